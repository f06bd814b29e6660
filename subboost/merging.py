"""Merging methods: each one definition, run by one engine in memory or streamed.

A method (:class:`MergeMethod`, registered by name in :data:`METHODS`) is

- a per-key **kernel** ``kernel(key, deltas, stats, options) -> Δm[key]``: the merged update
  of one tensor from the N task vectors' values of that tensor (``deltas``, in task order);
- the whole-model **statistics** it declares, ``statistics(source, options, progress) -> stats``:
  folds over every key of the task vectors that run before any kernel (TIES: each task's trim
  threshold and the majority sign; Consensus over TIES: the same; the other methods: none);
- its α grid, a one-line summary with the citation, and the public function over
  ``dict[str, Tensor]`` whose signature holds the options and their defaults.

The engine (:func:`run_merge`) folds the statistics, runs the kernel key by key (row block by
row block on tensors that are not block matrices, when the source splits them), then
Subspace Boosting (paper Alg. 1, :mod:`subboost.boost`) per key, then LiNeS (the depth scaling
the paper's experiments apply on top, Table 1; its default a is a statistic of the task
vectors and of the merged update, so the merged update is held: in a dict here, in a spill
file when streamed). Its input is a :class:`TaskVectorSource`:
:class:`InMemoryTaskVectors` for task vectors held as dicts (:func:`merge`), or the
checkpoint readers of :mod:`subboost.streaming` (:func:`subboost.streaming.stream_merge`),
so both paths give the same tensors bit for bit (for the same key order: LiNeS' default a
adds per-key norms in key order). Methods that need the whole model at once
(ESM, which also needs activations) declare ``whole_model``; the engine loads every key for them.

Every method takes the list of task vectors Δi = θi − θ0 and returns the merged update Δm;
the merged model is θ0 + α·Δm (paper Sec. 3, "Background";
:func:`subboost.taskvector.apply_task_vector`). The same table serves the notebooks, the CLI
and the tests::

    from subboost.merging import merge, METHODS
    delta = merge(vectors, "ties", top_k=0.2, boost_beta=0.0)   # TIES, then Subspace Boosting

Subspace Boosting is applied on top of any method, after it: masks first, boost second (SB
does not commute with element-wise masks). LiNeS is a per-layer rescaling that SB commutes
with for a fixed a; its default a depends on whether it sees the boosted update
(:func:`merge`, ``lines_order``). Spectral methods (Iso-C, Iso-CTS, TSV-M, HO-SB) decompose
only the block matrices (:func:`subboost.taskvector.select_block_keys`) and average every
other tensor.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Protocol, Sequence

import torch
from torch import Tensor

from subboost.boost import boost_task_vector_with_report
from subboost.spectral import polar_factor
from subboost.taskvector import (
    work_dtype,
    LAYER_TYPES,
    StateDict,
    check_same_structure,
    is_zero,
    layer_index,
    select_block_keys,
)


# ---------------------------------------------------------------- the engine's input


class TaskVectorSource(Protocol):
    """Task vectors Δ1..ΔN as the engine reads them: key by key, optionally row block by row block."""

    keys: list[str]  # every key of the task vectors, in order
    n_tasks: int

    def deltas(self, key: str, rows: tuple[int, int] | None = None) -> list[Tensor]:
        """[Δ1[key], …, ΔN[key]] (rows ``rows[0]:rows[1]`` when given)."""

    def row_blocks(self, key: str) -> list[tuple[int, int] | None]:
        """How ``key`` is read: ``[None]`` (whole) or row ranges. Block matrices are never split."""

    def delta_dtype(self, key: str, task: int) -> torch.dtype:
        """The dtype of Δ_task[key] (without reading it)."""

    def numel(self, key: str) -> int:
        """Entries of ``key``."""


class InMemoryTaskVectors:
    """A :class:`TaskVectorSource` over task vectors held as ``dict[str, Tensor]`` (whole tensors)."""

    def __init__(self, vectors: Sequence[Mapping[str, Tensor]]) -> None:
        self.vectors = list(vectors)
        self.keys = list(self.vectors[0]) if self.vectors else []
        self.n_tasks = len(self.vectors)

    def deltas(self, key: str, rows: tuple[int, int] | None = None) -> list[Tensor]:
        if rows is None:
            return [tv[key] for tv in self.vectors]
        return [tv[key][rows[0]:rows[1]] for tv in self.vectors]

    def row_blocks(self, key: str) -> list[tuple[int, int] | None]:
        return [None]

    def delta_dtype(self, key: str, task: int) -> torch.dtype:
        return self.vectors[task][key].dtype

    def numel(self, key: str) -> int:
        return self.vectors[0][key].numel()


def _as_list(task_vectors: Sequence[Mapping[str, Tensor]] | Mapping[str, Mapping[str, Tensor]]) -> list[Mapping[str, Tensor]]:
    if isinstance(task_vectors, Mapping):
        names = list(task_vectors)
        vectors = [task_vectors[n] for n in names]
    else:
        vectors = list(task_vectors)
        names = None
    check_same_structure(vectors, names)
    return vectors


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


Progress = Callable[[int, str], Any]
"""``progress(total, description)`` → a bar with ``update()`` and ``close()`` (e.g. tqdm)."""


def _no_progress(total: int, desc: str) -> _NoBar:
    return _NoBar()


# ---------------------------------------------------------------- registry


Kernel = Callable[[str, list[Tensor], Mapping[str, Any], Mapping[str, Any]], Tensor]
Statistics = Callable[[TaskVectorSource, Mapping[str, Any], Progress], dict[str, Any]]
MergeFn = Callable[..., StateDict]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merging method.

    ``fn`` is its public function over task vectors held as dicts; its signature (after the
    task vectors) names the options and their defaults. ``kernel(key, deltas, stats, options)``
    merges one key; ``statistics(source, options, progress)`` folds over every key once per
    pass before any kernel runs and returns the whole-model statistics the kernel reads
    (``None``: the method needs none). ``check(options)`` validates the options before any
    data is read. ``whole_model``: the method needs every key at once (``fn`` is called on the
    loaded task vectors); ``kernel`` is then ``None``. A kernel must give the same values on
    row blocks of a tensor that is not a block matrix as on the whole tensor (the engine
    splits only those)."""

    name: str
    fn: MergeFn
    summary: str
    alpha_grid: tuple[float, ...] = field(default=tuple(round(0.1 * i, 1) for i in range(1, 11)))
    kernel: Kernel | None = None
    statistics: Statistics | None = None
    check: Callable[[Mapping[str, Any]], None] | None = None
    whole_model: bool = False

    def options(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """``params`` with the defaults of :attr:`fn` filled in; an unknown name raises
        ``TypeError`` (as calling ``fn`` would). Whole-model methods get ``params`` as given."""
        if self.whole_model:
            return dict(params)
        bound = inspect.signature(self.fn).bind_partial(None, **params)
        bound.apply_defaults()
        first = next(iter(inspect.signature(self.fn).parameters))
        return {k: v for k, v in bound.arguments.items() if k != first}


METHODS: dict[str, MergeMethod] = {}

_WIDE_ALPHA = tuple(round(0.1 * i, 1) for i in range(1, 31))  # Iso / TSV grids: 0.1 .. 3.0


def register(
    name: str,
    summary: str,
    alpha_grid: Sequence[float] | None = None,
    *,
    kernel: Kernel | None = None,
    statistics: Statistics | None = None,
    check: Callable[[Mapping[str, Any]], None] | None = None,
    whole_model: bool = False,
) -> Callable[[MergeFn], MergeFn]:
    """Decorator adding a method to :data:`METHODS` under ``name``: the decorated public
    function plus its ``kernel`` (or ``whole_model=True``), ``statistics`` and ``check``."""
    if (kernel is None) != whole_model:
        raise ValueError(f"merging method '{name}': give a kernel, or whole_model=True")

    def deco(fn: MergeFn) -> MergeFn:
        if name in METHODS:
            raise ValueError(f"merging method '{name}' is registered twice")
        kwargs = {} if alpha_grid is None else {"alpha_grid": tuple(alpha_grid)}
        METHODS[name] = MergeMethod(name, fn, summary, kernel=kernel, statistics=statistics, check=check,
                                    whole_model=whole_model, **kwargs)
        return fn

    return deco


def get_method(name: str) -> MergeMethod:
    """Look up a method; an unknown name raises ``ValueError`` listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merging method '{name}'; known: {', '.join(sorted(METHODS))}") from None


def _merge_with(name: str, task_vectors: Sequence[Mapping[str, Tensor]], **options: Any) -> StateDict:
    """A registered method on task vectors held as dicts (the body of its public function)."""
    vectors = _as_list(task_vectors)
    _, items = run_merge(get_method(name), InMemoryTaskVectors(vectors), options)
    return dict(items)


def _sum(deltas: Sequence[Tensor]) -> Tensor:
    """Σ_i Δi of one key, in the work precision (:func:`subboost.taskvector.work_dtype`)."""
    acc = deltas[0].to(work_dtype(deltas[0])).clone()
    for d in deltas[1:]:
        acc += d.to(acc.dtype)
    return acc


# ---------------------------------------------------------------- element-wise methods


def _ta_kernel(key: str, deltas: list[Tensor], stats: Mapping[str, Any], options: Mapping[str, Any]) -> Tensor:
    return _sum(deltas).to(deltas[0].dtype)


def _average_kernel(key: str, deltas: list[Tensor], stats: Mapping[str, Any], options: Mapping[str, Any]) -> Tensor:
    return (_sum(deltas) / len(deltas)).to(deltas[0].dtype)


@register("ta", "Task Arithmetic: Δm = Σ Δi (Ilharco et al. 2023)", kernel=_ta_kernel)
def task_arithmetic(task_vectors: Sequence[Mapping[str, Tensor]]) -> StateDict:
    """Task Arithmetic, Δm = Σ_i Δi."""
    return _merge_with("ta", task_vectors)


@register("average", "Weight averaging: Δm = (1/N) Σ Δi", kernel=_average_kernel)
def average(task_vectors: Sequence[Mapping[str, Tensor]]) -> StateDict:
    """Plain averaging of the task vectors (TA with α = 1/N)."""
    return _merge_with("average", task_vectors)


def _check_fraction(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{name} is a fraction in (0, 1] (0.2 keeps 20%), got {value}")
    return value


TIES_TRIM_RULES = ("official", "top_k")
"""How many entries TIES keeps per task of P entries, with ``top_k`` = K (see :func:`ties`):

- ``"official"`` (default): min(P, ⌊P·K⌋ + 1). The official TIES code (and the TALL-masks /
  LiNeS code that reuses it) takes k = P − ⌊P·K⌋ and keeps every entry with
  |x| ≥ kthvalue(|x|, k), i.e. the ⌊P·K⌋ + 1 largest magnitudes (one more than the top-K
  share; K = 1 keeps everything).
- ``"top_k"``: max(1, ⌊P·K⌋), exactly the top-K share the TIES paper describes.

Ties at the threshold are kept under both rules."""


def _check_trim(trim: str) -> str:
    if trim not in TIES_TRIM_RULES:
        raise ValueError(f"ties trim must be one of {', '.join(TIES_TRIM_RULES)}; got '{trim}'")
    return trim


TIES_AGGREGATES = ("mean", "sum")


def _check_aggregate(aggregate: str, name: str = "aggregate") -> str:
    if aggregate not in TIES_AGGREGATES:
        raise ValueError(f"ties {name} must be one of {', '.join(TIES_AGGREGATES)}; got '{aggregate}'")
    return aggregate


def ties_keep_count(total: int, top_k: float, trim: str = "official") -> int:
    """Number of entries (before ties at the threshold) TIES keeps out of ``total``
    (:data:`TIES_TRIM_RULES`)."""
    top_k = _check_fraction(top_k, "top_k")
    share = int(total * top_k)
    if _check_trim(trim) == "official":
        return min(total, share + 1)
    return max(1, share)


def _magnitude_bits(x: Tensor, dtype: torch.dtype) -> Tensor:
    """Bit patterns of |x| in ``dtype`` (float32 → int32, float64 → int64), monotone in the
    magnitude."""
    itype = torch.int64 if dtype == torch.float64 else torch.int32
    return x.detach().abs().to(dtype).contiguous().view(itype)


def _select_from_top(hist: Tensor, rank: int) -> tuple[int, int]:
    """Bin holding the ``rank``-th largest element (1-based) of a histogram, and the rank
    inside that bin."""
    rev = torch.flip(hist, [0]).cumsum(0)
    pos = int(torch.searchsorted(rev, torch.tensor(rank, dtype=rev.dtype)))
    b = hist.numel() - 1 - pos
    above = int(rev[pos - 1]) if pos > 0 else 0
    return b, rank - above


def _threshold_precision(source: TaskVectorSource) -> torch.dtype:
    """The precision magnitudes are ranked in: float64 if any task-vector tensor is float64,
    else float32 (a float32 threshold compared with float64 magnitudes would drop or add
    entries at the boundary; float32 magnitudes rank the same in float64)."""
    for key in source.keys:
        for t in range(source.n_tasks):
            if source.delta_dtype(key, t) == torch.float64:
                return torch.float64
    return torch.float32


def _ties_thresholds(source: TaskVectorSource, top_k: float, trim: str, progress: Progress = _no_progress) -> list[float]:
    """Per task, the magnitude of its m-th largest entry over all P parameters, with
    m = :func:`ties_keep_count` (P, top_k, trim): exactly ``torch.kthvalue`` of the magnitudes
    at rank P − m + 1, found without holding a whole task vector by a radix selection on the
    bit patterns of the magnitudes, 16 bits per pass over every key (2 passes in float32, 4 in
    float64: :func:`_threshold_precision`)."""
    top_k = _check_fraction(top_k, "top_k")
    _check_trim(trim)
    n = source.n_tasks
    total = sum(source.numel(k) for k in source.keys)
    if total == 0:
        raise ValueError("ties: the task vectors are empty")
    keep = ties_keep_count(total, top_k, trim)
    dtype = _threshold_precision(source)
    width = 64 if dtype == torch.float64 else 32
    shifts = list(range(width - 16, -1, -16))
    prefix = [0] * n
    rank = [keep] * n
    for p, shift in enumerate(shifts):
        hist = torch.zeros(n, 1 << 16, dtype=torch.int64)
        bar = progress(len(source.keys), f"ties: thresholds {p + 1}/{len(shifts)}")
        for key in source.keys:
            for rows in source.row_blocks(key):
                for t, d in enumerate(source.deltas(key, rows)):
                    bits = _magnitude_bits(d, dtype).reshape(-1).cpu()
                    if p:  # entries whose higher bits are the selected prefix; their next 16 bits
                        bits = bits[(bits >> (shift + 16)) == prefix[t]] >> shift & 0xFFFF
                    else:  # the top 16 bits (the sign bit of |x| is 0): no mask, no int64 copy
                        bits = bits >> shift
                    if bits.numel():
                        hist[t] += torch.bincount(bits, minlength=1 << 16)
            bar.update(1)
        bar.close()
        for t in range(n):
            b, rank[t] = _select_from_top(hist[t], rank[t])
            prefix[t] = (prefix[t] << 16) | b
    itype = torch.int64 if dtype == torch.float64 else torch.int32
    thresholds = []
    for t in range(n):
        value = prefix[t] - (1 << width) if prefix[t] >= 1 << (width - 1) else prefix[t]
        thresholds.append(float(torch.tensor([value], dtype=itype).view(dtype)))
    return thresholds


def ties_trim_thresholds(
    task_vectors: Sequence[Mapping[str, Tensor]], top_k: float = 0.2, trim: str = "official"
) -> list[float]:
    """Per task, the magnitude of its m-th largest entry over all P parameters, with
    m = :func:`ties_keep_count` (P, top_k, trim), as the official code's ``torch.kthvalue``.

    The ranking runs in the task vectors' own precision (float64 inputs stay float64, others
    float32). The returned Python floats hold the value exactly."""
    return _ties_thresholds(InMemoryTaskVectors(list(task_vectors)), top_k, trim)


def _elected_signs(stack: Tensor) -> Tensor:
    """TIES step 2 on trimmed values ``stack`` (tasks × ...): per entry, the sign of their
    sum (0 for an exact tie)."""
    return torch.sign(stack.sum(0))


def ties_disjoint(stack: Tensor, majority_sign: float, aggregate: str = "mean") -> Tensor:
    """TIES steps 2-3 on trimmed values ``stack`` (tasks × ...): elect the sign per entry
    (sign of the sum; exact ties take ``majority_sign``), then aggregate the values that
    agree with it: their mean ("dis-mean") or sum ("dis-sum"); entries with none get 0."""
    _check_aggregate(aggregate)
    sign = _elected_signs(stack)
    sign = torch.where(sign == 0, torch.full_like(sign, majority_sign), sign)
    agree = (torch.sign(stack) == sign.unsqueeze(0)) & (stack != 0)
    total = torch.where(agree, stack, torch.zeros_like(stack)).sum(0)
    if aggregate == "sum":
        return total
    count = agree.sum(0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def majority_sign_of(elected_sum: float) -> float:
    """The sign that exact ties take: + if the elected signs sum to a positive number, −
    otherwise. The official code assigns sign(Σ elected signs), which is 0 when that sum is
    0; its disjoint step then keeps the negative values (``tensor < 0`` where the sign is
    not positive), i.e. it behaves as −1, which is what is returned here."""
    return 1.0 if elected_sum > 0 else -1.0


def _ties_trimmed(deltas: list[Tensor], thresholds: Sequence[float]) -> Tensor:
    """TIES step 1 on one key: the task values (tasks × ...) whose magnitude reaches their
    task's threshold, the others zeroed, in the work precision."""
    stack = torch.stack([d.to(work_dtype(d)) for d in deltas])
    thr = torch.tensor(list(thresholds), dtype=stack.dtype, device=stack.device).view(-1, *([1] * (stack.ndim - 1)))
    return torch.where(stack.abs() >= thr, stack, torch.zeros_like(stack))


