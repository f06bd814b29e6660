"""Shared matplotlib / seaborn helpers for the book's chapters.

One look for every figure (:func:`book_style`), axes that always carry a label and a unit
(:func:`label_axes`), log-log data with a fitted power law (:func:`loglog_with_fit`), saving
beside the executed notebook (:func:`save_figure`) and a "paper vs ours" table
(:func:`paper_vs_ours`).

Nothing here changes global state on import; :func:`apply_book_style` changes matplotlib's
rcParams when a notebook calls it (once, at the top).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

#: Colour-blind-safe palette (seaborn "colorblind"), in a fixed order.
PALETTE = "colorblind"


def book_style() -> dict[str, Any]:
    """The rcParams of every figure in the book (a fresh dict on every call)."""
    return {
        "figure.dpi": 110,
        "savefig.dpi": 150,
        "savefig.bbox": "tight",
        "figure.figsize": (7.0, 4.2),
        "figure.constrained_layout.use": True,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.titlesize": 11,
        "axes.labelsize": 10,
        "legend.fontsize": 9,
        "legend.frameon": False,
        "xtick.labelsize": 9,
        "ytick.labelsize": 9,
        "font.family": "DejaVu Sans",
        "mathtext.fontset": "dejavusans",
    }


def apply_book_style() -> None:
    """Apply :func:`book_style` and the seaborn palette to matplotlib (call once per notebook)."""
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    mpl.rcParams.update(book_style())


def colors(n: int) -> list[tuple[float, float, float]]:
    """``n`` colours of the book palette."""
    import seaborn as sns

    return list(sns.color_palette(PALETTE, n))


def label_axes(ax: Any, xlabel: str, ylabel: str, title: str | None = None) -> Any:
    """Set both axis labels (required: write the unit in brackets, or "[dimensionless]").

    Raises ``ValueError`` for an empty label so no figure leaves the book unlabelled.
    """
    if not xlabel.strip() or not ylabel.strip():
        raise ValueError("both axis labels are required (with units)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return ax


def power_of_two_ticks(ax: Any, values: Iterable[float], axis: str = "x") -> None:
    """Put plain-number ticks at ``values`` on a log axis (e.g. task counts 1, 2, 4, ...)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    vals = sorted(set(float(v) for v in values))
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_locator(FixedLocator(vals))
    fmt = ScalarFormatter()
    fmt.set_scientific(False)
    target.set_major_formatter(fmt)
    target.set_minor_formatter(NullFormatter())


def loglog_with_fit(
    ax: Any,
    x: Sequence[float],
    y: Sequence[float],
    *,
    label: str,
    color: Any = None,
    marker: str = "o",
    fit: Any = None,
    yerr: Sequence[float] | None = None,
) -> Any:
    """Plot y against x on log-log axes and, given a fit with ``slope`` and ``__call__``
    (:class:`subboost.synthetic.LogLogFit`), its dashed line with the slope in the legend."""
    x = np.asarray(x, float)
    y = np.asarray(y, float)
    if yerr is not None:
        ax.errorbar(x, y, yerr=yerr, fmt=marker, color=color, label=label, capsize=2, ms=4)
    else:
        ax.plot(x, y, marker, color=color, label=label, ms=4)
    if fit is not None:
        xs = np.geomspace(x.min(), x.max(), 50)
        ax.plot(xs, fit(xs), "--", color=color, lw=1,
                label=f"fit: slope {fit.slope:+.3f}" + (f" ± {fit.slope_stderr:.3f}" if math.isfinite(fit.slope_stderr) else ""))
    ax.set_xscale("log")
    ax.set_yscale("log")
    return ax


