"""Chapter 4 -- HO-GSVD: shared subspaces, alignment and expert selection
(``notebooks/04_hogsvd.md``); paper Sec. 4.2, 5.3, Fig. 5a, 5b, Table 5, Supp. G, H (Fig. 13,
Tables 9, 10).

The decompositions themselves (HO-GSVD, alignment matrices of Eq. 7, expert selection,
Higher-Order SB, Alg. 2) live in :mod:`subboost.hogsvd`; this module runs the chapter's
protocols on any :class:`subboost.experiments.Suite` (the mini zoo or real checkpoints),
summarises them in tidy tables and draws the figures.

- :func:`gsv_spectra` / :func:`gsv_summary`: generalised singular values of N single task
  vectors and of their average in one shared HO-GSVD basis (Fig. 5a);
- :func:`alignment_by_block` / :func:`depth_trend`: the per-matrix alignment matrices of Eq. 7
  summarised per residual block, to test "shallow layers low, deep layers high" (Supp. H);
- :class:`SelectionProtocol`, :func:`run_selection`, :func:`selection_summary`: the expert
  selection experiments of Table 5 (pool + k of the candidates, scored on pool and external
  tasks) and Table 10 (k of all, scored on all), HO-GSVD selection against seeded random draws;
- :func:`table9_variants`, :func:`table9_beside_paper`: Higher-Order SB against the SB
  variants (Table 9).

Profile sizes (:class:`ChapterSizes`, :data:`PROFILE_SIZES`) keep the CPU ``ci`` run within
its budget; ``full`` uses the paper's sizes (:data:`subboost.paper.SELECTION_SIZES`). The
paper's own numbers live in :mod:`subboost.paper`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm  # plain text bar: the book kernels have no ipywidgets

from subboost import claims, paper
from subboost.experiments import LINES_B, ResultCache, Suite, Variant, beside_paper, merge_variant
from subboost.hogsvd import AlignmentResult, hogsvd, random_selection, select_experts, selection_score
from subboost.plotting import colors
from subboost.taskvector import StateDict, is_zero, parse_block_key

# ----------------------------------------------------------------------------- profile sizes


@dataclass(frozen=True)
class ChapterSizes:
    """How large each experiment of the chapter is in a profile (the paper's values:
    :data:`subboost.paper.SELECTION_SIZES`, :data:`PAPER_SIZES`).

    spectra_tasks: single task vectors decomposed with their average for Fig. 5a;
    spectra_shown: how many of them are drawn;
    pool, candidates, external, select_k: Table 5 sizes;
    table5_draws: random draws of Table 5;
    table10_k, table10_draws: Table 10 (k chosen of all tasks, random draws);
    table9_counts: how many of the chapter's ``task_counts`` (smallest first) Table 9 runs
        (``None``: all, the paper's :data:`subboost.paper.TASK_COUNTS`);
    table9_methods: the Table 9 rows run (labels of :data:`subboost.paper.TABLE9_VIT_B32`).
    """

    profile: str
    spectra_tasks: int
    spectra_shown: int
    pool: int
    candidates: int
    external: int
    select_k: int
    table5_draws: int
    table10_k: int
    table10_draws: int
    table9_counts: int | None
    table9_methods: tuple[str, ...]

    @property
    def table5_tasks(self) -> int:
        return self.pool + self.candidates + self.external

    def counts_for_table9(self, task_counts: Sequence[int]) -> list[int]:
        counts = sorted(int(n) for n in task_counts)
        return counts if self.table9_counts is None else counts[: self.table9_counts]


_CORE_METHODS = ("TA+SB+LiNeS", "TIES+SB+LiNeS", "Higher-Order SB+LiNeS")

#: The paper's sizes (Table 9: all its rows at all its task counts); the ``full`` profile.
PAPER_SIZES = ChapterSizes("full", spectra_shown=4,  # 4 of the decomposed task vectors drawn: our choice
                           table9_counts=None, table9_methods=tuple(paper.TABLE9_VIT_B32),
                           **paper.SELECTION_SIZES)

PROFILE_SIZES: dict[str, ChapterSizes] = {
    # the 3-task smoke zoo: every step runs, on the smallest sizes that keep it meaningful
    "smoke": ChapterSizes("smoke", spectra_tasks=3, spectra_shown=3, pool=1, candidates=2, external=0,
                          select_k=1, table5_draws=2, table10_k=2, table10_draws=2, table9_counts=None,
                          table9_methods=_CORE_METHODS),
    # the paper's task split on the 20-task ci zoo; fewer random draws and Table 9 at the
    # smallest task count only, to stay within the chapter's CPU budget
    "ci": replace(PAPER_SIZES, profile="ci", table5_draws=8, table10_draws=8, table9_counts=1,
                  table9_methods=_CORE_METHODS),
    "full": PAPER_SIZES,
}


def chapter_sizes(profile: str, n_tasks: int, n_random_draws: int | None = None) -> ChapterSizes:
    """The sizes of ``profile`` checked against a suite of ``n_tasks`` tasks.

    ``n_random_draws`` (when given) replaces the random draws of both Table 5 and Table 10.
    Raises ``ValueError`` naming the parameter when a size does not fit the suite.
    """
    if profile not in PROFILE_SIZES:
        raise ValueError(f"parameter 'profile': unknown profile {profile!r}; choose one of {', '.join(PROFILE_SIZES)}")
    sizes = PROFILE_SIZES[profile]
    if n_random_draws is not None:
        if isinstance(n_random_draws, bool) or not isinstance(n_random_draws, (int, np.integer)) or n_random_draws < 1:
            raise ValueError(f"parameter 'n_random_draws': expected None or an integer ≥ 1, got {n_random_draws!r}")
        sizes = replace(sizes, table5_draws=int(n_random_draws), table10_draws=int(n_random_draws))
    n_tasks = int(n_tasks)
    if sizes.table5_tasks > n_tasks:
        raise ValueError(
            f"parameter 'profile': the {profile} sizes need {sizes.table5_tasks} tasks for Table 5 "
            f"({sizes.pool} pool + {sizes.candidates} candidates + {sizes.external} external), the suite has {n_tasks}")
    if sizes.table10_k > n_tasks or sizes.spectra_tasks > n_tasks:
        raise ValueError(f"parameter 'profile': the {profile} sizes need {max(sizes.table10_k, sizes.spectra_tasks)} "
                         f"tasks, the suite has {n_tasks}")
    if not 1 <= sizes.select_k <= sizes.candidates:
        raise ValueError(f"Table 5 needs 1 ≤ k ≤ candidates, got k={sizes.select_k}, {sizes.candidates} candidates")
    return sizes


def sizes_beside_paper(sizes: ChapterSizes, n_tasks: int, table9_counts: Sequence[int]) -> pd.DataFrame:
    """The experiment sizes of this run beside the paper's (:data:`PAPER_SIZES`,
    :data:`subboost.paper.TASK_COUNTS`, the 20 tasks of :data:`subboost.paper.PAPER_TASKS`)."""
    def column(s: ChapterSizes, tasks: int, counts: Sequence[int], rows: Sequence[str]) -> list:
        return [s.spectra_tasks, tasks, f"{s.pool} / {s.candidates} / {s.external}", s.select_k, s.table5_draws,
                f"{s.table10_k} of {tasks}", s.table10_draws, ", ".join(map(str, counts)), ", ".join(rows)]

    return pd.DataFrame({
        "this run": column(sizes, n_tasks, table9_counts, sizes.table9_methods),
        "paper": column(PAPER_SIZES, len(paper.PAPER_TASKS), paper.TASK_COUNTS, tuple(paper.TABLE9_VIT_B32)),
    }, index=["Fig. 5a: single task vectors", "Fig. 5b, 13: experts in the alignment matrix",
              "Table 5: pool / candidates / external", "Table 5: experts chosen", "Table 5: random draws",
              "Table 10: experts chosen", "Table 10: random draws", "Table 9: task counts N", "Table 9: rows"])


def paper_selection_numbers() -> dict[str, str]:
    """The paper's Table 5 and Table 10 numbers as the chapter's introduction quotes them
    (from :mod:`subboost.paper`)."""
    (r_pool, r_ext), (h_pool, h_ext) = paper.TABLE5["Random"], paper.TABLE5["HO-GSVD"]
    return {"paper_t5_pool": f"{h_pool:g} % vs {r_pool:g} %",
            "paper_t5_ext": f"{h_ext:g} % both" if h_ext == r_ext else f"{h_ext:g} % vs {r_ext:g} %",
            "paper_t10": f"{paper.TABLE10['HO-GSVD']:g} % vs {paper.TABLE10['Random']:g} ± "
                         f"{paper.TABLE10['Random (std)']:g} %"}


def check_pi(pi: float) -> float:
    """The HO-GSVD regularisation π of Eq. 32 (the paper's: :data:`subboost.paper.HOGSVD_PI`): a
    finite number > 0."""
    if isinstance(pi, bool) or not isinstance(pi, (int, float)) or not math.isfinite(float(pi)) or float(pi) <= 0:
        raise ValueError(f"parameter 'pi': expected a finite number > 0 (the paper uses {paper.HOGSVD_PI:g}), got {pi!r}")
    return float(pi)


# ----------------------------------------------------------------------------- keys


def describe_key(key: str) -> dict:
    """stack, layer, sublayer, layer_type of a block-matrix key."""
    info = parse_block_key(key)
    if info is None:
        return dict(stack="", layer=-1, sublayer=key, layer_type="other")
    return dict(stack=info.stack, layer=info.layer, sublayer=info.sublayer, layer_type=info.layer_type)


def keys_of_sublayer(keys: Sequence[str], sublayer: str) -> list[str]:
    """The keys of one sublayer type (e.g. ``attn.out_proj``), ordered by block index."""
    chosen = [k for k in keys if describe_key(k)["sublayer"] == sublayer]
    return sorted(chosen, key=lambda k: describe_key(k)["layer"])


# ----------------------------------------------------------------------------- Fig. 5a


def gsv_spectra(vectors: Mapping[str, StateDict], keys: Sequence[str], pi: float = paper.HOGSVD_PI,
                merged_label: str | None = None) -> pd.DataFrame:
    """Generalised singular values of N single task vectors and of their average (1/N Σ Δ_i)
    in one shared basis: per key, the HO-GSVD (:func:`subboost.hogsvd.hogsvd`, π = ``pi``)
    of {Δ_1, …, Δ_N, Δ_avg} (paper Fig. 5a). Wide matrices are decomposed transposed, as in
    :func:`subboost.hogsvd.alignment_matrix`.

    Long table, one row per (key, matrix, shared direction k): key, stack, layer, sublayer,
    matrix (task name or ``merged_label``), kind ("single" / "merged"), direction (k, in the
    HO-GSVD order: τ descending, most unique first), sigma, tau, isolated, in_rowspace
    (k < rank of the stack; directions outside it have σ = 0 for every matrix).
    """
    names = list(vectors)
    if len(names) < 2:
        raise ValueError(f"need at least 2 task vectors, got {len(names)}")
    label = merged_label or f"average of {len(names)}"
    frames = []
    for key in keys:
        mats = [vectors[n][key].detach().to("cpu", torch.float64) for n in names]
        if mats[0].ndim != 2:
            raise ValueError(f"key '{key}' is not a 2-D matrix")
        if all(is_zero(m) for m in mats):
            continue
        avg = sum(mats) / len(mats)
        stack = mats + [avg]
        if stack[0].shape[0] < stack[0].shape[1]:
            stack = [m.T for m in stack]
        dec = hogsvd(stack, pi)
        sigma = dec.sigma.numpy()
        n_dir = sigma.shape[1]
        desc = describe_key(key)
        for i, name in enumerate(names + [label]):
            frames.append(pd.DataFrame(dict(
                key=key, **{k: [v] * n_dir for k, v in desc.items()}, matrix=name,
                kind="merged" if i == len(names) else "single", direction=np.arange(n_dir), sigma=sigma[i],
                tau=dec.tau.numpy(), isolated=dec.isolated.numpy(), in_rowspace=np.arange(n_dir) < dec.rank)))
    if not frames:
        raise ValueError("every selected matrix is zero in every task vector")
    return pd.concat(frames, ignore_index=True)


def _row_stable_rank(s: np.ndarray) -> float:
    top = float(np.max(s)) if s.size else 0.0
    return float(np.sum(s**2) / top**2) if top > 0 else 0.0


def gsv_summary(spectra: pd.DataFrame, near_zero: float = 1e-2) -> pd.DataFrame:
    """One row per key of :func:`gsv_spectra` (directions in the row space only):

    - ``median_single`` / ``median_merged``: median σ over directions (single: mean over tasks)
      and their ratio ``merged_over_single``;
    - ``frac_below_all``: share of directions where the merged σ is below every single σ;
    - ``coherence_median``: median over directions k of σ_avg,k / mean_i σ_ik ∈ [0, 1] (≤ 1 by
      the triangle inequality, since Δ_avg's coefficients in the shared basis are the mean of
      the singles'); 1 for a direction all tasks use identically, 1/√N for N equal but
      orthogonal contributions, 1/N for a direction one task alone uses;
    - ``srank_single`` / ``srank_merged``: Σσ²/max σ² of the σ row (single: mean over tasks),
      an effective number of shared directions a matrix uses;
    - ``near_zero_single`` / ``near_zero_merged``: directions with σ < ``near_zero``·max σ of
      the same row (single: mean over tasks).
    """
    rows = []
    for key, sub in spectra[spectra.in_rowspace].groupby("key", sort=False):
        single = sub[sub.kind == "single"].pivot(index="direction", columns="matrix", values="sigma")
        merged = sub[sub.kind == "merged"].set_index("direction").sigma.reindex(single.index)
        s, m = single.to_numpy(), merged.to_numpy()
        mean_single = s.mean(axis=1)
        coherence = np.divide(m, mean_single, out=np.full_like(m, np.nan), where=mean_single > 0)
        first = sub.iloc[0]
        rows.append(dict(
            key=key, layer=first.layer, sublayer=first.sublayer, n_single=s.shape[1], directions=s.shape[0],
            median_single=float(np.mean(np.median(s, axis=0))), median_merged=float(np.median(m)),
            frac_below_all=float(np.mean(m < s.min(axis=1))),
            coherence_median=float(np.nanmedian(coherence)),
            srank_single=float(np.mean([_row_stable_rank(s[:, j]) for j in range(s.shape[1])])),
            srank_merged=_row_stable_rank(m),
            near_zero_single=float(np.mean([(s[:, j] < near_zero * s[:, j].max()).sum() for j in range(s.shape[1])])),
            near_zero_merged=int((m < near_zero * m.max()).sum()),
        ))
    out = pd.DataFrame(rows)
    out["merged_over_single"] = out.median_merged / out.median_single
    return out


# ----------------------------------------------------------------------------- alignment per block


def mean_offdiagonal(matrix: np.ndarray | pd.DataFrame) -> float:
    """Mean of the entries A_ij, i ≠ j, of a square matrix."""
    a = matrix.to_numpy(dtype=float) if isinstance(matrix, pd.DataFrame) else np.asarray(matrix, dtype=float)
    if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 2:
        raise ValueError(f"need a square matrix of size ≥ 2, got shape {a.shape}")
    mask = ~np.eye(a.shape[0], dtype=bool)
    return float(a[mask].mean())


def alignment_by_block(result: AlignmentResult) -> pd.DataFrame:
    """One row per decomposed matrix of an :class:`~subboost.hogsvd.AlignmentResult`: key,
    stack, layer, sublayer, layer_type and the mean / standard deviation / min / max of its
    off-diagonal alignments (the standard deviation measures how "defined", i.e. differentiated
    between expert pairs, a matrix's alignments are)."""
    rows = []
    for key in result.keys:
        a = result.per_layer[key]
        off = a[~np.eye(a.shape[0], dtype=bool)]
        rows.append(dict(key=key, **describe_key(key), mean_alignment=float(off.mean()),
                         std_alignment=float(off.std()), min_alignment=float(off.min()),
                         max_alignment=float(off.max())))
    return pd.DataFrame(rows)


def _spearman(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = pd.Series(x, dtype=float).rank(), pd.Series(y, dtype=float).rank()
    if x.nunique() < 2 or y.nunique() < 2:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def depth_trend(by_block: pd.DataFrame) -> dict:
    """Does alignment grow with depth (paper Supp. H)? From :func:`alignment_by_block`:

    per_block: mean off-diagonal alignment per block index (mean over sublayers); per_block_std:
    the same for the spread (std over expert pairs); per_sublayer: block index × sublayer table;
    first / last (and first_std / last_std): the values at the first and last block;
    monotone_mean: ``per_block`` never falls with depth; rising_sublayers: sublayers whose last
    block exceeds their first; monotone_sublayers: sublayers non-decreasing in depth;
    spearman: Spearman ρ between block index and mean alignment over all matrices (sublayer
    offsets included); spearman_blocks: the same over the per-block means; verdict: the
    :class:`subboost.claims.Verdict` of :func:`subboost.claims.alignment_depth` (the rule and
    its thresholds live there).
    """
    per_sub = by_block.pivot_table(index="layer", columns="sublayer", values="mean_alignment")
    per_block = by_block.groupby("layer").mean_alignment.mean()
    per_block_std = by_block.groupby("layer").std_alignment.mean() if "std_alignment" in by_block else None
    rising = [s for s in per_sub.columns if per_sub[s].iloc[-1] > per_sub[s].iloc[0]]
    monotone = [s for s in per_sub.columns if bool((per_sub[s].diff().dropna() >= 0).all())]
    monotone_mean = bool((per_block.diff().dropna() >= 0).all())
    first, last = float(per_block.iloc[0]), float(per_block.iloc[-1])
    verdict = claims.alignment_depth(list(per_block.values), len(rising), per_sub.shape[1])
    out = dict(per_block=per_block, per_sublayer=per_sub, first=first, last=last, monotone_mean=monotone_mean,
               rising_sublayers=rising, monotone_sublayers=monotone,
               spearman=_spearman(by_block.layer, by_block.mean_alignment),
               spearman_blocks=_spearman(per_block.index, per_block.values), n_blocks=int(per_block.size),
               verdict=verdict)
    if per_block_std is not None:
        out.update(per_block_std=per_block_std, first_std=float(per_block_std.iloc[0]),
                   last_std=float(per_block_std.iloc[-1]))
    return out


# ----------------------------------------------------------------------------- expert selection


@dataclass(frozen=True)
class SelectionProtocol:
    """One expert-selection experiment.

    name: "Table 5" / "Table 10"; pool: experts always merged; candidates: the k chosen come
    from here; groups: evaluation groups (label → tasks), e.g. {"Pool": pool, "Ext": external};
    draws, seed: the random baseline (:func:`subboost.hogsvd.random_selection`).
    """

    name: str
    pool: tuple[str, ...]
    candidates: tuple[str, ...]
    k: int
    groups: Mapping[str, tuple[str, ...]]
    draws: int
    seed: int = 0

    @property
    def alignment_tasks(self) -> list[str]:
        """The experts the selection may look at: pool and candidates (never the external tasks)."""
        return list(self.pool) + list(self.candidates)

    @property
    def eval_tasks(self) -> list[str]:
        return list(dict.fromkeys(t for tasks in self.groups.values() for t in tasks))


def table5_protocol(task_names: Sequence[str], sizes: ChapterSizes, seed: int = 0) -> SelectionProtocol:
    """Table 5: pool = the first ``pool`` tasks, candidates = the next ``candidates``, external
    = the last ``external``; choose ``select_k``; score on pool and external tasks."""
    names = list(task_names)
    pool = tuple(names[: sizes.pool])
    cand = tuple(names[sizes.pool: sizes.pool + sizes.candidates])
    ext = tuple(names[len(names) - sizes.external:]) if sizes.external else ()
    if set(ext) & (set(pool) | set(cand)):
        raise ValueError("Table 5: external tasks overlap the pool or the candidates")
    groups = {"Pool": pool}
    if ext:
        groups["Ext"] = ext
    return SelectionProtocol("Table 5", pool, cand, sizes.select_k, groups, sizes.table5_draws, seed)


def table10_protocol(task_names: Sequence[str], sizes: ChapterSizes, seed: int = 0) -> SelectionProtocol:
    """Table 10: choose ``table10_k`` of all tasks (empty pool); score on all tasks."""
    names = tuple(task_names)
    return SelectionProtocol("Table 10", (), names, sizes.table10_k, {"All": names}, sizes.table10_draws, seed)


#: (merged tasks, evaluation tasks) → (α, per-task test table with task, accuracy,
#: normalized_accuracy as fractions).
Evaluator = Callable[[Sequence[str], Sequence[str]], tuple[float, pd.DataFrame]]


def merge_and_evaluate(suite: Suite, variant: Variant, alpha_grid: Sequence[float],
                       cache: ResultCache | None = None) -> Evaluator:
    """The evaluator of the selection experiments: merge the chosen experts with ``variant``,
    choose α on the validation splits of the *merged* tasks (best mean normalised accuracy),
    then evaluate the test splits of the evaluation tasks once at that α. With ``cache``
    (:class:`subboost.experiments.ResultCache`) a set evaluated before with the same settings
    (e.g. by chapter 4, read by the appendix) is read back."""
    from subboost.evaluate import alpha_sweep, best_alpha, evaluate_delta

    alphas = tuple(float(a) for a in alpha_grid)

    def evaluate(merged: list[str], eval_tasks: list[str]) -> tuple[float, pd.DataFrame]:
        delta, _ = merge_variant(suite.task_vectors(merged), variant)
        alpha = best_alpha(alpha_sweep(suite, delta, merged, alphas, split="val"))
        return alpha, evaluate_delta(suite, delta, alpha, eval_tasks, split="test")

    def run(merged: Sequence[str], eval_tasks: Sequence[str]) -> tuple[float, pd.DataFrame]:
        merged, eval_tasks = list(merged), list(eval_tasks)
        if cache is None:
            return evaluate(merged, eval_tasks)
        row = cache.get_or_compute(cache.key(suite, merged, variant, alphas, select_then_test=eval_tasks),
                                   lambda: dict(zip(("alpha", "per_task"), evaluate(merged, eval_tasks))))
        return row["alpha"], row["per_task"]

    return run


@dataclass(frozen=True, eq=False)
class SelectionRun:
    """Outcome of :func:`run_selection`: the HO-GSVD selection, one row per merged model
    (``rows``: selection, kind, draw, chosen, score, alpha, "<group> accuracy" and
    "<group> normalized" in percent) and the per-task test results (``per_task``)."""

    protocol: SelectionProtocol
    selection: object  # subboost.hogsvd.SelectionResult
    rows: pd.DataFrame
    per_task: pd.DataFrame
    evaluations: int = 0
    alpha_grid: tuple[float, ...] = field(default_factory=tuple)


def run_selection(protocol: SelectionProtocol, alignment, evaluator: Evaluator, *, method: str = "auto",
                  within_weight: float = 1.0, alpha_grid: Sequence[float] = (), progress: bool = True) -> SelectionRun:
    """HO-GSVD selection (:func:`subboost.hogsvd.select_experts` on ``alignment``, maximising the
    alignment of the chosen experts with the pool and with each other) against
    ``protocol.draws`` seeded random draws; each merged set (pool + chosen) is evaluated once
    with ``evaluator`` (repeated sets are evaluated once and reused)."""
    sel = select_experts(alignment, list(protocol.pool), list(protocol.candidates), protocol.k, method=method,
                         within_weight=within_weight)
    draws = random_selection(list(protocol.candidates), protocol.k, protocol.draws, protocol.seed)
    runs = [("HO-GSVD", "HO-GSVD", -1, list(sel.selected))]
    runs += [(f"random {d}", "Random", d, list(chosen)) for d, chosen in enumerate(draws)]
    cache: dict[frozenset, tuple[float, pd.DataFrame]] = {}
    rows, per_task = [], []
    for label, kind, draw, chosen in tqdm(runs, desc=f"{protocol.name}: merge + evaluate", disable=not progress):
        merged = list(protocol.pool) + chosen
        key = frozenset(merged)
        if key not in cache:
            cache[key] = evaluator(merged, protocol.eval_tasks)
        alpha, df = cache[key]
        row = dict(selection=label, kind=kind, draw=draw, chosen=", ".join(chosen),
                   score=selection_score(alignment, list(protocol.pool), chosen, within_weight), alpha=float(alpha))
        for group, tasks in protocol.groups.items():
            sub = df[df.task.isin(tasks)]
            row[f"{group} accuracy"] = 100 * float(sub.accuracy.mean())
            row[f"{group} normalized"] = 100 * float(sub.normalized_accuracy.mean())
        rows.append(row)
        per_task.append(df.assign(selection=label))
    return SelectionRun(protocol, sel, pd.DataFrame(rows), pd.concat(per_task, ignore_index=True), len(cache),
                        tuple(float(a) for a in alpha_grid))


def selection_summary(run: SelectionRun) -> pd.DataFrame:
    """Random (mean, std over the draws) and HO-GSVD rows, one column pair per metric, plus
    ``beats``: how many random draws the HO-GSVD selection exceeds on that metric."""
    metrics = [c for c in run.rows.columns if c.endswith((" accuracy", " normalized"))]
    rnd = run.rows[run.rows.kind == "Random"]
    ho = run.rows[run.rows.kind == "HO-GSVD"].iloc[0]
    out = {}
    for m in metrics:
        out[(m, "Random mean")] = float(rnd[m].mean())
        out[(m, "Random std")] = float(rnd[m].std(ddof=1)) if len(rnd) > 1 else float("nan")
        out[(m, "HO-GSVD")] = float(ho[m])
        out[(m, "HO-GSVD beats")] = f"{int((ho[m] > rnd[m]).sum())} of {len(rnd)}"
    s = pd.Series(out)
    return s.unstack(level=1).reindex(metrics)[["Random mean", "Random std", "HO-GSVD", "HO-GSVD beats"]]


def selection_vs_paper(run: SelectionRun, paper: Mapping[str, object], columns: Mapping[str, int | None]) -> pd.DataFrame:
    """Rows Random / HO-GSVD: ours (random as mean ± std) beside the paper's numbers.

    ``paper``: e.g. ``subboost.paper.TABLE5`` ({"Random": (pool, ext), "HO-GSVD": (...)});
    ``columns``: our metric column → position in the paper's tuple (``None`` for a scalar entry).
    """
    rnd = run.rows[run.rows.kind == "Random"]
    ho = run.rows[run.rows.kind == "HO-GSVD"].iloc[0]
    table = {}
    for col, pos in columns.items():
        if col not in run.rows:
            continue
        std = rnd[col].std(ddof=1) if len(rnd) > 1 else float("nan")
        table[f"ours: {col}"] = {"Random": f"{rnd[col].mean():.1f} ± {std:.1f}", "HO-GSVD": f"{ho[col]:.1f}"}
        for row in ("Random", "HO-GSVD"):
            val = paper[row] if pos is None else paper[row][pos]
            table.setdefault(f"paper: {col}", {})[row] = f"{val:.1f}"
    return pd.DataFrame(table)


@dataclass(frozen=True)
class RandomComparison:
    """HO-GSVD selection against the random draws on one metric (percent)."""

    metric: str
    ho: float
    random_mean: float
    random_std: float
    draws: int
    beats: int

    @property
    def diff(self) -> float:
        return self.ho - self.random_mean

    @property
    def stderr(self) -> float:
        """Standard error of the random mean (NaN with fewer than 2 draws)."""
        return self.random_std / math.sqrt(self.draws) if self.draws > 1 else float("nan")

    @property
    def beyond_noise(self) -> bool:
        """:func:`subboost.claims.beyond_noise`: |difference| > 2 standard errors of the random
        mean (False when that cannot be told: one draw, or draws without spread)."""
        return claims.beyond_noise(self.diff, self.random_std, self.draws)

    def verdict(self):
        """:func:`subboost.claims.selection_beats_random` on this comparison."""
        return claims.selection_beats_random(self.ho, self.random_mean, self.random_std, self.draws)

    def sentence(self, what: str) -> str:
        word = "above" if self.diff > 0 else "below" if self.diff < 0 else "equal to"
        out = (f"on {what} HO-GSVD selection scores {self.ho:.1f} %, {abs(self.diff):.1f} points {word} the mean of "
               f"{self.draws} random draws ({self.random_mean:.1f} %"
               + (f" ± {self.random_std:.1f} std" if self.draws > 1 else "") + f") and beats {self.beats} of them")
        if self.draws > 1 and not self.stderr > 0:
            out += "; the random draws all scored the same, so their noise cannot be estimated"
        elif self.draws > 1:
            out += (f"; the difference is {'more' if self.beyond_noise else 'less'} than 2 standard errors of the random "
                    f"mean ({2 * self.stderr:.1f} points)")
        return out


def compare_to_random(run: SelectionRun, metric: str) -> RandomComparison:
    """:class:`RandomComparison` of a :func:`run_selection` outcome on ``metric`` (a rows column)."""
    rnd = run.rows[run.rows.kind == "Random"][metric].astype(float)
    ho = float(run.rows[run.rows.kind == "HO-GSVD"][metric].iloc[0])
    std = float(rnd.std(ddof=1)) if len(rnd) > 1 else float("nan")
    return RandomComparison(metric, ho, float(rnd.mean()), std, int(len(rnd)), int((ho > rnd).sum()))


def alignment_predicts_accuracy(run: SelectionRun, metric: str) -> float:
    """Spearman ρ between the selection objective J and ``metric`` over all distinct merged sets."""
    rows = run.rows.drop_duplicates("chosen")
    return _spearman(rows.score, rows[metric])


# ----------------------------------------------------------------------------- Table 9


def table9_variants(beta: float = 0.0, pi: float = paper.HOGSVD_PI, methods: Sequence[str] = tuple(paper.TABLE9_VIT_B32),
                    lines_b_grid: Sequence[float] = LINES_B) -> list[Variant]:
    """The rows of Table 9 as :class:`~subboost.experiments.Variant` s (labels as in
    :data:`subboost.paper.TABLE9_VIT_B32`), each with SB at ``beta`` and LiNeS (b chosen on validation)."""
    b = tuple(float(x) for x in lines_b_grid)
    every = {
        "TA+SB+LiNeS": Variant("TA+SB+LiNeS", "ta", boost_beta=beta, lines_b_grid=b),
        "TIES+SB+LiNeS": Variant("TIES+SB+LiNeS", "ties", {"top_k": 0.2}, boost_beta=beta, lines_b_grid=b),
        "CSM+SB+LiNeS": Variant("CSM+SB+LiNeS", "consensus", {"k": 2, "lambdas": 0.4}, boost_beta=beta,
                                lines_b_grid=b),
        "Higher-Order SB+LiNeS": Variant("Higher-Order SB+LiNeS", "ho-sb", {"beta": beta, "pi": pi}, lines_b_grid=b),
    }
    unknown = [m for m in methods if m not in every]
    if unknown:
        raise ValueError(f"unknown Table 9 rows {unknown}; known: {', '.join(every)}")
    return [every[m] for m in methods]


def table9_beside_paper(ours: pd.DataFrame, paper_rows: Mapping[str, Sequence[float]] = paper.TABLE9_VIT_B32,
                        value: str = "accuracy", paper_counts: Sequence[int] = paper.TASK_COUNTS,
                        label: str = "paper (ViT-B/32)") -> pd.DataFrame:
    """Methods as rows: our ``value`` per task count ("ours N=…") beside the paper's columns
    ("paper … N=…"); rows the paper has but we did not run stay empty on our side
    (:func:`subboost.experiments.beside_paper` with ``all_rows``)."""
    wide = ours.pivot_table(index="method", columns="n_tasks", values=value, sort=False)
    wide.columns = [f"ours N={c}" for c in wide.columns]
    pap = pd.DataFrame({m: list(v) for m, v in paper_rows.items()}, index=[f"{label} N={c}" for c in paper_counts]).T
    return beside_paper(wide, pap, all_rows=True)


def merged_similarity(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], keys: Sequence[str]) -> pd.DataFrame:
    """Per block matrix: cosine ⟨A, B⟩_F / (‖A‖_F ‖B‖_F) of two merged updates and the ratio of
    their spectral norms ‖A‖₂ / ‖B‖₂."""
    rows = []
    for key in keys:
        x, y = a[key].double(), b[key].double()
        nx, ny = float(torch.linalg.norm(x)), float(torch.linalg.norm(y))
        if nx == 0 or ny == 0:
            continue
        rows.append(dict(key=key, **describe_key(key), cosine=float((x * y).sum()) / (nx * ny),
                         spectral_ratio=float(torch.linalg.matrix_norm(x, ord=2) / torch.linalg.matrix_norm(y, ord=2))))
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- figures


def fig_gsv_spectra(spectra: pd.DataFrame, shown: Sequence[str]):
    """Fig. 5a: per key, σ_ik of the shown single task vectors and of the average against the
    shared direction k (left), and the coherence σ_avg,k / mean_i σ_ik (right)."""
    import matplotlib.pyplot as plt

    keys = list(dict.fromkeys(spectra.key))
    fig, axes = plt.subplots(len(keys), 2, figsize=(10.5, 3.4 * len(keys)), squeeze=False)
    palette = colors(max(1, len(shown)))
    for row, key in zip(axes, keys):
        sub = spectra[(spectra.key == key) & spectra.in_rowspace]
        ax = row[0]
        for c, name in zip(palette, shown):
            s = sub[sub.matrix == name]
            ax.plot(s.direction, s.sigma, lw=0.9, color=c, alpha=0.85, label=f"Δ {name}")
        m = sub[sub.kind == "merged"]
        ax.plot(m.direction, m.sigma, lw=1.8, color="black", label=str(m.matrix.iloc[0]))
        ax.set_yscale("log")
        info = sub.iloc[0]
        ax.set_title(f"block {info.layer} {info.sublayer}")
        ax.set_xlabel("shared direction k [index; τ descending: unique → common]")
        ax.set_ylabel("generalised σ_k [weight units]")
        ax.legend(fontsize=7, ncol=2)
        ax = row[1]
        single = sub[sub.kind == "single"].pivot(index="direction", columns="matrix", values="sigma")
        coh = m.set_index("direction").sigma.reindex(single.index) / single.mean(axis=1)
        n = single.shape[1]
        ax.plot(coh.index, coh.values, lw=1.0, color="black")
        for val, lab, ls in ((1.0, "1 (identical use)", "-"), (n**-0.5, f"1/√N = {n**-0.5:.2f}", "--"),
                             (1.0 / n, f"1/N = {1 / n:.2f}", ":")):
            ax.axhline(val, color="grey", ls=ls, lw=0.9, label=lab)
        ax.set_ylim(0, 1.05)
        ax.set_title(f"block {info.layer} {info.sublayer}: coherence")
        ax.set_xlabel("shared direction k [index; τ descending: unique → common]")
        ax.set_ylabel("σ_avg,k / mean_i σ_i,k [ratio]")
        ax.legend(fontsize=7, loc="lower right")
    return fig


_ALIGN_LABEL = "alignment A_ij, Eq. 7 [mean |log σ-ratio|, dimensionless]"


def _heatmap(ax, matrix: np.ndarray, names: Sequence[str], vmin: float, vmax: float, cbar_ax=None,
             xlabels: bool = True, ylabels: bool = True, cbar: bool = True):
    import seaborn as sns

    data = np.asarray(matrix, dtype=float).copy()
    mask = np.eye(data.shape[0], dtype=bool)  # the diagonal is 0 by definition
    sns.heatmap(data, mask=mask, vmin=vmin, vmax=vmax, cmap="viridis", square=True, ax=ax, cbar=cbar,
                cbar_ax=cbar_ax, cbar_kws={"label": _ALIGN_LABEL},
                xticklabels=list(names) if xlabels else False, yticklabels=list(names) if ylabels else False)
    small = 6 if len(names) > 12 else 8
    ax.tick_params(axis="both", labelsize=small)
    if xlabels:
        ax.set_xlabel("expert j [task]")
    if ylabels:
        ax.set_ylabel("expert i [task]")
    return ax


def fig_alignment_mean(result: AlignmentResult, title: str | None = None):
    """Fig. 5b / 13d: the mean alignment matrix over all decomposed matrices."""
    import matplotlib.pyplot as plt

    n = len(result.names)
    size = 3.2 + 0.28 * n
    fig, ax = plt.subplots(figsize=(size + 1.6, size))
    a = result.matrix.to_numpy()
    off = a[~np.eye(n, dtype=bool)]
    _heatmap(ax, a, result.names, float(off.min()), float(off.max()))
    ax.set_title(title or f"mean alignment over {len(result.keys)} block matrices (higher = less interference)")
    ax.grid(False)
    return fig


def fig_alignment_layers(result: AlignmentResult, keys: Sequence[str], ncols: int | None = None):
    """Fig. 13a-c: the alignment matrix of each given key (e.g. attn.out_proj of every block),
    on one shared colour scale so that blocks compare. ``ncols`` defaults to 2 for more than 12
    experts (readable task labels), else 3."""
    import matplotlib.pyplot as plt

    keys = list(keys)
    n = len(result.names)
    if ncols is None:
        ncols = 2 if n > 12 else 3
    nrows = math.ceil(len(keys) / ncols)
    ncols = min(ncols, len(keys))
    panel = 2.4 + 0.16 * n
    fig = plt.figure(figsize=(panel * ncols + 1.4, panel * nrows + 0.4), constrained_layout=True)
    grid = fig.add_gridspec(nrows, ncols + 1, width_ratios=[1.0] * ncols + [0.05])
    offs = np.concatenate([result.per_layer[k][~np.eye(n, dtype=bool)] for k in keys])
    vmin, vmax = float(offs.min()), float(offs.max())
    cax = fig.add_subplot(grid[:, -1])
    for i, key in enumerate(keys):
        r, c = divmod(i, ncols)
        ax = fig.add_subplot(grid[r, c])
        _heatmap(ax, result.per_layer[key], result.names, vmin, vmax, cbar_ax=cax if i == 0 else None,
                 cbar=(i == 0), xlabels=(r == nrows - 1 or i + ncols >= len(keys)), ylabels=(c == 0))
        info = describe_key(key)
        ax.set_title(f"block {info['layer']} {info['sublayer']}", fontsize=9)
        ax.grid(False)
    return fig


def fig_alignment_depth(by_block: pd.DataFrame):
    """Mean (left) and spread over expert pairs (right, when available) of the off-diagonal
    alignment against block index, one line per sublayer and their mean."""
    import matplotlib.pyplot as plt

    panels = [("mean_alignment", "mean off-diagonal alignment [dimensionless]")]
    if "std_alignment" in by_block:
        panels.append(("std_alignment", "std of off-diagonal alignment over pairs [dimensionless]"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 3.8), squeeze=False)
    subs = sorted(by_block.sublayer.unique())
    for ax, (col, ylabel) in zip(axes[0], panels):
        for c, sub in zip(colors(len(subs)), subs):
            s = by_block[by_block.sublayer == sub].sort_values("layer")
            ax.plot(s.layer, s[col], marker="o", color=c, lw=1.2, label=sub)
        mean = by_block.groupby("layer")[col].mean()
        ax.plot(mean.index, mean.values, marker="s", color="black", lw=2.0, label="mean over sublayers")
        ax.set_xticks(sorted(by_block.layer.unique()))
        ax.set_xlabel("residual block l [index, 0 = shallowest]")
        ax.set_ylabel(ylabel)
    axes[0][0].legend(fontsize=8)
    return fig


def fig_selection(run: SelectionRun):
    """Each random draw's accuracy (dots), their mean (bar) and the HO-GSVD selection (star),
    per evaluation group."""
    import matplotlib.pyplot as plt

    groups = list(run.protocol.groups)
    fig, axes = plt.subplots(1, len(groups), figsize=(3.0 * len(groups) + 2.4, 3.6), squeeze=False,
                             layout="constrained")
    rnd = run.rows[run.rows.kind == "Random"]
    ho = run.rows[run.rows.kind == "HO-GSVD"].iloc[0]
    rng = np.random.default_rng(0)
    for ax, group in zip(axes[0], groups):
        col = f"{group} accuracy"
        x = rng.uniform(-0.12, 0.12, len(rnd))
        ax.scatter(x, rnd[col], color="grey", s=22, label=f"random draws ({len(rnd)})", zorder=3)
        ax.hlines(rnd[col].mean(), -0.3, 0.3, color="grey", lw=2.0, label="random mean")
        ax.scatter([0.0], [ho[col]], marker="*", s=220, color="C3", label="HO-GSVD selection", zorder=4)
        ax.set_xlim(-0.6, 0.6)
        ax.set_xticks([])
        ax.set_xlabel(f"{group} tasks ({len(run.protocol.groups[group])})")
        ax.set_ylabel("mean test accuracy [%]")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=8, loc="outside right upper")
    fig.suptitle(f"{run.protocol.name} protocol: {run.protocol.k} chosen of {len(run.protocol.candidates)}"
                 + (f", pool of {len(run.protocol.pool)}" if run.protocol.pool else ""))
    return fig
