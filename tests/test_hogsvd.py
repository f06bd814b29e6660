"""HO-GSVD (paper Eq. 5, 31-32), alignment matrix (Eq. 7), expert selection (Table 5/10) and
Higher-Order Subspace Boosting (Alg. 2), against independent float64 references:
the textbook S_π eigenproblem, the two-matrix generalized eigenproblem (scipy), SVDs of
hand-built block matrices, brute-force subset enumeration and Subspace Boosting itself."""

import itertools
import math

import numpy as np
import pytest
import scipy.linalg
import torch

from subboost.boost import subspace_boost
from subboost.hogsvd import (
    AlignmentResult,
    alignment_from_sigma,
    alignment_matrix,
    higher_order_subspace_boost,
    ho_subspace_boost_matrix,
    hogsvd,
    random_selection,
    s_pi,
    s_pi_pairwise,
    select_experts,
    selection_score,
    tau_bounds,
)
from subboost.merging import merge

KEY = "visual.transformer.resblocks.{l}.{sub}"


def rand(rng, m, n):
    return torch.tensor(rng.standard_normal((m, n)), dtype=torch.float64)


def rel_err(x, y):
    return float(torch.linalg.norm(x - y) / max(float(torch.linalg.norm(y)), 1e-300))


def check_decomposition(dec, mats, tol=1e-9):
    n = mats[0].shape[1]
    assert dec.V.shape == (n, n) and dec.sigma.shape == (len(mats), n) and dec.tau.shape == (n,)
    assert dec.V.dtype == torch.float64
    for i, a in enumerate(mats):
        a64 = a.to(torch.float64)
        assert dec.U[i].shape == (a.shape[0], n)
        assert rel_err(dec.reconstruct(i), a64) <= tol, (i, rel_err(dec.reconstruct(i), a64))
        np.testing.assert_allclose(torch.linalg.vector_norm(dec.U[i], dim=0).numpy(), 1.0, atol=1e-12)
    assert bool((dec.sigma >= 0).all())
    np.testing.assert_allclose(torch.linalg.vector_norm(dec.V, dim=0).numpy(), 1.0, atol=1e-12)
    assert float(torch.linalg.cond(dec.V)) < 1e12  # invertible shared basis
    lo, hi = tau_bounds(len(mats), dec.pi)
    assert float(dec.tau.min()) >= lo * (1 - 1e-9) and float(dec.tau.max()) <= hi * (1 + 1e-9)


# ---------------------------------------------------------------- S_π references


