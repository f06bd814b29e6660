"""Chapter 2 -- Propositions 1-4 on controlled task vectors (``notebooks/02_propositions.md``);
paper Sec. 3.1, Supp. E (Props. 1-4, Eq. 8-29), Supp. E.4 and Fig. 10 (the N^γ test).

The synthetic task vectors and the numerical checks of each proposition are shared
mathematics in :mod:`subboost.synthetic`. This module holds what only this chapter uses: its
sizes per book profile (:data:`PROFILE_SETTINGS`), the set-up it derives from its parameters
(:func:`chapter_setup`), the experiments that repeat the checks over seeds and unique-part
models and fit their slopes, and the chapter's figures.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from subboost import paper
from subboost.plotting import colors, label_axes
from subboost.synthetic import (
    LogLogFit,
    SyntheticSpec,
    SyntheticTaskVectors,
    collapse_spread,
    e4_task_vectors,
    fit_loglog,
    gram_matrix,
    max_offdiagonal_cosine,
    mean_cosine_similarity,
    normalised_spectra,
    prop1_table,
    prop2_table,
    prop3_table,
    prop4_exact_boundaries,
    prop4_scale_sweep,
    repeat_tables,
    scaling_exponents,
)

#: The exponents the propositions predict (quoted from the paper), drawn as reference lines.
PREDICTED = paper.PROP_EXPONENTS

#: Sizes per book profile (read-only). ``smoke`` is a seconds-long check, ``ci`` what CI
#: executes on two CPU cores, ``full`` the large run (a GPU helps, a CPU works).
PROFILE_SETTINGS: Mapping[str, Mapping[str, object]] = MappingProxyType({
    "smoke": MappingProxyType(dict(
        size=48, sweep_task_counts=(1, 2, 4, 8, 16), n_repeats=2, unique_rank=2,
        prop4_max_dims=6, gamma_grid_points=21,
    )),
    "ci": MappingProxyType(dict(
        size=128, sweep_task_counts=(1, 2, 4, 8, 16, 32, 64), n_repeats=4, unique_rank=2,
        prop4_max_dims=12, gamma_grid_points=41,
    )),
    "full": MappingProxyType(dict(
        size=384, sweep_task_counts=(1, 2, 4, 8, 16, 32, 64, 128), n_repeats=10, unique_rank=2,
        prop4_max_dims=24, gamma_grid_points=101,
    )),
})


def profile_settings(profile: str, **overrides: object) -> dict[str, object]:
    """The sizes of chapter 2 for a book profile, with ``None``-valued overrides ignored.

    Raises ``ValueError`` naming ``profile`` for an unknown profile, or the override's name for
    an unknown setting.
    """
    if profile not in PROFILE_SETTINGS:
        raise ValueError(f"parameter 'profile': unknown profile {profile!r}; "
                         f"choose one of {', '.join(PROFILE_SETTINGS)}")
    settings = dict(PROFILE_SETTINGS[profile])
    for key, value in overrides.items():
        if key not in settings:
            raise ValueError(f"parameter {key!r}: not a chapter-2 size setting "
                             f"(known: {', '.join(settings)})")
        if value is not None:
            settings[key] = tuple(value) if isinstance(value, list) else value
    return settings



# ----------------------------------------------------------------------------- set-up and runners


@dataclass(frozen=True)
class ChapterSetup:
    """Everything chapter 2 derives from its parameters: sizes, task counts, seeds, specs."""

    profile: str
    size: int
    task_counts: tuple[int, ...]
    seeds: tuple[int, ...]
    dense: SyntheticSpec
    lowrank: SyntheticSpec
    prop4_max_dims: int
    gamma_grid_points: int

    @property
    def kinds(self) -> dict[str, SyntheticSpec]:
        """The two unique-part models by display name: ``dense`` and ``rank k``."""
        return {"dense": self.dense, f"rank {self.lowrank.unique_rank}": self.lowrank}

    @property
    def lowrank_name(self) -> str:
        return f"rank {self.lowrank.unique_rank}"

    def table(self, device: str, e4_task_counts: Sequence[int]) -> pd.DataFrame:
        """The settings as a two-column table for display."""
        d = self.dense
        noise_ratio = (d.noise_std * math.sqrt(d.rows * d.cols)) ** 2 / d.unique_norm**2 if d.unique_norm else float("nan")
        return pd.DataFrame({
            "setting": ["profile", "device", "matrix", "common rank r", "unique parts",
                        "noise energy / unique energy", "task counts (Props. 1-3)", "task counts (E.4)", "seeds"],
            "value": [self.profile, device, f"{d.rows} x {d.cols}", d.common_rank,
                      f"dense, or {self.lowrank_name}", round(noise_ratio, 4), list(self.task_counts),
                      list(e4_task_counts), list(self.seeds)],
        }).set_index("setting")


def chapter_setup(
    profile: str,
    *,
    seed: int = 0,
    matrix_size: int | None = None,
    n_repeats: int | None = None,
    sweep_task_counts: Sequence[int] | None = None,
    common_rank: int = 4,
    noise_fraction: float = 0.5,
) -> ChapterSetup:
    """Resolve chapter 2's parameters against the profile (:data:`PROFILE_SETTINGS`) and check
    the chapter-specific ones; errors name the parameter.

    ``noise_fraction`` is the noise energy per task relative to the unique energy,
    ‖ℰi‖F² / ‖Ui‖F² (entries of std σ give ‖ℰi‖F ≈ σ·√(mn)).
    """
    s = profile_settings(profile, size=matrix_size, n_repeats=n_repeats, sweep_task_counts=sweep_task_counts)
    size = s["size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"parameter 'matrix_size': expected an integer ≥ 8, got {size!r}")
    reps = s["n_repeats"]
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"parameter 'n_repeats': expected an integer ≥ 1, got {reps!r}")
    counts = tuple(sorted({int(c) for c in s["sweep_task_counts"]}))
    if len(counts) < 2 or counts[0] < 1:
        raise ValueError(f"parameter 'sweep_task_counts': need at least two distinct counts ≥ 1, got {list(counts)}")
    if isinstance(common_rank, bool) or not isinstance(common_rank, int) or not 1 <= common_rank <= size // 4:
        raise ValueError(f"parameter 'common_rank': expected an integer in [1, {size // 4}], got {common_rank!r}")
    if isinstance(noise_fraction, bool) or not isinstance(noise_fraction, (int, float)) or not 0 <= noise_fraction <= 4:
        raise ValueError(f"parameter 'noise_fraction': expected a number in [0, 4], got {noise_fraction!r}")
    needed = common_rank**2 + 2 * counts[-1]
    if needed > size * size:
        raise ValueError(f"parameter 'sweep_task_counts': {counts[-1]} tasks do not fit orthogonally in a "
                         f"{size}×{size} matrix")
    dense = SyntheticSpec(rows=size, cols=size, common_rank=common_rank, unique_rank=None,
                          noise_std=math.sqrt(float(noise_fraction)) / size)
    return ChapterSetup(
        profile=profile, size=size, task_counts=counts, seeds=tuple(int(seed) + k for k in range(reps)),
        dense=dense, lowrank=replace(dense, unique_rank=int(s["unique_rank"])),
        prop4_max_dims=int(s["prop4_max_dims"]), gamma_grid_points=int(s["gamma_grid_points"]),
    )


def assumption_checks(tv: SyntheticTaskVectors) -> pd.DataFrame:
    """The model's assumptions measured on one draw (Eq. 9 and Prop. 3's conditions)."""
    n = tv.n_tasks
    cross = (tv.common.reshape(n, -1) @ (tv.unique + tv.noise).reshape(n, -1).T).abs().max()
    c_norms = torch.linalg.matrix_norm(tv.common, "fro")
    g = gram_matrix(tv.common)
    d = torch.sqrt(torch.diagonal(g))
    return pd.DataFrame({
        "quantity": ["max |cos(E_i, E_j)| over i ≠ j (Eq. 9: 0)", "max |⟨C_i, E_j⟩_F|",
                     "B = max ‖E_i‖_F", "max ‖U_i‖_F", "mean ‖noise_i‖_F", "min ‖C_i‖_F (μ_min)",
                     "mean cosine of the C_i over all N² pairs (ρ̄)", "min pairwise cosine of the C_i"],
        "value": [max_offdiagonal_cosine(tv.task_specific()), float(cross), tv.bound(),
                  float(torch.linalg.matrix_norm(tv.unique, "fro").max()),
                  float(torch.linalg.matrix_norm(tv.noise, "fro").mean()), float(c_norms.min()),
                  mean_cosine_similarity(tv.common), float((g / d[:, None] / d[None, :]).min())],
    }).set_index("quantity")


def fits_table(table: pd.DataFrame, x: str, columns: Sequence[str], by: str | Sequence[str]) -> pd.DataFrame:
    """Log-log slopes of each column against ``x`` per group: columns group keys, quantity,
    slope, slope_stderr (and the :class:`LogLogFit` objects in ``fit``)."""
    rows = []
    keys = [by] if isinstance(by, str) else list(by)
    for key, g in table.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        for col in columns:
            f = fit_loglog(g[x], g[col])
            rows.append({**dict(zip(keys, key)), "quantity": col, "slope": f.slope,
                         "slope_stderr": f.slope_stderr, "fit": f})
    return pd.DataFrame(rows)


def prop1_experiment(setup: ChapterSetup, *, device: str = "cpu", progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Prop. 1 for both unique-part models over all seeds: the long table (with
    ``unique_parts`` and ``bound_holds``) and the slopes of ‖Δunique‖2, ‖Δunique‖F and
    ‖Δcommon‖2 against N."""
    frames = [repeat_tables(prop1_table, spec, max(setup.task_counts), setup.seeds, device=device,
                            progress=progress, desc=f"Prop. 1 ({kind})", task_counts=setup.task_counts
                            ).assign(unique_parts=kind) for kind, spec in setup.kinds.items()]
    t = pd.concat(frames, ignore_index=True)
    t["bound_holds"] = (t.unique_spectral <= t.unique_frobenius * (1 + 1e-12)) & (t.unique_frobenius <= t.bound * (1 + 1e-12))
    fits = fits_table(t, "N", ["unique_spectral", "unique_frobenius", "common_spectral"], "unique_parts")
    return t, fits


