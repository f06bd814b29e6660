"""Chapter 3 -- Subspace Boosting: results, ablations and timings
(``notebooks/03_subspace_boosting.md``); paper Sec. 4.1 (Alg. 1), 5.1, 5.2, Tables 1, 3, 4,
Supp. C (Table 6), Supp. F (Table 7).

Alg. 1 itself lives in :mod:`subboost.boost` and the merging methods in
:mod:`subboost.merging`; the results tables (Tables 1, 4, 7) are
:func:`subboost.experiments.results_table`. This module holds what only this chapter uses: the
ablation tables (Tables 3, 7), ESM's activations, the Iso-C / SB scale factor, the merge
timings (Table 6 analogue), the benchmark run, and the chapter's figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import pandas as pd
import torch

from subboost.experiments import ResultCache, Suite, Variant, merge_variant, results_table
from subboost.spectral import spectra_table
from subboost.taskvector import StateDict

if TYPE_CHECKING:
    from subboost.executor import Executor



# ----------------------------------------------------------------------------- runners


def ablation_table(suite: Suite, task_counts: Iterable[int], variants: Sequence[Variant],
                   alpha_grid: Sequence[float] | None = None, progress: bool = True,
                   executor: "str | Executor | None" = None, ray_address: str | None = None,
                   cache: ResultCache | None = None) -> pd.DataFrame:
    """Like :func:`subboost.experiments.results_table` without the reference rows (Tables 3, 7)."""
    long = results_table(suite, task_counts, variants, alpha_grid=alpha_grid, progress=progress,
                         executor=executor, ray_address=ray_address, cache=cache)
    return long[~long.method.isin(["Zero-shot", "Fine-tuned"])].reset_index(drop=True)


def time_merges(vectors: Mapping[str, StateDict], variants: Sequence[Variant], repeats: int = 3) -> pd.DataFrame:
    """Median wall time (seconds) of each variant's merge over ``repeats`` runs, the variants
    interleaved run by run so that a busy machine slows them alike (Table 6 analogue)."""
    times: dict[str, list[float]] = {v.label: [] for v in variants}
    for _ in range(max(1, int(repeats))):
        for v in variants:
            times[v.label].append(merge_variant(vectors, v, lines_b=(v.lines_b_grid or (None,))[0])[1])
    out = pd.DataFrame({"method": list(times), "median_seconds": [float(pd.Series(t).median()) for t in times.values()],
                        "min_seconds": [min(t) for t in times.values()]}).set_index("method")
    return out


def iso_vs_sb_scale(delta: Mapping[str, torch.Tensor]) -> pd.DataFrame:
    """Per block matrix of a merged task vector: SB(β=0) = S[0]·UVᵀ and Iso-C = mean(S)·UVᵀ share
    UVᵀ and differ by the scalar S[0]/mean(S). Returns that ratio per matrix."""
    spectra = spectra_table(delta)
    g = spectra.groupby(["key", "stack", "layer", "sublayer", "layer_type"], sort=False).sigma
    out = g.agg(sigma_max="max", sigma_mean="mean").reset_index()
    out["sb_over_iso"] = out.sigma_max / out.sigma_mean
    return out


def esm_activations(suite, tasks: Sequence[str], n_images: int = 64, max_samples: int = 512,
                    seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Inputs of every visual block matrix on unlabelled validation images, per task, captured
    from that task's expert (ESM's data requirement; labels are never used)."""
    from subboost.esm import capture_block_inputs
    from subboost.evaluate import normalize_batch
    from subboost.taskvector import select_block_keys

    keys = [k for k in select_block_keys(suite.base_state) if k.startswith("visual.")]
    rel = [k[len("visual."):] for k in keys]
    acts = []
    for t in tasks:
        visual = suite.load_visual(suite.expert_state(t))
        images = suite.data(t, "val").images[:n_images]
        batch = normalize_batch(images.to(suite.device))
        got = capture_block_inputs(visual, rel, [batch], forward=lambda m, b: m(b),
                                   max_samples=max_samples, seed=seed)
        acts.append({"visual." + k: v.cpu() for k, v in got.items()})
    return acts


def run_benchmarks(out_dir: str | Path, sections: Sequence[str] = ("sb", "hogsvd"), quick: bool = True,
                   threads: int | None = None, device: str = "cpu", timeout_s: float = 1800) -> pd.DataFrame:
    """Run ``benchmarks/run.py`` (fast routes against their references at the real
    ViT-B/32 sizes, one run, alternating) in a fresh process and return its table.

    The script lives in the repository, not in the installed package: outside a checkout this
    raises ``FileNotFoundError`` naming the path it looked for. ``device`` (``cpu``, ``cuda``)
    is where the sb and hogsvd sections run. Results are written to
    ``out_dir/benchmarks.csv`` (and ``.json``)."""
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "run.py"  # subboost/chapters/ -> checkout
    if not script.is_file():
        raise FileNotFoundError(f"{script}: the benchmark script comes with the repository checkout, "
                                "not with the installed package")
    out_dir = Path(out_dir)
    cmd = [sys.executable, str(script), "--sections", *sections, "--out", str(out_dir), "--name", "benchmarks"]
    if quick:
        cmd.append("--quick")
    if threads:
        cmd += ["--threads", str(int(threads))]
    cmd += ["--device", str(device)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"{script} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    return pd.read_csv(out_dir / "benchmarks.csv")


# ----------------------------------------------------------------------------- figures


def expert_accuracies(experts: pd.DataFrame):
    """Per task: chance, zero-shot and fine-tuned test accuracy (from :func:`subboost.zoo.report.expert_table`)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.0, 3.6))
    x = range(len(experts))
    ax.bar([i - 0.2 for i in x], 100 * experts.zeroshot, width=0.4, label="zero-shot (base)")
    ax.bar([i + 0.2 for i in x], 100 * experts.finetuned, width=0.4, label="fine-tuned (expert)")
    ax.scatter(list(x), 100 * experts.chance, marker="_", s=120, color="black", label="chance", zorder=3)
    ax.set_xticks(list(x))
    ax.set_xticklabels(experts.task, rotation=60, ha="right", fontsize=8)
    ax.set_xlabel("task")
    ax.set_ylabel("test accuracy [%]")
    ax.set_ylim(0, 105)
    ax.legend(ncol=3, fontsize=8, loc="lower right")
    return fig


def results_vs_n(long: pd.DataFrame, value: str = "normalized_accuracy", methods: Sequence[str] | None = None):
    """Merged accuracy against the number of merged experts, one line per method."""
    import matplotlib.pyplot as plt

    df = long if methods is None else long[long.method.isin(methods)]
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for method, sub in df.groupby("method", sort=False):
        sub = sub.sort_values("n_tasks")
        style = "--" if method in ("Zero-shot", "Fine-tuned") else "-"
        ax.plot(sub.n_tasks, sub[value], style, marker="o", label=method)
    ax.set_xlabel("merged experts N")
    ax.set_ylabel("normalised accuracy [%]" if "normalized" in value else "accuracy [%]")
    ax.set_xticks(sorted(df.n_tasks.unique()))
    ax.legend(ncol=2, fontsize=8)
    return fig


def iso_vs_sb(scales: pd.DataFrame):
    """Per block matrix, the factor S[0]/mean(S) by which SB(β=0) exceeds Iso-C (same UVᵀ)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    sns.lineplot(data=scales, x="layer", y="sb_over_iso", hue="sublayer", marker="o", ax=ax)
    ax.set_xlabel("residual block l")
    ax.set_ylabel("σ_1 / mean(σ) of Σ Δ_i [ratio]")
    return fig