ROUTES = ["lapack", "torch"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("n_mat", [2, 3, 5, 8])
def test_s_pi_identity_equals_pairwise_sum(n_mat, route):
    rng = np.random.default_rng(n_mat)
    mats = [rand(rng, 9 + i, 6) for i in range(n_mat)]
    for pi in (0.0, 1e-2, 0.5):
        np.testing.assert_allclose(
            s_pi(mats, pi, route=route).numpy(), s_pi_pairwise(mats, pi).numpy(), rtol=1e-10, atol=1e-10
        )


def numpy_s_pi(mats, pi):
    """Independent float64 numpy reference of Eq. 31-32 (N(N−1) products with inverses)."""
    a = [np.asarray(m, dtype=np.float64) for m in mats]
    tot = sum(x.T @ x for x in a)
    d = [x.T @ x + pi * tot for x in a]
    n = len(a)
    return sum(d[i] @ np.linalg.inv(d[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))


@pytest.mark.parametrize("route", ROUTES)
def test_s_pi_same_shape_route_equals_numpy_reference(route):
    """Same-shape inputs large enough for the torch route's block-symmetric Gram (n ≥ 256)."""
    rng = np.random.default_rng(7)
    mats = [rand(rng, 280, 260) for _ in range(4)]
    ours = s_pi(mats, 1e-2, route=route).numpy()
    np.testing.assert_allclose(ours, s_pi_pairwise(mats, 1e-2).numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ours, numpy_s_pi(mats, 1e-2), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("route", ROUTES)
def test_s_pi_wide_scaled_and_non_contiguous_inputs(route):
    """Wide A_i (m_i < n, singular Grams made definite by π), very different scales, a
    transposed (non-contiguous) and a float32 input: same S_π as the numpy reference."""
    rng = np.random.default_rng(11)
    mats = [
        torch.from_numpy(rng.standard_normal((5, 12))) * 1e3,
        torch.from_numpy(rng.standard_normal((12, 20))).T,  # 20 × 12, non-contiguous view
        torch.from_numpy(rng.standard_normal((7, 12))).float() * 1e-2,
    ]
    ref = numpy_s_pi([m.double().numpy() for m in mats], 0.05)
    ours = s_pi(mats, 0.05, route=route)
    assert ours.dtype == torch.float64 and ours.shape == (12, 12)
    np.testing.assert_allclose(ours.numpy(), ref, rtol=1e-7, atol=1e-9 * np.abs(ref).max())


@pytest.mark.parametrize("route", ROUTES)
def test_s_pi_singular_gram_raises(route):
    rng = np.random.default_rng(8)
    full = rand(rng, 9, 6)
    low_rank = rand(rng, 3, 6)  # 3 rows, 6 columns: A_1ᵀA_1 is singular
    with pytest.raises(torch.linalg.LinAlgError, match="D_1"):
        s_pi([full, low_rank], 0.0, route=route)


def test_s_pi_route_checks():
    rng = np.random.default_rng(9)
    mats = [rand(rng, 7, 5) for _ in range(3)]
    with pytest.raises(ValueError, match="route"):
        s_pi(mats, 1e-2, route="fast")
    with pytest.raises(ValueError, match="CPU"):
        s_pi([m.to("meta") for m in mats], 1e-2, route="lapack")


def test_s_pi_lapack_route_restores_blas_threads():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = [d["num_threads"] for d in threadpoolctl.threadpool_info() if d["user_api"] == "blas"]
    rng = np.random.default_rng(10)
    s_pi([rand(rng, 8, 6) for _ in range(3)], 1e-2, route="lapack")
    after = [d["num_threads"] for d in threadpoolctl.threadpool_info() if d["user_api"] == "blas"]
    assert before == after


@pytest.mark.parametrize("n_mat", [2, 3, 4, 7])
def test_qr_route_matches_naive_s_pi_eigenvectors(n_mat):
    """V holds eigenvectors of the textbook S_π (Eq. 31), with eigenvalues λ = ((1+Nπ)τ − 1)/(N−1)."""
    rng = np.random.default_rng(10 + n_mat)
    mats = [rand(rng, 8 + 2 * i, 6) * (1 + i) for i in range(n_mat)]
    pi = 1e-2
    s = s_pi_pairwise(mats, pi).numpy()
    evals, evecs = np.linalg.eig(s)
    assert np.abs(evals.imag).max() < 1e-8
    order = np.argsort(-evals.real)
    evals, evecs = evals.real[order], evecs.real[:, order]
    assert np.min(np.abs(np.diff(evals))) > 1e-6 * evals.max()  # distinct: eigenvectors are unique
    dec = hogsvd(mats, pi)
    lam = dec.s_pi_eigenvalues.numpy()
    np.testing.assert_allclose(lam, evals, rtol=1e-8)
    v = dec.V.numpy()
    residual = np.linalg.norm(s @ v - v * lam) / np.linalg.norm(s)
    assert residual < 1e-10
    cos = np.abs(np.sum(v * evecs, axis=0)) / np.linalg.norm(evecs, axis=0)
    np.testing.assert_allclose(cos, 1.0, atol=1e-8)  # same directions up to sign and scale
    # τ itself: eigenvalues of (1/N) AᵀA Σ_j D_j⁻¹ (independent of the QR route)
    a = torch.cat(mats).numpy()
    d = [m.numpy().T @ m.numpy() + pi * a.T @ a for m in mats]
    t = a.T @ a @ sum(np.linalg.inv(x) for x in d) / n_mat
    np.testing.assert_allclose(np.sort(np.linalg.eigvals(t).real)[::-1], dec.tau.numpy(), rtol=1e-8)
    check_decomposition(dec, mats)


def test_two_matrices_are_the_gsvd():
    """N = 2: (σ_1k/σ_2k)² are the eigenvalues of A1ᵀA1 x = μ A2ᵀA2 x, U_i orthonormal."""
    rng = np.random.default_rng(3)
    a1, a2 = rand(rng, 10, 5), rand(rng, 7, 5)
    mu = scipy.linalg.eigh(a1.numpy().T @ a1.numpy(), a2.numpy().T @ a2.numpy(), eigvals_only=True)
    for pi in (1e-3, 1e-2, 1.0):  # the ratios do not depend on π for N = 2
        dec = hogsvd([a1, a2], pi)
        ratio2 = np.sort((dec.sigma[0] / dec.sigma[1]).numpy() ** 2)
        np.testing.assert_allclose(ratio2, np.sort(mu), rtol=1e-9)
        for u in dec.U:
            np.testing.assert_allclose((u.T @ u).numpy(), np.eye(5), atol=1e-9)


def test_eigh_solver_agrees_with_svd_solver():
    rng = np.random.default_rng(4)
    mats = [rand(rng, 12, 7) for _ in range(5)]
    a, b = hogsvd(mats, solver="svd"), hogsvd(mats, solver="eigh")
    np.testing.assert_allclose(a.tau.numpy(), b.tau.numpy(), rtol=1e-10)
    np.testing.assert_allclose(a.sigma.numpy(), b.sigma.numpy(), rtol=1e-7)
    np.testing.assert_allclose(a.V.numpy(), b.V.numpy(), atol=1e-7)
    check_decomposition(b, mats)


# ---------------------------------------------------------------- accuracy and rank deficiency


@pytest.mark.parametrize("n_mat", [2, 3, 5, 8, 13, 20])
def test_reconstruction_float64_full_rank_and_rank_deficient(n_mat):
    rng = np.random.default_rng(100 + n_mat)
    n = 8
    shared_rows = rand(rng, 3, n)
    cases = {
        "full": [rand(rng, int(rng.integers(n, 14)), n) for _ in range(n_mat)],
        # m_i may be < n: each A_i is rank-deficient, the stack is not
        "short": [rand(rng, int(rng.integers(2, 6)), n) for _ in range(n_mat)],
        # every A_i of rank 2, shared rank-3 row space: the stack has rank 3 < n
        "low-rank stack": [rand(rng, 6, 2) @ rand(rng, 2, 3) @ shared_rows for _ in range(n_mat)],
        # wildly different scales, one all-zero matrix, one rank-1 matrix
        "mixed": [rand(rng, 9, n) * 10.0 ** (i % 7 - 3) for i in range(n_mat - 2)]
        + [torch.zeros(4, n, dtype=torch.float64), rand(rng, 5, 1) @ rand(rng, 1, n)],
    }
    for name, mats in cases.items():
        dec = hogsvd(mats)
        check_decomposition(dec, mats)
        if name == "low-rank stack":
            assert dec.rank == 3


def test_rank_deficient_stack_null_directions():
    """Σ m_i < n: rank(A) = r < n. The last n − r columns of V span null(A): σ = 0 for every
    matrix, τ = τmin (λ = 1), not isolated; A_i V_null = 0."""
    rng = np.random.default_rng(5)
    mats = [rand(rng, 2, 9), rand(rng, 3, 9)]
    dec = hogsvd(mats, pi=1e-2)
    assert dec.rank == 5
    check_decomposition(dec, mats)
    null = dec.V[:, 5:]
    assert torch.allclose(null.T @ null, torch.eye(4, dtype=torch.float64), atol=1e-12)
    for a in mats:
        assert float((a @ null).abs().max()) < 1e-12
    assert bool((dec.sigma[:, 5:] == 0).all())
    lo, _ = tau_bounds(2, 1e-2)
    np.testing.assert_allclose(dec.tau[5:].numpy(), lo)
    np.testing.assert_allclose(dec.s_pi_eigenvalues[5:].numpy(), 1.0)
    assert not bool(dec.isolated[5:].any())


def test_isolated_directions_and_owner():
    """Column 0 is used only by A_0: exactly one isolated direction, τ = τmax, owned by 0."""
    rng = np.random.default_rng(6)
    mats = [rand(rng, 8, 6) for _ in range(3)]
    for a in mats[1:]:
        a[:, 0] = 0.0
    pi = 1e-2
    dec = hogsvd(mats, pi)
    lo, hi = tau_bounds(3, pi)
    assert int(dec.isolated.sum()) == 1 and bool(dec.isolated[0])
    assert dec.owner.tolist() == [0, -1, -1, -1, -1, -1]
    assert float(dec.tau[0]) == pytest.approx(hi, rel=1e-12)
    assert float(dec.tau[1]) < hi - 1e-3 * (hi - lo)
    assert float(dec.sigma[1:, 0].abs().max()) == 0.0
    check_decomposition(dec, mats)


def test_disjoint_supports_split_isolated_subspace_by_owner():
    """A_1 = [B1, 0], A_2 = [0, B2]: every direction is isolated (degenerate τ = τmax); the
    basis is split by owner and, inside each owner, equals the SVD of its block."""
    rng = np.random.default_rng(7)
    b1, b2 = rand(rng, 6, 4), rand(rng, 5, 3)
    a1 = torch.cat([b1, torch.zeros(6, 3, dtype=torch.float64)], dim=1)
    a2 = torch.cat([torch.zeros(5, 4, dtype=torch.float64), b2], dim=1)
    dec = hogsvd([a1, a2])
    assert bool(dec.isolated.all())
    assert sorted(dec.owner.tolist()) == [0] * 4 + [1] * 3
    s1 = np.sort(dec.sigma[0][dec.owner == 0].numpy())
    s2 = np.sort(dec.sigma[1][dec.owner == 1].numpy())
    np.testing.assert_allclose(s1, np.sort(np.linalg.svd(b1.numpy(), compute_uv=False)), rtol=1e-12)
    np.testing.assert_allclose(s2, np.sort(np.linalg.svd(b2.numpy(), compute_uv=False)), rtol=1e-12)
    assert float(dec.sigma[1][dec.owner == 0].abs().max()) == 0.0
    check_decomposition(dec, [a1, a2])


def test_identical_inputs_reduce_to_svd():
    rng = np.random.default_rng(8)
    a = rand(rng, 9, 5)
    dec = hogsvd([a, a, a, a])
    s = np.linalg.svd(a.numpy(), compute_uv=False)
    for i in range(4):
        np.testing.assert_allclose(dec.sigma[i].numpy(), s, rtol=1e-10)
    np.testing.assert_allclose((dec.V.T @ dec.V).numpy(), np.eye(5), atol=1e-10)
    np.testing.assert_allclose(dec.s_pi_eigenvalues.numpy(), 1.0, rtol=1e-9)  # all common


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_inputs_are_decomposed_in_float64(dtype):
    rng = np.random.default_rng(9)
    mats = [rand(rng, 7, 5).to(dtype) for _ in range(4)]
    dec = hogsvd(mats)
    assert dec.sigma.dtype == torch.float64 and dec.U[0].dtype == torch.float64
    check_decomposition(dec, mats)


def test_input_validation():
    rng = np.random.default_rng(10)
    with pytest.raises(ValueError, match="matrix 2"):
        hogsvd([rand(rng, 4, 5), rand(rng, 6, 5), rand(rng, 4, 6)])
    with pytest.raises(ValueError, match="at least 2"):
        hogsvd([rand(rng, 4, 5)])
    bad = rand(rng, 4, 5)
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match="matrix 1"):
        hogsvd([rand(rng, 4, 5), bad])
    with pytest.raises(ValueError, match="pi"):
        hogsvd([rand(rng, 4, 5), rand(rng, 4, 5)], pi=0.0)


# ---------------------------------------------------------------- alignment matrix (Eq. 7)


def block_tv(mats_by_layer, extra=None):
    """A CLIP-like task vector with one attention out_proj matrix per layer."""
    tv = {KEY.format(l=l, sub="attn.out_proj.weight"): m for l, m in enumerate(mats_by_layer)}
    tv.update(extra or {})
    return tv


def test_alignment_from_sigma_matches_eq7_loop():
    rng = np.random.default_rng(11)
    sigma = np.abs(rng.standard_normal((4, 6)))
    sigma[1, 2] = 0.0
    eps = 1e-12
    ref = np.array([[np.mean([abs(math.log((sigma[i, p] + eps) / (sigma[j, p] + eps))) for p in range(6)])
                     for j in range(4)] for i in range(4)])
    np.testing.assert_allclose(alignment_from_sigma(sigma), ref, rtol=1e-12)


def test_alignment_identical_inputs_is_zero():
    rng = np.random.default_rng(12)
    layers = [rand(rng, 6, 6), rand(rng, 6, 6)]
    res = alignment_matrix({"a": block_tv(layers), "b": block_tv(layers), "c": block_tv(layers)})
    assert isinstance(res, AlignmentResult)
    assert list(res.matrix.index) == ["a", "b", "c"] and list(res.matrix.columns) == ["a", "b", "c"]
    assert np.abs(res.matrix.to_numpy()).max() < 1e-8
    assert len(res.per_layer) == 2


def test_alignment_scaled_copy_is_log_of_scale():
    """A_2 = c·A_1 in every layer: σ_2 = c·σ_1, so Eq. 7 gives |log c| exactly."""
    rng = np.random.default_rng(13)
    layers = [rand(rng, 7, 5), rand(rng, 5, 7)]  # the second one is wide (decomposed transposed)
    res = alignment_matrix([block_tv(layers), block_tv([3.0 * m for m in layers])])
    np.testing.assert_allclose(res.matrix.to_numpy(), [[0, math.log(3)], [math.log(3), 0]], rtol=1e-9, atol=1e-12)


def test_alignment_disjoint_supports_matches_hand_value_and_is_large():
    """A_1 = [B1, 0], A_2 = [0, B2]: σ_1 = s(B1) on its 4 directions (σ_2 = 0 there) and vice
    versa, so Eq. 7 = (1/7)(Σ log((s(B1)+ε)/ε) + Σ log((s(B2)+ε)/ε)) ≈ 27."""
    rng = np.random.default_rng(14)
    b1, b2 = rand(rng, 8, 4), rand(rng, 8, 3)
    z = torch.zeros(8, 3, dtype=torch.float64), torch.zeros(8, 4, dtype=torch.float64)
    a1, a2 = torch.cat([b1, z[0]], 1), torch.cat([z[1], b2], 1)
    res = alignment_matrix([block_tv([a1]), block_tv([a2])], names=["x", "y"])
    eps = 1e-12
    s = np.concatenate([np.linalg.svd(b1.numpy(), compute_uv=False), np.linalg.svd(b2.numpy(), compute_uv=False)])
    expected = np.mean(np.log((s + eps) / eps))
    assert res.matrix.loc["x", "y"] == pytest.approx(expected, rel=1e-9)
    assert expected > 20


def test_alignment_symmetric_zero_diagonal_skips_zero_keys_and_averages_layers():
    rng = np.random.default_rng(15)
    n_tasks, n_layers = 4, 3
    tvs = []
    for _ in range(n_tasks):
        tv = block_tv([rand(rng, 6, 6) for _ in range(n_layers)])
        tv["transformer.resblocks.0.attn.out_proj.weight"] = torch.zeros(6, 6, dtype=torch.float64)  # frozen tower
        tv[KEY.format(l=0, sub="ln_1.weight")] = rand(rng, 1, 6)[0]
        tvs.append(tv)
    res = alignment_matrix(tvs)
    m = res.matrix.to_numpy()
    np.testing.assert_allclose(m, m.T, atol=0)
    assert np.all(np.diag(m) == 0) and np.all(m[~np.eye(n_tasks, dtype=bool)] > 0)
    assert res.keys == [KEY.format(l=l, sub="attn.out_proj.weight") for l in range(n_layers)]
    for key, layer in res.per_layer.items():
        np.testing.assert_allclose(layer, alignment_from_sigma(res.sigma[key]))
        np.testing.assert_allclose(layer, layer.T, atol=1e-14)
    np.testing.assert_allclose(m, np.mean(list(res.per_layer.values()), axis=0), rtol=1e-12)
    one = alignment_matrix(tvs, keys=[res.keys[1]])
    np.testing.assert_allclose(one.matrix.to_numpy(), res.per_layer[res.keys[1]], rtol=1e-12)


# ---------------------------------------------------------------- expert selection


def test_selection_picks_non_interfering_candidates_end_to_end():
    """Pool tasks live on columns 0-7. 'same_*' candidates use the same columns (interference:
    low alignment), 'other_*' candidates use columns 8-15 (disjoint subspace: high alignment).
    The paper's criterion (maximise alignment with the pool) must pick the 'other_*' ones."""
    rng = np.random.default_rng(16)

    def on(cols):
        m = torch.zeros(20, 16, dtype=torch.float64)  # tall: decomposed as is, V acts on columns
        m[:, cols] = rand(rng, 20, len(cols))
        return block_tv([m])

    tvs = {
        "pool_a": on(range(0, 8)), "pool_b": on(range(0, 8)),
        "same_1": on(range(0, 8)), "other_1": on(range(8, 16)), "same_2": on(range(0, 8)),
        "other_2": on(range(8, 12)), "same_3": on(range(0, 8)),
    }
    res = alignment_matrix(tvs)
    cands = ["same_1", "other_1", "same_2", "other_2", "same_3"]
    for method in ("greedy", "exhaustive"):
        sel = select_experts(res, ["pool_a", "pool_b"], cands, 2, method=method)
        assert sel.selected == ["other_1", "other_2"] and sel.method == method
    sel = select_experts(res.matrix, [0, 1], [2, 3, 4, 5, 6], 2)  # indices work too
    assert sel.selected == [3, 5]


def test_exhaustive_matches_brute_force_and_greedy_on_easy_case():
    rng = np.random.default_rng(17)
    a = rng.uniform(0, 1, (9, 9))
    a = a + a.T
    np.fill_diagonal(a, 0)
    pool, cands = [0, 1], list(range(2, 9))
    ex = select_experts(a, pool, cands, 3, method="exhaustive")
    best = max(itertools.combinations(cands, 3), key=lambda s: selection_score(a, pool, s))
    assert ex.selected == list(best) and ex.n_evaluated == math.comb(7, 3)
    assert ex.score == pytest.approx(selection_score(a, pool, best))
    gr = select_experts(a, pool, cands, 3, method="greedy")
    assert gr.score <= ex.score + 1e-12
    # without candidate-candidate terms the objective is separable: greedy is exact
    for k in (1, 3, 5):
        g0 = select_experts(a, pool, cands, k, method="greedy", within_weight=0.0)
        e0 = select_experts(a, pool, cands, k, method="exhaustive", within_weight=0.0)
        assert g0.selected == e0.selected
    # easy planted case: two candidates clearly better with the pool and with each other
    easy = np.full((6, 6), 1.0)
    easy[np.ix_([3, 5], [0, 1, 3, 5])] = easy[np.ix_([0, 1, 3, 5], [3, 5])] = 5.0
    np.fill_diagonal(easy, 0)
    for method in ("greedy", "exhaustive", "auto"):
        assert select_experts(easy, [0, 1], [2, 3, 4, 5], 2, method=method).selected == [3, 5]


def test_selection_without_pool_and_auto_switch():
    rng = np.random.default_rng(18)
    a = rng.uniform(0, 1, (12, 12))
    a = a + a.T
    sel = select_experts(a, [], list(range(12)), 4, method="auto", max_exhaustive=10)
    assert sel.method == "greedy" and len(sel.selected) == 4
    sel = select_experts(a, [], list(range(12)), 4, method="auto")
    assert sel.method == "exhaustive"
    with pytest.raises(ValueError):
        select_experts(a, [0], [0, 1], 1)
    with pytest.raises(ValueError):
        select_experts(a, [0], [1, 2], 3)
    with pytest.raises(ValueError):
        select_experts(a, [0], ["nope"], 1)


def test_random_selection_is_deterministic_by_seed():
    cands = [f"t{i}" for i in range(14)]
    a = random_selection(cands, 5, draws=10, seed=3)
    assert a == random_selection(cands, 5, draws=10, seed=3)
    assert a != random_selection(cands, 5, draws=10, seed=4)
    assert len(a) == 10 and all(len(d) == 5 == len(set(d)) and set(d) <= set(cands) for d in a)
    assert all(d == sorted(d, key=cands.index) for d in a)
    assert len({tuple(d) for d in a}) > 1


# ---------------------------------------------------------------- Higher-Order SB (Alg. 2)


def test_ho_sb_identical_rank_one_task_vectors_via_merge():
    """N copies of Δ with a rank-1 block matrix σ u vᵀ: HO-GSVD gives σ_i = σ on the one used
    direction (zero elsewhere), Σ_sum = Nσ, β = 0 leaves a single value unchanged, so the block
    matrix becomes N·σ u vᵀ (the unused directions are not boosted). Non-block tensors: mean = Δ."""
    rng = np.random.default_rng(19)
    n_tasks = 4
    rank1 = rand(rng, 9, 1) @ rand(rng, 1, 6)
    tv = {
        KEY.format(l=0, sub="attn.out_proj.weight"): rank1,
        KEY.format(l=0, sub="mlp.c_proj.weight"): rank1.T.contiguous(),  # wide: transposed path
        KEY.format(l=1, sub="attn.out_proj.weight"): torch.zeros(6, 6, dtype=torch.float64),
        KEY.format(l=0, sub="ln_1.weight"): rand(rng, 1, 6)[0],
        "visual.proj": rand(rng, 6, 3),
    }
    out = merge([tv] * n_tasks, "ho-sb", beta=0.0)
    assert set(out) == set(tv)
    np.testing.assert_allclose(out[KEY.format(l=0, sub="attn.out_proj.weight")].numpy(), n_tasks * rank1.numpy(), atol=1e-12)
    np.testing.assert_allclose(out[KEY.format(l=0, sub="mlp.c_proj.weight")].numpy(), n_tasks * rank1.T.numpy(), atol=1e-12)
    assert not bool(out[KEY.format(l=1, sub="attn.out_proj.weight")].any())
    np.testing.assert_allclose(out[KEY.format(l=0, sub="ln_1.weight")].numpy(), tv[KEY.format(l=0, sub="ln_1.weight")].numpy())
    np.testing.assert_allclose(out["visual.proj"].numpy(), tv["visual.proj"].numpy())
    # include_proj: visual.proj (3 identical copies, full rank) becomes SB of their sum
    out_p = higher_order_subspace_boost([tv] * n_tasks, beta=0.0, include_proj=True)
    np.testing.assert_allclose(out_p["visual.proj"].numpy(), subspace_boost(n_tasks * tv["visual.proj"], 0.0).numpy(), atol=1e-10)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(9, 6), (6, 9)])