def _ties_statistics(source: TaskVectorSource, options: Mapping[str, Any], progress: Progress = _no_progress) -> dict[str, Any]:
    """TIES' whole-model statistics: each task's trim threshold (:func:`_ties_thresholds`)
    and the majority sign that exact ties of the election take (:func:`majority_sign_of` of
    Σ over all entries of the elected signs), one more pass."""
    thresholds = _ties_thresholds(source, options["top_k"], options["trim"], progress)
    majority = 0.0
    bar = progress(len(source.keys), "ties: majority sign")
    for key in source.keys:
        for rows in source.row_blocks(key):
            stack = _ties_trimmed(source.deltas(key, rows), thresholds)
            majority += float(_elected_signs(stack).sum())
        bar.update(1)
    bar.close()
    return {"thresholds": thresholds, "majority_sign": majority_sign_of(majority)}


def _ties_value(deltas: list[Tensor], stats: Mapping[str, Any], aggregate: str) -> Tensor:
    """TIES on one key given its statistics: trim, elect, disjoint aggregate (input dtype)."""
    return ties_disjoint(_ties_trimmed(deltas, stats["thresholds"]), stats["majority_sign"], aggregate).to(deltas[0].dtype)


def _ties_kernel(key: str, deltas: list[Tensor], stats: Mapping[str, Any], options: Mapping[str, Any]) -> Tensor:
    return _ties_value(deltas, stats, options["aggregate"])


