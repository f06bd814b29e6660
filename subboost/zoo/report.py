"""The zoo's report card: is it a good stand-in for the paper's setting?

A zoo resembles the real one when fine-tuned ≫ zero-shot, each expert learned something its
base did not know, and merging more experts interferes (Task Arithmetic's normalised accuracy
on the first tasks drops when more experts join the merge). :func:`expert_table` and
:func:`interference_table` measure this; :func:`zoo_report` adds the build's own record and
the acceptance thresholds of the zoo's design, so that ``python -m subboost.zoo
report`` and the book print measured numbers, never typed ones.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pandas as pd

#: an expert is "specialised" when it beats its own zero-shot accuracy by this much ...
MIN_EXPERT_GAIN = 0.10
#: ... or is at least this accurate
MIN_EXPERT_ACC = 0.95
#: the ``ci`` profile's budgets and targets
MAX_BUILD_S = 600.0
MIN_MEAN_FINETUNED = 0.85
MIN_ZEROSHOT_GAP = 0.25
#: α grid of the interference check: the papers' TA grid starts at 0.1, but merges of many
#: large task vectors (the zoo's are 5-9% of the weights' norm) peak below it
REPORT_ALPHAS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.7, 1.0)


def expert_table(suite, split: str = "test") -> pd.DataFrame:
    """Per task: classes, chance, zero-shot and fine-tuned accuracy (recorded at build time),
    the gain, and whether the expert is specialised (gain ≥ 10 points or accuracy ≥ 95%)."""
    df = suite.reference(split=split)
    df["gain"] = df.finetuned - df.zeroshot
    df["specialised"] = (df.gain >= MIN_EXPERT_GAIN) | (df.finetuned >= MIN_EXPERT_ACC)
    return df


def interference_table(suite, task_counts: Sequence[int] = (8, 20), boost_beta: float | None = 0.0,
                       alpha_grid: Sequence[float] | None = REPORT_ALPHAS, progress: bool = False) -> pd.DataFrame:
    """Task Arithmetic (and TA+SB when ``boost_beta`` is not None) merged over the first N tasks
    for each N, α chosen on validation, scored on the test splits: normalised accuracy on the
    first min(task_counts) tasks (the same tasks for every N) and on all N tasks, in percent
    (:func:`subboost.experiments.results_table`)."""
    from subboost.experiments import Variant, results_table

    variants = [Variant("TA", "ta")] + ([Variant("TA+SB", "ta", boost_beta=boost_beta)] if boost_beta is not None else [])
    long = results_table(suite, task_counts, variants, alpha_grid=alpha_grid, progress=progress)
    long = long[long.method.isin([v.label for v in variants])]
    long = long.rename(columns={"first_normalized_accuracy": "shared_normalized_accuracy"})
    return long[["method", "n_tasks", "alpha", "shared_normalized_accuracy", "normalized_accuracy", "accuracy"]] \
        .reset_index(drop=True)


@dataclass
class ZooReport:
    """Measured properties of a zoo against its design targets."""

    build: dict
    experts: pd.DataFrame
    interference: pd.DataFrame | None

    def checks(self) -> pd.DataFrame:
        """One row per target: the measured value, the target, and whether it is met."""
        ft, zs = float(self.experts.finetuned.mean()), float(self.experts.zeroshot.mean())
        rows = [
            ("build time (s)", self.build.get("timings", {}).get("total_s", float("nan")), f"≤ {MAX_BUILD_S:.0f}",
             self.build.get("timings", {}).get("total_s", float("inf")) <= MAX_BUILD_S),
            ("mean fine-tuned accuracy", ft, f"≥ {MIN_MEAN_FINETUNED:.2f}", ft >= MIN_MEAN_FINETUNED),
            ("mean zero-shot gap", ft - zs, f"≥ {MIN_ZEROSHOT_GAP:.2f}", ft - zs >= MIN_ZEROSHOT_GAP),
            ("specialised experts", int(self.experts.specialised.sum()), f"= {len(self.experts)}",
             bool(self.experts.specialised.all())),
        ]
        if self.interference is not None and len(self.interference):
            ta = self.interference[self.interference.method == "TA"].sort_values("n_tasks")
            drop = float(ta.shared_normalized_accuracy.iloc[0] - ta.shared_normalized_accuracy.iloc[-1])
            rows.append((f"TA interference: shared-task drop {ta.n_tasks.iloc[0]}→{ta.n_tasks.iloc[-1]} (points)",
                         drop, "> 0", drop > 0))
        return pd.DataFrame(rows, columns=["check", "measured", "target", "met"])


def zoo_report(suite, folder: str | Path, task_counts: Sequence[int] = (8, 20),
               interference: bool = True, progress: bool = False) -> ZooReport:
    """The report of the zoo built in ``folder`` (its ``build.json``) loaded as ``suite``."""
    build = json.loads((Path(folder) / "build.json").read_text())
    inter = interference_table(suite, task_counts, progress=progress) if interference else None
    return ZooReport(build=build, experts=expert_table(suite), interference=inter)
