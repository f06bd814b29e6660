"""Writing checkpoints and other outputs: atomic, exclusive, umask-respecting, clean on failure.

:func:`atomic_path` is the one way outputs are written: the content goes to a temporary
file beside the target (``.{name}.XXXX.tmp``); when it is complete, :func:`publish` gives it
the mode a plain ``open()`` would (``0o666 & ~umask``) and moves it into place:

- without ``overwrite``, with ``os.link(tmp, target)``, which fails if the name exists
  (two writers racing for a new name: exactly one wins, the other gets
  :class:`~subboost.io.errors.InputError`), then the temporary name is removed; on file
  systems without hard links, the name is first reserved with ``O_CREAT | O_EXCL``;
- with ``overwrite``, with ``os.replace`` (readers see the old or the new file, never a mix).

On any failure, including ``KeyboardInterrupt`` and the signals that
:func:`interrupt_signals` turns into exceptions, the temporary file and every folder that
was created for the output are removed, and an existing target is left untouched.
:class:`SafetensorsWriter` streams a ``.safetensors`` file tensor by tensor.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import struct
import tempfile
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from subboost.io.errors import InputError
from subboost.io.formats import SAFETENSORS_NAMES, TensorInfo

__all__ = ["atomic_path", "publish", "same_file", "current_umask", "SafetensorsWriter", "save_state_dict",
           "Interrupted", "ReceivedSignal", "interrupt_signals"]


def current_umask() -> int:
    """The process' umask (read without changing it where ``/proc`` allows)."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status") as fh:
            return int(next(line for line in fh if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file (hard links and symlinks included)."""
    try:
        if Path(a).exists() and Path(b).exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return Path(a).resolve() == Path(b).resolve()


def _describe(label: str | None, path: Path) -> str:
    return f"{label} {path}" if label else str(path)


def publish(tmp: str | os.PathLike, target: str | os.PathLike, *, overwrite: bool = False,
            label: str | None = None) -> Path:
    """Move the complete file ``tmp`` to ``target`` (see the module docstring). Without
    ``overwrite`` an existing ``target`` raises :class:`InputError` and ``tmp`` is kept
    (the caller removes it)."""
    tmp, target = Path(tmp), Path(target)
    what = _describe(label, target)
    os.chmod(tmp, 0o666 & ~current_umask())
    try:
        if overwrite:
            if target.is_dir():
                raise InputError(f"{what} is a folder")
            os.replace(tmp, target)
            return target
        try:
            os.link(tmp, target)
        except FileExistsError:
            raise InputError(f"{what} exists; pass --overwrite (overwrite=True) to replace it") from None
        except OSError as err:
            if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
                raise
            try:  # no hard links here: reserve the name, then move the file onto it
                fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                raise InputError(f"{what} exists; pass --overwrite (overwrite=True) to replace it") from None
            os.close(fd)
            os.replace(tmp, target)
            return target
        os.unlink(tmp)
        return target
    except OSError as err:
        raise InputError(f"{what}: cannot write ({err.strerror or err})") from None


def _make_parents(folder: Path, what: str) -> list[Path]:
    """Create ``folder`` and its missing parents; return the folders created (outermost first)."""
    missing: list[Path] = []
    p = folder
    while not p.exists():
        missing.append(p)
        if p.parent == p:
            break
        p = p.parent
    created: list[Path] = []
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
    except FileExistsError:
        pass  # made concurrently: not ours to remove
    except OSError as err:
        _remove_folders(created)
        raise InputError(f"{what}: cannot create the folder {err.filename or folder} ({err.strerror or err})") from None
    if not folder.is_dir():
        _remove_folders(created)
        raise InputError(f"{what}: {folder} is not a folder")
    return created


def _remove_folders(created: list[Path]) -> None:
    for d in reversed(created):
        with contextlib.suppress(OSError):
            d.rmdir()  # only if still empty


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True, label: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends normally, publish it as
    ``path`` (module docstring). ``label`` (e.g. ``"--output"``) prefixes the path in error
    messages. Errors writing the temporary file are reported for ``path``, never for the
    hidden temporary name."""
    path = Path(path)
    what = _describe(label, path)
    created = _make_parents(path.parent, what)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        _remove_folders(created)
        raise InputError(f"{what}: cannot write there ({err.strerror or err})") from None
    os.close(fd)
    tmp = Path(name)
    published = False
    try:
        try:
            yield tmp
        except OSError as err:
            if isinstance(err, InputError) or (err.filename is not None and Path(os.fsdecode(err.filename)) != tmp):
                raise
            raise InputError(f"{what}: cannot write ({err.strerror or err})") from None
        publish(tmp, path, overwrite=overwrite, label=label)
        published = True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if not published:
            _remove_folders(created)


# ----------------------------------------------------------------------------- signals


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread when a termination signal arrives (see :func:`interrupt_signals`)."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal.Signals(signum).name)  # SIGINT included: a KeyboardInterrupt

    @property
    def exit_code(self) -> int:
        """128 + the signal number, the shell's convention (SIGTERM 143, SIGHUP 129)."""
        return 128 + self.signum


class ReceivedSignal:
    """Which termination signal arrived first inside :func:`interrupt_signals` (or None)."""

    signum: int | None = None

    @property
    def exit_code(self) -> int | None:
        return None if self.signum is None else 128 + self.signum


@contextlib.contextmanager
def interrupt_signals(signums: tuple[int, ...] = ()) -> Iterator[ReceivedSignal]:
    """Within the block, SIGINT, SIGTERM and SIGHUP (or ``signums``) raise
    :class:`Interrupted`, so that ``finally`` clauses (temporary files of
    :func:`atomic_path`) run; later signals are ignored while the stack unwinds. The
    yielded :class:`ReceivedSignal` records the first signal, because native code running
    when it arrives may turn the exception into another one. For applications (the CLI);
    handlers are restored on exit; outside the main thread nothing is installed."""
    import threading

    received = ReceivedSignal()
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    wanted = signums or tuple(s for s in (getattr(signal, n, None) for n in ("SIGINT", "SIGTERM", "SIGHUP")) if s)
    previous = {s: signal.getsignal(s) for s in wanted}

    def handler(signum: int, frame: Any) -> None:
        if received.signum is None:
            received.signum = signum
            raise Interrupted(signum)

    for s in wanted:
        signal.signal(s, handler)
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- safetensors


class SafetensorsWriter:
    """Writes a ``.safetensors`` file tensor by tensor, in the order of ``infos``.

    The header (shapes, dtypes, offsets, metadata) is written first; :meth:`write` then
    appends each tensor's bytes and checks its key, shape and dtype. The file is what the
    ``safetensors`` library writes (8-byte little-endian header length, JSON header padded
    with spaces to 8 bytes, tensors in header order)."""

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
            if info.dtype not in SAFETENSORS_NAMES:
                raise InputError(f"key '{key}': dtype {info.dtype} cannot be stored in safetensors")
            header[key] = {"dtype": SAFETENSORS_NAMES[info.dtype], "shape": list(info.shape),
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
        """Flush, sync and close; raises if some tensors were never written."""
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


def save_state_dict(state: Mapping[str, Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None,
                    *, overwrite: bool = True) -> Path:
    """Save a state dict atomically: safetensors for ``.safetensors``, a torch state dict
    (``torch.save``) for other suffixes."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path, overwrite=overwrite) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata={str(k): str(v) for k, v in (metadata or {}).items()})
        else:
            torch.save(tensors, tmp)
    return path