def prop2_experiment(setup: ChapterSetup, betas: Sequence[float], *, device: str = "cpu",
                     progress: bool = False) -> tuple[pd.DataFrame, LogLogFit]:
    """Prop. 2 on the dense model: the per-N mean over seeds and the fit of the stable-rank gap."""
    t = repeat_tables(prop2_table, setup.dense, max(setup.task_counts), setup.seeds, device=device,
                      progress=progress, desc="Prop. 2", task_counts=setup.task_counts, betas=betas)
    m = t.drop(columns="seed").groupby("N").mean()
    return m, fit_loglog(m.index, m.srank_gap)


def prop3_experiment(setup: ChapterSetup, alphas: Sequence[float], *, device: str = "cpu",
                     progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Prop. 3 on the dense model: the long table (with ``*_bound_holds``), the per-(α, N)
    means, and the slopes of the norms and of the spectral ratio against N per α."""
    t = repeat_tables(prop3_table, setup.dense, max(setup.task_counts), setup.seeds, device=device,
                      progress=progress, desc="Prop. 3", task_counts=setup.task_counts, alphas=alphas)
    # relative tolerance for rounding: at N = 1 the Frobenius bound is an equality
    t["spectral_bound_holds"] = t.ratio_spectral >= t.bound_spectral * (1 - 1e-12)
    t["frobenius_bound_holds"] = t.ratio_frobenius >= t.bound_frobenius * (1 - 1e-12)
    m = t.drop(columns="seed").groupby(["alpha", "N"]).mean(numeric_only=True).reset_index()
    fits = fits_table(m, "N", ["common_spectral", "unique_spectral", "ratio_spectral"], "alpha")
    return t, m, fits


def prop4_relaxed(
    signal_dims: int, noise_dims: int, task_counts: Sequence[int], *, n_scales: int = 60,
    max_scale: float = 3.0, seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Prop. 4 beyond its assumptions: gain against the signal scale s/σβ ∈ [0.05, max_scale],
    first in the proof's limit (c = 10⁻³, no noise left in TA), then for each N with TA
    keeping c = 1/√N of the signal and noise of size ε = σβ/√N.

    Returns the sweep (columns of :func:`prop4_grid` plus ``setting`` and ``N``, 0 for the
    limit) and one row per setting: c, ε, ``sweep_to`` (the largest swept s/σβ: below
    max_scale when c·s would leave the tail), ``eq29`` (Eq. 29's boundary √(d/k)), the interval
    (``exact_from``, ``exact_to``) of scales inside the sweep where the closed form says
    boosting wins (:func:`prop4_exact_boundaries`; an end that lies outside the sweep is the
    sweep's end, NaN when boosting never wins), and the first and last swept scales where
    the measured gain is positive (``measured_from``, ``measured_to``).
    """
    rows, bounds = [], []
    for n in [None] + [int(x) for x in task_counts]:
        c = 1e-3 if n is None else 1 / math.sqrt(n)
        eps = 0.0 if n is None else 1 / math.sqrt(n)
        lo, hi = 0.05, min(max_scale, 0.999 / c)
        sw = prop4_scale_sweep(np.linspace(lo, hi, n_scales), signal_dims=signal_dims, noise_dims=noise_dims,
                               suppression=c, noise_level=eps, seed=seed)
        label = "limit c → 0" if n is None else f"N = {n}"
        rows.append(sw.assign(setting=label, N=0 if n is None else n))
        roots = prop4_exact_boundaries(signal_dims, noise_dims, c, eps)
        if len(roots) == 2 and roots[0] < hi and roots[1] > lo:
            win_from, win_to = max(roots[0], lo), min(roots[1], hi)
        elif len(roots) == 1 and roots[0] < hi:
            win_from, win_to = max(roots[0], lo), hi
        else:
            win_from = win_to = float("nan")
        win = sw[sw.gain > 0]
        bounds.append(dict(setting=label, N=0 if n is None else n, c=c, eps=eps, sweep_to=hi,
                           eq29=math.sqrt(noise_dims / signal_dims), exact_from=win_from, exact_to=win_to,
                           measured_from=float(win.signal_scale.min()) if len(win) else float("nan"),
                           measured_to=float(win.signal_scale.max()) if len(win) else float("nan")))
    return pd.concat(rows, ignore_index=True), pd.DataFrame(bounds).set_index("setting")


def describe_windows(bounds: pd.DataFrame) -> list[str]:
    """One phrase per row of :func:`prop4_relaxed`'s bounds: where boosting wins."""
    out = []
    for label, row in bounds.iterrows():
        if math.isnan(row.exact_from):
            out.append(f"{label}: never, for s/σβ ≤ {row.sweep_to:.2f}")
        else:
            out.append(f"{label}: for s/σβ from {row.exact_from:.2f} to {row.exact_to:.2f}")
    return out


@dataclass(frozen=True)
class E4Result:
    """Supp. E.4 on synthetic vectors: the normalised spectra (dense model), the collapse
    spread per γ for head and tail, the best γ of each, and per-index exponents per model."""

    spectra: pd.DataFrame
    spreads: pd.DataFrame
    best_gamma: dict[str, float]
    exponents: dict[str, pd.DataFrame]
    head: tuple[int, int]
    tail: tuple[int, int]
    tail_summary: pd.DataFrame


def e4_experiment(setup: ChapterSetup, task_counts: Sequence[int], gammas: Sequence[float], *,
                  seed: int = 0, device: str = "cpu", tail_fraction: float = 0.9) -> E4Result:
    """Run the N^γ test: spectra of Σ_{i≤N} Δi divided by N^γ (``gammas``), the collapse spread
    on a fine γ grid for the head (indices < r) and the tail (r ≤ k < tail_fraction·n, leaving
    out the smallest, noisiest values), and per-index exponents for dense and low-rank unique
    parts. ``tail_summary`` has, per unique-part model, the γ that best collapses the tail,
    the median and interquartile range of the tail's exponents, and the median exponent of
    the first tail values (the k_u·min(N) indices after the head, which every N fills with
    unique directions)."""
    by_n = e4_task_vectors(setup.dense, task_counts, seed=seed, device=device)
    r = setup.dense.common_rank
    n_sv = min(setup.dense.rows, setup.dense.cols)
    head, tail = (0, r), (r, int(tail_fraction * n_sv))
    grid = np.linspace(0.0, 1.25, setup.gamma_grid_points)
    spreads = pd.concat([
        collapse_spread(by_n, grid, range(*head)).assign(part="head (k ≤ r)"),
        collapse_spread(by_n, grid, range(*tail)).assign(part="tail"),
    ], ignore_index=True)
    best = {p: float(g.loc[g.spread.idxmin(), "gamma"]) for p, g in spreads.groupby("part")}
    expo, rows = {}, []
    n_min = min(int(n) for n in task_counts)
    for kind, spec in setup.kinds.items():
        kind_by_n = by_n if spec == setup.dense else e4_task_vectors(spec, task_counts, seed=seed, device=device)
        e = scaling_exponents(kind_by_n)
        expo[kind] = e
        t = e[(e["index"] >= tail[0]) & (e["index"] < tail[1])].gamma
        k_u = setup.lowrank.unique_rank
        early = e[(e["index"] >= r) & (e["index"] < r + k_u * n_min)].gamma
        spread_k = collapse_spread(kind_by_n, grid, range(*tail))
        rows.append(dict(unique_parts=kind, best_tail_gamma=float(spread_k.loc[spread_k.spread.idxmin(), "gamma"]),
                         min_tail_spread=float(spread_k.spread.min()), median_tail_exponent=float(t.median()),
                         tail_exponent_iqr=float(t.quantile(0.75) - t.quantile(0.25)),
                         first_tail_exponents=float(early.median())))
    summary = pd.DataFrame(rows).set_index("unique_parts")
    return E4Result(normalised_spectra(by_n, gammas), spreads, best, expo, head, tail, summary)


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



# ----------------------------------------------------------------------------- figures
# Each takes the tables of the runners above and returns the figure; the notebook shows and
# saves it (:func:`subboost.plotting.show`).

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
    for x in (PREDICTED["e4_tail_gamma"], PREDICTED["e4_head_gamma"]):
        axes[0].axvline(x, color="grey", ls=":", lw=1)
    label_axes(axes[0], "normalisation exponent $\\gamma$ [dimensionless]",
               "spread of $\\log(\\sigma_k/N^\\gamma)$ across N [dimensionless]", "Collapse quality (0 = perfect)")
    axes[0].legend(fontsize=8)
    for (kind, e), col in zip(exponents.items(), colors(len(exponents))):
        axes[1].plot(e["index"] + 1, e.gamma, ".", ms=3, color=col, label=f"unique parts: {kind}")
    for y in (PREDICTED["e4_tail_gamma"], PREDICTED["e4_head_gamma"]):
        axes[1].axhline(y, color="grey", ls=":", lw=1)
    if common_rank:
        axes[1].axvline(common_rank + 0.5, color="k", ls="--", lw=0.8, label="end of the common rank r")
    axes[1].set_xscale("log")
    axes[1].set_ylim(-0.3, 1.3)
    label_axes(axes[1], "singular value index k [count]", "fitted exponent $\\gamma_k$ [dimensionless]",
               "$\\sigma_k(\\sum_{i\\leq N}\\Delta_i) \\propto N^{\\gamma_k}$")
    axes[1].legend(fontsize=8)
    return fig
