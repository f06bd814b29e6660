"""Streaming merges: read, merge and write checkpoints tensor by tensor.

Real experts weigh 350 MB (ViT-B/32) to 1.7 GB (ViT-L/14) each; loading N of them costs N
models of memory. Here the merged model θ0 + α·Δm is built one tensor (or one row block of a
large tensor) at a time, so that peak memory stays near one tensor per expert. Files are
read and written by :mod:`subboost.io` (lazy readers by key, the streaming
:class:`~subboost.io.SafetensorsWriter`, atomic and exclusive publication). The merge itself is
:mod:`subboost.merging`'s one engine (:func:`subboost.merging.run_merge`) run on
:class:`CheckpointTaskVectors`, a source that reads Δi = θi − θ0 key by key: the methods'
kernels and whole-model statistics are the in-memory ones, so the streamed result is the
library's bit for bit. Statistics cost extra passes over the checkpoints (TIES' per-task
thresholds: a radix selection on the magnitudes' bit patterns, 2 passes in float32, 4 in
float64, then one for the majority sign); LiNeS' default ``a`` needs the ℓ1 norm of the whole
merged update, which is spilled to a temporary file in between. Whole-model methods (ESM)
are merged in memory.

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
from subboost.merging import LINES_ORDERS, METHODS, get_method, run_merge
from subboost.taskvector import (
    all_finite,
    apply_task_vector,
    is_projection_matrix,
    parse_block_key,
    select_block_keys,
)

__all__ = [
    "check_compatible", "check_method_params", "merged_deltas",
    "stream_merge", "MergeReport", "CheckpointTaskVectors", "iter_task_vectors", "block_keys",
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
class CheckpointTaskVectors:
    """The task vectors Δi = θi − θ0 of checkpoints on disk as a
    :class:`subboost.merging.TaskVectorSource`: read key by key (row block by row block for
    large tensors that are not block matrices), never held whole."""

    base: CheckpointReader
    experts: list[CheckpointReader]
    names: list[str]
    keys: list[str]  # task-vector keys (floating point), base order
    device: torch.device
    budget: int

    @property
    def n_tasks(self) -> int:
        return len(self.experts)

    def numel(self, key: str) -> int:
        return self.base.info(key).numel

    def delta_dtype(self, key: str, task: int) -> torch.dtype:
        return torch.promote_types(self.base.info(key).dtype, self.experts[task].info(key).dtype)

    def row_blocks(self, key: str) -> list[tuple[int, int] | None]:
        """Row blocks for ``key``: whole block-matrix candidates (SB and the spectral methods
        need whole matrices), otherwise blocks within the memory budget."""
        info = self.base.info(key)
        if not info.shape or info.shape[0] <= 1 or _is_block_candidate(key, info):
            return [None]
        per_row = max(1, info.numel // info.shape[0]) * 4 * (len(self.experts) + 3)
        rows = max(1, self.budget // per_row)
        n = info.shape[0]
        if rows >= n:
            return [None]
        return [(r, min(r + rows, n)) for r in range(0, n, rows)]

    def deltas(self, key: str, rows: tuple[int, int] | None = None) -> list[Tensor]:
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


def _bars(enabled: bool) -> Callable[[int, str], Any]:
    """The engine's progress callback (:data:`subboost.merging.Progress`): tqdm bars on stderr."""
    return lambda total, desc: _progress(total, desc, enabled)


@contextlib.contextmanager
def _input_errors() -> Iterator[None]:
    """Report the engine's ValueErrors (bad method options, LiNeS on an all-zero update) as
    :class:`~subboost.io.InputError`."""
    try:
        yield
    except InputError:
        raise
    except (ValueError, TypeError) as err:
        raise InputError(str(err)) from None


