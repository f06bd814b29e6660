"""Spectral diagnostics of (merged) task vectors (paper Eq. 2, Supp. D).

- stable rank  srank(A) = Σσi² / σ1² = ‖A‖F² / ‖A‖2²;
- cumulative energy rank at k: the number of leading singular values whose σ² sum reaches
  the fraction k of Σσ² (the paper plots k = 50% and 30%).

Tables are tidy (one row per matrix, or per singular value) for seaborn.
"""

from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from subboost.taskvector import LAYER_TYPES, is_zero, parse_block_key, select_block_keys


def singular_values(matrix: Tensor) -> Tensor:
    """Singular values (descending) in float64 on the CPU; raises ``ValueError`` unless 2-D."""
    if matrix.ndim != 2:
        raise ValueError(f"singular values need a 2-D matrix, got shape {tuple(matrix.shape)}")
    return torch.linalg.svdvals(matrix.detach().to("cpu", torch.float64))


def stable_rank_from_spectrum(s: Tensor) -> float:
    """Σσ² / σ1² of a descending spectrum; 0.0 for an all-zero spectrum."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0.0
    sq = s.to(torch.float64) ** 2
    return float(sq.sum() / sq[0])


def energy_rank_from_spectrum(s: Tensor, fraction: float) -> int:
    """Smallest k with Σ_{i<k} σi² ≥ fraction·Σσi²; 0 for an all-zero spectrum."""
    fraction = float(fraction)
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    sq = s.to(torch.float64) ** 2
    total = float(sq.sum())
    if total == 0.0:
        return 0
    cum = torch.cumsum(sq, 0) / total
    # tolerate the last partial sum landing a hair below 1.0 through rounding
    hits = torch.nonzero(cum >= fraction - 1e-12)
    return int(hits[0].item()) + 1


def polar_factor(x: Tensor) -> Tensor:
    """Orthogonal Procrustes: the closest matrix with orthonormal columns (or rows), P Qᵀ
    from the thin SVD X = P Σ Qᵀ (TSV-M's and Iso-CTS' orthogonalisation, Alg. 2's)."""
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def stable_rank(matrix: Tensor) -> float:
    """Stable rank ‖A‖F² / ‖A‖2² (paper Eq. 2); 0.0 for an all-zero matrix."""
    return stable_rank_from_spectrum(singular_values(matrix))


def energy_rank(matrix: Tensor, fraction: float) -> int:
    """Cumulative energy rank: leading singular values holding ``fraction`` of Σσ² (Supp. D)."""
    return energy_rank_from_spectrum(singular_values(matrix), fraction)


def _describe(key: str) -> dict:
    info = parse_block_key(key)
    if info is None:
        return dict(stack="", layer=-1, sublayer=key, layer_type="proj")
    return dict(stack=info.stack, layer=info.layer, sublayer=info.sublayer, layer_type=info.layer_type)


def rank_table(
    task_vector: Mapping[str, Tensor],
    fractions: Sequence[float] = (0.5, 0.3),
    layer_types: Iterable[str] = LAYER_TYPES,
    include_proj: bool = False,
    skip_zero: bool = True,
) -> pd.DataFrame:
    """One row per block matrix: key, stack, layer, sublayer, shape, stable rank, energy ranks.

    Columns ``energy_rank_50`` etc. are named after the fractions in percent.
    """
    rows = []
    for key in select_block_keys(task_vector, layer_types, include_proj):
        m = task_vector[key]
        if skip_zero and is_zero(m):
            continue
        s = singular_values(m)
        row = dict(key=key, **_describe(key), rows=m.shape[0], cols=m.shape[1],
                   max_rank=min(m.shape), stable_rank=stable_rank_from_spectrum(s))
        for f in fractions:
            row[f"energy_rank_{round(f * 100)}"] = energy_rank_from_spectrum(s, f)
        rows.append(row)
    return pd.DataFrame(rows)


def spectra_table(
    task_vector: Mapping[str, Tensor],
    layer_types: Iterable[str] = LAYER_TYPES,
    include_proj: bool = False,
    skip_zero: bool = True,
) -> pd.DataFrame:
    """One row per singular value of each block matrix: key, layer, sublayer, index, sigma,
    sigma / sigma_max and the cumulative σ² energy fraction."""
    frames = []
    for key in select_block_keys(task_vector, layer_types, include_proj):
        m = task_vector[key]
        if skip_zero and is_zero(m):
            continue
        s = singular_values(m)
        energy = torch.cumsum(s**2, 0) / (s**2).sum()
        desc = _describe(key)
        frames.append(pd.DataFrame(dict(
            key=key, **{k: [v] * s.numel() for k, v in desc.items()},
            index=range(s.numel()), sigma=s.numpy(), sigma_normalised=(s / s[0]).numpy(),
            energy=energy.numpy(),
        )))
    if not frames:
        return pd.DataFrame(columns=["key", "stack", "layer", "sublayer", "layer_type", "index",
                                     "sigma", "sigma_normalised", "energy"])
    return pd.concat(frames, ignore_index=True)
