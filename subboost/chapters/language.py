"""Chapter 5 -- Language experts: a Table 2 analogue (``notebooks/05_language.md``); paper
Sec. 5.1, Table 2 (T5), here on the MiniLM language zoo (:mod:`subboost.langzoo`).

This module holds what only this chapter uses: Table 2's rows (:data:`TABLE2_VARIANTS`), the
results table with per-task accuracies (:func:`table2_results`), the task counts that fit the
language zoo (:func:`language_task_counts`), and the zoo's task overview and build costs. It
reuses chapter 1's rank runners and figures (:mod:`subboost.chapters.rank_collapse`) and
chapter 3's accuracy-against-N figure (:mod:`subboost.chapters.subspace_boosting`).
"""

from __future__ import annotations

import json
from typing import Iterable, Sequence

import pandas as pd
from tqdm import tqdm  # plain text bar: the book kernels have no ipywidgets

from subboost import experiments as ex
from subboost.langzoo import tasks as T
from subboost.langzoo.suite import LanguageSuite

#: Table 2's rows; the paper's "Subspace Boosting (ours)" row is TA + LiNeS + SB (paper text).
TABLE2_VARIANTS = (
    ex.Variant("TA", "ta"),
    ex.Variant("TIES", "ties", {"top_k": 0.2}),
    ex.Variant("Consensus", "consensus", {"k": 2, "lambdas": 0.4}),
    ex.Variant("TA+LiNeS", "ta", lines_b_grid=ex.LINES_B),
    ex.Variant("TA+SB", "ta", boost_beta=0.0),
    ex.Variant("TA+LiNeS+SB", "ta", boost_beta=0.0, lines_b_grid=ex.LINES_B),
)
PAPER_ROW_FOR = {"SB": "TA+LiNeS+SB"}  # TABLE2_T5 label -> our row


def table2_results(suite: ex.Suite, task_counts: Iterable[int], variants: Sequence[ex.Variant] = TABLE2_VARIANTS,
                  alpha_grid: Sequence[float] | None = None, progress: bool = True,
                  reference: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(long, per_task)``: the long results table (as :func:`subboost.experiments.results_table`,
    with zero-shot and fine-tuned rows when ``reference``) and the per-task test accuracies
    (fractions) of every merged model. :func:`subboost.experiments.evaluate_variant` tunes α
    with :func:`subboost.evaluate.tune_and_test`, as for the vision suites."""
    subsets = ex.task_subsets(suite, task_counts)
    rows, per_task = [], []
    jobs = [(n, v) for n in subsets for v in variants]
    cache: dict[int, dict] = {}
    for n, variant in tqdm(jobs, desc="merge + evaluate", disable=not progress):
        if n not in cache:
            cache.clear()
            cache[n] = suite.task_vectors(subsets[n])
        row = ex.evaluate_variant(suite, subsets[n], variant, cache[n], alpha_grid)
        df = row.pop("per_task").assign(method=variant.label, n_tasks=n)
        per_task.append(df)
        rows.append(row)
    long = pd.DataFrame(rows)
    if reference:
        long = pd.concat([ex.reference_rows(suite, task_counts), long], ignore_index=True)
    return long, pd.concat(per_task, ignore_index=True)


def language_task_counts(suite: ex.Suite, task_counts: Sequence[int], profile: str) -> tuple[list[int], list[int]]:
    """``(used, skipped)``: :func:`subboost.experiments.task_counts_for` on the requested counts
    that fit the suite (2 to its number of tasks); the rest are returned as skipped, for the
    chapter to say so (the smoke profile skips none: it always uses 2 and 3)."""
    if profile == "smoke":
        return ex.task_counts_for(suite, task_counts, profile), []
    available = len(suite.task_names)
    used = [int(n) for n in task_counts if 2 <= int(n) <= available]
    skipped = sorted(int(n) for n in task_counts if not 2 <= int(n) <= available)
    if not used:
        raise ValueError(f"parameter 'task_counts': none of {list(task_counts)} fits the {available} tasks "
                         f"of this suite (2..{available})")
    return ex.task_counts_for(suite, used, profile), skipped


def task_overview(suite: LanguageSuite, examples: int = 1) -> pd.DataFrame:
    """Per task: classes, what decides the class, an example test sentence, chance, zero-shot
    and fine-tuned test accuracy (percent)."""
    rows = []
    for t in suite.task_names:
        spec = T.get_task(t)
        data = suite.data(t, "test")
        rows.append(dict(task=t, classes=", ".join(spec.classnames), decided_by=spec.summary,
                         example=" | ".join(f"{data.texts[i]} → {spec.classnames[data.labels[i]]}"
                                            for i in range(min(examples, len(data)))),
                         chance=100 / spec.num_classes, zero_shot=100 * suite.zeroshot_accuracy(t),
                         fine_tuned=100 * suite.finetuned_accuracy(t)))
    return pd.DataFrame(rows).set_index("task")


def build_costs(suite: LanguageSuite) -> pd.DataFrame:
    """Per expert: fine-tuning seconds (training only, and with its evaluations), steps, seconds
    per step, final training loss — read from the build records."""
    cfg = suite.config
    rows = []
    for t in suite.task_names:
        rec = json.loads((suite.folder / "experts" / f"{t}.json").read_text())
        loss = rec.get("loss", [])
        tail = loss[-10:] or [float("nan")]
        rows.append(dict(task=t, train_seconds=rec.get("train_seconds", float("nan")),
                         expert_seconds=rec.get("seconds", float("nan")), steps=cfg.steps,
                         seconds_per_step=rec.get("train_seconds", float("nan")) / max(1, cfg.steps),
                         final_loss=sum(tail) / len(tail)))
    return pd.DataFrame(rows).set_index("task")


def paper_table2_numbers() -> dict[str, str]:
    """The paper's Table 2 (T5; 8 QA / 7 NLP tasks) numbers as the chapter's introduction quotes
    them (from :data:`subboost.paper.TABLE2_T5`)."""
    from subboost.paper import TABLE2_T5

    def pair(row: str) -> str:
        return " / ".join(f"{v:.1f}%" for v in TABLE2_T5[row])

    return {"paper_t2_ta": pair("TA"), "paper_t2_ft": pair("Fine-tuned"), "paper_t2_sb": pair("SB")}
