"""Streaming merges: read, merge and write checkpoints tensor by tensor.

Real experts weigh 350 MB (ViT-B/32) to 1.7 GB (ViT-L/14) each; loading N of them costs N
models of memory. Here the merged model θ0 + α·Δm is built one tensor (or one row block of a
large tensor) at a time, so that peak memory stays near one tensor per expert. Files are
read and written by :mod:`subboost.io` (lazy readers by key, the streaming
:class:`~subboost.io.SafetensorsWriter`, atomic and exclusive publication); this module is
the merge engine:

- :func:`merged_deltas` and :func:`stream_merge` call the registered merging functions of
  :mod:`subboost.merging` on single-key task vectors, so the streamed result is the
  library's by construction. Methods whose result for a key depends on that key only (TA,
  averaging, Consensus over TA, Iso-C, Iso-CTS, TSV-M, HO-SB) run in one pass. TIES needs
  two global statistics, each task's top-k magnitude threshold (found exactly by a two-pass
  radix selection on the float32 bit patterns, never holding a whole task vector) and the
  majority sign; LiNeS' default ``a`` needs the ℓ1 norm of the whole merged update (the
  update is spilled to a temporary file in between). Other methods (ESM) are merged in
  memory.

Inputs are validated before any work (method parameters, keys and shapes from the
headers); every merged tensor is checked to be finite before it is written (a float16
overflow or a huge α raise :class:`~subboost.io.InputError` naming the key), and the output
appears only when complete (:func:`subboost.io.atomic_path`).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from subboost.boost import boost_task_vector_with_report
from subboost.io import (
    CheckpointReader,
    InputError,
    SafetensorsReader,
    SafetensorsWriter,
    TensorInfo,
    atomic_path,
    expert_names,
    same_file,
)
from subboost.merging import METHODS, get_method, lines_scales
from subboost.taskvector import (
    work_dtype,
    all_finite,
    apply_task_vector,
    is_projection_matrix,
    parse_block_key,
    select_block_keys,
)

__all__ = [
    "check_compatible", "check_method_params", "merged_deltas",
    "stream_merge", "MergeReport", "LOCAL_METHODS", "GLOBAL_METHODS", "iter_task_vectors", "block_keys",
]


def check_compatible(base: CheckpointReader, experts: Sequence[CheckpointReader], names: Sequence[str]) -> list[str]:
    """Check that every expert has the base's keys and shapes (from the headers, without
    reading data). Returns the keys of the task vector (floating-point tensors), base order.

    A whole top-level module of the base that no expert has (e.g. the text tower
    ``transformer.*`` of a base saved from open_clip, beside the authors' experts, which drop
    it) is not part of the task vector: the merged model keeps the base's values there. Any
    other key that an expert lacks, or an expert key the base lacks, is an error naming the
    expert."""
    base_keys = base.keys()
    base_set = set(base_keys)
    expert_keys = [set(reader.keys()) for reader in experts]
    expert_modules = {k.split(".", 1)[0] for keys in expert_keys for k in keys}
    base_only = {k for k in base_keys if k.split(".", 1)[0] not in expert_modules}
    if base_only == base_set:
        base_only = set()  # nothing in common: report the mismatch below
    for reader, name, keys in zip(experts, names, expert_keys):
        missing = [k for k in base_keys if k not in keys and k not in base_only]
        extra = sorted(keys - base_set)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
            if extra:
                parts.append(f"not in the base {extra[:3]}{' ...' if len(extra) > 3 else ''}")
            raise InputError(f"expert '{name}' ({reader.path}): keys differ from the base: " + "; ".join(parts))
        for key in base_keys:
            if key in base_only:
                continue
            b, e = base.info(key), reader.info(key)
            if b.shape != e.shape:
                raise InputError(f"shape mismatch for key '{key}': base {b.shape} vs expert '{name}' {e.shape} ({reader.path})")
            if b.dtype.is_floating_point != e.dtype.is_floating_point:
                raise InputError(f"dtype mismatch for key '{key}': base {b.dtype} vs expert '{name}' {e.dtype} ({reader.path})")
    return [k for k in base_keys if k not in base_only and base.info(k).dtype.is_floating_point]


LOCAL_METHODS = frozenset({"ta", "average", "iso-c", "iso-cts", "tsv", "ho-sb"})
"""Methods whose merged value of a key depends only on that key's task vectors (streamed in
one pass). Consensus is local too when its ``base`` is "ta"."""

GLOBAL_METHODS = frozenset({"ties"})
"""Methods streamed with extra passes for their global statistics (Consensus over TIES too)."""

_ELEMENTWISE = frozenset({"ta", "average", "ties", "consensus"})


_PARAM_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "top_k": (lambda v: 0.0 < v <= 1.0, "a fraction in (0, 1] (0.2 keeps 20%)"),
    "k": (lambda v: v >= 1, "an integer ≥ 1"),
    "lambdas": (lambda v: v >= 0.0, "≥ 0"),
    "common_fraction": (lambda v: 0.0 < v <= 1.0, "a fraction in (0, 1]"),
    "beta": (lambda v: 0.0 <= v <= 1.0, "in [0, 1]"),
    "pi": (lambda v: v > 0.0, "> 0"),
}
_PARAM_CHOICES: dict[str, tuple[str, ...]] = {"base": ("ta", "ties"), "layer_types": ("attn", "mlp")}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def check_method_params(method: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Check the parameters of a registered method against its signature (names, types
    from the annotations, documented ranges) and return them normalised; raise
    :class:`~subboost.io.InputError` naming the method, the parameter and the bad value."""
    if method not in METHODS:
        raise InputError(f"unknown merging method '{method}'; known: {', '.join(METHODS)}")
    sig = inspect.signature(get_method(method).fn)
    accepted = {n: p for i, (n, p) in enumerate(sig.parameters.items())
                if i > 0 and p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)}
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    out: dict[str, Any] = {}
    for name, value in params.items():
        if name not in accepted and open_ended:
            out[name] = value  # passed on to the method, which checks it
            continue
        if name not in accepted:
            raise InputError(f"method '{method}' has no parameter '{name}' (accepted: {', '.join(accepted) or 'none'})")
        ann = accepted[name].annotation
        ann = ann if isinstance(ann, str) else getattr(ann, "__name__", str(ann))
        ann = ann.replace(" ", "")

        def bad(expected: str) -> InputError:
            return InputError(f"method '{method}': parameter '{name}' must be {expected}, got {value!r}")

        if ann == "float":
            if not _is_number(value):
                raise bad("a finite number")
            value = float(value)
        elif ann == "int":
            if isinstance(value, float) and _is_number(value) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad("an integer")
        elif ann == "bool":
            if not isinstance(value, bool):
                raise bad("true or false")
        elif ann == "str":
            if not isinstance(value, str):
                raise bad("a string")
        elif ann.startswith("float|Sequence[float]"):
            if isinstance(value, list) and value and all(_is_number(v) for v in value):
                value = [float(v) for v in value]
            elif _is_number(value):
                value = float(value)
            else:
                raise bad("a finite number or a non-empty list of numbers")
        elif ann.startswith("Iterable[str]"):
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
                raise bad("a non-empty list of names")
        else:
            raise InputError(f"method '{method}': parameter '{name}' cannot be given as a value")
        if name in _PARAM_RANGES:
            ok, expected = _PARAM_RANGES[name]
            values = value if isinstance(value, list) else [value]
            if not all(ok(v) for v in values):
                raise bad(expected)
        if name in _PARAM_CHOICES:
            values = value if isinstance(value, list) else [value]
            if not all(v in _PARAM_CHOICES[name] for v in values):
                raise bad("one of " + ", ".join(_PARAM_CHOICES[name]))
        out[name] = value
    return out


