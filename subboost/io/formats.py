"""Tensor metadata shared by readers and writer: shapes, dtypes, safetensors dtype names."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

#: dtypes a checkpoint may hold: what the merging math (differences, sums, SVDs in float32)
#: and the writer support. float8, complex, unsigned 16/32/64-bit and quantised tensors are
#: refused when a file is opened, naming the key.
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
SAFETENSORS_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}
SUPPORTED_DTYPES = frozenset(SAFETENSORS_DTYPES.values())


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
        return self.numel * itemsize(self.dtype)


def itemsize(dtype: torch.dtype) -> int:
    """Bytes per element of ``dtype``."""
    return torch.empty((), dtype=dtype).element_size()


def row_range(info: TensorInfo, rows: tuple[int, int] | None) -> tuple[int, int]:
    """``rows`` checked against the first dimension (``None``: all rows)."""
    n = info.shape[0] if info.shape else 1
    if rows is None:
        return 0, n
    r0, r1 = rows
    if not 0 <= r0 <= r1 <= n:
        raise ValueError(f"row range {rows} outside [0, {n}]")
    return r0, r1