def _ties_check(options: Mapping[str, Any]) -> None:
    _check_fraction(options["top_k"], "top_k")
    _check_trim(options["trim"])
    _check_aggregate(options["aggregate"])


@register("ties", "TIES: trim to top-k% per task, elect signs, disjoint mean (Yadav et al. 2023)",
          tuple(round(0.2 * i, 1) for i in range(1, 11)),
          kernel=_ties_kernel, statistics=_ties_statistics, check=_ties_check)
def ties(
    task_vectors: Sequence[Mapping[str, Tensor]],
    top_k: float = 0.2,
    trim: str = "official",
    aggregate: str = "mean",
) -> StateDict:
    """TIES-Merging (Yadav et al. 2023), matching the official implementation.

    1. Trim: per task keep the entries whose magnitude is at least its m-th largest over the
       whole task vector (a whole-model statistic, :func:`ties_trim_thresholds`).
       ``trim="official"`` (default) takes m = ⌊P·top_k⌋ + 1 as the official
       code does (k = P − ⌊P·K⌋, then ``|x| ≥ kthvalue``: one entry more than the top-k
       share); ``trim="top_k"`` takes m = ⌊P·top_k⌋, the share the paper describes
       (:data:`TIES_TRIM_RULES`). The book uses the official rule so that its TIES numbers are
       the ones the public code produces; on real models the two differ by one entry per task.
       The ranking is done in the input's precision (float64 stays float64).
    2. Elect: per entry, sign of the sum of the trimmed values. An exact tie (sum 0) takes
       the majority sign, the sign of the sum of all elected signs over the whole vector
       (− when that sum is 0, which is how the official code behaves:
       :func:`majority_sign_of`).
    3. Disjoint aggregation of the trimmed values that agree with the elected sign
       (:func:`ties_disjoint`): ``aggregate="mean"`` (TIES' "dis-mean", the default), or
       ``"sum"`` ("dis-sum", which the official Consensus / TALL-masks code uses as its TIES
       base). Entries with none get 0.
    """
    return _merge_with("ties", task_vectors, top_k=top_k, trim=trim, aggregate=aggregate)