def test_ho_sb_identical_full_rank_equals_sb_of_sum(beta, shape):
    rng = np.random.default_rng(20)
    a = rand(rng, *shape)
    out = ho_subspace_boost_matrix([a, a, a], beta)
    np.testing.assert_allclose(out.numpy(), subspace_boost(3 * a, beta).numpy(), atol=1e-10)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_ho_sb_block_diagonal_tasks_equal_sb_of_sum(beta):
    """Tasks on disjoint row and column blocks: the SVD of the sum is the union of the task
    SVDs, so Alg. 2 with σ-weighted Procrustes must equal SB(Σ Δi); with β = 1 (no boost)
    it rebuilds the sum exactly. The unweighted variant does not (it averages in the unit
    columns a task does not use)."""
    rng = np.random.default_rng(21)
    b1, b2 = rand(rng, 5, 4), rand(rng, 4, 3)
    a1 = torch.zeros(9, 7, dtype=torch.float64)
    a2 = torch.zeros(9, 7, dtype=torch.float64)
    a1[:5, :4], a2[5:, 4:] = b1, b2
    out = ho_subspace_boost_matrix([a1, a2], beta)
    np.testing.assert_allclose(out.numpy(), subspace_boost(a1 + a2, beta).numpy(), atol=1e-10)
    if beta == 1.0:
        assert rel_err(out, a1 + a2) < 1e-12
        assert rel_err(ho_subspace_boost_matrix([a1, a2], 1.0, weighting="none"), a1 + a2) > 0.1