def save_figure(fig: Any, output_dir: str | Path | None, name: str, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Save ``fig`` as ``output_dir/name.{fmt}`` (folders created); nothing if ``output_dir``
    is ``None``. Returns the written paths."""
    if output_dir is None:
        return []
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out / f"{name}.{fmt}"
        fig.savefig(path)
        paths.append(path)
    return paths


def show(fig: Any, output_dir: str | Path | None, name: str) -> None:
    """Save ``fig`` (:func:`save_figure`), display it in the notebook and close it. Returns
    ``None`` so that a notebook cell ending with it shows only the figure."""
    import matplotlib.pyplot as plt

    save_figure(fig, output_dir, name)
    plt.show()
    plt.close(fig)


def paper_vs_ours(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """A table of claims: each row a mapping with ``claim``, ``paper`` (what the paper states
    or reports), ``ours`` (what this book measured, from an executed cell) and ``agrees``
    (True / False / None for "not comparable"); extra keys become extra columns.

    The ``agrees`` column is rendered as "yes" / "no" / "n/a" so the table reads plainly.
    Display it with ``.style`` in a notebook: pandas' plain HTML cuts long cells at 50
    characters.
    """
    df = pd.DataFrame(list(rows))
    for col in ("claim", "paper", "ours"):
        if col not in df.columns:
            raise ValueError(f"paper_vs_ours rows need a '{col}' entry")
    if "agrees" in df.columns:
        df["agrees"] = df["agrees"].map(lambda v: "n/a" if v is None else ("yes" if bool(v) else "no"))
    return df.set_index("claim")


# ----------------------------------------------------------------------------- chapter 2 figures
# Each takes the tables of :mod:`subboost.synthetic`'s chapter-2 experiments and returns the
# figure; the notebook shows and saves it.

_N_LABEL = "number of merged task vectors N [count]"


def _log_n_axes(ax: Any, task_counts: Sequence[int]) -> None:
    ax.set_xscale("log")
    ax.set_yscale("log")
    power_of_two_ticks(ax, task_counts)


def fig_part_spectra(parts: Mapping[str, Any]) -> Any:
    """Singular values of the parts of one task vector (label → 2-D tensor)."""
    import matplotlib.pyplot as plt
    import torch

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for (label, mat), col in zip(parts.items(), colors(len(parts))):
        s = torch.linalg.svdvals(mat).cpu().numpy()
        ax.semilogy(np.arange(1, s.size + 1), np.maximum(s, 1e-18), label=label, color=col)
    ax.set_ylim(bottom=1e-4)
    label_axes(ax, "singular value index k [count]", "singular value $\\sigma_k$ [a.u.]",
               "Spectra of the parts of one synthetic task vector")
    ax.legend()
    return fig


def fig_prop1(table: pd.DataFrame, fits: pd.DataFrame, task_counts: Sequence[int]) -> Any:
    """Prop. 1: ‖Δunique‖2 and ‖Δunique‖F (mean ± std over seeds) with fits, the bound B/√N
    and ‖Δcommon‖2, one panel per unique-part model."""
    import matplotlib.pyplot as plt

    kinds = list(dict.fromkeys(table.unique_parts))
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), sharey=True, squeeze=False)
    c = colors(3)
    for ax, kind in zip(axes[0], kinds):
        g = table[table.unique_parts == kind].drop(columns="unique_parts")
        m = g.groupby("N").agg(["mean", "std"])
        f = fits[fits.unique_parts == kind].set_index("quantity").fit
        loglog_with_fit(ax, m.index, m[("unique_spectral", "mean")], yerr=m[("unique_spectral", "std")],
                        label="$\\|\\Delta_{unique}\\|_2$", color=c[0], fit=f["unique_spectral"])
        loglog_with_fit(ax, m.index, m[("unique_frobenius", "mean")], marker="s",
                        label="$\\|\\Delta_{unique}\\|_F$", color=c[1], fit=f["unique_frobenius"])
        ax.plot(m.index, m[("bound", "mean")], "k-", lw=1.2, label="bound $B/\\sqrt{N}$ (Eq. 15)")
        ax.plot(m.index, m[("common_spectral", "mean")], "^:", color=c[2], ms=4, label="$\\|\\Delta_{common}\\|_2$")
        _log_n_axes(ax, task_counts)
        label_axes(ax, "number of averaged task vectors N [count]", "norm [a.u.]", f"unique parts: {kind}")
        ax.legend(loc="lower left", fontsize=7)
    return fig


def fig_prop2(means: pd.DataFrame, gap_fit: Any, task_counts: Sequence[int], betas: Sequence[float]) -> Any:
    """Prop. 2: stable ranks of Δm, Δcommon and SB_β(Δm) against N, and the gap with its fit."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    c = colors(2 + len(betas))
    ax = axes[0]
    ax.plot(means.index, means.srank_merged, "o-", color=c[0], label="$\\Delta_m$ (average)")
    ax.plot(means.index, means.srank_common, "s--", color=c[1], label="$\\Delta_{common}$")
    for b, col in zip(betas, c[2:]):
        ax.plot(means.index, means[f"srank_boosted_{b:g}"], "^:", color=col, label=f"SB$_{{\\beta={b:g}}}(\\Delta_m)$")
    _log_n_axes(ax, task_counts)
    label_axes(ax, "number of averaged task vectors N [count]", "stable rank [dimensionless]", "Stable rank (Eq. 2)")
    ax.legend(fontsize=8)
    loglog_with_fit(axes[1], means.index, means.srank_gap, color=c[0], fit=gap_fit,
                    label="$|\\mathcal{M}(\\Delta_m) - \\mathcal{M}(\\Delta_{common})|$")
    _log_n_axes(axes[1], task_counts)
    label_axes(axes[1], "number of averaged task vectors N [count]", "stable-rank gap [dimensionless]",
               "Gap to the common part")
    axes[1].legend(fontsize=8)
    return fig


def fig_prop3(means: pd.DataFrame, alphas: Sequence[float], task_counts: Sequence[int]) -> Any:
    """Prop. 3: the spectral norms of both parts of α Σ Δi for each α, and their ratio with
    the lower bounds of Eq. 26-28 (markers shrink with α so coinciding curves stay visible)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4))
    c = colors(len(alphas))
    for j, (a, col) in enumerate(zip(alphas, c)):
        g = means[means.alpha == a]
        axes[0].plot(g.N, g.common_spectral, "o-", color=col, ms=4, label=f"common, $\\alpha$={a:g}")
        axes[0].plot(g.N, g.unique_spectral, "s--", color=col, ms=4, label=f"unique, $\\alpha$={a:g}")
        axes[1].plot(g.N, g.ratio_spectral, "o-", color=col, ms=4 + 2.5 * (len(alphas) - 1 - j), alpha=0.7,
                     label=f"measured, $\\alpha$={a:g}")
    g = means[means.alpha == alphas[0]]
    axes[1].plot(g.N, g.bound_spectral, "k--", lw=1.2, label="lower bound, Eq. 27-28")
    axes[1].plot(g.N, g.bound_frobenius, "k:", lw=1.2, label="Frobenius bound, Eq. 26")
    for ax in axes:
        _log_n_axes(ax, task_counts)
    label_axes(axes[0], _N_LABEL, "spectral norm [a.u.]", "$\\|\\cdot\\|_2$ of both parts of $\\alpha\\sum\\Delta_i$")
    label_axes(axes[1], _N_LABEL, "common / unique ratio [dimensionless]",
               "$\\|\\Delta_{common}\\|_2 \\,/\\, \\|\\Delta_{unique}\\|_2$")
    axes[0].legend(fontsize=7, ncol=2)
    axes[1].legend(fontsize=8)
    return fig


def fig_prop4_grid(grid: pd.DataFrame, suppression: float) -> Any:
    """Prop. 4 in the proof's setting: the measured gain over (k_s, d_noise) with Eq. 29's
    boundary, and the gain per noise direction against r = ‖Δsignal‖F² / (d_noise σβ²)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4.2))
    piv = grid.pivot(index="d_noise", columns="signal_dims", values="gain")
    ks, dn = list(piv.columns), list(piv.index)
    lim = float(np.abs(piv.values).max())
    im = axes[0].imshow(piv.values, origin="lower", cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto",
                        extent=(ks[0] - 0.5, ks[-1] + 0.5, dn[0] - 0.5, dn[-1] + 0.5))
    lo, hi = min(ks[0], dn[0]) - 0.5, max(ks[-1], dn[-1]) + 0.5
    axes[0].plot([lo, hi], [lo, hi], "k--", lw=1.2, label="Eq. 29 boundary")
    axes[0].set_xlim(ks[0] - 0.5, ks[-1] + 0.5)
    axes[0].set_ylim(dn[0] - 0.5, dn[-1] + 0.5)
    fig.colorbar(im, ax=axes[0], label="gain $\\mathcal{L}_{TA} - \\mathcal{L}_{boost}$ [$\\sigma_\\beta^2$]")
    label_axes(axes[0], "signal directions $k_s$ [count]", "noise directions $d_{noise}$ [count]",
               "Measured gain (blue: boosting wins)")
    axes[0].grid(False)
    axes[0].legend(loc="upper left", fontsize=8, frameon=True, facecolor="white", framealpha=0.9)
    ax = axes[1]
    ratio = grid.ratio.to_numpy()
    per_dir = (grid.gain / grid.d_noise).to_numpy()
    win = grid.gain.to_numpy() > 0
    ax.scatter(ratio[win], per_dir[win], color=colors(1)[0], s=14, label="measured: boosting wins")
    ax.scatter(ratio[~win], per_dir[~win], color="tab:red", s=14, label="measured: TA wins")
    xs = np.geomspace(ratio.min(), ratio.max(), 100)
    ax.plot(xs, (1 - suppression) ** 2 * xs - 1, "k-", lw=1, label="closed form $(1-c)^2 r - 1$")
    ax.axvline(1.0, color="k", ls="--", lw=1, label="Eq. 29 boundary r = 1")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xscale("log")
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ticks = [t for t in (0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50) if ratio.min() <= t * 1.001 and t <= ratio.max() * 1.001]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels collide on a short log axis
    label_axes(ax, "$r = \\|\\Delta_{signal}\\|_F^2 / (d_{noise}\\,\\sigma_\\beta^2)$ [dimensionless]",
               "gain per noise direction [$\\sigma_\\beta^2$]", "The sign flips at r = 1")
    ax.legend(fontsize=8)
    return fig


