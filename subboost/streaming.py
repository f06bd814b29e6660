"""Streaming merges: read, merge and write checkpoints tensor by tensor (issue 6, issue 7).

Real experts weigh 350 MB (ViT-B/32) to 1.7 GB (ViT-L/14) each; loading N of them costs N
models of memory. Here the merged model θ0 + α·Δm is built one tensor (or one row block of a
large tensor) at a time, so that peak memory stays near one tensor per expert:

- **Readers** (:func:`open_checkpoint`) give lazy access by key:
  ``.safetensors`` files are read with positioned reads from their header's offsets (no
  memory map, so the bytes of tensors already merged never count towards the process' RSS);
  ``.pt`` files are memory-mapped (``torch.load(mmap=True)``) and the pages of a tensor are
  handed back to the OS (``madvise(MADV_DONTNEED)``, Linux) once it has been copied.
  Pickled modules (the public task-vector releases pickle ``open_clip`` image encoders)
  need ``allow_pickle=True``; classes whose code is not installed are rebuilt as inert
  placeholders from which only the parameters and buffers are read.
- **Writer** (:class:`SafetensorsWriter`): the header is known from the base (every output
  tensor has the base's shape and dtype), so tensors are appended one by one.
- **Engine** (:func:`merged_deltas`, :func:`stream_merge`): the registered merging functions
  of :mod:`subboost.merging` are called on single-key task vectors, so the streamed result
  is the library's by construction. Methods whose result for a key depends on that key only
  (TA, averaging, Consensus over TA, Iso-C, Iso-CTS, TSV-M, HO-SB) run in one pass. TIES
  needs two global statistics, each task's top-k magnitude threshold (found exactly by a
  two-pass radix selection on the float32 bit patterns, never holding a whole task vector)
  and the majority sign; LiNeS' default ``a`` needs the ℓ1 norm of the whole merged update
  (the update is spilled to a temporary file in between). Other methods (ESM) are merged
  in memory.

Inputs are validated before any work (keys and shapes from the headers); every problem is
raised as :class:`InputError` naming the file and key. Outputs are written to a temporary
file and renamed at the end (:func:`subboost.checkpoints.atomic_path`).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import inspect
import json
import math
import mmap
import os
import pickle
import struct
import sys
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from subboost.boost import boost_task_vector_with_report
from subboost.checkpoints import atomic_path
from subboost.merging import METHODS, get_method, lines_scales
from subboost.taskvector import (
    all_finite,
    apply_task_vector,
    is_projection_matrix,
    parse_block_key,
    select_block_keys,
)

__all__ = [
    "InputError", "TensorInfo", "CheckpointReader", "SafetensorsReader", "TorchReader",
    "SafetensorsWriter", "open_checkpoint", "checkpoint_root_paths", "expert_names",
    "check_compatible", "sha256_file", "merged_deltas", "stream_merge", "MergeReport",
    "LOCAL_METHODS", "GLOBAL_METHODS", "iter_task_vectors", "block_keys",
]


class InputError(ValueError):
    """A problem with the user's inputs (missing file, mismatched keys, bad parameter...)."""


# ----------------------------------------------------------------------------- dtypes

_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _ST_DTYPES[_name] = getattr(torch, _attr)
_ST_NAMES: dict[torch.dtype, str] = {v: k for k, v in _ST_DTYPES.items()}
del _name, _attr