def _lambdas(lambdas: float | Sequence[float], n: int) -> list[float]:
    lams = [float(lambdas)] * n if isinstance(lambdas, (int, float)) else [float(x) for x in lambdas]
    if len(lams) != n:
        raise ValueError(f"lambdas: got {len(lams)} values for {n} task vectors")
    return lams


def _tall_masks_key(deltas: Sequence[Tensor], lams: Sequence[float], mtl: Tensor) -> list[Tensor]:
    """TALL masks of one key: mask_t = |Δt| > λt·|Δ_MTL − Δt| (strict), Δ_MTL = ``mtl``."""
    masks = []
    for lam, delta in zip(lams, deltas):
        d = delta.to(mtl.dtype)
        masks.append(d.abs() > lam * (mtl - d).abs())
    return masks


def _consensus_key(value: Tensor, masks: Sequence[Tensor], k: int) -> Tensor:
    """Keep the entries of ``value`` that at least ``k`` of the ``masks`` select."""
    count = torch.stack(list(masks)).sum(0)
    return torch.where(count >= int(k), value, torch.zeros_like(value))


def tall_masks(
    task_vectors: Sequence[Mapping[str, Tensor]],
    lambdas: float | Sequence[float] = 0.4,
    reference: Mapping[str, Tensor] | None = None,
) -> list[dict[str, Tensor]]:
    """TALL masks (Wang et al. 2024): mask_t = |Δt| > λt·|Δ_MTL − Δt|.

    Δ_MTL is ``reference``, the multi-task vector the masks are built against (default: the
    Task Arithmetic sum Σ Δt; Consensus over TIES passes its TIES vector, as the official code
    does). The comparison is strict (``>``), as in the official code."""
    vectors = _as_list(task_vectors)
    lams = _lambdas(lambdas, len(vectors))
    masks: list[dict[str, Tensor]] = [{} for _ in vectors]
    for key in vectors[0]:
        deltas = [tv[key] for tv in vectors]
        if reference is None:
            mtl = _sum(deltas)
        else:
            if key not in reference:
                raise ValueError(f"tall_masks: the reference has no key '{key}'")
            mtl = reference[key].to(work_dtype(reference[key]))
        for t, mask in enumerate(_tall_masks_key(deltas, lams, mtl)):
            masks[t][key] = mask
    return masks