def fig_prop4_relaxed(sweep: pd.DataFrame, signal_dims: int, noise_dims: int) -> Any:
    """Prop. 4 outside its assumptions: gain against s/σβ per setting, with Eq. 29's boundary."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    settings = list(dict.fromkeys(sweep.setting))
    for label, col in zip(settings, colors(len(settings))):
        g = sweep[sweep.setting == label]
        ax.plot(g.signal_scale, g.gain, "-", color=col, label=label)
    ax.axvline(math.sqrt(noise_dims / signal_dims), color="k", ls="--", lw=1,
               label="Eq. 29: $s=\\sigma_\\beta\\sqrt{d_{noise}/k_s}$")
    ax.axhline(0, color="grey", lw=0.8)
    label_axes(ax, "signal magnitude $s/\\sigma_\\beta$ [dimensionless]",
               "gain $\\mathcal{L}_{TA} - \\mathcal{L}_{boost}$ [$\\sigma_\\beta^2$]",
               f"$k_s$ = {signal_dims} signal, $d_{{noise}}$ = {noise_dims} noise directions; "
               "TA keeps $c = \\varepsilon = 1/\\sqrt{N}$")
    ax.legend(fontsize=8)
    return fig


def fig_normalised_spectra(spectra: pd.DataFrame, common_rank: int | None = None) -> Any:
    """Supp. E.4 / paper Fig. 10: one panel per γ, σ_k / N^γ against k for each N."""
    import matplotlib.pyplot as plt

    gammas = sorted(spectra.gamma.unique())
    ns = sorted(spectra.N.unique())
    ncols = min(2, len(gammas))
    nrows = math.ceil(len(gammas) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.4 * nrows), squeeze=False)
    for ax in axes.flat[len(gammas):]:
        ax.set_visible(False)
    for ax, gamma in zip(axes.flat, gammas):
        for n, col in zip(ns, colors(len(ns))):
            g = spectra[(spectra.gamma == gamma) & (spectra.N == n)]
            ax.loglog(g["index"] + 1, g.sigma_normalised, color=col, lw=1.2, label=f"N = {n}")
        if common_rank:
            ax.axvline(common_rank + 0.5, color="grey", ls=":", lw=1)
        label_axes(ax, "singular value index k [count]", f"$\\sigma_k / N^{{{gamma:g}}}$ [a.u.]",
                   f"divided by $N^{{{gamma:g}}}$")
    axes[0][0].legend(fontsize=8)
    return fig


def fig_collapse(spreads: pd.DataFrame, best: Mapping[str, float], exponents: Mapping[str, pd.DataFrame],
                 common_rank: int | None = None) -> Any:
    """Supp. E.4 as numbers: collapse spread against γ for head and tail, and the fitted
    exponent γ_k of every singular value for each unique-part model."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4))
    parts = list(dict.fromkeys(spreads.part))
    for part, col in zip(parts, colors(len(parts))):
        g = spreads[spreads.part == part]
        axes[0].plot(g.gamma, g.spread, "-", color=col, label=f"{part}: minimum at $\\gamma$ = {best[part]:.2f}")
    for x in (0.5, 1.0):
        axes[0].axvline(x, color="grey", ls=":", lw=1)
    label_axes(axes[0], "normalisation exponent $\\gamma$ [dimensionless]",
               "spread of $\\log(\\sigma_k/N^\\gamma)$ across N [dimensionless]", "Collapse quality (0 = perfect)")
    axes[0].legend(fontsize=8)
    for (kind, e), col in zip(exponents.items(), colors(len(exponents))):
        axes[1].plot(e["index"] + 1, e.gamma, ".", ms=3, color=col, label=f"unique parts: {kind}")
    for y in (0.5, 1.0):
        axes[1].axhline(y, color="grey", ls=":", lw=1)
    if common_rank:
        axes[1].axvline(common_rank + 0.5, color="k", ls="--", lw=0.8, label="end of the common rank r")
    axes[1].set_xscale("log")
    axes[1].set_ylim(-0.3, 1.3)
    label_axes(axes[1], "singular value index k [count]", "fitted exponent $\\gamma_k$ [dimensionless]",
               "$\\sigma_k(\\sum_{i\\leq N}\\Delta_i) \\propto N^{\\gamma_k}$")
    axes[1].legend(fontsize=8)
    return fig
