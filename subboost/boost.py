"""Subspace Boosting (paper Sec. 4.1, Alg. 1).

For one matrix M of the merged task vector (after the base merging method, before α):

1. M = U diag(S) Vᵀ, S descending;
2. r = cumsum(S) / sum(S)  (plain S, not S²);
3. idx = first index with r ≥ β;
4. S' = max(S, S[idx])  (clamp from below); return U diag(S') Vᵀ.

β = 0 gives idx = 0, so every singular value becomes S[0]: SB(M) = S[0]·polar(M) with
polar(M) = U Vᵀ. SB is positively homogeneous, SB(cM) = c·SB(M) for c > 0, so it commutes
with α and with LiNeS' per-layer scalars, but not with element-wise masks: mask first,
boost second.
"""

from __future__ import annotations

from typing import Iterable, Mapping

import pandas as pd
import torch
from torch import Tensor

from subboost.taskvector import LAYER_TYPES, StateDict, is_zero, parse_block_key, select_block_keys


def _check_beta(beta: float, name: str = "beta") -> float:
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"{name} must lie in [0, 1], got {beta}")
    return beta


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Decompose in float32 at least; keep float64 inputs in float64.
    return torch.float64 if dtype == torch.float64 else torch.float32


def boost_cutoff_index(singular_values: Tensor, beta: float = 0.0) -> int:
    """Alg. 1 lines 3-6: first index where cumsum(S)/sum(S) ≥ β (S descending).

    Returns 0 for an all-zero spectrum. The comparison allows a few ulps of rounding, so
    β = 1 selects the last nonzero singular value, as in exact arithmetic.
    """
    beta = _check_beta(beta)
    s = singular_values
    total = s.sum()
    if total <= 0:
        return 0
    ratio = torch.cumsum(s, dim=0) / total
    # a few ulps of slack so that exact-arithmetic boundaries (e.g. β = 1 on a rank-deficient
    # matrix, whose ratio reaches 1 at the last nonzero value) do not depend on rounding
    slack = 8 * torch.finfo(ratio.dtype).eps
    hits = torch.nonzero(ratio >= beta - slack)
    return int(hits[0].item()) if hits.numel() else s.numel() - 1


def boost_singular_values(singular_values: Tensor, beta: float = 0.0) -> Tensor:
    """Clamp a descending spectrum from below at S[idx] (Alg. 1 line 7)."""
    idx = boost_cutoff_index(singular_values, beta)
    return torch.clamp(singular_values, min=singular_values[idx])


def subspace_boost(matrix: Tensor, beta: float = 0.0, *, name: str = "matrix") -> Tensor:
    """Subspace Boosting of one 2-D matrix, exactly as paper Alg. 1.

    The decomposition runs in float32 (float64 inputs stay float64); the result comes back
    in the input's dtype and device. An all-zero matrix comes back unchanged (a copy): its
    normalised cumulative sum would be 0/0.

    Raises ``ValueError`` (naming ``name``) for a non-2-D input, NaN/Inf entries or β ∉ [0, 1].
    """
    _check_beta(beta)
    if matrix.ndim != 2:
        raise ValueError(f"{name}: Subspace Boosting needs a 2-D matrix, got shape {tuple(matrix.shape)}")
    if not matrix.is_floating_point():
        raise ValueError(f"{name}: Subspace Boosting needs a floating-point matrix, got {matrix.dtype}")
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError(f"{name}: matrix contains NaN or Inf values")
    if is_zero(matrix):
        return matrix.clone()
    work = matrix.detach().to(_compute_dtype(matrix.dtype))
    u, s, vh = torch.linalg.svd(work, full_matrices=False)
    s_new = boost_singular_values(s, beta)
    out = (u * s_new.unsqueeze(0)) @ vh
    return out.to(matrix.dtype)


def boost_task_vector(
    task_vector: Mapping[str, Tensor],
    beta: float = 0.0,
    *,
    beta_attn: float | None = None,
    beta_mlp: float | None = None,
    layer_types: Iterable[str] = LAYER_TYPES,
    include_proj: bool = False,
) -> StateDict:
    """Boost every block matrix of a merged task vector; every other tensor is returned as is.

    ``layer_types`` restricts boosting to attention and/or MLP matrices (paper Table 3b);
    ``beta_attn`` / ``beta_mlp`` override β per layer type (Table 3c, Table 8).
    All-zero matrices (e.g. the frozen text tower of CLIP) are skipped.
    """
    out, _ = boost_task_vector_with_report(
        task_vector, beta, beta_attn=beta_attn, beta_mlp=beta_mlp,
        layer_types=layer_types, include_proj=include_proj,
    )
    return out


def boost_task_vector_with_report(
    task_vector: Mapping[str, Tensor],
    beta: float = 0.0,
    *,
    beta_attn: float | None = None,
    beta_mlp: float | None = None,
    layer_types: Iterable[str] = LAYER_TYPES,
    include_proj: bool = False,
) -> tuple[StateDict, pd.DataFrame]:
    """:func:`boost_task_vector` plus a table with one row per block matrix: key, β used,
    cutoff index, rank, whether it was skipped as all-zero."""
    betas = {
        "attn": _check_beta(beta if beta_attn is None else beta_attn, "beta_attn"),
        "mlp": _check_beta(beta if beta_mlp is None else beta_mlp, "beta_mlp"),
        "proj": _check_beta(beta, "beta"),
    }
    keys = set(select_block_keys(task_vector, layer_types, include_proj))
    out: StateDict = {}
    rows = []
    for key, value in task_vector.items():
        if key not in keys:
            out[key] = value
            continue
        info = parse_block_key(key)
        ltype = info.layer_type if info is not None else "proj"
        b = betas[ltype]
        if is_zero(value):
            out[key] = value
            rows.append(dict(key=key, layer_type=ltype, beta=b, cutoff_index=None, rank=min(value.shape), skipped_zero=True))
            continue
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"task vector key '{key}' contains NaN or Inf values")
        work = value.detach().to(_compute_dtype(value.dtype))
        u, s, vh = torch.linalg.svd(work, full_matrices=False)
        idx = boost_cutoff_index(s, b)
        s_new = torch.clamp(s, min=s[idx])
        out[key] = ((u * s_new.unsqueeze(0)) @ vh).to(value.dtype)
        rows.append(dict(key=key, layer_type=ltype, beta=b, cutoff_index=idx, rank=min(value.shape), skipped_zero=False))
    return out, pd.DataFrame(rows, columns=["key", "layer_type", "beta", "cutoff_index", "rank", "skipped_zero"])
