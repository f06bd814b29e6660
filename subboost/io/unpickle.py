"""Restricted, lenient unpickling of pickled models (``torch.load(weights_only=False)``).

Checkpoints of the public task-vector releases pickle whole models: the authors'
``src.modeling.ImageEncoder`` / ``ClassificationHead`` wrapping open_clip and torch modules,
with torchvision transforms as attributes. Unpickling them with the plain ``pickle`` module
would run any code the file names. Here nothing from the file ever resolves to callable
code outside a short allowlist:

- **real objects** (:data:`ALLOWED_GLOBALS`): torch's tensor and parameter rebuilders,
  ``torch.Size``, dtypes and layouts, ``OrderedDict``, plain containers and
  ``copyreg._reconstructor`` — exactly what is needed to rebuild tensors and dicts;
- **inert placeholders** for classes and functions of the modules in
  :data:`PLACEHOLDER_MODULES` (the authors' ``src.*`` code, and torch.nn, open_clip,
  torchvision, PIL and numpy objects that only hold a model's structure): a placeholder
  accepts any constructor arguments and keeps its pickled state, so parameters and
  buffers can be read from its ``__dict__`` while no code of these classes runs;
- **refused**: every other global (``os.system``, ``builtins.eval``, ``subprocess`` ...),
  with an :class:`~subboost.io.errors.InputError`-friendly :class:`RefusedGlobal`
  naming it.

Only used when the user allows pickles (``allow_pickle=True``, CLI ``--allow-pickle``);
otherwise files go through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import builtins
import collections
import copyreg
import io
import pickle
import types
from typing import Any

import torch

PLACEHOLDER_MODULES: tuple[str, ...] = ("src", "torch.nn", "open_clip", "torchvision", "PIL", "numpy", "timm")
"""Top-level modules (and their submodules) whose globals become inert placeholders."""


def _allowed_globals() -> dict[tuple[str, str], Any]:
    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("copyreg", "_reconstructor"): copyreg._reconstructor,
        ("torch", "Size"): torch.Size,
        ("torch", "Tensor"): torch.Tensor,
        ("torch._tensor", "_rebuild_from_type_v2"): torch._tensor._rebuild_from_type_v2,
        ("torch.nn.parameter", "Parameter"): torch.nn.Parameter,
        ("_codecs", "encode"): __import__("codecs").encode,
    }
    for name in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
                 "_rebuild_parameter_with_state", "_rebuild_sparse_tensor"):
        if hasattr(torch._utils, name):
            allowed[("torch._utils", name)] = getattr(torch._utils, name)
    for name in ("set", "frozenset", "slice", "range", "complex", "bytearray", "object", "tuple", "list",
                 "dict", "int", "float", "bool", "str", "bytes"):
        allowed[("builtins", name)] = getattr(builtins, name)
        allowed[("__builtin__", name)] = getattr(builtins, name)
    for name in dir(torch):
        value = getattr(torch, name, None)
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
    return allowed


ALLOWED_GLOBALS: dict[tuple[str, str], Any] = _allowed_globals()


class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a global outside the allowlist and the placeholder modules."""

    def __init__(self, module: str, name: str) -> None:
        self.qualified = f"{module}.{name}"
        super().__init__(f"refusing to unpickle '{self.qualified}' (not a tensor, container or model class)")


class Placeholder:
    """Stands in for a pickled object of a placeholder module: takes any arguments, keeps
    its pickled state in ``__dict__``, runs no code of the class it replaces."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.__dict__["_placeholder_args"] = args

    def __setstate__(self, state: object) -> None:
        if isinstance(state, tuple) and len(state) == 2:  # (dict state, slot state)
            state = {**(state[0] or {}), **(state[1] or {})}
        if isinstance(state, dict):
            self.__dict__.update({k: v for k, v in state.items() if isinstance(k, str)})
        else:
            self.__dict__["_placeholder_state"] = state

    def __call__(self, *args: object, **kwargs: object) -> "Placeholder":
        return Placeholder(*args)

    def __repr__(self) -> str:
        cls = type(self)
        return f"<placeholder {cls.__module__}.{cls.__qualname__}>"


def _is_placeholder_module(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in PLACEHOLDER_MODULES)


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals are allowlisted objects or inert placeholders
    (one placeholder class per ``module.name``, made per unpickler: no shared state)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._made: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key in ALLOWED_GLOBALS:
            return ALLOWED_GLOBALS[key]
        if _is_placeholder_module(module):
            if key not in self._made:
                self._made[key] = type(name.split(".")[-1] or "Placeholder", (Placeholder,), {"__module__": module})
            return self._made[key]
        raise RefusedGlobal(module, name)


def restricted_pickle_module() -> types.ModuleType:
    """A ``pickle_module`` for ``torch.load(weights_only=False, pickle_module=...)`` that
    unpickles with :class:`RestrictedUnpickler`."""
    mod = types.ModuleType("subboost_restricted_pickle")
    mod.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    mod.Pickler = pickle.Pickler  # type: ignore[attr-defined]
    mod.UnpicklingError = pickle.UnpicklingError  # type: ignore[attr-defined]
    mod.HIGHEST_PROTOCOL = pickle.HIGHEST_PROTOCOL  # type: ignore[attr-defined]
    mod.DEFAULT_PROTOCOL = pickle.DEFAULT_PROTOCOL  # type: ignore[attr-defined]
    mod.load = lambda f, **kw: RestrictedUnpickler(f, **kw).load()  # type: ignore[attr-defined]
    mod.loads = lambda data, **kw: RestrictedUnpickler(io.BytesIO(data), **kw).load()  # type: ignore[attr-defined]
    mod.dump = pickle.dump  # type: ignore[attr-defined]
    mod.dumps = pickle.dumps  # type: ignore[attr-defined]
    return mod
