"""Checkpoint I/O: the one place where checkpoints are read, unpickled, unwrapped, resolved
in the public layouts and written.

- :mod:`subboost.io.readers` -- lazy readers by key (:func:`open_checkpoint`): safetensors
  through the ``safetensors`` library (memory-mapped), torch files through
  ``torch.load(weights_only=True)`` or, for trusted pickles, a restricted unpickler;
  :func:`load_state_dict` reads a whole file.
- :mod:`subboost.io.unpickle` -- the restricted, lenient unpickler (allowlist + inert
  placeholders; nothing from the file runs).
- :mod:`subboost.io.statedict` -- the one unwrapper and the one key-prefix rule.
- :mod:`subboost.io.writer` -- atomic, exclusive, umask-respecting publication
  (:func:`atomic_path`), the streaming :class:`SafetensorsWriter`, :func:`save_state_dict`,
  and :func:`interrupt_signals` for applications.
- :mod:`subboost.io.layouts` -- the public checkpoint layouts.
"""

from subboost.io.errors import CheckpointNotFound, InputError
from subboost.io.formats import SAFETENSORS_DTYPES, SUPPORTED_DTYPES, TensorInfo
from subboost.io.layouts import (
    LAYOUTS,
    PAPER_TASKS,
    base_path,
    checkpoint_root_paths,
    detect_layout,
    discover_tasks,
    expert_names,
    expert_path,
    head_path,
)
from subboost.io.readers import (
    CheckpointReader,
    SafetensorsReader,
    TorchReader,
    load_state_dict,
    open_checkpoint,
    sha256_file,
)
from subboost.io.statedict import PREFIXES, public_keys, tensors_of
from subboost.io.unpickle import Placeholder, RefusedGlobal, restricted_pickle_module
from subboost.io.writer import (
    Interrupted,
    ReceivedSignal,
    SafetensorsWriter,
    atomic_path,
    current_umask,
    interrupt_signals,
    publish,
    same_file,
    save_state_dict,
)

__all__ = [
    "InputError", "CheckpointNotFound", "TensorInfo", "SAFETENSORS_DTYPES", "SUPPORTED_DTYPES",
    "CheckpointReader", "SafetensorsReader", "TorchReader", "open_checkpoint", "load_state_dict", "sha256_file",
    "PREFIXES", "public_keys", "tensors_of", "Placeholder", "RefusedGlobal", "restricted_pickle_module",
    "atomic_path", "publish", "same_file", "current_umask", "SafetensorsWriter", "save_state_dict",
    "Interrupted", "ReceivedSignal",
    "interrupt_signals", "LAYOUTS", "PAPER_TASKS", "detect_layout", "discover_tasks", "base_path",
    "expert_path", "head_path", "checkpoint_root_paths", "expert_names",
]