def _check_merged(method: str) -> Callable[[str, Tensor], None]:
    def check(key: str, value: Tensor) -> None:
        if not all_finite(value):
            raise InputError(f"the merged update of key '{key}' ({method}) is not finite: "
                             f"{value.dtype} overflow? (experts' differences too large for their dtype)")

    return check


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
    :func:`subboost.boost.boost_task_vector`), before LiNeS and α. The engine and the
    kernels are :func:`subboost.merging.run_merge`'s, so the values are those of
    :func:`subboost.merging.merge` on the loaded task vectors, bit for bit.

    ``keys`` restricts the keys yielded (whole-model statistics still use every key).
    ``memory_budget`` bounds the row blocks of large tensors that are not block matrices.
    ``boost_rows``, if given, receives the Subspace Boosting report rows. Whole-model methods
    (:attr:`subboost.merging.MergeMethod.whole_model`, ESM) are merged in memory.
    """
    params = check_method_params(method, dict(params or {}))
    experts = list(experts)
    if not experts:
        raise InputError("need at least one expert")
    names = list(names) if names is not None else expert_names([r.path for r in experts])
    all_keys = check_compatible(base, experts, names)
    source = CheckpointTaskVectors(base, experts, names, all_keys, torch.device(device), int(memory_budget))
    with _input_errors():
        _, items = run_merge(method, source, params, boost_beta=boost_beta, boost_options=boost_options, keys=keys,
                             check=_check_merged(method), boost_rows=boost_rows, progress=_bars(progress))
    for key, value in items:
        yield key, value.cpu()


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
    source = CheckpointTaskVectors(base, experts, names, all_keys, torch.device(device), 0)
    bar = _progress(len(keys), desc, progress)
    for key in keys:
        yield key, source.deltas(key, None)
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
    tensor by tensor. Δm = method → Subspace Boosting (``boost_beta``) → LiNeS (``lines_b``,
    ``lines_order``) by the engine of :func:`subboost.merging.merge`
    (:func:`subboost.merging.run_merge`), so the update is the in-memory one bit for bit;
    LiNeS' default a holds Δm in a temporary file beside ``output`` between its two passes.
    Keys outside the task vector (integer buffers) are copied from the base; dtypes are the base's.

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
    if lines_order not in LINES_ORDERS:
        raise InputError(f"lines order must be one of {', '.join(LINES_ORDERS)}; got '{lines_order}'")
    output = Path(output)
    experts = list(experts)
    if not experts:
        raise InputError("need at least one expert")
    names = list(names) if names is not None else expert_names([r.path for r in experts])
    rows: list[dict] = []
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
        task_keys = check_compatible(base, experts, names)
        source = CheckpointTaskVectors(base, experts, names, task_keys, torch.device(device), int(memory_budget))
        spilled = False

        def spill(items: Iterator[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
            # LiNeS' default a needs ‖Δm‖1 of the whole merged update before any key is
            # scaled: the engine holds Δm in a temporary file beside the output
            nonlocal spilled
            path = stack.enter_context(_temporary_file(output.parent, f".{output.name}.delta."))
            spill_infos = {k: TensorInfo(infos[k].shape, source.delta_dtype(k, 0)) for k in task_keys}
            writer = SafetensorsWriter(path, spill_infos)
            try:
                for key, value in items:
                    writer.write(key, value.to(spill_infos[key].dtype).cpu())
                writer.close()
            except BaseException:
                writer.abort()
                raise
            spilled = True
            reader = stack.enter_context(SafetensorsReader(path))
            return ((k, reader.read(k).to(source.device)) for k in task_keys)

        with _input_errors():
            a_used, deltas = run_merge(
                method, source, params, boost_beta=boost_beta, boost_options=boost_options, lines_b=lines_b,
                lines_a=lines_a, lines_order=lines_order, hold=spill, check=_check_merged(method), boost_rows=rows,
                progress=_bars(progress),
            )
        meta["subboost.lines_a"] = "none" if a_used is None else repr(float(a_used))
        writer = SafetensorsWriter(tmp, infos, meta)
        try:
            pending = next(deltas, None)
            bar = _progress(len(keys_all), "write", progress and spilled)
            for key in keys_all:
                b = base.read(key)
                if pending is not None and pending[0] == key:
                    merged = apply_task_vector({key: b}, {key: pending[1].cpu()}, float(alpha))[key]
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
