"""Alias of :mod:`subboost.io` kept for older imports; new code imports from :mod:`subboost.io`."""

from subboost.io import atomic_path, load_state_dict, save_state_dict

__all__ = ["atomic_path", "load_state_dict", "save_state_dict"]
