"""The synthetic task vectors and the proposition checks of chapter 2, against independent
computations (numpy, hand-computed values) rather than the library's own helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from subboost import synthetic as syn
from subboost.chapters import propositions
from subboost.boost import boost_cutoff_index, subspace_boost


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float64)


@pytest.fixture(scope="module")
def dense() -> syn.SyntheticTaskVectors:
    spec = syn.SyntheticSpec(rows=24, cols=20, common_rank=3, unique_rank=None, noise_std=0.03,
                             unique_norm=1.5, unique_norm_spread=0.5)
    return syn.make_task_vectors(spec, 12, seed=3)


@pytest.fixture(scope="module")
def lowrank() -> syn.SyntheticTaskVectors:
    spec = syn.SyntheticSpec(rows=24, cols=20, common_rank=3, unique_rank=2, noise_std=0.0)
    return syn.make_task_vectors(spec, 12, seed=4)


# ------------------------------------------------------------------ generator guarantees


@pytest.mark.parametrize("which", ["dense", "lowrank"])
def test_task_specific_parts_pairwise_frobenius_orthogonal(which, request):
    tv = request.getfixturevalue(which)
    e = _np(tv.unique + tv.noise).reshape(tv.n_tasks, -1)
    gram = e @ e.T
    norms = np.sqrt(np.diag(gram))
    off = np.abs(gram - np.diag(np.diag(gram))) / np.outer(norms, norms)
    assert off.max() < 1e-10  # Eq. 9: <E_i, E_j>_F = 0 for i != j


def test_unique_noise_and_common_mutually_orthogonal(dense):
    n = dense.n_tasks
    u = _np(dense.unique).reshape(n, -1)
    z = _np(dense.noise).reshape(n, -1)
    c = _np(dense.common).reshape(n, -1)
    scale = np.linalg.norm(u, axis=1).max() * max(np.linalg.norm(z, axis=1).max(), np.linalg.norm(c, axis=1).max())
    assert np.abs(u @ z.T).max() < 1e-10 * scale
    assert np.abs(u @ c.T).max() < 1e-10 * scale
    assert np.abs(z @ c.T).max() < 1e-10 * scale


def test_unique_norms_bounded_by_B(dense, lowrank):
    norms = np.linalg.norm(_np(dense.unique).reshape(dense.n_tasks, -1), axis=1)
    assert (norms <= 1.5 + 1e-12).all() and (norms >= 0.75 - 1e-12).all()
    equal = np.linalg.norm(_np(lowrank.unique).reshape(lowrank.n_tasks, -1), axis=1)
    np.testing.assert_allclose(equal, 1.0, rtol=1e-12)
    e = _np(dense.unique + dense.noise).reshape(dense.n_tasks, -1)
    assert dense.bound() == pytest.approx(np.linalg.norm(e, axis=1).max(), rel=1e-12)


def test_common_parts_low_rank_and_positively_correlated(dense):
    for c in _np(dense.common):
        assert np.linalg.matrix_rank(c, tol=1e-10 * np.linalg.norm(c, 2)) <= 3
    flat = _np(dense.common).reshape(dense.n_tasks, -1)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True)
    assert (flat @ flat.T).min() > 0  # Prop. 3 assumes positive cosine similarity


def test_lowrank_unique_parts_are_nearly_low_rank():
    spec = syn.SyntheticSpec(rows=96, cols=96, common_rank=3, unique_rank=2)
    tv = syn.make_task_vectors(spec, 10, seed=4)
    for u in _np(tv.unique):
        s = np.linalg.svd(u, compute_uv=False)
        # rank 2 up to orthogonalisation corrections of relative size ~ sqrt(K / (m n)), K = 19
        assert s[2] / s[0] < 0.15


def test_same_seed_same_draw_and_too_many_tasks():
    spec = syn.SyntheticSpec(rows=8, cols=8, common_rank=2)
    a = syn.make_task_vectors(spec, 5, seed=1)
    b = syn.make_task_vectors(spec, 5, seed=1)
    assert torch.equal(a.task_vectors(), b.task_vectors())
    with pytest.raises(ValueError, match="orthogonal directions"):
        syn.make_task_vectors(spec, 40, seed=1)  # 4 + 80 > 64 entries


def test_spec_rejects_jitter_that_could_make_common_parts_anticorrelated():
    with pytest.raises(ValueError, match="common_jitter"):
        syn.SyntheticSpec(common_jitter=0.5)


# ------------------------------------------------------------------ Props. 1-3


def test_prop1_bound_holds_and_frobenius_is_exact(dense):
    for n in (1, 2, 5, 12):
        d_unique = _np(dense.merge(n).unique)
        e = _np(dense.unique[:n] + dense.noise[:n])
        b = np.linalg.norm(e.reshape(n, -1), axis=1).max()
        spec_norm, fro = np.linalg.norm(d_unique, 2), np.linalg.norm(d_unique)
        assert spec_norm <= fro + 1e-12 <= b / math.sqrt(n) + 2e-12  # Eq. 15
        # Eq. 13: energies of orthogonal parts add
        assert fro**2 == pytest.approx((e.reshape(n, -1) ** 2).sum() / n**2, rel=1e-10)
    table = syn.prop1_table(dense, [1, 3, 12])
    assert (table.unique_spectral <= table.bound + 1e-12).all()


def test_prop2_gap_shrinks(dense):
    t = syn.prop2_table(dense, [1, 4, 12], betas=[0.0])
    assert t.srank_gap.is_monotonic_decreasing
    np.testing.assert_allclose(t.srank_boosted_0, 20.0)  # β = 0: flat spectrum, full stable rank


def test_prop3_ratio_independent_of_alpha_and_above_bounds(dense):
    t = syn.prop3_table(dense, [2, 6, 12], alphas=[0.1, 1.0, 3.0])
    for _, g in t.groupby("N"):
        np.testing.assert_allclose(g.ratio_spectral, g.ratio_spectral.iloc[0], rtol=1e-9)
    assert (t.ratio_frobenius >= t.bound_frobenius * (1 - 1e-12)).all()
    assert (t.ratio_spectral >= t.bound_spectral * (1 - 1e-12)).all()
    one = syn.prop3_table(dense, [1], alphas=[1.0]).iloc[0]  # N = 1, ρ̄ = 1: Eq. 26 is an equality
    assert one.ratio_frobenius == pytest.approx(one.bound_frobenius, rel=1e-12)
    with pytest.raises(ValueError, match="alphas"):
        syn.prop3_table(dense, [2], alphas=[])


def test_fit_loglog_recovers_power_law():
    x = np.array([1, 2, 4, 8, 16.0])
    f = syn.fit_loglog(x, 3.0 * x**-0.5)
    assert f.slope == pytest.approx(-0.5) and f.prefactor == pytest.approx(3.0)
    with pytest.raises(ValueError):
        syn.fit_loglog([2, 2], [1, 1])


# ------------------------------------------------------------------ Prop. 4


def test_prop4_tiny_case_by_hand():
    """Head (2, 1) with σβ = 1, k_s = 2 signal directions of size 1 that TA keeps at c, and
    d_noise noise directions at 0. By hand: L_TA = 2(1 − c)², L_boost = d_noise·σβ² = d_noise.
    Eq. 29: boosting wins iff 2 > d_noise."""
    c = 1e-3
    for d_noise, boost_wins in ((1, True), (3, False)):
        size = 4 + d_noise
        s_ta = np.array([2.0, 1.0, c, c] + [0.0] * d_noise)
        s_ideal = np.array([2.0, 1.0, 1.0, 1.0] + [0.0] * d_noise)
        delta_ta = torch.tensor(np.diag(s_ta))
        # β between the normalised cumulative sums at index 0 (2/3.002) and 1 (3/3.002)
        boosted = _np(subspace_boost(delta_ta, 0.8))
        np.testing.assert_allclose(np.sort(np.linalg.svd(boosted, compute_uv=False))[::-1],
                                   [2.0] + [1.0] * (size - 1), atol=1e-12)
        l_ta = ((s_ta - s_ideal) ** 2).sum()
        l_boost = ((boosted - np.diag(s_ideal)) ** 2).sum()
        assert l_ta == pytest.approx(2 * (1 - c) ** 2)
        assert l_boost == pytest.approx(d_noise)
        assert bool(l_ta > l_boost) is boost_wins
        model = syn.TailModel(head=(2.0, 1.0), signal=(1.0, 1.0), suppression=c, noise=(0.0,) * d_noise)
        res = syn.prop4_losses(model, seed=5)
        assert res.loss_ta == pytest.approx(l_ta, abs=1e-10)
        assert res.loss_boost == pytest.approx(l_boost, abs=1e-10)
        assert res.cutoff_index == 1
        assert model.paper_criterion() is boost_wins


def test_prop4_sign_flips_exactly_at_the_analytic_boundary():
    grid = syn.prop4_grid([1, 2, 3, 4, 5, 6], [2, 3, 4], suppression=1e-3, seed=2)
    assert ((grid.gain > 0) == (grid.signal_dims > grid.d_noise)).all()
    assert ((grid.gain > 0) == grid.paper_predicts_gain).all()
    np.testing.assert_allclose(grid.loss_ta, grid.exact_loss_ta, atol=1e-9)
    np.testing.assert_allclose(grid.loss_boost, grid.exact_loss_boost, atol=1e-9)


def test_prop4_exact_boundaries_are_roots():
    for k, d, c, e in ((8, 4, 1e-3, 0.0), (8, 4, 0.3, 0.3), (4, 6, 0.2, 0.1)):
        for root in syn.prop4_exact_boundaries(k, d, c, e):
            model = syn.TailModel(head=(4.0, 1.0), signal=(root,) * k, suppression=c, noise=(e,) * d)
            l_ta, l_boost = model.exact_losses()
            assert l_ta == pytest.approx(l_boost, rel=1e-9)


def test_tail_model_rejects_zero_suppression():
    with pytest.raises(ValueError, match="suppression"):
        syn.TailModel(head=(2.0, 1.0), signal=(1.0,), suppression=0.0)


def test_beta_for_cutoff_hits_every_index():
    s = torch.tensor([5.0, 3.0, 3.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    for i in (0, 1, 3, 4):
        assert boost_cutoff_index(s, syn.beta_for_cutoff(s, i)) == i


# ------------------------------------------------------------------ Supp. E.4


def _known_scaling() -> dict[int, torch.Tensor]:
    # σ_0 = N (common), σ_1 = 0.1·√N (unique): exact exponents 1 and 0.5
    return {n: torch.diag(torch.tensor([float(n), 0.1 * math.sqrt(n)], dtype=torch.float64))
            for n in (4, 8, 14, 20)}


def test_normalised_spectra_collapse_at_the_right_gamma():
    t = syn.normalised_spectra(_known_scaling(), [0.5, 1.0])
    head = t[(t["index"] == 0) & (t.gamma == 1.0)].sigma_normalised
    tail = t[(t["index"] == 1) & (t.gamma == 0.5)].sigma_normalised
    np.testing.assert_allclose(head, 1.0)
    np.testing.assert_allclose(tail, 0.1)
    e = syn.scaling_exponents(_known_scaling())
    np.testing.assert_allclose(e.gamma, [1.0, 0.5], atol=1e-12)
    spread = syn.collapse_spread(_known_scaling(), [0.5, 1.0], [0])
    assert spread.set_index("gamma").spread[1.0] < 1e-12 < spread.set_index("gamma").spread[0.5]


def test_normalised_spectra_inputs_equivalent():
    mats = torch.randn(5, 6, 4, dtype=torch.float64)
    as_stack = syn.normalised_spectra({5: mats}, [0.5])
    as_list = syn.normalised_spectra({5: list(mats)}, [0.5])
    as_sum = syn.normalised_spectra({5: mats.sum(0)}, [0.5])
    np.testing.assert_allclose(as_stack.sigma, as_list.sigma)
    np.testing.assert_allclose(as_stack.sigma, as_sum.sigma)
    with pytest.raises(ValueError):
        syn.normalised_spectra({5: mats}, [])


def test_merged_by_prefix_on_state_dicts():
    vecs = [{"w": torch.full((2, 2), float(i)), "b": torch.zeros(2)} for i in range(1, 6)]
    out = syn.merged_by_prefix(vecs, [2, 5], key="w")
    assert float(out[2][0, 0]) == 3.0 and float(out[5][0, 0]) == 15.0
    with pytest.raises(ValueError, match="key"):
        syn.merged_by_prefix(vecs, [2])
    with pytest.raises(ValueError, match="task_counts"):
        syn.merged_by_prefix(vecs, [9], key="w")


def test_e4_synthetic_head_linear_tail_sqrt():
    spec = syn.SyntheticSpec(rows=48, cols=48, common_rank=3, noise_std=0.0)
    e = syn.scaling_exponents(syn.e4_task_vectors(spec, [4, 8, 14, 20], seed=0))
    assert np.all(np.abs(e.gamma[:3] - 1.0) < 0.1)
    assert abs(e.gamma[3:40].median() - 0.5) < 0.05


# ------------------------------------------------------------------ chapter setup


def test_profile_and_chapter_parameters_named_in_errors():
    with pytest.raises(ValueError, match="'profile'"):
        propositions.profile_settings("huge")
    with pytest.raises(ValueError, match="'common_rank'"):
        propositions.chapter_setup("smoke", common_rank=0)
    with pytest.raises(ValueError, match="'noise_fraction'"):
        propositions.chapter_setup("smoke", noise_fraction=-1)
    with pytest.raises(ValueError, match="'sweep_task_counts'"):
        propositions.chapter_setup("smoke", sweep_task_counts=[4])
    setup = propositions.chapter_setup("smoke", seed=7, n_repeats=3)
    assert setup.seeds == (7, 8, 9) and setup.lowrank.unique_rank == 2
