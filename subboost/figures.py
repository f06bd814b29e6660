"""The book's chapter figures, built from the tidy tables of :mod:`subboost.experiments`.

Each function takes a DataFrame, draws one figure with labelled axes (units in brackets) and
returns the matplotlib Figure; the notebooks only call them. Style: :mod:`subboost.plotting`.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

SUBLAYER_ORDER = ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")


def _plt():
    import matplotlib.pyplot as plt

    return plt


def pick_layers(layers: Sequence[int]) -> list[int]:
    """First, middle and last residual block (paper Fig. 2a-c)."""
    layers = sorted(set(int(x) for x in layers))
    picks = [layers[0], layers[len(layers) // 2], layers[-1]]
    return list(dict.fromkeys(picks))


def stable_rank_by_sublayer(ranks: pd.DataFrame, metric: str = "stable_rank"):
    """Paper Fig. 2a-c: the metric of each sublayer in three blocks, one bar per N."""
    import seaborn as sns

    plt = _plt()
    layers = pick_layers(ranks.layer)
    fig, axes = plt.subplots(1, len(layers), figsize=(4.0 * len(layers), 3.6), sharey=True)
    axes = np.atleast_1d(axes)
    order = [s for s in SUBLAYER_ORDER if s in set(ranks.sublayer)] or sorted(set(ranks.sublayer))
    for ax, layer in zip(axes, layers):
        sub = ranks[ranks.layer == layer]
        sns.barplot(data=sub, x="sublayer", y=metric, hue="n_tasks", order=order, ax=ax, palette="viridis")
        ax.set_title(f"block {layer}")
        ax.set_xlabel("sublayer")
        ax.set_ylabel(f"{metric.replace('_', ' ')} [dimensions]")
        ax.tick_params(axis="x", rotation=30)
        if ax is not axes[-1] and ax.get_legend() is not None:
            ax.get_legend().remove()
    axes[-1].legend(title="merged experts N", loc="upper right")
    return fig


def rank_vs_n(ranks: pd.DataFrame, metrics: Sequence[str] = ("stable_rank", "energy_rank_50", "energy_rank_30")):
    """Paper Fig. 2d, 8, 9: mean (± spread over block matrices) of rank metrics against N."""
    plt = _plt()
    metrics = [m for m in metrics if m in ranks]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.0 * len(metrics), 3.4))
    axes = np.atleast_1d(axes)
    for ax, metric in zip(axes, metrics):
        for ltype, sub in ranks.groupby("layer_type"):
            g = sub.groupby("n_tasks")[metric]
            mean, lo, hi = g.mean(), g.quantile(0.25), g.quantile(0.75)
            ax.plot(mean.index, mean.values, marker="o", label=f"{ltype} (mean)")
            ax.fill_between(mean.index, lo.values, hi.values, alpha=0.2)
        ax.set_xlabel("merged experts N")
        ax.set_ylabel(f"{metric.replace('_', ' ')} [dimensions]")
        ax.set_xticks(sorted(ranks.n_tasks.unique()))
        ax.legend()
    fig.suptitle("Task Arithmetic: rank of the merged block matrices (band: 25-75% of matrices)")
    return fig


def spectra_vs_n(spectra: pd.DataFrame, normalised: bool = False):
    """Paper Fig. 3: singular values of one block matrix of the merged task vector, per N."""
    plt = _plt()
    keys = list(dict.fromkeys(spectra.key))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    col = "sigma_normalised" if normalised else "sigma"
    for ax, key in zip(axes[0], keys):
        sub = spectra[spectra.key == key]
        cmap = plt.get_cmap("viridis")
        counts = sorted(sub.n_tasks.unique())
        for i, n in enumerate(counts):
            s = sub[sub.n_tasks == n]
            ax.plot(s["index"] + 1, s[col], color=cmap(i / max(1, len(counts) - 1)), label=f"N = {n}")
        ax.set_yscale("log")
        ax.set_xscale("log")
        row = sub.iloc[0]
        ax.set_title(f"block {row.layer} {row.sublayer}")
        ax.set_xlabel("singular value index i [1 = largest]")
        ax.set_ylabel("σ_i / σ_1 [ratio]" if normalised else "σ_i [weight units]")
        ax.legend()
    return fig


def method_rank_bars(ranks: pd.DataFrame, metric: str = "stable_rank"):
    """Paper Fig. 1a / 6: mean rank metric of the merged block matrices per method, ± SB."""
    import seaborn as sns

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    sns.barplot(data=ranks, x="method", y=metric, hue="boosted", ax=ax, errorbar=("pi", 50))
    ax.set_xlabel("merging method")
    ax.set_ylabel(f"mean {metric.replace('_', ' ')} [dimensions]")
    ax.legend(title="Subspace Boosting")
    return fig


def rank_vs_accuracy(points: pd.DataFrame, x: str = "stable_rank", y: str = "normalized_accuracy"):
    """Merged accuracy against mean stable rank, one point per (method, N)."""
    import seaborn as sns

    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    sns.scatterplot(data=points, x=x, y=y, hue="method", style="n_tasks", s=70, ax=ax)
    ax.set_xlabel(f"mean {x.replace('_', ' ')} of block matrices [dimensions]")
    ax.set_ylabel("normalised accuracy [%]" if "normalized" in y else "accuracy [%]")
    return fig


def expert_accuracies(experts: pd.DataFrame):
    """Per task: chance, zero-shot and fine-tuned test accuracy (from :func:`subboost.zoo.report.expert_table`)."""
    plt = _plt()
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
    plt = _plt()
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
    import seaborn as sns

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    sns.lineplot(data=scales, x="layer", y="sb_over_iso", hue="sublayer", marker="o", ax=ax)
    ax.set_xlabel("residual block l")
    ax.set_ylabel("σ_1 / mean(σ) of Σ Δ_i [ratio]")
    return fig
