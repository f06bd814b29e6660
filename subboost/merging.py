"""Merging methods as small pure functions over ``dict[str, Tensor]``, registered by name.

Every method takes the list of task vectors Δ1..ΔN and returns the merged update Δm; the
merged model is θ0 + α·Δm (:func:`subboost.taskvector.apply_task_vector`). The same table
serves the notebooks, the CLI and the tests::

    from subboost.merging import merge, METHODS
    delta = merge(vectors, "ties", top_k=0.2, boost_beta=0.0)   # TIES, then Subspace Boosting

Subspace Boosting (:mod:`subboost.boost`) is applied on top of any method, after it: masks
first, boost second (SB does not commute with element-wise masks). LiNeS is a per-layer
rescaling that SB commutes with for a fixed a; its default a depends on whether it sees the
boosted update (:func:`merge`, ``lines_order``). Spectral methods (Iso-C, Iso-CTS, TSV-M, HO-SB) decompose
only the block matrices (:func:`subboost.taskvector.select_block_keys`) and average every
other tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor

from subboost.boost import boost_task_vector
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

MergeFn = Callable[..., StateDict]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merging method: its function, the paper's α grid, a one-line summary."""

    name: str
    fn: MergeFn
    summary: str
    alpha_grid: tuple[float, ...] = field(default=tuple(round(0.1 * i, 1) for i in range(1, 11)))


METHODS: dict[str, MergeMethod] = {}

_WIDE_ALPHA = tuple(round(0.1 * i, 1) for i in range(1, 31))  # Iso / TSV grids: 0.1 .. 3.0


def register(name: str, summary: str, alpha_grid: Sequence[float] | None = None) -> Callable[[MergeFn], MergeFn]:
    """Decorator adding a merging function to :data:`METHODS` under ``name``."""

    def deco(fn: MergeFn) -> MergeFn:
        if name in METHODS:
            raise ValueError(f"merging method '{name}' is registered twice")
        kwargs = {} if alpha_grid is None else {"alpha_grid": tuple(alpha_grid)}
        METHODS[name] = MergeMethod(name, fn, summary, **kwargs)
        return fn

    return deco


def get_method(name: str) -> MergeMethod:
    """Look up a method; an unknown name raises ``ValueError`` listing the known ones."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown merging method '{name}'; known: {', '.join(sorted(METHODS))}") from None


def _as_list(task_vectors: Sequence[Mapping[str, Tensor]] | Mapping[str, Mapping[str, Tensor]]) -> list[Mapping[str, Tensor]]:
    if isinstance(task_vectors, Mapping):
        names = list(task_vectors)
        vectors = [task_vectors[n] for n in names]
    else:
        vectors = list(task_vectors)
        names = None
    check_same_structure(vectors, names)
    return vectors


def _sum(vectors: list[Mapping[str, Tensor]], key: str) -> Tensor:
    acc = vectors[0][key].to(work_dtype(vectors[0][key])).clone()
    for tv in vectors[1:]:
        acc += tv[key].to(acc.dtype)
    return acc


# ---------------------------------------------------------------- element-wise methods


@register("ta", "Task Arithmetic: Δm = Σ Δi (Ilharco et al. 2023)")
def task_arithmetic(task_vectors: Sequence[Mapping[str, Tensor]]) -> StateDict:
    """Task Arithmetic, Δm = Σ_i Δi."""
    vectors = _as_list(task_vectors)
    return {k: _sum(vectors, k).to(vectors[0][k].dtype) for k in vectors[0]}


@register("average", "Weight averaging: Δm = (1/N) Σ Δi")
def average(task_vectors: Sequence[Mapping[str, Tensor]]) -> StateDict:
    """Plain averaging of the task vectors (TA with α = 1/N)."""
    vectors = _as_list(task_vectors)
    n = len(vectors)
    return {k: (_sum(vectors, k) / n).to(vectors[0][k].dtype) for k in vectors[0]}


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


def ties_keep_count(total: int, top_k: float, trim: str = "official") -> int:
    """Number of entries (before ties at the threshold) TIES keeps out of ``total``
    (:data:`TIES_TRIM_RULES`)."""
    top_k = _check_fraction(top_k, "top_k")
    share = int(total * top_k)
    if _check_trim(trim) == "official":
        return min(total, share + 1)
    return max(1, share)


def _threshold_dtype(tensors: Iterable[Tensor]) -> torch.dtype:
    """The precision magnitudes are ranked in: float64 if any tensor is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def ties_trim_thresholds(
    task_vectors: Sequence[Mapping[str, Tensor]], top_k: float = 0.2, trim: str = "official"
) -> list[float]:
    """Per task, the magnitude of its m-th largest entry over all P parameters, with
    m = :func:`ties_keep_count` (P, top_k, trim).

    The ranking runs in the task vector's own precision (float64 inputs stay float64, others
    float32): a float32 threshold compared with float64 magnitudes would drop or add entries
    at the boundary. The returned Python floats hold the value exactly."""
    top_k = _check_fraction(top_k, "top_k")
    _check_trim(trim)
    thresholds = []
    for tv in task_vectors:
        dtype = _threshold_dtype(tv.values())
        flat = torch.cat([v.detach().reshape(-1).abs().to(dtype) for v in tv.values()])
        keep = ties_keep_count(flat.numel(), top_k, trim)
        thresholds.append(float(torch.kthvalue(flat, flat.numel() - keep + 1).values))
    return thresholds