def consensus_apply(merged: Mapping[str, Tensor], masks: Sequence[Mapping[str, Tensor]], k: int = 2) -> StateDict:
    """Keep the entries of ``merged`` that at least ``k`` of the ``masks`` select."""
    return {key: _consensus_key(value, [m[key] for m in masks], k) for key, value in merged.items()}


def _consensus_kernel(key: str, deltas: list[Tensor], stats: Mapping[str, Any], options: Mapping[str, Any]) -> Tensor:
    lams = _lambdas(options["lambdas"], len(deltas))
    if options["base"] == "ta":
        total = _sum(deltas)
        merged, mtl = total.to(deltas[0].dtype), total
    else:
        merged = _ties_value(deltas, stats, options["ties_aggregate"])
        mtl = merged.to(work_dtype(merged))
    return _consensus_key(merged, _tall_masks_key(deltas, lams, mtl), options["k"])


def _consensus_statistics(source: TaskVectorSource, options: Mapping[str, Any], progress: Progress = _no_progress) -> dict[str, Any]:
    """Consensus over TIES needs TIES' statistics (:func:`_ties_statistics`); over TA, none."""
    return _ties_statistics(source, options, progress) if options["base"] == "ties" else {}


def _consensus_check(options: Mapping[str, Any]) -> None:
    if options["base"] not in ("ta", "ties"):
        raise ValueError(f"consensus base must be 'ta' or 'ties', got '{options['base']}'")
    if int(options["k"]) < 1:
        raise ValueError(f"consensus k must be ≥ 1, got {options['k']}")
    if options["base"] == "ties":
        _check_fraction(options["top_k"], "top_k")
        _check_trim(options["trim"])
        _check_aggregate(options["ties_aggregate"], "ties_aggregate")


@register("consensus", "Consensus merging: keep entries selected by ≥ k TALL masks (Wang et al. 2024)",
          kernel=_consensus_kernel, statistics=_consensus_statistics, check=_consensus_check)
def consensus(
    task_vectors: Sequence[Mapping[str, Tensor]],
    k: int = 2,
    lambdas: float | Sequence[float] = 0.4,
    base: str = "ta",
    top_k: float = 0.2,
    ties_aggregate: str = "sum",
    trim: str = "official",
) -> StateDict:
    """Consensus merging (Wang et al. 2024), matching the official TALL-masks code.

    The ``base`` multi-task vector Δ_MTL is built first: ``"ta"``, the sum Σ Δt, or
    ``"ties"``, TIES with ``top_k`` (the official code fixes 20%) and the disjoint *sum* of
    the agreeing values (``ties_aggregate="sum"``, the official code's "dis-sum";
    ``"mean"`` gives TIES' own dis-mean instead; the whole-model statistics are TIES'). The
    TALL masks are built against that same vector, mask_t = |Δt| > λt·|Δ_MTL − Δt| (strict,
    :func:`tall_masks`), and the result is Δ_MTL restricted to the entries that at least
    ``k`` masks select (k = 2 in the paper). Per key, so no statistics beyond the base's.
    ``lambdas`` are the per-task TALL thresholds (the papers tune them per task on
    validation data from {0.2, ..., 0.6}). ``trim``: TIES' keep rule (:data:`TIES_TRIM_RULES`).
    """
    return _merge_with("consensus", task_vectors, k=k, lambdas=lambdas, base=base, top_k=top_k,
                       ties_aggregate=ties_aggregate, trim=trim)


# ---------------------------------------------------------------- LiNeS


def _task_sum_l1(source: TaskVectorSource, progress: Progress = _no_progress) -> float:
    """‖Σt Δt‖1 over the whole model (the numerator of LiNeS' default a), key by key in the
    work precision (row blocks of a key are joined before its norm is taken)."""
    total = 0.0
    bar = progress(len(source.keys), "lines: ‖Σ Δt‖1")
    for key in source.keys:
        parts = [_sum(source.deltas(key, rows)) for rows in source.row_blocks(key)]
        value = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        total += float(value.abs().sum())
        bar.update(1)
    bar.close()
    return total


def _l1(value: Tensor) -> float:
    """‖value‖1 accumulated in float64 (a term of the denominator of LiNeS' default a)."""
    return float(value.abs().to(torch.float64).sum())


def _lines_a(num: float, den: float, n_tasks: int) -> float:
    if den == 0.0:
        raise ValueError("LiNeS: the merged update is all zero")
    return num / den / n_tasks


def lines_default_a(task_vectors: Sequence[Mapping[str, Tensor]], merged: Mapping[str, Tensor]) -> float:
    """LiNeS multi-task default a = (‖Σt Δt‖1 / ‖Δm‖1) / T (Wang et al. 2025)."""
    vectors = _as_list(task_vectors)
    return _lines_a(_task_sum_l1(InMemoryTaskVectors(vectors)), sum(_l1(v) for v in merged.values()), len(vectors))


def lines_scales(keys: Iterable[str], a: float, b: float) -> dict[str, float]:
    """Per-key LiNeS factor: a + b·l/(L−1) inside residual block l of a stack of L blocks,
    a outside the blocks. L is counted per stack (e.g. ``visual`` and the text tower)."""
    keys = list(keys)
    depth: dict[str, int] = {}
    for key in keys:
        info = layer_index(key)
        if info is not None:
            depth[info[0]] = max(depth.get(info[0], 0), info[1] + 1)
    scales = {}
    for key in keys:
        info = layer_index(key)
        if info is None:
            scales[key] = float(a)
        else:
            n = depth[info[0]]
            scales[key] = float(a) + float(b) * (info[1] / (n - 1) if n > 1 else 0.0)
    return scales