@dataclass(frozen=True)
class TensorInfo:
    """Shape and dtype of a stored tensor (known without reading its data)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * _itemsize(self.dtype)


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _row_range(info: TensorInfo, rows: tuple[int, int] | None) -> tuple[int, int]:
    n = info.shape[0] if info.shape else 1
    if rows is None:
        return 0, n
    r0, r1 = rows
    if not 0 <= r0 <= r1 <= n:
        raise ValueError(f"row range {rows} outside [0, {n}]")
    return r0, r1


# ----------------------------------------------------------------------------- readers


class CheckpointReader:
    """Lazy, read-only access to the tensors of one checkpoint file, by key."""

    path: Path

    def keys(self) -> list[str]:
        raise NotImplementedError

    def info(self, key: str) -> TensorInfo:
        raise NotImplementedError

    def read(self, key: str, rows: tuple[int, int] | None = None) -> Tensor:
        """A fresh CPU tensor holding ``key`` (or its rows ``rows[0]:rows[1]``, first dim)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the file (idempotent)."""

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"


class SafetensorsReader(CheckpointReader):
    """Positioned reads from a ``.safetensors`` file: header parsed once, each tensor (or
    row block) read into a fresh buffer; nothing stays mapped."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._file = open(self.path, "rb")
        try:
            self._parse_header()
        except Exception:
            self._file.close()
            raise

    def _parse_header(self) -> None:
        size = os.fstat(self._file.fileno()).st_size
        head = self._file.read(8)
        if len(head) < 8:
            raise InputError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 1 << 28):
            raise InputError(f"{self.path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(self._file.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise InputError(f"{self.path}: not a safetensors file (header is not JSON)") from None
        if not isinstance(header, dict):
            raise InputError(f"{self.path}: not a safetensors file (header is not a JSON object)")
        self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
        self._data_start = 8 + n
        self._entries: dict[str, tuple[TensorInfo, int]] = {}
        for key, entry in header.items():
            try:
                dtype = _ST_DTYPES[entry["dtype"]]
                shape = tuple(int(x) for x in entry["shape"])
                begin, end = (int(x) for x in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise InputError(f"{self.path}: unsupported or malformed header entry for key '{key}'") from None
            info = TensorInfo(shape, dtype)
            if end - begin != info.nbytes or self._data_start + end > size:
                raise InputError(f"{self.path}: key '{key}': data offsets do not match its shape or the file size")
            self._entries[key] = (info, begin)

    def keys(self) -> list[str]:
        return list(self._entries)

    def info(self, key: str) -> TensorInfo:
        return self._entries[key][0]

    def read(self, key: str, rows: tuple[int, int] | None = None) -> Tensor:
        info, begin = self._entries[key]
        r0, r1 = _row_range(info, rows)
        row_bytes = info.nbytes // max(info.shape[0], 1) if info.shape else info.nbytes
        shape = ((r1 - r0),) + info.shape[1:] if info.shape else ()
        out = torch.empty(shape, dtype=info.dtype)
        nbytes = out.numel() * out.element_size()
        if nbytes:
            view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
            self._file.seek(self._data_start + begin + r0 * row_bytes)
            got = 0
            while got < nbytes:
                n = self._file.readinto(view[got:])
                if not n:
                    raise InputError(f"{self.path}: file ends inside tensor '{key}'")
                got += n
        return out

    def close(self) -> None:
        self._file.close()


class _PageReleaser:
    """Hands the pages of a memory-mapped file back to the OS once a tensor was copied, so
    that streamed ``.pt`` files do not pile up in the resident set. Linux only (it reads
    ``/proc/self/maps``); a no-op elsewhere. Only ranges inside this file's own mappings
    are released (MADV_DONTNEED on a file mapping just drops clean pages: a later access
    reads them again from the file)."""

    _MADV_DONTNEED = 4

    def __init__(self, path: Path) -> None:
        self._ranges: list[tuple[int, int]] = []
        self._madvise: Callable[..., int] | None = None
        if not sys.platform.startswith("linux"):
            return
        real = os.path.realpath(path)
        try:
            with open("/proc/self/maps") as fh:
                for line in fh:
                    parts = line.rstrip("\n").split(None, 5)
                    if len(parts) == 6 and parts[5] == real:
                        lo, hi = (int(x, 16) for x in parts[0].split("-"))
                        self._ranges.append((lo, hi))
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.madvise
            fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            fn.restype = ctypes.c_int
            self._madvise = fn
        except (OSError, AttributeError):
            self._ranges = []

    def release(self, tensor: Tensor) -> None:
        if not self._ranges or self._madvise is None or not tensor.is_contiguous():
            return
        page = mmap.PAGESIZE
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        for lo, hi in self._ranges:
            a, b = max(start, lo), min(end, hi)
            a = -(-a // page) * page
            b = (b // page) * page
            if b > a:
                self._madvise(a, b - a, self._MADV_DONTNEED)


class _Placeholder:
    """Stands in for a pickled object whose class cannot be imported; keeps its state."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.__dict__["_placeholder_args"] = args

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update(state)
        else:
            self.__dict__["_placeholder_state"] = state

    def __call__(self, *args: object, **kwargs: object) -> "_Placeholder":
        return _Placeholder(*args)


def _placeholder_pickle_module() -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load`` whose Unpickler rebuilds classes from missing
    modules as :class:`_Placeholder` subclasses (made per unpickler: no shared state)."""

    class Unpickler(pickle.Unpickler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._made: dict[tuple[str, str], type] = {}

        def find_class(self, module: str, name: str) -> Any:
            try:
                return super().find_class(module, name)
            except (ModuleNotFoundError, AttributeError, ImportError):
                key = (module, name)
                if key not in self._made:
                    self._made[key] = type(name, (_Placeholder,), {"__module__": module})
                return self._made[key]

    mod = types.ModuleType("subboost_placeholder_pickle")
    mod.Unpickler = Unpickler  # type: ignore[attr-defined]
    mod.Pickler = pickle.Pickler  # type: ignore[attr-defined]
    mod.load = lambda f, **kw: Unpickler(f, **kw).load()  # type: ignore[attr-defined]
    mod.loads = pickle.loads  # type: ignore[attr-defined]
    mod.dump = pickle.dump  # type: ignore[attr-defined]
    return mod


def _module_tensors(obj: Any, prefix: str, out: dict[str, Tensor], depth: int = 0) -> bool:
    """Collect parameters and persistent buffers of an ``nn.Module`` or of a placeholder
    with a module's ``__dict__``; returns False when ``obj`` is neither."""
    if depth > 64:
        return False
    if isinstance(obj, torch.nn.Module):
        try:  # a real module: its own state_dict (hooks, custom _save_to_state_dict)
            items = obj.state_dict().items()
        except (AttributeError, TypeError):
            items = None  # some submodule is a placeholder: walk the attributes below
        if items is not None:
            for k, v in items:
                out[prefix + k] = v
            return True
    state = getattr(obj, "__dict__", None)
    if not isinstance(state, dict) or "_parameters" not in state or "_modules" not in state:
        return False
    for name, p in (state.get("_parameters") or {}).items():
        if p is not None:
            out[prefix + name] = p.detach()
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for name, b in (state.get("_buffers") or {}).items():
        if b is not None and name not in skip:
            out[prefix + name] = b.detach()
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            _module_tensors(child, f"{prefix}{name}.", out, depth + 1)
    return True


def _extract_tensors(obj: Any, path: Path) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    if _module_tensors(obj, "", out):
        return out
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, Mapping) or _module_tensors(inner, "", {}):
                return _extract_tensors(inner, path)
        bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
        if bad:
            raise InputError(f"{path}: not a state dict (entries that are not tensors: {bad[:5]})")
        return {str(k): v for k, v in obj.items()}
    raise InputError(f"{path}: holds a {type(obj).__name__}, not a state dict or a torch module")


class TorchReader(CheckpointReader):
    """``.pt``/``.pth``/``.bin`` torch files: state dicts, wrapped state dicts
    (``{"state_dict": ...}``) or pickled modules (``allow_pickle=True``).

    Zip-format files are memory-mapped, and each tensor's pages are released after it was
    copied; legacy (pre-1.6) files are loaded whole."""

    def __init__(self, path: str | os.PathLike, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        obj, mapped = self._load(allow_pickle)
        self._tensors = _extract_tensors(obj, self.path)
        del obj
        self._releaser = _PageReleaser(self.path) if mapped else None

    def _load(self, allow_pickle: bool) -> tuple[Any, bool]:
        path = self.path
        attempts: list[tuple[bool, bool]] = [(True, True), (True, False)]  # (weights_only, mmap)
        last: Exception | None = None
        for weights_only, use_mmap in attempts:
            try:
                return torch.load(path, map_location="cpu", weights_only=weights_only, mmap=use_mmap), use_mmap
            except RuntimeError as err:
                last = err
                if "mmap" in str(err) and use_mmap:
                    continue  # legacy serialisation: cannot be mapped
                break
            except pickle.UnpicklingError as err:
                last = err
                break
            except (EOFError, ValueError, OSError) as err:
                last = err
                break
        msg = str(last).strip().splitlines()[0] if last is not None and str(last).strip() else type(last).__name__
        # the weights-only unpickler names the global it refused ("Unsupported global: GLOBAL
        # src.modeling.ImageEncoder ..."); other failures mean the file is no torch pickle
        refused = isinstance(last, pickle.UnpicklingError) and "unsupported global" in str(last).lower()
        if not refused:
            raise InputError(f"{path}: cannot read as a torch checkpoint ({msg})")
        if not allow_pickle:
            raise InputError(
                f"{path}: holds pickled Python objects (e.g. a whole model), which torch.load"
                f"(weights_only=True) refuses; if you trust the file, pass --allow-pickle"
            )
        for use_mmap in (True, False):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=False, mmap=use_mmap,
                                 pickle_module=_placeholder_pickle_module())
                return obj, use_mmap
            except RuntimeError as err:
                if "mmap" in str(err) and use_mmap:
                    continue
                raise InputError(f"{path}: cannot unpickle ({str(err).splitlines()[0]})") from None
            except Exception as err:  # arbitrary pickles fail in arbitrary ways
                raise InputError(f"{path}: cannot unpickle ({type(err).__name__}: {err})") from None
        raise InputError(f"{path}: cannot unpickle")

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, key: str) -> TensorInfo:
        t = self._tensors[key]
        return TensorInfo(tuple(t.shape), t.dtype)

    def read(self, key: str, rows: tuple[int, int] | None = None) -> Tensor:
        t = self._tensors[key]
        info = TensorInfo(tuple(t.shape), t.dtype)
        r0, r1 = _row_range(info, rows)
        src = t[r0:r1] if (rows is not None and t.ndim) else t
        out = src.detach().clone(memory_format=torch.contiguous_format)
        if self._releaser is not None:
            self._releaser.release(src)
        return out

    def close(self) -> None:
        self._tensors = {}


def open_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> CheckpointReader:
    """Open a checkpoint for lazy reading: ``.safetensors`` by its header, anything else as a
    torch file. Raises :class:`InputError` naming the file for a missing or unreadable file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise InputError(f"not a file: {path}")
    if path.suffix == ".safetensors":
        return SafetensorsReader(path)
    return TorchReader(path, allow_pickle=allow_pickle)


def checkpoint_root_paths(root: str | os.PathLike, model: str, tasks: Sequence[str]) -> tuple[Path, list[Path]]:
    """Base and expert files of a checkpoint root in the public layout.

    Tried in order, per file: the tall-masks layout ``{root}/{model}/{Task}Val/nonlinear_finetuned.pt``
    with base ``{root}/{model}/MNISTVal/nonlinear_zeroshot.pt`` (any ``*Val/nonlinear_zeroshot.pt``
    if MNIST's is absent), then the older task-vectors layout ``{root}/{model}/{Task}/finetuned.pt``
    with base ``{root}/{model}/zeroshot.pt``. Task names may be given with or without "Val".
    """
    folder = Path(root) / model
    if not folder.is_dir():
        raise InputError(f"checkpoint root has no folder for model '{model}': {folder}")
    base_candidates = [folder / "MNISTVal" / "nonlinear_zeroshot.pt"]
    base_candidates += sorted(folder.glob("*Val/nonlinear_zeroshot.pt"))
    base_candidates += [folder / "zeroshot.pt"]
    base = next((p for p in base_candidates if p.is_file()), None)
    if base is None:
        raise InputError(f"no zero-shot base under {folder} (looked for MNISTVal/nonlinear_zeroshot.pt and zeroshot.pt)")
    experts = []
    for task in tasks:
        plain = task[:-3] if task.endswith("Val") else task
        options = [folder / f"{plain}Val" / "nonlinear_finetuned.pt", folder / plain / "finetuned.pt",
                   folder / task / "finetuned.pt"]
        found = next((p for p in options if p.is_file()), None)
        if found is None:
            raise InputError(f"no fine-tuned checkpoint for task '{task}' under {folder} "
                             f"(looked for {plain}Val/nonlinear_finetuned.pt and {plain}/finetuned.pt)")
        experts.append(found)
    return base, experts


def expert_names(paths: Sequence[Path]) -> list[str]:
    """Readable, unique names for expert files: stems, else parent folders, else both, else
    numbered."""
    paths = [Path(p) for p in paths]
    for candidate in ([p.stem for p in paths], [p.parent.name for p in paths],
                      [f"{p.parent.name}/{p.stem}" for p in paths]):
        if len(set(candidate)) == len(candidate) and all(candidate):
            return candidate
    return [f"expert{i}" for i in range(len(paths))]


def check_compatible(base: CheckpointReader, experts: Sequence[CheckpointReader], names: Sequence[str]) -> list[str]:
    """Check that every expert has the base's keys and shapes (from the headers, without
    reading data). Returns the keys of the task vector (floating-point tensors), base order."""
    base_keys = base.keys()
    base_set = set(base_keys)
    for reader, name in zip(experts, names):
        keys = set(reader.keys())
        missing = [k for k in base_keys if k not in keys]
        extra = sorted(keys - base_set)
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {missing[:3]}{' ...' if len(missing) > 3 else ''}")
            if extra:
                parts.append(f"not in the base {extra[:3]}{' ...' if len(extra) > 3 else ''}")
            raise InputError(f"expert '{name}' ({reader.path}): keys differ from the base: " + "; ".join(parts))
        for key in base_keys:
            b, e = base.info(key), reader.info(key)
            if b.shape != e.shape:
                raise InputError(f"shape mismatch for key '{key}': base {b.shape} vs expert '{name}' {e.shape} ({reader.path})")
            if b.dtype.is_floating_point != e.dtype.is_floating_point:
                raise InputError(f"dtype mismatch for key '{key}': base {b.dtype} vs expert '{name}' {e.dtype} ({reader.path})")
    return [k for k in base_keys if base.info(k).dtype.is_floating_point]


def sha256_file(path: str | os.PathLike, progress: Any = None) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks (``progress``: an optional tqdm bar
    updated with the bytes read)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(1 << 22)
            if not block:
                break
            h.update(block)
            if progress is not None:
                progress.update(len(block))
    return h.hexdigest()


# ----------------------------------------------------------------------------- writer


class SafetensorsWriter:
    """Writes a ``.safetensors`` file tensor by tensor, in the order of ``infos``.

    The header (shapes, dtypes, offsets, metadata) is written first; :meth:`write` then
    appends each tensor's bytes and checks its key, shape and dtype."""

    def __init__(self, path: str | os.PathLike, infos: Mapping[str, TensorInfo], metadata: Mapping[str, str] | None = None) -> None:
        self.path = Path(path)
        header: dict[str, Any] = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._order = list(infos)
        self._infos = dict(infos)
        for key in self._order:
            info = self._infos[key]
            if info.dtype not in _ST_NAMES:
                raise InputError(f"key '{key}': dtype {info.dtype} cannot be stored in safetensors")
            header[key] = {"dtype": _ST_NAMES[info.dtype], "shape": list(info.shape),
                           "data_offsets": [offset, offset + info.nbytes]}
            offset += info.nbytes
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._next = 0

    def write(self, key: str, tensor: Tensor) -> None:
        if self._next >= len(self._order) or self._order[self._next] != key:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise RuntimeError(f"SafetensorsWriter: got '{key}', expected {expected}")
        info = self._infos[key]
        if tuple(tensor.shape) != info.shape or tensor.dtype != info.dtype:
            raise RuntimeError(f"SafetensorsWriter: '{key}' is {tuple(tensor.shape)} {tensor.dtype}, header says {info.shape} {info.dtype}")
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        if flat.numel():
            self._file.write(memoryview(flat.view(torch.uint8).numpy()))
        self._next += 1

    def close(self) -> None:
        """Flush and close; raises if some tensors were never written."""
        if self._file.closed:
            return
        missing = len(self._order) - self._next
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        if missing:
            raise RuntimeError(f"SafetensorsWriter: {missing} tensors were never written")

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()


# ----------------------------------------------------------------------------- engine

LOCAL_METHODS = frozenset({"ta", "average", "iso-c", "iso-cts", "tsv", "ho-sb"})
"""Methods whose merged value of a key depends only on that key's task vectors (streamed in
one pass). Consensus is local too when its ``base`` is "ta"."""

GLOBAL_METHODS = frozenset({"ties"})
"""Methods streamed with extra passes for their global statistics (Consensus over TIES too)."""

_ELEMENTWISE = frozenset({"ta", "average", "ties", "consensus"})


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _check_params(method: str, params: Mapping[str, Any]) -> None:
    fn = get_method(method).fn
    sig = inspect.signature(fn)
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    allowed = [n for n in list(sig.parameters)[1:] if sig.parameters[n].kind is not inspect.Parameter.VAR_KEYWORD]
    for name in params:
        if not accepts_any and name not in allowed:
            raise InputError(f"method '{method}' has no parameter '{name}' (accepted: {', '.join(allowed) or 'none'})")


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
    stack = torch.stack([d.to(_work_dtype(d)) for d in deltas])
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
    if method not in METHODS:
        raise InputError(f"unknown merging method '{method}'; known: {', '.join(sorted(METHODS))}")
    params = dict(params or {})
    _check_params(method, params)
    experts = list(experts)
    if not experts:
        raise InputError("need at least one expert")
    names = list(names) if names is not None else expert_names([r.path for r in experts])
    all_keys = check_compatible(base, experts, names)
    wanted = set(all_keys if keys is None else keys)
    plan = _Plan(base, experts, names, all_keys, method, params, torch.device(device), int(memory_budget))
    def boosted(key: str, value: Tensor) -> Tensor:
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
) -> MergeReport:
    """Merge ``experts`` onto ``base`` and write θ0 + α·Δm to ``output`` (safetensors),
    tensor by tensor. Δm = method → Subspace Boosting (``boost_beta``) → LiNeS (``lines_b``),
    as :func:`subboost.merging.merge`. ``lines_order="before_boost"`` computes LiNeS' default a
    from the un-boosted update (as :func:`subboost.merging.merge` with that order); the
    per-layer scalars are applied after SB in both orders, which gives the same matrices
    because SB(cM) = c·SB(M). Keys outside the task vector (integer buffers) are
    copied from the base; dtypes are the base's.

    The file appears only when complete (temporary file + rename). ``metadata`` is stored
    in the safetensors header, together with the method, its parameters, α, β and LiNeS.
    """
    start = time.perf_counter()
    if not math.isfinite(float(alpha)):
        raise InputError(f"alpha must be finite, got {alpha}")
    for label, value in (("lines b", lines_b), ("lines a", lines_a), ("boost beta", boost_beta)):
        if value is not None and not math.isfinite(float(value)):
            raise InputError(f"{label} must be finite, got {value}")
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
        if _same_file(path, output):
            raise InputError(f"output {output} is one of the inputs ({path}); refusing to overwrite an input")

    with contextlib.ExitStack() as stack:
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
        tmp = stack.enter_context(atomic_path(output))
        writer = SafetensorsWriter(tmp, infos, meta)
        try:
            pending = next(deltas, None)
            bar = _progress(len(keys_all), "write", progress and spilled)
            for key in keys_all:
                b = base.read(key)
                if pending is not None and pending[0] == key:
                    d = pending[1]
                    if scales is not None:
                        d = (d.to(_work_dtype(d)) * scales[key]).to(d.dtype)
                    merged = apply_task_vector({key: b}, {key: d}, float(alpha))[key]
                    pending = next(deltas, None)
                else:
                    merged = b
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


def _same_file(a: Path, b: Path) -> bool:
    try:
        if Path(a).exists() and Path(b).exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return Path(a).resolve() == Path(b).resolve()


@contextlib.contextmanager
def _temporary_file(folder: Path, prefix: str) -> Iterator[Path]:
    """A temporary file in ``folder`` (created if needed), always removed at the end."""
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
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
        total += float(value.to(_work_dtype(value)).abs().sum())
    return total
