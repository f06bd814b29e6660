"""Essential Subspace Merging (ESM), reimplemented from its abstract (Li, Qi, Tian, Geng, 2026).

Only the abstract of *Model Merging in the Essential Subspace* is known; every step below that
the abstract leaves open is a choice of ours, named, documented and exposed as a parameter.

The abstract's three steps, per block matrix W (out × in, ``y = x Wᵀ``) and task i with update
ΔWi and layer inputs Xi (samples × in) on unlabelled data of task i:

1. *PCA of the feature shifts* Fi = Xi ΔWiᵀ (samples × out): the shift of the layer's output
   that the update causes on the task's own inputs. The principal directions of Fi live in the
   layer's **output (feature) space**; the top ki of them, holding a fraction ``energy`` of
   ‖Fi‖²_F (or a fixed ``rank``), span the task's *essential subspace* Ui (out × ki).
2. *Projection / low-rank decomposition*: ΔWi ← Ui Uiᵀ ΔWi = Ui (Uiᵀ ΔWi), a rank-ki
   factorisation; the projected updates are summed (Task Arithmetic on the projected vectors).
3. *Multi-level polarised scaling*: the merged matrix is multiplied by positive factors, at the
   layer level and at the parameter level, that amplify (× (1 + γ)) what carries critical
   knowledge and damp (× (1 − γ)) what is redundant (rules in
   :func:`essential_subspace_merge`).

Everything that is not a block matrix (:func:`subboost.taskvector.select_block_keys`: biases,
norms, embeddings, ``visual.proj``) is averaged, as in the spectral methods of
:mod:`subboost.merging`. The merged model is θ0 + α·Δm, α from the wide grid 0.1 … 3.0.

Activations come from :func:`capture_block_inputs` (forward hooks; ``nn.Linear``,
``nn.MultiheadAttention`` in-projection and out-projection, open_clip's custom ``Attention``).

Cost (what the book compares with TA+SB, Iso-CTS and TSV-M, which need no data):

- **data and forward passes**: ESM needs unlabelled inputs of every task and one forward pass
  per task (N passes over ``n_images`` each; we recommend the expert model i on task i's data,
  see :func:`capture_block_inputs`), plus, for each ``nn.MultiheadAttention`` whose
  out-projection input is captured, one recomputation of that attention (its fused kernel never
  exposes the context vectors). Subspace Boosting, Iso-CTS and TSV-M need no data at all.
- **memory**: per task and block matrix, ``max_samples`` rows × in_features (ViT-B/32, 48 visual
  block matrices, 2048 rows each: ≈ 0.5 GB per task in float32; use ``store_dtype=float16`` or
  fewer rows to halve or shrink it).
- **decompositions**: per task and block matrix one QR of Xi (n × in, when n > in) and one SVD
  of the reduced shift matrix R ΔWᵀ of size min(n, in) × out, i.e. N SVDs per matrix (like
  TSV-M's N SVDs of ΔWi, out × in), versus one SVD of the merged matrix for TA+SB and 1 + N
  for Iso-CTS. :func:`esm_cost` counts these for a given set of vectors and activations.
  Measured on 2 shared CPU cores: one ViT-B/32 layer (4 matrices, 2048 rows) takes ≈ 6–10 s
  per task, ~90 % of it in the SVDs, so 8 tasks × 12 layers ≈ 10–15 min; pass the task vectors
  on a GPU to run it there (activations are moved to their device).
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from subboost.taskvector import (
    work_dtype,
    LAYER_TYPES,
    StateDict,
    check_same_structure,
    is_zero,
    parse_block_key,
    select_block_keys,
)

__all__ = [
    "capture_block_inputs",
    "essential_basis",
    "project_onto_subspace",
    "polarized_factors",
    "essential_subspace_merge",
    "esm_cost",
    "EssentialSubspace",
]

ForwardFn = Callable[[nn.Module, Any], Any]


# ====================================================================== activation capture


@dataclass(frozen=True)
class _Target:
    """Where the input of one state-dict matrix can be observed."""

    key: str
    module: nn.Module  # the module to hook
    kind: str  # "linear" | "mha_in" | "mha_out" | "first_arg"


def _resolve_target(key: str, modules: Mapping[str, nn.Module]) -> _Target:
    owner_name, _, param = key.rpartition(".")
    if param == "in_proj_weight":
        owner = modules.get(owner_name)  # "" is the model itself
        if owner is None:
            raise ValueError(f"capture: no module owns '{key}' in this model")
        kind = "mha_in" if isinstance(owner, nn.MultiheadAttention) else "first_arg"
        return _Target(key, owner, kind)
    if param == "weight" and owner_name:
        name = owner_name
        module = modules.get(name)
        if module is None:
            raise ValueError(f"capture: no module '{name}' in this model (key '{key}')")
        parent_name, _, child = name.rpartition(".")
        parent = modules.get(parent_name)  # "" is the model itself
        if child == "out_proj" and isinstance(parent, nn.MultiheadAttention):
            return _Target(key, parent, "mha_out")
        if isinstance(module, nn.Linear):
            return _Target(key, module, "linear")
        raise ValueError(
            f"capture: '{key}' belongs to a {type(module).__name__}; only nn.Linear weights, "
            "MultiheadAttention in_proj_weight / out_proj.weight and attention in_proj_weight "
            "parameters are supported"
        )
    raise ValueError(f"capture: '{key}' is not a weight matrix key")


class _RowSampler:
    """Uniform sample without replacement of at most ``max_rows`` rows from a stream.

    Every incoming row draws a uniform priority from a seeded generator; the rows with the
    ``max_rows`` smallest priorities are kept (equivalent to reservoir sampling), so memory
    stays bounded by ``max_rows`` plus one batch and the result depends only on the seed and
    the order of the data.
    """

    def __init__(self, max_rows: int | None, seed: int, dtype: torch.dtype) -> None:
        self.max_rows = max_rows
        self.dtype = dtype
        self.generator = torch.Generator().manual_seed(int(seed))
        self.rows: Tensor | None = None
        self.priority: Tensor | None = None
        self.seen = 0

    def add(self, x: Tensor) -> None:
        rows = x.detach().reshape(-1, x.shape[-1]).to("cpu", self.dtype)
        self.seen += rows.shape[0]
        if self.max_rows is None:
            self.rows = rows if self.rows is None else torch.cat([self.rows, rows])
            return
        pri = torch.rand(rows.shape[0], generator=self.generator)
        if self.rows is not None:
            rows = torch.cat([self.rows, rows])
            pri = torch.cat([self.priority, pri])
        if rows.shape[0] > self.max_rows:
            keep = torch.topk(pri, self.max_rows, largest=False).indices.sort().values
            rows, pri = rows[keep], pri[keep]
        self.rows, self.priority = rows, pri


def _attention_context(mha: nn.MultiheadAttention, identity: nn.Linear, args: tuple, kwargs: dict) -> Tensor:
    """Input of ``mha.out_proj`` for this call: the same attention with an identity out-projection.

    ``nn.MultiheadAttention`` never calls ``out_proj.forward`` (both its fused fast path and
    ``F.multi_head_attention_forward`` read ``out_proj.weight`` directly), so a hook on
    ``out_proj`` sees nothing. We rerun the module's own forward on a shallow copy whose
    ``out_proj`` is the identity (zero bias): same masks, same code path, and the output is
    exactly the concatenated heads that ``out_proj`` multiplies. The original module is not
    modified.
    """
    bound = inspect.signature(mha.forward).bind(*args, **kwargs)
    bound.arguments["need_weights"] = False
    clone = copy.copy(mha)
    clone._modules = dict(mha._modules)  # own table: the original keeps its out_proj
    clone._modules["out_proj"] = identity
    return clone.forward(*bound.args, **bound.kwargs)[0]


def _identity_linear(like: nn.Linear) -> nn.Linear:
    width = like.weight.shape[1]
    lin = nn.Linear(width, width, bias=True, device=like.weight.device, dtype=like.weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(width, dtype=like.weight.dtype))
        lin.bias.zero_()
    lin.requires_grad_(False)
    return lin


def _default_forward(model: nn.Module, batch: Any) -> Any:
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if isinstance(batch, Mapping):
        return model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()})
    if isinstance(batch, (tuple, list)):  # (inputs, labels) from a loader: labels are never used
        batch = batch[0]
    return model(batch.to(device) if torch.is_tensor(batch) else batch)


def capture_block_inputs(
    model: nn.Module,
    keys: Sequence[str],
    batches: Iterable[Any],
    forward: ForwardFn | None = None,
    max_samples: int | None = 2048,
    seed: int = 0,
    max_batches: int | None = None,
    store_dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """Inputs x of the given weight matrices, captured with forward hooks.

    For each state-dict ``key`` of ``model`` (a weight W with ``y = x Wᵀ + b``) returns X
    (samples × in_features): every token of every input is one sample (all leading dimensions
    are flattened), uniformly subsampled without replacement to at most ``max_samples`` rows
    per key (seeded by ``seed`` + the key's position; ``None`` keeps all rows, in call order).

    Supported keys:

    - ``<m>.weight`` of an ``nn.Linear`` ``<m>`` (open_clip ``mlp.c_fc`` / ``mlp.c_proj``, BERT /
      T5 linears): the first argument of its forward (forward pre-hook);
    - ``<m>.in_proj_weight`` of an ``nn.MultiheadAttention``: its ``query`` argument. This is the
      input of all three q/k/v row blocks only for self-attention, so a call whose key/value
      differ from the query raises ``ValueError``;
    - ``<m>.out_proj.weight`` of an ``nn.MultiheadAttention``: the concatenated head outputs,
      recomputed by :func:`_attention_context` (one extra attention per call);
    - ``<m>.in_proj_weight`` of any other module (open_clip's custom ``Attention``): its first
      argument.

    ``forward(model, batch)`` runs one batch (default: ``model(**batch)`` for a mapping,
    ``model(batch[0])`` for a tuple/list, ``model(batch)`` otherwise, moved to the model's
    device; e.g. pass ``lambda m, b: m.encode_image(b)`` for CLIP). The model runs in eval mode
    (dropout off) under ``torch.no_grad()``; its training flag is restored afterwards and all
    hooks are removed, also on error. Padding tokens are not filtered out: feed equal-length
    batches (images always are) if that matters.

    Which model to run is the caller's choice; for ESM we recommend expert i on the unlabelled
    inputs of task i (the feature shifts it induced at its own operating point), with the base
    model as the alternative. Either way it costs one pass per task.
    """
    if max_samples is not None and int(max_samples) < 1:
        raise ValueError(f"max_samples must be ≥ 1 or None, got {max_samples}")
    forward = forward or _default_forward
    modules = dict(model.named_modules())
    keys = list(dict.fromkeys(keys))
    targets = [_resolve_target(k, modules) for k in keys]
    samplers = {k: _RowSampler(None if max_samples is None else int(max_samples), seed + i, store_dtype)
                for i, k in enumerate(keys)}
    identities: dict[int, nn.Linear] = {}

    def make_hook(target: _Target) -> Callable:
        sampler = samplers[target.key]

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if target.kind == "mha_out":
                ident = identities.setdefault(id(module), _identity_linear(module.out_proj))
                sampler.add(_attention_context(module, ident, args, kwargs))
                return
            if target.kind == "mha_in":
                bound = inspect.signature(module.forward).bind(*args, **kwargs)
                q, k, v = (bound.arguments[n] for n in ("query", "key", "value"))
                same = all(t is q or (t.shape == q.shape and torch.equal(t, q)) for t in (k, v))
                if not same:
                    raise ValueError(
                        f"capture: '{target.key}' is used for cross-attention (key/value differ from "
                        "query); its q/k/v rows have different inputs"
                    )
                sampler.add(q)
                return
            x = args[0] if args else next(iter(kwargs.values()))
            sampler.add(x)

        return hook

    handles = []
    was_training = model.training
    try:
        for target in targets:
            handles.append(target.module.register_forward_pre_hook(make_hook(target), with_kwargs=True))
        model.eval()
        with torch.no_grad():
            for b, batch in enumerate(batches):
                if max_batches is not None and b >= max_batches:
                    break
                forward(model, batch)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out: dict[str, Tensor] = {}
    for key in keys:
        rows = samplers[key].rows
        if rows is None:
            raise RuntimeError(f"capture: no input reached '{key}'; is it used by `forward`?")
        out[key] = rows
    return out


# ====================================================================== essential subspace


@dataclass(frozen=True)
class EssentialSubspace:
    """A task's essential subspace of one block matrix.

    ``basis``: out × k orthonormal columns (principal directions of the feature shifts);
    ``singular_values``: all singular values of the (reduced) feature-shift matrix, descending;
    ``rank``: k.
    """

    basis: Tensor
    singular_values: Tensor
    rank: int


def _check_unit(value: float, name: str, open_left: bool = True) -> float:
    value = float(value)
    ok = (0.0 < value <= 1.0) if open_left else (0.0 <= value <= 1.0)
    if not ok:
        raise ValueError(f"{name} must lie in {'(0' if open_left else '[0'}, 1], got {value}")
    return value


def _check_gamma(value: float, name: str) -> float:
    value = float(value)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must lie in [0, 1) so that every factor 1 ± γ stays positive, got {value}")
    return value


def _reduced_inputs(x: Tensor, center: bool) -> Tensor:
    """A matrix R with RᵀR = XᵀX (X centred if asked): feature shifts X ΔWᵀ and R ΔWᵀ have the
    same singular values and right singular vectors, and R has min(n, in) rows."""
    if center:
        x = x - x.mean(0, keepdim=True)
    if x.shape[0] > x.shape[1]:
        return torch.linalg.qr(x, mode="r").R
    return x


def _rank_for_energy(s: Tensor, energy: float) -> int:
    """Smallest k with Σ_{j<k} σj² ≥ (energy − 8·eps) · Σ σj²: the slack makes energy = 1 drop
    only directions whose share of the energy is at rounding level."""
    power = s.square()
    total = power.sum()
    if total <= 0:
        return 0
    ratio = torch.cumsum(power, 0) / total
    slack = 8 * torch.finfo(ratio.dtype).eps
    hits = torch.nonzero(ratio >= energy - slack)
    return int(hits[0].item()) + 1 if hits.numel() else int(s.numel())


def essential_basis(
    delta: Tensor,
    inputs: Tensor,
    energy: float = 0.9,
    rank: int | None = None,
    center: bool = False,
    *,
    _reduced: Tensor | None = None,
) -> EssentialSubspace:
    """Essential subspace of one update ΔW (out × in) on inputs X (n × in).

    PCA of the feature shifts F = X ΔWᵀ: F = P diag(σ) Vᵀ; the essential subspace is spanned by
    the first k right singular vectors V[:, :k] (directions in the layer's output space).

    - ``rank`` given: k = min(rank, number of singular values); otherwise k is the smallest
      number of directions holding a fraction ``energy`` of Σσ² (the explained "variance");
      ``energy = 1`` keeps every direction except those whose share of Σσ² is at rounding
      level (below 8·eps of the work dtype).
    - ``center=False`` (default): PCA of the *uncentred* shifts, i.e. the best rank-k
      approximation of F itself. A shift common to all inputs (the mean of F) is part of what
      the update does to the features, often its largest part; centring would discard it from
      the subspace. ``center=True`` gives textbook PCA of F − mean(F).

    For n > in, X is first reduced to the triangular factor of its QR decomposition
    (min(n, in) rows), which leaves σ and V unchanged.
    """
    if delta.ndim != 2 or inputs.ndim != 2:
        raise ValueError(f"essential_basis needs 2-D ΔW and X, got {tuple(delta.shape)} and {tuple(inputs.shape)}")
    if inputs.shape[1] != delta.shape[1]:
        raise ValueError(f"inputs have {inputs.shape[1]} features, ΔW has {delta.shape[1]} input columns")
    if rank is None:
        _check_unit(energy, "energy")
    elif int(rank) < 1:
        raise ValueError(f"rank must be ≥ 1, got {rank}")
    dtype = torch.float64 if delta.dtype == torch.float64 else torch.float32
    d = delta.to(dtype)
    r = _reduced if _reduced is not None else _reduced_inputs(inputs.to(dtype), center)
    shifts = r.to(d.device, dtype) @ d.T  # min(n, in) × out
    # LAPACK is far slower on wide matrices (ViT-B/32 c_fc: 768 × 3072 takes ~10× longer than
    # its transpose), so decompose the tall orientation
    if shifts.shape[0] < shifts.shape[1]:
        v, s, _ = torch.linalg.svd(shifts.T, full_matrices=False)
    else:
        _, s, vh = torch.linalg.svd(shifts, full_matrices=False)
        v = vh.T
    k = min(int(rank), s.numel()) if rank is not None else _rank_for_energy(s, energy)
    return EssentialSubspace(v[:, :k].contiguous(), s, k)


def project_onto_subspace(delta: Tensor, basis: Tensor) -> Tensor:
    """U Uᵀ ΔW: ΔW restricted to the output directions spanned by ``basis`` (out × k,
    orthonormal columns); the rank-k factorisation U · (Uᵀ ΔW). k = out gives ΔW back."""
    return basis @ (basis.T @ delta.to(basis.dtype))


def polarized_factors(importance: Tensor, gamma: float, top: float) -> Tensor:
    """Polarised scaling factors: 1 + γ where ``importance`` is among its top ``top`` fraction
    (⌈top·n⌉ entries, ties at the threshold included), 1 − γ elsewhere. γ ∈ [0, 1), so every
    factor is positive and scaling keeps signs."""
    gamma = _check_gamma(gamma, "gamma")
    top = _check_unit(top, "top")
    flat = importance.reshape(-1)
    n = flat.numel()
    keep = min(n, max(1, math.ceil(top * n)))
    threshold = torch.kthvalue(flat, n - keep + 1).values
    return torch.where(importance >= threshold, 1.0 + gamma, 1.0 - gamma).to(importance.dtype)


# ====================================================================== merging


def essential_subspace_merge(
    task_vectors: Sequence[Mapping[str, Tensor]],
    activations: Sequence[Mapping[str, Tensor]],
    energy: float = 0.9,
    rank: int | None = None,
    center: bool = False,
    layer_gamma: float = 0.2,
    layer_top: float = 0.5,
    param_gamma: float = 0.2,
    param_top: float = 0.2,
    layer_types: Iterable[str] = LAYER_TYPES,
) -> StateDict:
    """Essential Subspace Merging of N task vectors; returns Δm (merged model θ0 + α·Δm).

    ``activations[i][key]``: inputs X (samples × in_features) of block matrix ``key`` on
    unlabelled data of task i (:func:`capture_block_inputs`), in the order of
    ``task_vectors``. They are needed for every block matrix where task i's update is nonzero;
    a matrix that is zero for every task (e.g. CLIP's frozen text tower) is copied as zero.

    Per block matrix (``select_block_keys(…, layer_types)``):

    1. **Essential subspace** (:func:`essential_basis`): Ui from the PCA of Fi = Xi ΔWiᵀ,
       output side, uncentred unless ``center``; k from ``energy`` (fraction of Σσ²,
       default 0.9) or a fixed ``rank``.
    2. **Projection and merge**: Δ̃i = Ui Uiᵀ ΔWi; S = Σi Δ̃i (sum, like Task Arithmetic).
    3. **Parameter-level polarisation**: per entry, the importance is the largest
       *task-normalised* magnitude maxᵢ |Δ̃i| / rms(Δ̃i). Normalising per task gives a task with a
       small update the same voice as a large one, so its critical entries are not overwhelmed
       in the sum. The top ``param_top`` fraction of entries (default 0.2, TIES' trim level) is
       multiplied by 1 + ``param_gamma``, the rest, redundant, by 1 − ``param_gamma``.
    4. **Layer-level polarisation**: per task, the feature-shift gain of the projected update,
       gi = ‖Xi Δ̃iᵀ‖_F / ‖Xi‖_F (scale-free with respect to the activations), divided by its mean
       over the matrices of the same kind in the same stack (e.g. all ``mlp.c_fc`` of
       ``visual.transformer.resblocks``), so that matrices of different shapes and input
       statistics are never compared. A matrix's importance is the maximum of these relative
       gains over tasks; within each kind, the top ``layer_top`` fraction of layers (default
       one half) is multiplied by 1 + ``layer_gamma``, the others by 1 − ``layer_gamma``.

    The factors are positive (γ ∈ [0, 1)), so Δm has the signs of S entry by entry;
    ``layer_gamma = param_gamma = 0`` gives the plain projected sum, and with ``energy=1`` on
    inputs of full column rank the projection is the identity, so ESM then reduces to Task
    Arithmetic on the block matrices. The defaults (0.9, 0.2, 0.5, 0.2, 0.2) are our guesses,
    not the paper's; the book sweeps them. Everything that is not a block matrix is averaged.

    Work: N SVDs of size min(n, in) × out per block matrix (plus a QR of each Xi when n > in).
    """
    vectors = list(task_vectors)
    check_same_structure(vectors)
    acts = list(activations)
    if len(acts) != len(vectors):
        raise ValueError(f"esm: {len(acts)} activation sets for {len(vectors)} task vectors")
    _check_gamma(layer_gamma, "layer_gamma")
    _check_gamma(param_gamma, "param_gamma")
    _check_unit(layer_top, "layer_top")
    _check_unit(param_top, "param_top")
    if rank is None:
        _check_unit(energy, "energy")
    n = len(vectors)
    block = set(select_block_keys(vectors[0], layer_types, include_proj=False))

    out: StateDict = {}
    gains: dict[str, list[float | None]] = {}  # key -> per-task gain (None: zero update)
    for key, ref in vectors[0].items():
        dtype = work_dtype(ref)
        if key not in block:
            acc = ref.to(dtype).clone()
            for tv in vectors[1:]:
                acc += tv[key].to(dtype)
            out[key] = (acc / n).to(ref.dtype)
            continue
        mats = [tv[key].to(dtype) for tv in vectors]
        if all(is_zero(m) for m in mats):
            out[key] = ref.clone()
            continue
        total = torch.zeros_like(mats[0])
        importance = torch.zeros_like(mats[0])
        key_gains: list[float | None] = []
        for i, m in enumerate(mats):
            if is_zero(m):
                key_gains.append(None)
                continue
            x = acts[i].get(key)
            if x is None:
                raise KeyError(f"esm: no activations for '{key}' of task {i} (its update is nonzero)")
            if x.ndim != 2 or x.shape[1] != m.shape[1] or x.shape[0] == 0:
                raise ValueError(
                    f"esm: activations of '{key}' for task {i} must be (samples × {m.shape[1]}), got {tuple(x.shape)}"
                )
            reduced = _reduced_inputs(x.to(m.device, dtype), center)
            sub = essential_basis(m, x, energy, rank, center, _reduced=reduced)
            proj = project_onto_subspace(m, sub.basis)
            total += proj
            rms = proj.square().mean().sqrt()
            if rms > 0:
                importance = torch.maximum(importance, proj.abs() / rms)
            xnorm = float(torch.linalg.matrix_norm(reduced))
            key_gains.append(float(torch.linalg.matrix_norm(reduced @ proj.T)) / xnorm if xnorm > 0 else 0.0)
        if param_gamma > 0:
            total = total * polarized_factors(importance, param_gamma, param_top)
        out[key] = total  # kept in the work dtype until the layer level is applied
        gains[key] = key_gains

    # layer level: relative gains within each (stack, kind) group, polarised per group
    groups: dict[tuple[str, str], list[str]] = {}
    for key in gains:
        info = parse_block_key(key)
        group = (info.stack, info.sublayer) if info is not None else (key, "")
        groups.setdefault(group, []).append(key)
    for keys in groups.values():
        if layer_gamma > 0:
            rel = torch.zeros(len(keys), dtype=torch.float64)
            for i in range(n):
                g = [gains[k][i] for k in keys]
                present = [v for v in g if v is not None]
                mean = sum(present) / len(present) if present else 0.0
                if mean > 0:
                    rel = torch.maximum(rel, torch.tensor([(v or 0.0) / mean for v in g], dtype=torch.float64))
            factors = polarized_factors(rel, layer_gamma, layer_top).tolist()
        else:
            factors = [1.0] * len(keys)
        for key, f in zip(keys, factors):
            out[key] = (out[key] * f).to(vectors[0][key].dtype)
    return {k: out[k] for k in vectors[0]}


def esm_cost(
    task_vectors: Sequence[Mapping[str, Tensor]],
    activations: Sequence[Mapping[str, Tensor]],
    layer_types: Iterable[str] = LAYER_TYPES,
) -> dict[str, float]:
    """What ESM's merge step costs for these inputs (forward passes are the caller's).

    Returns: ``svds`` (number of SVDs), ``svd_flops`` (≈ 4·m·n·min(m, n) per m × n SVD, plus
    2·n·in² per QR of an n × in activation matrix with n > in), ``activation_rows`` and
    ``activation_bytes`` (float32) held over all tasks and matrices, and ``largest_svd`` as
    m·n of the biggest matrix decomposed.
    """
    vectors = list(task_vectors)
    block = select_block_keys(vectors[0], layer_types, include_proj=False)
    svds = 0
    flops = 0.0
    rows = 0
    nbytes = 0
    largest = 0
    for key in block:
        for i, tv in enumerate(vectors):
            m = tv[key]
            if is_zero(m):
                continue
            x = activations[i][key]
            n_rows, width = x.shape
            out_dim = m.shape[0]
            red = min(n_rows, width)
            if n_rows > width:
                flops += 2.0 * n_rows * width * width
            flops += 4.0 * red * out_dim * min(red, out_dim)
            svds += 1
            rows += n_rows
            nbytes += 4 * n_rows * width
            largest = max(largest, red * out_dim)
    return {
        "svds": float(svds),
        "svd_flops": flops,
        "activation_rows": float(rows),
        "activation_bytes": float(nbytes),
        "largest_svd": float(largest),
    }