def _scaled(value: Tensor, scale: float) -> Tensor:
    """One key's LiNeS rescaling, in the work precision, back in the value's dtype."""
    return (value.to(work_dtype(value)) * scale).to(value.dtype)


def lines_scale(
    merged: Mapping[str, Tensor],
    b: float,
    a: float | None = None,
    task_vectors: Sequence[Mapping[str, Tensor]] | None = None,
) -> StateDict:
    """LiNeS: scale the merged update of residual block l by a + b·l/(L−1), the rest by a.

    With ``a=None`` the multi-task default :func:`lines_default_a` is used (needs
    ``task_vectors``).
    """
    if a is None:
        if task_vectors is None:
            raise ValueError("LiNeS: pass a, or the task vectors to compute its default")
        a = lines_default_a(task_vectors, merged)
    scales = lines_scales(merged.keys(), a, b)
    return {k: _scaled(v, scales[k]) for k, v in merged.items()}


# ---------------------------------------------------------------- spectral methods


def _spectral_key(key: str, deltas: list[Tensor], per_matrix: Callable[[list[Tensor]], Tensor],
                  options: Mapping[str, Any]) -> Tensor:
    """A spectral method on one key: ``per_matrix`` on a selected block matrix
    (:func:`subboost.taskvector.select_block_keys` with ``layer_types``, ``include_proj``;
    all-zero in every task: zeros), the mean of the task vectors elsewhere."""
    dtype = deltas[0].dtype
    if select_block_keys({key: deltas[0]}, options["layer_types"], options["include_proj"]):
        mats = [d.to(work_dtype(d)) for d in deltas]
        if all(is_zero(m) for m in mats):
            return deltas[0].clone()
        return per_matrix(mats).to(dtype)
    return (_sum(deltas) / len(deltas)).to(dtype)


def _check_layer_types(options: Mapping[str, Any]) -> None:
    select_block_keys({}, options["layer_types"], options["include_proj"])  # raises on unknown types


def _iso_c_matrix(mats: list[Tensor]) -> Tensor:
    u, s, vh = torch.linalg.svd(sum(mats), full_matrices=False)
    return s.mean() * (u @ vh)


def _iso_c_kernel(key: str, deltas: list[Tensor], stats: Mapping[str, Any], options: Mapping[str, Any]) -> Tensor:
    return _spectral_key(key, deltas, _iso_c_matrix, options)


@register("iso-c", "Iso-C: flatten the spectrum of Σ Δi to its mean (Marczak et al. 2025)", _WIDE_ALPHA,
          kernel=_iso_c_kernel, check=_check_layer_types)
def iso_c(
    task_vectors: Sequence[Mapping[str, Tensor]],
    layer_types: Iterable[str] = LAYER_TYPES,
    include_proj: bool = False,
) -> StateDict:
    """Iso-C: per block matrix, M = Σ Δi = U S Vᵀ → mean(S)·U Vᵀ. Other tensors: mean of Δi."""
    return _merge_with("iso-c", task_vectors, layer_types=layer_types, include_proj=include_proj)


def iso_cts_split(rank: int, n_tasks: int, common_fraction: float = 0.8) -> tuple[int, int]:
    """Iso-CTS' split of the r = ``rank`` directions into (common size, directions per task).

    As the official code (iso-merging, ``src/utils/iso.py``): k = ⌊common_fraction·r⌋, the
    task-specific total is round((r − k)/N)·N with Python's ``round`` (half to even), and the
    common size is re-set to r minus that total, so that common + N·per_task = r and every
    direction is filled. Where the official formula would ask for more than r directions
    (possible only for small r with a small ``common_fraction``, where that code fails), the
    per-task size drops to ⌊r/N⌋ and the common part takes the rest."""
    if rank < 1 or n_tasks < 1:
        raise ValueError(f"iso_cts_split: need rank ≥ 1 and n_tasks ≥ 1, got {rank}, {n_tasks}")
    k = int(rank * common_fraction)
    per_task = round((rank - k) / n_tasks)
    if per_task * n_tasks > rank:
        per_task = rank // n_tasks
    return rank - per_task * n_tasks, per_task


def _iso_cts_kernel(key: str, deltas: list[Tensor], stats: Mapping[str, Any], options: Mapping[str, Any]) -> Tensor:
    common_fraction = options["common_fraction"]

    def cts(mats: list[Tensor]) -> Tensor:
        u, s, vh = torch.linalg.svd(sum(mats), full_matrices=False)
        c, per_task = iso_cts_split(s.numel(), len(mats), common_fraction)
        uc = u[:, :c]
        us, ss, vs = [uc], [s[:c]], [vh[:c].T]
        if per_task > 0:
            for m in mats:
                resid = m - uc @ (uc.T @ m)
                ut, st, vht = torch.linalg.svd(resid, full_matrices=False)
                us.append(ut[:, :per_task])
                ss.append(st[:per_task])
                vs.append(vht[:per_task].T)
        big_u, big_s, big_v = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
        return big_s.mean() * (polar_factor(big_u) @ polar_factor(big_v).T)

    return _spectral_key(key, deltas, cts, options)


def _iso_cts_check(options: Mapping[str, Any]) -> None:
    _check_fraction(options["common_fraction"], "common_fraction")
    _check_layer_types(options)


@register("iso-cts", "Iso-CTS: common + task-specific subspaces, isotropic spectrum (Marczak et al. 2025)", _WIDE_ALPHA,
          kernel=_iso_cts_kernel, check=_iso_cts_check)
