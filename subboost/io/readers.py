"""Lazy, read-only access to checkpoint tensors by key (safetensors and torch files).

- ``.safetensors``: the ``safetensors`` library's own reader (:func:`safetensors.safe_open`,
  memory-mapped). It validates the header (JSON, dtypes, shapes, offsets that cover the
  data exactly, ``__metadata__`` a string map); any failure is an
  :class:`~subboost.io.errors.InputError` naming the file.
- torch files (``.pt``, ``.pth``, ``.bin``): ``torch.load(weights_only=True, mmap=True)``;
  pickled models need ``allow_pickle=True`` and then go through the restricted unpickler
  of :mod:`subboost.io.unpickle` (no code from the file runs). Legacy (pre-1.6) files
  cannot be mapped and are loaded whole.

Both map the file; after a tensor (or a row block) is copied out, its pages are handed
back to the OS (``madvise(MADV_DONTNEED)``, Linux), so that streaming many large files
keeps the resident set near one tensor per file. Keys follow the one key rule of
:mod:`subboost.io.statedict`; torch warnings raised while reading are swallowed (the
errors say what went wrong).
"""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import pickle
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from subboost.io.errors import CheckpointNotFound, InputError
from subboost.io.formats import SAFETENSORS_DTYPES, TensorInfo, row_range
from subboost.io.statedict import public_keys, tensors_of
from subboost.io.unpickle import RefusedGlobal, restricted_pickle_module

__all__ = ["CheckpointReader", "SafetensorsReader", "TorchReader", "open_checkpoint", "load_state_dict", "sha256_file"]


class _PageReleaser:
    """Hands the pages of a memory-mapped file back to the OS once a tensor was copied.
    Linux only (reads ``/proc/self/maps``); a no-op elsewhere. Only ranges inside this
    file's own mappings are released (MADV_DONTNEED on a private file mapping that was
    never written drops clean pages: a later access reads them again from the file)."""

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
            fn = ctypes.CDLL(None, use_errno=True).madvise
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


class CheckpointReader:
    """Lazy, read-only access to the tensors of one checkpoint file, by (public) key."""

    path: Path
    #: metadata entries of a torch file that were ignored (not tensors)
    ignored: list[str]
    #: the safetensors ``__metadata__`` (empty for torch files)
    metadata: dict[str, str]

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


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _torch_reason(err: BaseException | None) -> str:
    """The informative line of a ``torch.load`` error (its first line is boilerplate for
    the weights-only unpickler)."""
    if err is None:
        return "unknown error"
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for ln in lines:
        if ln.lower().startswith(("unsupported", "trying to load")):
            return ln.replace("Unsupported operand", "unsupported pickle opcode")
    return lines[0] if lines else type(err).__name__


class SafetensorsReader(CheckpointReader):
    """A ``.safetensors`` file through :func:`safetensors.safe_open` (memory-mapped)."""

    def __init__(self, path: str | os.PathLike) -> None:
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        self.ignored = []
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._file = safe_open(str(self.path), framework="pt", device="cpu")
                self.metadata = dict(self._file.metadata() or {})
                stored = list(self._file.keys())
                infos: dict[str, TensorInfo] = {}
                for key in stored:
                    view = self._file.get_slice(key)
                    name = view.get_dtype()
                    if name not in SAFETENSORS_DTYPES:
                        raise InputError(f"{self.path}: key '{key}' has dtype {name}, which merging does not "
                                         f"support (F64, F32, F16, BF16, integers, BOOL)")
                    infos[key] = TensorInfo(tuple(int(x) for x in view.get_shape()), SAFETENSORS_DTYPES[name])
        except SafetensorError as err:
            raise InputError(f"{self.path}: not a valid safetensors file ({_first_line(err)})") from None
        except (OSError, ValueError, TypeError) as err:
            if isinstance(err, InputError):
                raise
            raise InputError(f"{self.path}: cannot read as safetensors ({_first_line(err)})") from None
        if not stored:
            raise InputError(f"{self.path}: holds no tensors")
        self._names = public_keys(stored)
        self._infos = {k: infos[s] for k, s in self._names.items()}
        self._releaser = _PageReleaser(self.path)

    def keys(self) -> list[str]:
        return list(self._names)

    def info(self, key: str) -> TensorInfo:
        return self._infos[key]

    def read(self, key: str, rows: tuple[int, int] | None = None) -> Tensor:
        info = self._infos[key]
        r0, r1 = row_range(info, rows)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            whole = self._file.get_tensor(self._names[key])
        src = whole[r0:r1] if (rows is not None and info.shape) else whole
        out = src.clone(memory_format=torch.contiguous_format)
        self._releaser.release(src)
        return out

    def close(self) -> None:
        self._file = None  # type: ignore[assignment]  # the mapping goes with the last reference


