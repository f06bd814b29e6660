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
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

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
    calibration: pd.DataFrame | None = None

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
               interference: bool = True, progress: bool = False, calibration: bool = False) -> ZooReport:
    """The report of the zoo built in ``folder`` (its ``build.json``) loaded as ``suite``.

    With ``calibration`` the report adds :func:`calibration_section` (its TA merges at 8 / 14 /
    20 tasks are those of the interference table, whose task counts then include them)."""
    build = json.loads((Path(folder) / "build.json").read_text())
    counts = sorted(set(task_counts) | (set(_calibration_counts(suite)) if calibration else set()))
    inter = interference_table(suite, counts, progress=progress) if interference else None
    calib = calibration_section(suite, build.get("config", {}), inter, progress=progress) if calibration else None
    return ZooReport(build=build, experts=expert_table(suite), interference=inter, calibration=calib)


# ------------------------------------------------------------------------------- calibration

#: merge sizes of the calibration (paper Table 1) and of its stable-rank trend (paper Fig. 2, 7)
CALIBRATION_COUNTS = (8, 14, 20)
RANK_TREND_COUNTS = (4, 8, 14, 20)


def suite_config(suite) -> dict | None:
    """The zoo config (``config.json`` in the checkpoint root) a suite was loaded from, or None
    (real checkpoints, stubs)."""
    root = getattr(suite, "info", {}).get("checkpoint_root")
    path = Path(root) / "config.json" if root else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def _calibration_counts(suite, counts: Sequence[int] = CALIBRATION_COUNTS) -> list[int]:
    return [n for n in counts if 2 <= n <= len(suite.task_names)]


def calibration_measurements(suite, config: Mapping | None = None, interference: pd.DataFrame | None = None,
                             progress: bool = False) -> dict[str, float]:
    """The zoo's values of the calibration quantities (:mod:`subboost.calibration`).

    Task vectors of all tasks: pairwise cosine (mean, max over pairs), the low-rank measures of
    every block matrix and ‖Δ‖/‖θ0‖ (mean over tasks); the accuracy each expert keeps with its
    block matrices truncated to 10% of their size (TSV-Compress), relative to its own test
    accuracy, mean over tasks; zero-shot, fine-tuned, TA α and TA normalised accuracy at 8 / 14
    / 20 tasks (from ``interference`` when it has them, else merged here on the report's α
    grid); the TA stable-rank trend over N = 4, 8, 14, 20; the expert recipe from ``config``.
    Task counts larger than the suite are skipped.
    """
    from subboost import calibration as C
    from subboost.evaluate import merged_state
    from subboost.experiments import rank_collapse_table, reference_rows

    vectors = suite.task_vectors()
    base = suite.base_state
    out: dict[str, float] = {}
    pairs = C.off_diagonal(C.pairwise_cosine(vectors))
    out["cosine_mean"], out["cosine_max"] = float(pairs.mean()), float(pairs.max())
    out.update(C.lowrank_summary(C.block_table(base, vectors)))
    out["relative_size"] = sum(C.relative_size(base, d) for d in vectors.values()) / len(vectors)
    kept = []
    for task, delta in vectors.items():
        acc = suite.accuracy(merged_state(suite, C.truncate_task_vector(delta), 1.0), task, "test")
        kept.append(acc / suite.finetuned_accuracy(task))
    out["lowrank_accuracy_retained"] = sum(kept) / len(kept)
    del vectors
    counts = _calibration_counts(suite)
    if counts:
        have = set() if interference is None else set(interference[interference.method == "TA"].n_tasks)
        ta = interference if set(counts) <= have else interference_table(suite, counts, boost_beta=None,
                                                                            progress=progress)
        ta = ta[ta.method == "TA"].set_index("n_tasks")
        ref = reference_rows(suite, counts).set_index(["method", "n_tasks"])
        for n in counts:
            zs, ft = float(ref.loc[("Zero-shot", n), "accuracy"]), float(ref.loc[("Fine-tuned", n), "accuracy"])
            out.update({f"zeroshot_{n}": zs, f"finetuned_{n}": ft, f"gap_{n}": ft - zs,
                        f"alpha_ta_{n}": float(ta.loc[n, "alpha"]),
                        f"ta_normalised_{n}": float(ta.loc[n, "normalized_accuracy"])})
    rank_counts = _calibration_counts(suite, RANK_TREND_COUNTS)
    if len(rank_counts) >= 2:
        trend = C.stable_rank_trend(rank_collapse_table(suite, rank_counts))
        out["stable_rank_share_falling"] = trend.pop("share_falling")
        out.update(trend)
    if config:
        out.update(C.recipe_measurements(config))
    return out


def calibration_section(suite, config: Mapping | None = None, interference: pd.DataFrame | None = None,
                        progress: bool = False, column: str = "zoo") -> pd.DataFrame:
    """:func:`subboost.calibration.calibration_table` of the suite's measurements."""
    from subboost.calibration import calibration_table

    return calibration_table(calibration_measurements(suite, config, interference, progress), column=column)


def _cell(value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "—"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value).replace("|", "/")


def markdown_table(df: pd.DataFrame) -> str:
    """A DataFrame as a GitHub-flavoured Markdown table (numbers to 3 significant digits)."""
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * df.shape[1]]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_calibration(table: pd.DataFrame, out_dir: str | Path, stem: str = "calibration") -> tuple[Path, Path]:
    """Write the calibration table as ``{stem}.csv`` and ``{stem}.md`` into ``out_dir``
    (each published atomically); returns both paths."""
    from subboost.checkpoints import atomic_path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out / f"{stem}.csv", out / f"{stem}.md"
    with atomic_path(csv_path) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(md_path) as tmp:
        tmp.write_text(markdown_table(table), encoding="utf-8")
    return csv_path, md_path