def block_keys(reader: CheckpointReader, layer_types: Iterable[str] = ("attn", "mlp"), include_proj: bool = False) -> list[str]:
    """The keys :func:`subboost.taskvector.select_block_keys` would pick, from the header
    (shapes only, no data read)."""
    stub = {k: torch.empty(reader.info(k).shape, device="meta") for k in reader.keys()
            if reader.info(k).dtype.is_floating_point}
    return select_block_keys(stub, layer_types, include_proj)


def _is_block_candidate(key: str, info: TensorInfo) -> bool:
    return len(info.shape) == 2 and (parse_block_key(key) is not None or is_projection_matrix(key))


@dataclass
class _Plan:
    base: CheckpointReader
    experts: list[CheckpointReader]
    names: list[str]
    keys: list[str]  # task-vector keys (floating point), base order
    method: str
    params: dict[str, Any]
    device: torch.device
    budget: int

    def row_blocks(self, key: str) -> list[tuple[int, int] | None]:
        """Row blocks for ``key``: whole block matrices (and everything for non-element-wise
        methods' block candidates), otherwise blocks within the memory budget."""
        info = self.base.info(key)
        if not info.shape or info.shape[0] <= 1 or _is_block_candidate(key, info):
            return [None]
        per_row = max(1, info.numel // info.shape[0]) * 4 * (len(self.experts) + 3)
        rows = max(1, self.budget // per_row)
        n = info.shape[0]
        if rows >= n:
            return [None]
        return [(r, min(r + rows, n)) for r in range(0, n, rows)]

    def deltas(self, key: str, rows: tuple[int, int] | None) -> list[Tensor]:
        """Task vectors Δi = θi − θ0 of ``key`` (rows), moved to the compute device.

        Same rules as :func:`subboost.taskvector.task_vector` (Δ = θi − θ0 in the promoted
        dtype, NaN/Inf rejected naming the file and key), with the base checked once."""
        b = self.base.read(key, rows).to(self.device)
        if not all_finite(b):
            raise InputError(f"base ({self.base.path}): key '{key}' contains NaN or Inf values")
        out = []
        for reader, name in zip(self.experts, self.names):
            e = reader.read(key, rows).to(self.device)
            if not all_finite(e):
                raise InputError(f"expert '{name}' ({reader.path}): key '{key}' contains NaN or Inf values")
            out.append(e - b)
            del e
        return out


def _progress(total: int, desc: str, enabled: bool, unit: str = "tensor") -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled, leave=False, dynamic_ncols=True)


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


def _ties_precision(plan: _Plan) -> torch.dtype:
    """The precision TIES ranks magnitudes in, as :func:`subboost.merging.ties_trim_thresholds`:
    float64 if any task-vector tensor (promoted base/expert dtype) is float64, else float32."""
    for key in plan.keys:
        for reader in plan.experts:
            if torch.promote_types(plan.base.info(key).dtype, reader.info(key).dtype) == torch.float64:
                return torch.float64
    return torch.float32


def _ties_statistics(plan: _Plan, top_k: float, progress: bool, trim: str = "official") -> tuple[list[float], float]:
    """Exact TIES statistics over the whole task vectors: per-task trim thresholds (the m-th
    largest magnitude, m = :func:`subboost.merging.ties_keep_count`, as ``torch.kthvalue`` in
    :func:`subboost.merging.ties_trim_thresholds`) by a radix selection on the bit patterns of
    the magnitudes, 16 bits per pass (2 passes in float32, 4 in float64, the precision of
    the inputs), then the majority sign (:func:`subboost.merging.majority_sign_of`)."""
    from subboost.merging import TIES_TRIM_RULES, majority_sign_of, ties_keep_count

    top_k = float(top_k)
    if not 0.0 < top_k <= 1.0:
        raise InputError(f"ties: top_k is a fraction in (0, 1] (0.2 keeps 20%), got {top_k}")
    if trim not in TIES_TRIM_RULES:
        raise InputError(f"ties: trim must be one of {', '.join(TIES_TRIM_RULES)}; got '{trim}'")
    n = len(plan.experts)
    total = sum(plan.base.info(k).numel for k in plan.keys)
    if total == 0:
        raise InputError("ties: the task vectors are empty")
    keep = ties_keep_count(total, top_k, trim)
    dtype = _ties_precision(plan)
    width = 64 if dtype == torch.float64 else 32
    shifts = list(range(width - 16, -1, -16))
    prefix = [0] * n
    rank = [keep] * n
    for p, shift in enumerate(shifts):
        hist = torch.zeros(n, 1 << 16, dtype=torch.int64)
        bar = _progress(len(plan.keys), f"ties: thresholds {p + 1}/{len(shifts)}", progress)
        for key in plan.keys:
            for rows in plan.row_blocks(key):
                for t, d in enumerate(plan.deltas(key, rows)):
                    bits = _magnitude_bits(d, dtype).reshape(-1).cpu()
                    if p:
                        bits = bits[(bits >> (shift + 16)) == prefix[t]]
                    if bits.numel():
                        hist[t] += torch.bincount(((bits >> shift) & 0xFFFF).to(torch.int64), minlength=1 << 16)
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
    majority = 0.0
    bar = _progress(len(plan.keys), "ties: majority sign", progress)
    for key in plan.keys:
        for rows in plan.row_blocks(key):
            stack = _ties_trimmed(plan.deltas(key, rows), thresholds)
            majority += float(torch.sign(stack.sum(0)).sum())
        bar.update(1)
    bar.close()
    return thresholds, majority_sign_of(majority)


def _ties_trimmed(deltas: list[Tensor], thresholds: Sequence[float]) -> Tensor:
    stack = torch.stack([d.to(work_dtype(d)) for d in deltas])
    thr = torch.tensor(list(thresholds), dtype=stack.dtype, device=stack.device).view(-1, *([1] * (stack.ndim - 1)))
    return torch.where(stack.abs() >= thr, stack, torch.zeros_like(stack))


def _ties_merge(deltas: list[Tensor], thresholds: Sequence[float], majority_sign: float, aggregate: str = "mean") -> Tensor:
    """TIES on one key given the global statistics; same steps as :func:`subboost.merging.ties`."""
    from subboost.merging import ties_disjoint

    return ties_disjoint(_ties_trimmed(deltas, thresholds), majority_sign, aggregate).to(deltas[0].dtype)


def _merge_fn(plan: _Plan, progress: bool) -> Callable[[str, list[Tensor]], Tensor]:
    """Per-key merge function ``(key, deltas) → merged delta`` (after any global pass)."""
    from subboost.merging import TIES_AGGREGATES

    method, params = plan.method, dict(plan.params)
    fn = get_method(method).fn
    for name in ("aggregate", "ties_aggregate"):
        if params.get(name, "mean") not in TIES_AGGREGATES:
            raise InputError(f"{method}: {name} must be one of {', '.join(TIES_AGGREGATES)}; got '{params[name]}'")
    if method == "ties":
        thresholds, majority = _ties_statistics(plan, params.get("top_k", 0.2), progress, params.get("trim", "official"))
        aggregate = params.get("aggregate", "mean")
        return lambda key, ds: _ties_merge(ds, thresholds, majority, aggregate)
    if method == "consensus" and params.get("base", "ta") == "ties":
        from subboost.merging import consensus_apply, tall_masks

        k = int(params.get("k", 2))
        if k < 1:
            raise InputError(f"consensus k must be ≥ 1, got {k}")
        thresholds, majority = _ties_statistics(plan, params.get("top_k", 0.2), progress, params.get("trim", "official"))
        lambdas = params.get("lambdas", 0.4)
        aggregate = params.get("ties_aggregate", "sum")

        def cons_ties(key: str, ds: list[Tensor]) -> Tensor:
            value = _ties_merge(ds, thresholds, majority, aggregate)
            masks = tall_masks([{key: d} for d in ds], lambdas, reference={key: value})
            return consensus_apply({key: value}, masks, k)[key]

        return cons_ties
    return lambda key, ds: fn([{key: d} for d in ds], **params)[key]


def merged_deltas(
    base: CheckpointReader,
    experts: Sequence[CheckpointReader],
    method: str = "ta",
    *,
    names: Sequence[str] | None = None,
    params: Mapping[str, Any] | None = None,
    boost_beta: float | None = None,
    boost_options: Mapping[str, Any] | None = None,
    keys: Iterable[str] | None = None,
    device: str | torch.device = "cpu",
    memory_budget: int = 512 << 20,
    progress: bool = False,
    boost_rows: list[dict] | None = None,
) -> Iterator[tuple[str, Tensor]]:
    """Yield ``(key, Δm[key])`` for the task-vector keys in base order: the method's merged
    update of each key, boosted (``boost_beta`` not None; ``boost_options`` go to
    :func:`subboost.boost.boost_task_vector`), before LiNeS and α. Same values as
    :func:`subboost.merging.merge` on the loaded task vectors.

    ``keys`` restricts the keys yielded (global statistics still use every key).
    ``memory_budget`` bounds the row blocks of large element-wise tensors. ``boost_rows``,
    if given, receives the Subspace Boosting report rows. Methods outside
    :data:`LOCAL_METHODS`, :data:`GLOBAL_METHODS` and Consensus are merged in memory.
    """
    params = check_method_params(method, dict(params or {}))
    experts = list(experts)
    if not experts:
        raise InputError("need at least one expert")
    names = list(names) if names is not None else expert_names([r.path for r in experts])
    all_keys = check_compatible(base, experts, names)
    wanted = set(all_keys if keys is None else keys)
    plan = _Plan(base, experts, names, all_keys, method, params, torch.device(device), int(memory_budget))
    def boosted(key: str, value: Tensor) -> Tensor:
        if not all_finite(value):
            raise InputError(f"the merged update of key '{key}' ({method}) is not finite: "
                             f"{value.dtype} overflow? (experts' differences too large for their dtype)")
        return _boost_key(key, value, boost_beta, boost_options, boost_rows)

    streamable = method in LOCAL_METHODS or method in GLOBAL_METHODS or method == "consensus"
    if not streamable:
        yield from _in_memory_deltas(plan, wanted, boosted, progress)
        return
    merge_key = _merge_fn(plan, progress)
    elementwise = method in _ELEMENTWISE
    bar = _progress(len(wanted), f"merge ({method})", progress)
    for key in all_keys:
        if key not in wanted:
            continue
        blocks = plan.row_blocks(key) if elementwise or not _is_block_candidate(key, base.info(key)) else [None]
        if blocks == [None]:
            value = merge_key(key, plan.deltas(key, None))
        else:
            parts = [merge_key(key, plan.deltas(key, rows)) for rows in blocks]
            value = torch.cat(parts, 0)
            del parts
        yield key, boosted(key, value).cpu()
        bar.update(1)
    bar.close()


def _boost_key(key: str, value: Tensor, beta: float | None, options: Mapping[str, Any] | None,
               rows: list[dict] | None) -> Tensor:
    """Subspace Boosting of one merged key (``beta`` None: unchanged), report rows into ``rows``."""
    if beta is None:
        return value
    out, report = boost_task_vector_with_report({key: value}, beta, **dict(options or {}))
    if rows is not None:
        rows.extend(report.to_dict("records"))
    return out[key]


def _in_memory_deltas(plan: _Plan, wanted: set[str], boosted: Callable[[str, Tensor], Tensor], progress: bool) -> Iterator[tuple[str, Tensor]]:
    from subboost.merging import merge as library_merge

    vectors: list[dict[str, Tensor]] = [{} for _ in plan.experts]
    bar = _progress(len(plan.keys), "load (in memory)", progress)
    for key in plan.keys:
        for t, d in enumerate(plan.deltas(key, None)):
            vectors[t][key] = d
        bar.update(1)
    bar.close()
    try:
        merged = library_merge(vectors, plan.method, **plan.params)
    except TypeError as err:
        raise InputError(f"method '{plan.method}': {err}") from None
    for key in plan.keys:
        if key in wanted:
            yield key, boosted(key, merged[key]).cpu()


def iter_task_vectors(
    base: CheckpointReader,
    experts: Sequence[CheckpointReader],
    keys: Iterable[str],
    *,
    names: Sequence[str] | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    desc: str = "task vectors",
) -> Iterator[tuple[str, list[Tensor]]]:
    """Yield ``(key, [Δ1[key], …, ΔN[key]])`` for ``keys`` (whole tensors), after checking
    that the experts match the base. For per-matrix analyses (alignment matrices)."""
    experts = list(experts)
    names = list(names) if names is not None else expert_names([r.path for r in experts])
    all_keys = check_compatible(base, experts, names)
    keys = list(keys)
    unknown = [k for k in keys if k not in set(all_keys)]
    if unknown:
        raise InputError(f"keys not in the task vectors: {unknown[:5]}")
    plan = _Plan(base, experts, names, all_keys, "ta", {}, torch.device(device), 0)
    bar = _progress(len(keys), desc, progress)
    for key in keys:
        yield key, plan.deltas(key, None)
        bar.update(1)
    bar.close()


@dataclass
class MergeReport:
    """What :func:`stream_merge` did."""

    output: Path
    method: str
    params: dict[str, Any]
    alpha: float
    boost_beta: float | None
    lines_a: float | None
    lines_b: float | None
    n_experts: int
    n_tensors: int
    seconds: float
    boost: pd.DataFrame = field(default_factory=pd.DataFrame)
    metadata: dict[str, str] = field(default_factory=dict)


def stream_merge(
    base: CheckpointReader,
    experts: Sequence[CheckpointReader],
    output: str | os.PathLike,
    method: str = "ta",
    *,
    names: Sequence[str] | None = None,
    params: Mapping[str, Any] | None = None,
    alpha: float = 1.0,
    boost_beta: float | None = None,
    boost_options: Mapping[str, Any] | None = None,
    lines_b: float | None = None,
    lines_a: float | None = None,
    lines_order: str = "after_boost",
    metadata: Mapping[str, str] | None = None,
    device: str | torch.device = "cpu",
    memory_budget: int = 512 << 20,
    progress: bool = False,
    overwrite: bool = False,
    label: str | None = None,
) -> MergeReport:
    """Merge ``experts`` onto ``base`` and write θ0 + α·Δm to ``output`` (safetensors),
    tensor by tensor. Δm = method → Subspace Boosting (``boost_beta``) → LiNeS (``lines_b``),
    as :func:`subboost.merging.merge`. ``lines_order="before_boost"`` computes LiNeS' default a
    from the un-boosted update (as :func:`subboost.merging.merge` with that order); the
    per-layer scalars are applied after SB in both orders, which gives the same matrices
    because SB(cM) = c·SB(M). Keys outside the task vector (integer buffers) are
    copied from the base; dtypes are the base's.

    The file appears only when complete and every merged tensor is finite
    (:func:`subboost.io.atomic_path`: an existing ``output`` is an error unless
    ``overwrite``; ``label`` names it in messages, e.g. ``"--output"``). ``metadata`` is
    stored in the safetensors header, together with the method, its parameters, α, β and
    LiNeS.
    """
    start = time.perf_counter()
    params = check_method_params(method, dict(params or {}))
    if not math.isfinite(float(alpha)):
        raise InputError(f"alpha must be finite, got {alpha}")
    for what, value in (("lines b", lines_b), ("lines a", lines_a), ("boost beta", boost_beta)):
        if value is not None and not math.isfinite(float(value)):
            raise InputError(f"{what} must be finite, got {value}")
    if boost_beta is not None and not 0.0 <= float(boost_beta) <= 1.0:
        raise InputError(f"boost beta must lie in [0, 1], got {boost_beta}")
    from subboost.merging import LINES_ORDERS

    if lines_order not in LINES_ORDERS:
        raise InputError(f"lines order must be one of {', '.join(LINES_ORDERS)}; got '{lines_order}'")
    boost_late = lines_b is not None and lines_a is None and lines_order == "before_boost" and boost_beta is not None
    output = Path(output)
    experts = list(experts)
    names = list(names) if names is not None else expert_names([r.path for r in experts])
    rows: list[dict] = []
    delta_iter = lambda: merged_deltas(  # noqa: E731
        base, experts, method, names=names, params=params, boost_beta=None if boost_late else boost_beta,
        boost_options=boost_options, device=device, memory_budget=memory_budget,
        progress=progress, boost_rows=rows,
    )
    keys_all = base.keys()
    infos = {k: base.info(k) for k in keys_all}
    meta = {
        "format": "pt",
        "subboost.command": "merge",
        "subboost.method": method,
        "subboost.params": json.dumps(dict(params or {}), sort_keys=True, default=str),
        "subboost.alpha": repr(float(alpha)),
        "subboost.boost_beta": "none" if boost_beta is None else repr(float(boost_beta)),
        "subboost.boost_options": json.dumps(dict(boost_options or {}), sort_keys=True, default=str),
        "subboost.lines_b": "none" if lines_b is None else repr(float(lines_b)),
        "subboost.lines_order": lines_order,
    }
    from subboost import __version__

    meta["subboost.version"] = __version__
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})

    inputs = [base.path] + [r.path for r in experts]
    for path in inputs:
        if same_file(path, output):
            raise InputError(f"{label or 'output'} {output} is one of the inputs ({path}); refusing to overwrite an input")

    with contextlib.ExitStack() as stack:
        tmp = stack.enter_context(atomic_path(output, overwrite=overwrite, label=label))
        a_used = lines_a
        deltas: Iterator[tuple[str, Tensor]]
        spilled = False
        task_keys = check_compatible(base, experts, names)
        if lines_b is not None and lines_a is None:
            # LiNeS' default a needs ‖Σ Δt‖1 and ‖Δm‖1 over the whole model: spill Δm first
            # (un-boosted when LiNeS comes before SB: then SB runs when it is read back)
            spill = stack.enter_context(_temporary_file(output.parent, f".{output.name}.delta."))
            num = _ta_l1(base, experts, names, device, memory_budget, progress)
            den = 0.0
            spill_infos = {
                k: TensorInfo(infos[k].shape, torch.promote_types(infos[k].dtype, experts[0].info(k).dtype))
                for k in task_keys
            }
            writer = SafetensorsWriter(spill, spill_infos)
            try:
                for key, value in delta_iter():
                    value = value.to(spill_infos[key].dtype)
                    den += float(value.abs().to(torch.float64).sum())
                    writer.write(key, value)
                writer.close()
            except BaseException:
                writer.abort()
                raise
            if den == 0.0:
                raise InputError("LiNeS: the merged update is all zero")
            a_used = num / den / len(experts)
            spill_reader = stack.enter_context(SafetensorsReader(spill))
            if boost_late:
                deltas = ((k, _boost_key(k, spill_reader.read(k), boost_beta, boost_options, rows)) for k in task_keys)
            else:
                deltas = ((k, spill_reader.read(k)) for k in task_keys)
            spilled = True
        else:
            deltas = delta_iter()
        scales = lines_scales(task_keys, a_used, lines_b) if lines_b is not None else None
        meta["subboost.lines_a"] = "none" if a_used is None else repr(float(a_used))
        writer = SafetensorsWriter(tmp, infos, meta)
        try:
            pending = next(deltas, None)
            bar = _progress(len(keys_all), "write", progress and spilled)
            for key in keys_all:
                b = base.read(key)
                if pending is not None and pending[0] == key:
                    d = pending[1]
                    if scales is not None:
                        d = (d.to(work_dtype(d)) * scales[key]).to(d.dtype)
                    merged = apply_task_vector({key: b}, {key: d}, float(alpha))[key]
                    pending = next(deltas, None)
                else:
                    merged = b
                if not all_finite(merged):
                    raise InputError(f"merged tensor '{key}' is not finite (NaN or Inf: {merged.dtype} overflow "
                                     f"with alpha={float(alpha):g}?); nothing was written")
                writer.write(key, merged)
                bar.update(1)
            bar.close()
            writer.close()
        except BaseException:
            writer.abort()
            raise
        if pending is not None:
            raise RuntimeError(f"merged update has key '{pending[0]}' out of base order")
    boost = pd.DataFrame(rows)
    return MergeReport(output, method, dict(params or {}), float(alpha), boost_beta, a_used, lines_b,
                       len(experts), len(keys_all), time.perf_counter() - start, boost, meta)


@contextlib.contextmanager
def _temporary_file(folder: Path, prefix: str) -> Iterator[Path]:
    """A temporary file in ``folder`` (which exists), always removed at the end."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def _ta_l1(base: CheckpointReader, experts: list[CheckpointReader], names: list[str], device: Any, budget: int, progress: bool) -> float:
    """Σ_k ‖Σ_t Δt[k]‖1 (the numerator of LiNeS' default a), streamed."""
    total = 0.0
    for _, value in merged_deltas(base, experts, "ta", names=names, device=device, memory_budget=budget,
                                  progress=progress):
        total += float(value.to(work_dtype(value)).abs().sum())
    return total