def test_ho_sb_sigma_weighting_rebuilds_sum_more_closely_than_unweighted():
    """Before boosting (β = 1) the σ-weighted Procrustes stays closer to Σ Δi on planted tasks
    (shared low-rank part + task-specific low-rank parts)."""
    rng = np.random.default_rng(22)
    wins = 0
    for _ in range(6):
        shared = rand(rng, 20, 2) @ rand(rng, 2, 12)
        mats = [0.5 * shared + 3 * rand(rng, 20, 2) @ rand(rng, 2, 12) + 0.05 * rand(rng, 20, 12) for _ in range(3)]
        total = sum(mats)
        e_sig = rel_err(ho_subspace_boost_matrix(mats, 1.0, weighting="sigma"), total)
        e_none = rel_err(ho_subspace_boost_matrix(mats, 1.0, weighting="none"), total)
        wins += e_sig < e_none
    assert wins == 6


def test_ho_sb_float32_task_vectors_and_validation():
    rng = np.random.default_rng(23)
    tvs = [block_tv([rand(rng, 8, 6).float(), rand(rng, 6, 8).float()]) for _ in range(3)]
    out = merge(tvs, "ho-sb", beta=0.0)
    for key, value in out.items():
        assert value.dtype == torch.float32 and value.shape == tvs[0][key].shape
        assert bool(torch.isfinite(value).all())
        # β = 0: every boosted Σ equals the largest summed σ, so the matrix is s·(partial isometry)
        s = torch.linalg.svdvals(value.double())
        np.testing.assert_allclose(s.numpy(), float(s[0]), rtol=1e-5)
    bad = dict(tvs[1])
    bad[KEY.format(l=0, sub="attn.out_proj.weight")] = torch.zeros(8, 5)
    with pytest.raises(ValueError):
        merge([tvs[0], bad], "ho-sb")
    with pytest.raises(ValueError):
        higher_order_subspace_boost([tvs[0]])