class TorchReader(CheckpointReader):
    """A torch file (state dict, wrapped state dict or pickled model; see module docstring)."""

    def __init__(self, path: str | os.PathLike, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        self.metadata = {}
        obj, mapped = self._load(allow_pickle)
        tensors, self.ignored = tensors_of(obj, self.path)
        del obj
        self._names = public_keys(list(tensors))
        self._tensors = {k: tensors[s] for k, s in self._names.items()}
        self._releaser = _PageReleaser(self.path) if mapped else None

    def _torch_load(self, weights_only: bool, use_mmap: bool) -> Any:
        kwargs: dict[str, Any] = dict(map_location="cpu", weights_only=weights_only, mmap=use_mmap)
        if not weights_only:
            kwargs["pickle_module"] = restricted_pickle_module()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(self.path, **kwargs)

    def _load(self, allow_pickle: bool) -> tuple[Any, bool]:
        path = self.path
        last: BaseException | None = None
        for use_mmap in (True, False):
            try:
                return self._torch_load(True, use_mmap), use_mmap
            except RuntimeError as err:
                last = err
                if use_mmap and "mmap" in str(err):
                    continue  # legacy serialisation: cannot be mapped
                break
            except Exception as err:  # noqa: BLE001 -- arbitrary bytes fail in arbitrary ways
                last = err
                break
        # the weights-only unpickler names what it refused ("Unsupported global: ..."); other
        # failures mean that the file is no torch checkpoint
        refused = isinstance(last, pickle.UnpicklingError) and "unsupported global" in str(last).lower()
        if not refused:
            raise InputError(f"{path}: cannot read as a torch checkpoint ({_torch_reason(last)})") from None
        if not allow_pickle:
            raise InputError(
                f"{path}: holds pickled Python objects (e.g. a whole model), which torch.load"
                f"(weights_only=True) refuses; if you trust the file, pass --allow-pickle (allow_pickle=True)")
        for use_mmap in (True, False):
            try:
                return self._torch_load(False, use_mmap), use_mmap
            except RefusedGlobal as err:
                raise InputError(f"{path}: {err}; only tensors and model classes are unpickled") from None
            except RuntimeError as err:
                if use_mmap and "mmap" in str(err):
                    continue
                raise InputError(f"{path}: cannot unpickle ({_first_line(err)})") from None
            except Exception as err:  # noqa: BLE001
                raise InputError(f"{path}: cannot unpickle ({type(err).__name__}: {_first_line(err)})") from None
        raise InputError(f"{path}: cannot unpickle")

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, key: str) -> TensorInfo:
        t = self._tensors[key]
        return TensorInfo(tuple(t.shape), t.dtype)

    def read(self, key: str, rows: tuple[int, int] | None = None) -> Tensor:
        t = self._tensors[key]
        r0, r1 = row_range(TensorInfo(tuple(t.shape), t.dtype), rows)
        src = t[r0:r1] if (rows is not None and t.ndim) else t
        out = src.detach().clone(memory_format=torch.contiguous_format)
        if self._releaser is not None:
            self._releaser.release(src)
        return out

    def close(self) -> None:
        self._tensors = {}


def open_checkpoint(path: str | os.PathLike, allow_pickle: bool = False) -> CheckpointReader:
    """Open a checkpoint for lazy reading: ``.safetensors`` with the safetensors library,
    anything else as a torch file. Raises :class:`InputError` naming the file (a
    :class:`CheckpointNotFound` when it does not exist)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFound(f"checkpoint not found: {path}")
    if not path.is_file():
        raise InputError(f"not a file: {path}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{path}: not readable (permission denied)")
    if path.suffix == ".safetensors":
        return SafetensorsReader(path)
    return TorchReader(path, allow_pickle=allow_pickle)


def load_state_dict(path: str | os.PathLike, allow_pickle: bool = False) -> dict[str, Tensor]:
    """Every tensor of a checkpoint, in memory (public keys; see :func:`open_checkpoint`)."""
    with open_checkpoint(path, allow_pickle) as reader:
        return {k: reader.read(k) for k in reader.keys()}


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

