"""Stable rank (paper Eq. 2) and cumulative energy rank (Supp. D) against hand values."""

import numpy as np
import pytest
import torch

from subboost.spectral import energy_rank, rank_table, spectra_table, stable_rank


def test_stable_rank_hand_values():
    assert stable_rank(torch.diag(torch.tensor([3.0, 4.0]))) == pytest.approx((9 + 16) / 16)
    assert stable_rank(torch.eye(7)) == pytest.approx(7.0)
    assert stable_rank(torch.outer(torch.arange(1.0, 5.0), torch.arange(1.0, 4.0))) == pytest.approx(1.0)
    assert stable_rank(torch.zeros(3, 5)) == 0.0


def test_stable_rank_is_frobenius_over_spectral():
    m = np.random.default_rng(0).standard_normal((30, 12))
    expected = np.linalg.norm(m, "fro") ** 2 / np.linalg.norm(m, 2) ** 2
    assert stable_rank(torch.tensor(m)) == pytest.approx(expected, rel=1e-10)


def test_energy_rank_hand_values():
    m = torch.diag(torch.tensor([3.0, 2.0, 1.0]))  # σ² = 9, 4, 1; total 14
    assert energy_rank(m, 0.5) == 1  # 9/14 = 0.64
    assert energy_rank(m, 0.64) == 1
    assert energy_rank(m, 0.65) == 2  # 13/14
    assert energy_rank(m, 0.3) == 1
    assert energy_rank(m, 1.0) == 3
    assert energy_rank(torch.zeros(4, 4), 0.5) == 0
    with pytest.raises(ValueError, match="fraction"):
        energy_rank(m, 0.0)
    with pytest.raises(ValueError, match="2-D"):
        stable_rank(torch.ones(2, 2, 2))


def test_tables():
    tv = {
        "visual.transformer.resblocks.0.attn.out_proj.weight": torch.diag(torch.tensor([3.0, 2.0, 1.0])),
        "visual.transformer.resblocks.1.mlp.c_fc.weight": torch.zeros(4, 3),
        "visual.transformer.resblocks.0.ln_1.weight": torch.ones(3),
    }
    ranks = rank_table(tv)
    assert list(ranks.key) == ["visual.transformer.resblocks.0.attn.out_proj.weight"]
    row = ranks.iloc[0]
    assert row.stable_rank == pytest.approx(14 / 9) and row.energy_rank_50 == 1 and row.layer == 0
    assert row.sublayer == "attn.out_proj"
    spectra = spectra_table(tv)
    assert list(spectra.sigma) == pytest.approx([3.0, 2.0, 1.0])
    assert list(spectra.energy) == pytest.approx([9 / 14, 13 / 14, 1.0])
    assert len(rank_table(tv, skip_zero=False)) == 2