TIES_AGGREGATES = ("mean", "sum")


def ties_disjoint(stack: Tensor, majority_sign: float, aggregate: str = "mean") -> Tensor:
    """TIES steps 2-3 on trimmed values ``stack`` (tasks × ...): elect the sign per entry
    (sign of the sum; exact ties take ``majority_sign``), then aggregate the values that
    agree with it: their mean ("dis-mean") or sum ("dis-sum"); entries with none get 0."""
    if aggregate not in TIES_AGGREGATES:
        raise ValueError(f"ties aggregate must be one of {', '.join(TIES_AGGREGATES)}; got '{aggregate}'")
    sign = torch.sign(stack.sum(0))
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


@register("ties", "TIES: trim to top-k% per task, elect signs, disjoint mean (Yadav et al. 2023)",
          tuple(round(0.2 * i, 1) for i in range(1, 11)))
def ties(
    task_vectors: Sequence[Mapping[str, Tensor]],
    top_k: float = 0.2,
    trim: str = "official",
    aggregate: str = "mean",
) -> StateDict:
    """TIES-Merging (Yadav et al. 2023), matching the official implementation.

    1. Trim: per task keep the entries whose magnitude is at least its m-th largest over the
       whole task vector. ``trim="official"`` (default) takes m = ⌊P·top_k⌋ + 1 as the official
       code does (k = P − ⌊P·K⌋, then ``|x| ≥ kthvalue``: one entry more than the top-k
       share); ``trim="top_k"`` takes m = ⌊P·top_k⌋, the share the paper describes
       (:data:`TIES_TRIM_RULES`). The book uses the official rule so that its TIES numbers are
       the ones the public code produces; on real models the two differ by one entry per task.
       The ranking is done in the input's precision (float64 stays float64).
    2. Elect: per entry, sign of the sum of the trimmed values. An exact tie (sum 0) takes
       the majority sign, the sign of the sum of all elected signs over the whole vector
       (− when that sum is 0, which is how the official code behaves:
       :func:`majority_sign_of`).
    3. Disjoint aggregation of the trimmed values that agree with the elected sign:
       ``aggregate="mean"`` (TIES' "dis-mean", the default), or ``"sum"`` ("dis-sum", which
       the official Consensus / TALL-masks code uses as its TIES base). Entries with none get 0.
    """
    vectors = _as_list(task_vectors)
    thresholds = ties_trim_thresholds(vectors, top_k, trim)
    trimmed: dict[str, Tensor] = {}
    majority = 0.0
    for key in vectors[0]:
        stack = torch.stack([tv[key].to(work_dtype(tv[key])) for tv in vectors])
        thr = torch.tensor(thresholds, dtype=stack.dtype).view(-1, *([1] * (stack.ndim - 1)))
        stack = torch.where(stack.abs() >= thr, stack, torch.zeros_like(stack))
        trimmed[key] = stack
        majority += float(torch.sign(stack.sum(0)).sum())
    majority_sign = majority_sign_of(majority)
    return {key: ties_disjoint(stack, majority_sign, aggregate).to(vectors[0][key].dtype)
            for key, stack in trimmed.items()}


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
    lams = [float(lambdas)] * len(vectors) if isinstance(lambdas, (int, float)) else [float(x) for x in lambdas]
    if len(lams) != len(vectors):
        raise ValueError(f"lambdas: got {len(lams)} values for {len(vectors)} task vectors")
    masks: list[dict[str, Tensor]] = [{} for _ in vectors]
    for key in vectors[0]:
        if reference is None:
            mtl = _sum(vectors, key)
        else:
            if key not in reference:
                raise ValueError(f"tall_masks: the reference has no key '{key}'")
            mtl = reference[key].to(work_dtype(reference[key]))
        for t, tv in enumerate(vectors):
            d = tv[key].to(mtl.dtype)
            masks[t][key] = d.abs() > lams[t] * (mtl - d).abs()
    return masks


