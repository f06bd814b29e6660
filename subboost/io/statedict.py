"""One unwrapper and one key rule for every checkpoint the library or the CLI reads.

**Unwrapping** (:func:`tensors_of`): a torch file may hold a flat state dict, a wrapped one
(``{"state_dict": ...}``, ``{"model_state_dict": ...}``, ``{"model": ...}``, ``{"module": ...}``),
or a pickled ``nn.Module`` (also as a :class:`~subboost.io.unpickle.Placeholder` with a
module's ``__dict__``), whose parameters and persistent buffers are collected.

**Entries that are not tensors**: plain scalars and strings beside the tensors (``epoch``,
``model_name``, ``None``) are metadata and are ignored (listed in the reader's ``ignored``);
any other value (a list, a dict, an object) and tensors that are not dense CPU tensors of a
supported dtype (sparse, quantised, float8, complex) are refused, naming the key.

**Key rule** (:func:`public_keys`): if every key (ignoring ``classification_head.*``) starts
with one of :data:`PREFIXES` (tried longest first), that prefix is removed and the
``classification_head.*`` entries are dropped, so the keys are open_clip's
(``visual.transformer.resblocks.0.attn.in_proj_weight``) whether a file stores an open_clip
model, the releases' ``ImageEncoder`` (``model.``), a DataParallel copy (``module.``) or a
whole classifier (``image_encoder.model.`` + ``classification_head.``). Otherwise the keys
are kept as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from subboost.io.errors import InputError
from subboost.io.formats import SUPPORTED_DTYPES
from subboost.io.unpickle import Placeholder

PREFIXES: tuple[str, ...] = ("image_encoder.model.", "module.model.", "model.", "module.")
"""Wrapper prefixes removed from the keys (all keys must share it), longest first."""

HEAD_PREFIX = "classification_head."
"""Keys of a classifier's head, dropped when the other keys share a wrapper prefix."""

WRAPPER_KEYS: tuple[str, ...] = ("state_dict", "model_state_dict", "model", "module")
"""Dict entries that hold the actual state dict of a wrapped checkpoint."""

_METADATA_TYPES = (int, float, str, bytes, bool, type(None))


def public_keys(keys: list[str]) -> dict[str, str]:
    """``{public key: stored key}`` after the one prefix rule (module docstring)."""
    body = [k for k in keys if not k.startswith(HEAD_PREFIX)]
    for prefix in PREFIXES:
        if body and all(k.startswith(prefix) and len(k) > len(prefix) for k in body):
            return {k[len(prefix):]: k for k in body}
    return {k: k for k in keys}


def _module_tensors(obj: Any, prefix: str, out: dict[str, Any], depth: int = 0) -> bool:
    """Parameters and persistent buffers of an ``nn.Module`` or of a placeholder holding a
    module's ``__dict__``; False when ``obj`` is neither."""
    if depth > 100:
        return False
    state = getattr(obj, "__dict__", None)
    is_module = isinstance(obj, torch.nn.Module) or isinstance(obj, Placeholder)
    if not is_module or not isinstance(state, dict) or "_parameters" not in state or "_modules" not in state:
        return False
    for name, p in (state.get("_parameters") or {}).items():
        if p is not None:
            out[prefix + str(name)] = p
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for name, b in (state.get("_buffers") or {}).items():
        if b is not None and name not in skip:
            out[prefix + str(name)] = b
    for name, child in (state.get("_modules") or {}).items():
        if child is not None and not _module_tensors(child, f"{prefix}{name}.", out, depth + 1):
            raise InputError(f"submodule '{prefix}{name}' is not a module")
    return True


def _is_module(obj: Any) -> bool:
    state = getattr(obj, "__dict__", None)
    return (isinstance(obj, (torch.nn.Module, Placeholder)) and isinstance(state, dict)
            and "_parameters" in state and "_modules" in state)


def _check_tensor(path: Path, key: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        raise InputError(f"{path}: entry '{key}' is a {type(value).__name__}, not a tensor")
    if value.layout != torch.strided:
        raise InputError(f"{path}: key '{key}' is a {str(value.layout).replace('torch.', '')} tensor; "
                         f"only dense tensors are supported")
    if value.is_quantized:
        raise InputError(f"{path}: key '{key}' is a quantised tensor; only dense tensors are supported")
    if value.dtype not in SUPPORTED_DTYPES:
        raise InputError(f"{path}: key '{key}' has dtype {str(value.dtype).replace('torch.', '')}, which "
                         f"merging does not support (float64/32/16, bfloat16, integers, bool)")
    if value.device.type != "cpu":
        raise InputError(f"{path}: key '{key}' is stored on {value.device}, expected a CPU tensor")
    return value.detach() if value.requires_grad or isinstance(value, torch.nn.Parameter) else value


def tensors_of(obj: Any, path: Path) -> tuple[dict[str, Tensor], list[str]]:
    """The tensors of an unpickled checkpoint object (stored key names) and the names of the
    ignored metadata entries. Raises :class:`InputError` naming the file and key."""
    for _ in range(8):  # unwrap {"state_dict": {...}}, {"model": module}, ...
        if isinstance(obj, Mapping):
            inner = next((obj[w] for w in WRAPPER_KEYS if w in obj
                          and (isinstance(obj[w], Mapping) or _is_module(obj[w]))), None)
            if inner is None:
                break
            obj = inner
        else:
            break
    found: dict[str, Any] = {}
    try:
        is_module = _module_tensors(obj, "", found)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    if is_module:
        return {k: _check_tensor(path, k, v) for k, v in found.items()}, []
    if not isinstance(obj, Mapping):
        raise InputError(f"{path}: holds a {type(obj).__name__}, not a state dict or a torch module")
    tensors: dict[str, Tensor] = {}
    ignored: list[str] = []
    for k, v in obj.items():
        if not isinstance(k, str):
            raise InputError(f"{path}: key {k!r} is not a string")
        if isinstance(v, _METADATA_TYPES):
            ignored.append(k)
            continue
        tensors[k] = _check_tensor(path, k, v)
    if not tensors:
        raise InputError(f"{path}: holds no tensors")
    return tensors, ignored
