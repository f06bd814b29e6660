"""Loading and saving state dicts: safetensors, ``.pt`` state dicts and pickled modules.

Writes are atomic (temporary file in the same folder, then ``os.replace``), so an
interrupted run never leaves a half-written checkpoint and never clobbers an input.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import tempfile
from pathlib import Path
from typing import Iterator, Mapping

import torch
from torch import Tensor

StateDict = dict[str, Tensor]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _extract_state_dict(obj: object, path: Path) -> StateDict:
    if isinstance(obj, torch.nn.Module):
        return {k: v for k, v in obj.state_dict().items()}
    if isinstance(obj, Mapping):
        for wrapper in ("state_dict", "model_state_dict", "model"):
            inner = obj.get(wrapper)
            if isinstance(inner, (Mapping, torch.nn.Module)):
                return _extract_state_dict(inner, path)
        bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
        if bad:
            raise ValueError(f"{path}: not a state dict (entries that are not tensors: {bad[:5]})")
        return dict(obj)
    raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict or torch module")


def load_state_dict(path: str | os.PathLike, allow_pickle: bool = False, mmap: bool = True) -> StateDict:
    """Load a state dict from ``.safetensors`` or a torch file (state dict, wrapped state
    dict, or pickled ``nn.Module`` as in the public task-vector releases).

    Pickled modules need ``allow_pickle=True`` (``torch.load(weights_only=False)`` runs code
    from the file: only for files you trust). Errors name the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, AttributeError) as err:
        if not allow_pickle:
            raise ValueError(
                f"{path}: holds a pickled object that torch.load(weights_only=True) refuses "
                f"({type(err).__name__}); if you trust the file, load it with allow_pickle=True "
                f"(CLI: --allow-pickle), which uses weights_only=False"
            ) from None
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except ModuleNotFoundError as err2:
            raise ValueError(
                f"{path}: unpickling needs the module '{err2.name}' (the file pickles classes "
                f"from the code that wrote it); install it or re-save the checkpoint as a state dict"
            ) from None
    return _extract_state_dict(obj, path)


def save_state_dict(state: Mapping[str, Tensor], path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
    """Save atomically as safetensors (``.safetensors``) or a torch state dict (other suffixes)."""
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, str(tmp), metadata={str(k): str(v) for k, v in (metadata or {}).items()})
        else:
            torch.save(tensors, tmp)
    return path
