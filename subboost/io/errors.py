"""Errors of the checkpoint I/O layer."""

from __future__ import annotations


class InputError(ValueError):
    """A problem with the user's inputs (missing or malformed file, mismatched keys, bad
    parameter...). The message is one line that names the file, key or parameter."""


class CheckpointNotFound(InputError, FileNotFoundError):
    """A checkpoint file (or a checkpoint folder of a public layout) does not exist."""

    def __str__(self) -> str:  # OSError would format "[Errno None] ..." otherwise
        return str(self.args[0]) if self.args else "checkpoint not found"