@register("consensus", "Consensus merging: keep entries selected by ≥ k TALL masks (Wang et al. 2024)")
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
    ``"mean"`` gives TIES' own dis-mean instead). The TALL masks are built against that
    same vector, mask_t = |Δt| > λt·|Δ_MTL − Δt| (strict, :func:`tall_masks`), and the result
    is Δ_MTL restricted to the entries that at least ``k`` masks select (k = 2 in the
    paper). ``lambdas`` are the per-task TALL thresholds (the papers tune them per task on
    validation data from {0.2, ..., 0.6}). ``trim``: TIES' keep rule (:data:`TIES_TRIM_RULES`).
    """
    vectors = _as_list(task_vectors)
    if base not in ("ta", "ties"):
        raise ValueError(f"consensus base must be 'ta' or 'ties', got '{base}'")
    if int(k) < 1:
        raise ValueError(f"consensus k must be ≥ 1, got {k}")
    if base == "ta":
        merged = task_arithmetic(vectors)
        masks = tall_masks(vectors, lambdas)
    else:
        merged = ties(vectors, top_k=top_k, trim=trim, aggregate=ties_aggregate)
        masks = tall_masks(vectors, lambdas, reference=merged)
    return consensus_apply(merged, masks, k)


def consensus_apply(merged: Mapping[str, Tensor], masks: Sequence[Mapping[str, Tensor]], k: int = 2) -> StateDict:
    """Keep the entries of ``merged`` that at least ``k`` of the ``masks`` select."""
    out: StateDict = {}
    for key, value in merged.items():
        count = torch.stack([m[key] for m in masks]).sum(0)
        out[key] = torch.where(count >= int(k), value, torch.zeros_like(value))
    return out


# ---------------------------------------------------------------- LiNeS


def lines_default_a(task_vectors: Sequence[Mapping[str, Tensor]], merged: Mapping[str, Tensor]) -> float:
    """LiNeS multi-task default a = (‖Σt Δt‖1 / ‖Δm‖1) / T (Wang et al. 2025)."""
    vectors = _as_list(task_vectors)
    num = sum(float(_sum(vectors, k).abs().sum()) for k in vectors[0])
    den = sum(float(v.abs().to(torch.float64).sum()) for v in merged.values())
    if den == 0.0:
        raise ValueError("LiNeS: the merged update is all zero")
    return num / den / len(vectors)


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
    return {k: (v.to(work_dtype(v)) * scales[k]).to(v.dtype) for k, v in merged.items()}


# ---------------------------------------------------------------- spectral methods


def _spectral_merge(
    vectors: list[Mapping[str, Tensor]],
    per_matrix: Callable[[list[Tensor]], Tensor],
    layer_types: Iterable[str],
    include_proj: bool,
) -> StateDict:
    keys = set(select_block_keys(vectors[0], layer_types, include_proj))
    n = len(vectors)
    out: StateDict = {}
    for key in vectors[0]:
        dtype = vectors[0][key].dtype
        if key in keys:
            mats = [tv[key].to(work_dtype(tv[key])) for tv in vectors]
            if all(is_zero(m) for m in mats):
                out[key] = vectors[0][key].clone()
            else:
                out[key] = per_matrix(mats).to(dtype)
        else:
            out[key] = (_sum(vectors, key) / n).to(dtype)
    return out


@register("iso-c", "Iso-C: flatten the spectrum of Σ Δi to its mean (Marczak et al. 2025)", _WIDE_ALPHA)
def iso_c(
    task_vectors: Sequence[Mapping[str, Tensor]],
    layer_types: Iterable[str] = LAYER_TYPES,
    include_proj: bool = False,
) -> StateDict:
    """Iso-C: per block matrix, M = Σ Δi = U S Vᵀ → mean(S)·U Vᵀ. Other tensors: mean of Δi."""

    def iso(mats: list[Tensor]) -> Tensor:
        u, s, vh = torch.linalg.svd(sum(mats), full_matrices=False)
        return s.mean() * (u @ vh)

    return _spectral_merge(_as_list(task_vectors), iso, layer_types, include_proj)


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


@register("iso-cts", "Iso-CTS: common + task-specific subspaces, isotropic spectrum (Marczak et al. 2025)", _WIDE_ALPHA)
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
    common_fraction = _check_fraction(common_fraction, "common_fraction")

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

    return _spectral_merge(_as_list(task_vectors), cts, layer_types, include_proj)


@register("tsv", "TSV-M: per-task top singular triplets, orthogonalised and summed (Gargiulo et al. 2025)", _WIDE_ALPHA)
def tsv_merge(
    task_vectors: Sequence[Mapping[str, Tensor]],
    layer_types: Iterable[str] = LAYER_TYPES,
    include_proj: bool = False,
) -> StateDict:
    """TSV-M, per block matrix of rank r: keep each task's top ⌊r/N⌋ singular triplets,
    concatenate U, Σ, V, replace U and V by their closest orthonormal matrices (Procrustes,
    X → P Qᵀ), rebuild U⊥ diag(Σ) V⊥ᵀ. Other tensors: mean of Δi."""

    def tsv(mats: list[Tensor]) -> Tensor:
        k = max(1, min(mats[0].shape) // len(mats))
        us, ss, vs = [], [], []
        for m in mats:
            u, s, vh = torch.linalg.svd(m, full_matrices=False)
            us.append(u[:, :k])
            ss.append(s[:k])
            vs.append(vh[:k].T)
        big_u, big_s, big_v = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 1)
        return (polar_factor(big_u) * big_s.unsqueeze(0)) @ polar_factor(big_v).T

    return _spectral_merge(_as_list(task_vectors), tsv, layer_types, include_proj)


@register("ho-sb", "Higher-Order Subspace Boosting: HO-GSVD, Procrustes, boosted summed spectrum (paper Alg. 2)")
def higher_order_sb(
    task_vectors: Sequence[Mapping[str, Tensor]],
    beta: float = 0.0,
    pi: float = 1e-2,
    layer_types: Iterable[str] = LAYER_TYPES,
    include_proj: bool = False,
) -> StateDict:
    """Paper Alg. 2; see :func:`subboost.hogsvd.higher_order_subspace_boost`."""
    from subboost.hogsvd import higher_order_subspace_boost  # heavy module, loaded on use

    return higher_order_subspace_boost(
        _as_list(task_vectors), beta=beta, pi=pi, layer_types=layer_types, include_proj=include_proj
    )


@register("esm", "Essential Subspace Merging: per-task PCA of feature shifts, projection, polarised scaling (Li et al. 2026)", _WIDE_ALPHA)
def essential_subspace(
    task_vectors: Sequence[Mapping[str, Tensor]],
    activations: Sequence[Mapping[str, Tensor]] | None = None,
    **params,
) -> StateDict:
    """ESM, reimplemented from its abstract; see :func:`subboost.esm.essential_subspace_merge`.

    ``activations[i][key]`` holds inputs x (samples × in_features) of block matrix ``key`` on
    unlabelled data of task i, in the order of ``task_vectors``.
    """
    from subboost.esm import essential_subspace_merge  # loaded on use

    if activations is None:
        raise ValueError("esm needs activations: per task, the inputs of each block matrix (see subboost.esm)")
    return essential_subspace_merge(_as_list(task_vectors), activations=activations, **params)


# ---------------------------------------------------------------- one entry point


LINES_ORDERS = ("after_boost", "before_boost")
"""Where LiNeS goes relative to Subspace Boosting in :func:`merge` (see there)."""


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
    """Merge task vectors with a registered method, then optionally Subspace Boosting and LiNeS.

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
    fn = get_method(method).fn
    vectors = _as_list(task_vectors)
    delta = fn(vectors, **params)
    if lines_b is not None and lines_order == "before_boost":
        delta = lines_scale(delta, lines_b, a=lines_a, task_vectors=vectors)
    if boost_beta is not None:
        delta = boost_task_vector(delta, boost_beta, **dict(boost_options or {}))
    if lines_b is not None and lines_order == "after_boost":
        delta = lines_scale(delta, lines_b, a=lines_a, task_vectors=vectors)
    return delta