def iso_cts(
    task_vectors: Sequence[Mapping[str, Tensor]],
    common_fraction: float = 0.8,
    layer_types: Iterable[str] = LAYER_TYPES,
    include_proj: bool = False,
) -> StateDict:
    """Iso-CTS (Marczak et al. 2025), per block matrix of rank r = min(m, n), as the official code:

    1. split r into a common size c and s directions per task with c + N·s = r
       (:func:`iso_cts_split`: k = ⌊0.8 r⌋, s = round((r − k)/N), c = r − N·s);
    2. common subspace: the top c singular triplets of M = Σ Δi;
    3. each task adds the top s singular triplets of its projection onto the complement of
       the common *left* subspace, Δi − Uc Ucᵀ Δi (thin SVD of that m × n matrix);
    4. the concatenated U and V (r columns each) are orthogonalised (Procrustes, X → P Qᵀ)
       and every singular value is set to the mean of the r concatenated values.

    Other tensors: mean of Δi. An earlier version kept c = ⌊0.8 r⌋ and s = ⌊(r − c)/N⌋,
    which leaves up to N − 1 directions empty and adds none at all when N > r − ⌊0.8 r⌋;
    no published description asks for that, so it was replaced by the official split (on N Gaussian 768 × 768
    float64 task matrices the two differ by 20 % relative at N = 8 and 36 % at N = 20, and
    agree at N = 14, where 154/14 is whole).
    """
    return _merge_with("iso-cts", task_vectors, common_fraction=common_fraction, layer_types=layer_types,
                       include_proj=include_proj)


