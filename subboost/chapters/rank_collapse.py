"""Chapter 1 -- Rank collapse of merged task vectors (``notebooks/01_rank_collapse.md``);
paper Sec. 3, Fig. 1a, 2, 3, Supp. D (Fig. 6-9).

Merging more experts with Task Arithmetic lowers the stable rank (Eq. 2) and the energy ranks
of the merged block matrices. This module holds what only this chapter defines: the spectra
of selected matrices per task count (:func:`spectra_by_count`), rank metrics per merging
method (:func:`method_rank_comparison`) and the chapter's figures. The rank table itself,
:func:`subboost.experiments.rank_collapse_table`, is shared (the zoo's calibration uses it).

Chapter 5 (:mod:`subboost.chapters.language`) reuses this chapter's rank runners and figures
on the language zoo, the way a later chapter of a textbook reuses an earlier one's code.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from subboost.experiments import TABLE1_VARIANTS, Suite, Variant, merge_variant, task_subsets
from subboost.merging import merge
from subboost.spectral import rank_table, spectra_table

SUBLAYER_ORDER = ("attn.in_proj", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")


# ----------------------------------------------------------------------------- runners


def spectra_by_count(suite: Suite, task_counts: Sequence[int], keys: Sequence[str] | None = None,
                     method: str = "ta", **params) -> pd.DataFrame:
    """Singular value spectra of selected block matrices of the merged task vector for each N (Fig. 3)."""
    frames = []
    for n, tasks in task_subsets(suite, task_counts).items():
        delta = merge(suite.task_vectors(tasks), method, **params)
        if keys is not None:
            delta = {k: delta[k] for k in keys}
        df = spectra_table(delta)
        df.insert(0, "n_tasks", n)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


def method_rank_comparison(suite: Suite, n_tasks: int, variants: Sequence[Variant] = TABLE1_VARIANTS) -> pd.DataFrame:
    """Rank metrics of the merged block matrices for each variant at one N (paper Fig. 1a, 6);
    LiNeS variants are skipped (a per-layer scalar does not change any rank metric)."""
    tasks = task_subsets(suite, [n_tasks])[n_tasks]
    vectors = suite.task_vectors(tasks)
    frames = []
    for v in variants:
        if v.lines_b_grid:
            continue
        delta, _ = merge_variant(vectors, v)
        df = rank_table(delta)
        df.insert(0, "variant", v.label)
        df.insert(1, "method", v.label.split("+")[0])
        df.insert(2, "boosted", v.boost_beta is not None)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


# ----------------------------------------------------------------------------- figures
# Each takes a tidy table, draws one figure with labelled axes (units in brackets) and returns
# the matplotlib Figure; the notebook saves it (:func:`subboost.plotting.save_figure`).


def pick_layers(layers: Sequence[int]) -> list[int]:
    """First, middle and last residual block (paper Fig. 2a-c)."""
    layers = sorted(set(int(x) for x in layers))
    picks = [layers[0], layers[len(layers) // 2], layers[-1]]
    return list(dict.fromkeys(picks))


def stable_rank_by_sublayer(ranks: pd.DataFrame, metric: str = "stable_rank"):
    """Paper Fig. 2a-c: the metric of each sublayer in three blocks, one bar per N."""
    import matplotlib.pyplot as plt
    import seaborn as sns

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
    import matplotlib.pyplot as plt

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
    import matplotlib.pyplot as plt

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
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    sns.barplot(data=ranks, x="method", y=metric, hue="boosted", ax=ax, errorbar=("pi", 50))
    ax.set_xlabel("merging method")
    ax.set_ylabel(f"mean {metric.replace('_', ' ')} [dimensions]")
    ax.legend(title="Subspace Boosting")
    return fig


def rank_vs_accuracy(points: pd.DataFrame, x: str = "stable_rank", y: str = "normalized_accuracy"):
    """Merged accuracy against mean stable rank, one point per (method, N)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    sns.scatterplot(data=points, x=x, y=y, hue="method", style="n_tasks", s=70, ax=ax)
    ax.set_xlabel(f"mean {x.replace('_', ' ')} of block matrices [dimensions]")
    ax.set_ylabel("normalised accuracy [%]" if "normalized" in y else "accuracy [%]")
    return fig