def _tsv_matrix(mats: list[Tensor]) -> Tensor:
    k = max(1, min(mats[0].shape) // len(mats))
    us, ss, vs = [], [], []
    for m in mats:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    big_u, big_s, big_v = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
    return (polar_factor(big_u) * big_s.unsqueeze(0)) @ polar_factor(big_v).T


def _tsv_kernel(key: str, deltas: list[Tensor], stats: Mapping[str, Any], options: Mapping[str, Any]) -> Tensor:
    return _spectral_key(key, deltas, _tsv_matrix, options)


@register("tsv", "TSV-M: per-task top singular triplets, orthogonalised and summed (Gargiulo et al. 2025)", _WIDE_ALPHA,
          kernel=_tsv_kernel, check=_check_layer_types)
def tsv_merge(
    task_vectors: Sequence[Mapping[str, Tensor]],
    layer_types: Iterable[str] = LAYER_TYPES,
    include_proj: bool = False,
) -> StateDict:
    """TSV-M, per block matrix of rank r: keep each task's top ⌊r/N⌋ singular triplets,
    concatenate U, Σ, V, replace U and V by their closest orthonormal matrices (Procrustes,
    X → P Qᵀ), rebuild U⊥ diag(Σ) V⊥ᵀ. Other tensors: mean of Δi."""
    return _merge_with("tsv", task_vectors, layer_types=layer_types, include_proj=include_proj)


def _ho_sb_kernel(key: str, deltas: list[Tensor], stats: Mapping[str, Any], options: Mapping[str, Any]) -> Tensor:
    from subboost.hogsvd import higher_order_subspace_boost  # heavy module, loaded on use

    return higher_order_subspace_boost([{key: d} for d in deltas], **options)[key]


@register("ho-sb", "Higher-Order Subspace Boosting: HO-GSVD, Procrustes, boosted summed spectrum (paper Alg. 2)",
          kernel=_ho_sb_kernel, check=_check_layer_types)
def higher_order_sb(
    task_vectors: Sequence[Mapping[str, Tensor]],
    beta: float = 0.0,
    pi: float = 1e-2,
    layer_types: Iterable[str] = LAYER_TYPES,
    include_proj: bool = False,
) -> StateDict:
    """Paper Alg. 2, per key (its HO-GSVD of the N task matrices is per matrix); see
    :func:`subboost.hogsvd.higher_order_subspace_boost`."""
    return _merge_with("ho-sb", task_vectors, beta=beta, pi=pi, layer_types=layer_types, include_proj=include_proj)


@register("esm", "Essential Subspace Merging: per-task PCA of feature shifts, projection, polarised scaling (Li et al. 2026)",
          _WIDE_ALPHA, whole_model=True)
def essential_subspace(
    task_vectors: Sequence[Mapping[str, Tensor]],
    activations: Sequence[Mapping[str, Tensor]] | None = None,
    **params,
) -> StateDict:
    """ESM, reimplemented from its abstract; see :func:`subboost.esm.essential_subspace_merge`.

    ``activations[i][key]`` holds inputs x (samples × in_features) of block matrix ``key`` on
    unlabelled data of task i, in the order of ``task_vectors``. The engine runs it on the
    whole model (``whole_model``): it needs activations, which checkpoints do not hold.
    """
    from subboost.esm import essential_subspace_merge  # loaded on use

    if activations is None:
        raise ValueError("esm needs activations: per task, the inputs of each block matrix (see subboost.esm)")
    return essential_subspace_merge(_as_list(task_vectors), activations=activations, **params)


# ---------------------------------------------------------------- the engine


LINES_ORDERS = ("after_boost", "before_boost")
"""Where LiNeS goes relative to Subspace Boosting in :func:`merge` (see there)."""

Hold = Callable[[Iterator[tuple[str, Tensor]]], Iterable[tuple[str, Tensor]]]
"""Where the engine keeps the merged update while LiNeS' default a is computed: consumes the
``(key, Δm[key])`` items and gives them back (:func:`hold_in_memory`; streamed: a spill file)."""


def hold_in_memory(items: Iterator[tuple[str, Tensor]]) -> list[tuple[str, Tensor]]:
    """Hold the merged update in memory (a list of ``(key, tensor)``)."""
    return list(items)


def run_merge(
    method: str | MergeMethod,
    source: TaskVectorSource,
    params: Mapping[str, Any] | None = None,
    *,
    boost_beta: float | None = None,
    boost_options: Mapping[str, Any] | None = None,
    lines_b: float | None = None,
    lines_a: float | None = None,
    lines_order: str = "after_boost",
    keys: Iterable[str] | None = None,
    hold: Hold = hold_in_memory,
    check: Callable[[str, Tensor], None] | None = None,
    boost_rows: list[dict] | None = None,
    progress: Progress = _no_progress,
) -> tuple[float | None, Iterator[tuple[str, Tensor]]]:
    """The one merge engine: method → Subspace Boosting → LiNeS on a :class:`TaskVectorSource`.

    1. The method's options (``params`` with its defaults) are checked before any data is read.
    2. Its whole-model statistics are folded over every key (:attr:`MergeMethod.statistics`).
    3. Its kernel merges each key (row block by row block where ``source`` splits a key;
       ``check(key, value)`` sees each merged key, e.g. to refuse non-finite values);
       whole-model methods get every key loaded at once instead.
    4. Per key: Subspace Boosting (``boost_beta`` not None; ``boost_options`` go to
       :func:`subboost.boost.boost_task_vector_with_report`, whose report rows are appended to
       ``boost_rows``) and LiNeS (``lines_b`` not None; ``lines_order``, see :func:`merge`).
       LiNeS' default a (``lines_a=None``, :func:`lines_default_a`) needs ‖Σ Δt‖1 (one more pass
       over the task vectors) and ‖Δm‖1 of the whole merged update, which is therefore held
       by ``hold`` before anything is yielded.

    Returns (the LiNeS a used, or None without LiNeS; an iterator of ``(key, Δm[key])`` over
    ``keys``, default every key, in the source's order). The statistics and any hold run
    before this function returns only where LiNeS needs them; otherwise the work happens as
    the iterator is consumed.
    """
    method = get_method(method) if isinstance(method, str) else method
    if lines_order not in LINES_ORDERS:
        raise ValueError(f"lines_order must be one of {', '.join(LINES_ORDERS)}; got '{lines_order}'")
    options = method.options(dict(params or {}))
    if method.check is not None:
        method.check(options)
    wanted = None if keys is None else set(keys)
    needs_all = lines_b is not None and lines_a is None
    kernel_keys = [k for k in source.keys if needs_all or wanted is None or k in wanted]

    def merged() -> Iterator[tuple[str, Tensor]]:
        if method.whole_model:
            vectors: list[dict[str, Tensor]] = [{} for _ in range(source.n_tasks)]
            bar = progress(len(source.keys), f"load ({method.name}: whole model)")
            for key in source.keys:
                for t, d in enumerate(source.deltas(key)):
                    vectors[t][key] = d
                bar.update(1)
            bar.close()
            result = method.fn(vectors, **options)
            del vectors
            for key in kernel_keys:
                if check is not None:
                    check(key, result[key])
                yield key, result[key]
            return
        stats = method.statistics(source, options, progress) if method.statistics is not None else {}
        bar = progress(len(kernel_keys), f"merge ({method.name})")
        for key in kernel_keys:
            parts = [method.kernel(key, source.deltas(key, rows), stats, options) for rows in source.row_blocks(key)]
            value = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
            del parts
            if check is not None:
                check(key, value)
            yield key, value
            bar.update(1)
        bar.close()

    def boosted(key: str, value: Tensor) -> Tensor:
        if boost_beta is None:
            return value
        out, report = boost_task_vector_with_report({key: value}, boost_beta, **dict(boost_options or {}))
        if boost_rows is not None:
            boost_rows.extend(report.to_dict("records"))
        return out[key]

    def only_wanted(items: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        return ((k, v) for k, v in items if wanted is None or k in wanted)

    if lines_b is None:
        return None, only_wanted((k, boosted(k, v)) for k, v in merged())
    boost_late = lines_order == "before_boost"
    first = merged() if boost_late else ((k, boosted(k, v)) for k, v in merged())
    a = lines_a
    if a is None:
        num = _task_sum_l1(source, progress)
        den = 0.0

        def counted(items: Iterator[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
            nonlocal den
            for key, value in items:
                den += _l1(value)
                yield key, value

        first = iter(hold(counted(first)))
        a = _lines_a(num, den, source.n_tasks)
    scales = lines_scales(source.keys, a, lines_b)

    def scaled(items: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
        for key, value in items:
            value = _scaled(value, scales[key])
            yield key, (boosted(key, value) if boost_late else value)

    return float(a), only_wanted(scaled(first))


def merge(
    task_vectors: Sequence[Mapping[str, Tensor]] | Mapping[str, Mapping[str, Tensor]],
    method: str = "ta",
    *,
    boost_beta: float | None = None,
    boost_options: Mapping | None = None,
    lines_b: float | None = None,
    lines_a: float | None = None,
    lines_order: str = "after_boost",
    **params,
) -> StateDict:
    """Merge task vectors with a registered method, then optionally Subspace Boosting and LiNeS
    (:func:`run_merge` on :class:`InMemoryTaskVectors`).

    ``lines_order="after_boost"`` (default): method (masks included) → SB (``boost_beta`` not
    None; ``boost_options`` go to :func:`subboost.boost.boost_task_vector`) → LiNeS
    (``lines_b`` not None). This is how the book reads the paper's "TA + SB + LiNeS": the
    paper calls LiNeS a post-processing applied on top of a merging method, SB belongs to the
    merge, and the official LiNeS code computes its default a = (‖Σ Δt‖1/‖Δm‖1)/T
    (:func:`lines_default_a`) from the multi-task vector it is handed, here the boosted one.

    ``lines_order="before_boost"``: LiNeS on the un-boosted merge (so the default a uses the
    un-boosted ‖Δm‖1), then SB.

    With an explicit ``lines_a`` the two orders give the same matrices (to rounding): SB is
    homogeneous, SB(cM) = c·SB(M), so a per-layer scalar passes through it. With the default
    a they do not: boosting changes ‖Δm‖1 (it grows, so the after-boost a is smaller), the
    whole depth profile a + b·l/(L−1) moves, and a global α cannot absorb the change of its
    shape. The merged model is then θ0 + α·Δm.
    """
    if lines_order not in LINES_ORDERS:
        raise ValueError(f"lines_order must be one of {', '.join(LINES_ORDERS)}; got '{lines_order}'")
    method_ = get_method(method)
    vectors = _as_list(task_vectors)
    _, items = run_merge(method_, InMemoryTaskVectors(vectors), params, boost_beta=boost_beta,
                         boost_options=boost_options, lines_b=lines_b, lines_a=lines_a, lines_order=lines_order)
    return dict(items)
