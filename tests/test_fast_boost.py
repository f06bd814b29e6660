"""Fast Subspace Boosting routes (issue 6) against the reference (paper Alg. 1 by float32 SVD)
and against a float64 brute force, on small inputs. Timings are never asserted here."""

from __future__ import annotations

import math

import pytest
import torch

from subboost.boost import (
    _GRAM32_MAX_ERR,
    _GRAM32_SAFETY,
    _gram,
    _gram32_error,
    _gram_eigh,
    AUTO_MIN_ASPECT,
    AUTO_MIN_DIM,
    GRAM_MAX_COND,
    ROUTES,
    boost_matrices,
    boost_singular_values,
    boost_task_vector,
    boost_task_vector_with_report,
    subspace_boost,
)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def sb64(m: torch.Tensor, beta: float) -> torch.Tensor:
    """Float64 brute force of Alg. 1."""
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    return (u * boost_singular_values(s, beta)) @ vh


def realistic(m: int, n: int, seed: int = 0, spikes: int = 8, spike: float = 30.0, dtype=torch.float32) -> torch.Tensor:
    """A task-vector-like matrix: a few strong directions with a power-law decay over a
    Gaussian bulk (low stable rank, heavy tail; square ones have κ ~ 1e3-1e4)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, spikes, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, spikes, generator=g, dtype=torch.float64))[0]
    s = spike * (math.sqrt(m) + math.sqrt(n)) / torch.arange(1, spikes + 1, dtype=torch.float64)
    return (1e-3 * ((u * s) @ v.T + torch.randn(m, n, generator=g, dtype=torch.float64))).to(dtype)


SHAPES = [(240, 160), (160, 240), (160, 160), (384, 128), (128, 512)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("beta", [0.0, 0.01, 0.3, 0.9, 1.0])
def test_gram_route_matches_reference(shape, beta):
    m = realistic(*shape, seed=hash(shape) % 1000)
    ref = subspace_boost(m, beta, route="svd")
    truth = sb64(m, beta)
    fast = subspace_boost(m, beta, route="gram")
    assert fast.dtype == m.dtype and fast.shape == m.shape
    assert rel(fast, ref) < 1e-4
    # the fast route is at least as close to the float64 answer as the reference (± rounding)
    assert rel(fast, truth) < max(2 * rel(ref, truth), 1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_auto_route_choice_and_accuracy(shape):
    m = realistic(*shape, seed=7)
    out, report = boost_task_vector_with_report({"visual.transformer.resblocks.0.mlp.c_fc.weight": m}, 0.0)
    expected_route = "gram" if min(shape) >= AUTO_MIN_DIM and max(shape) >= AUTO_MIN_ASPECT * min(shape) else "svd"
    assert report.route.tolist() == [expected_route]
    assert rel(out["visual.transformer.resblocks.0.mlp.c_fc.weight"], subspace_boost(m, 0.0, route="svd")) < 1e-4


def test_small_matrices_keep_the_reference_bit_for_bit():
    m = realistic(24, 16, seed=1)
    assert torch.equal(subspace_boost(m, 0.2), subspace_boost(m, 0.2, route="svd"))


@pytest.mark.parametrize("shape", [(200, 150), (150, 200)])
def test_svd_tall_route(shape):
    m = realistic(*shape, seed=3)
    assert rel(subspace_boost(m, 0.0, route="svd-tall"), subspace_boost(m, 0.0, route="svd")) < 1e-5


def test_beta_zero_is_top_singular_value_times_polar_on_gram_route():
    m = realistic(300, 140, seed=4).double()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    assert rel(subspace_boost(m, 0.0, route="gram"), s[0] * (u @ vh)) < 1e-10  # float64 stays float64


@pytest.mark.parametrize("shape", [(200, 150), (150, 200), (160, 160)])
def test_rank_deficient_falls_back_to_the_reference(shape):
    g = torch.Generator().manual_seed(5)
    m = torch.randn(shape[0], 12, generator=g) @ torch.randn(12, shape[1], generator=g)  # rank 12
    outs = boost_matrices([m], 0.0, route="gram")
    out, idx, used = outs[0]
    assert used == "svd" and idx == 0
    assert torch.equal(out, subspace_boost(m, 0.0, route="svd"))


def test_ill_conditioned_full_rank_falls_back():
    g = torch.Generator().manual_seed(6)
    u = torch.linalg.qr(torch.randn(200, 150, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(150, 150, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -math.log10(GRAM_MAX_COND) - 1, 150, dtype=torch.float64)
    m = (u * s) @ v.T
    (_, _, used), = boost_matrices([m], 0.0, route="gram")
    assert used == "svd"
    (_, _, used_ok), = boost_matrices([(u * s.clamp(min=1e-3)) @ v.T], 0.0, route="gram")
    assert used_ok == "gram"


def test_zero_matrix_skipped_on_every_route():
    z = torch.zeros(200, 150)
    for route in ROUTES:
        (out, idx, used), = boost_matrices([z], 0.0, route=route)
        assert used == "zero" and idx is None and torch.equal(out, z)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2), (torch.float64, 1e-10)])
def test_low_and_high_precision_inputs(dtype, tol):
    m = realistic(200, 150, seed=8, spike=3.0, dtype=dtype)
    fast = subspace_boost(m, 0.0, route="gram")
    assert fast.dtype == dtype
    truth = sb64(m, 0.0)
    assert rel(fast, truth) < tol
    assert rel(fast, subspace_boost(m, 0.0, route="svd")) < tol


def test_batched_equals_one_by_one_and_keeps_order():
    mats = [realistic(180, 130, seed=s) for s in range(3)] + [realistic(130, 180, seed=9), torch.zeros(180, 130)]
    betas = [0.0, 0.2, 0.5, 0.0, 0.0]
    batched = boost_matrices(mats, betas, route="gram")
    assert [r[2] for r in batched] == ["gram"] * 4 + ["zero"]
    for m, b, (out, _, _) in zip(mats[:4], betas, batched):
        assert rel(out, subspace_boost(m, b, route="gram")) < 1e-6
        assert rel(out, subspace_boost(m, b, route="svd")) < 1e-4


def test_positive_homogeneity_on_gram_route():
    m = realistic(200, 150, seed=10)
    for c in (0.1, 37.5):
        assert rel(subspace_boost(c * m, 0.1, route="gram"), c * subspace_boost(m, 0.1, route="gram")) < 1e-5


def test_task_vector_routes_agree():
    g = torch.Generator().manual_seed(11)
    tv = {}
    for layer in range(2):
        p = f"visual.transformer.resblocks.{layer}."
        tv[p + "attn.in_proj_weight"] = realistic(3 * 128, 128, seed=layer)
        tv[p + "attn.out_proj.weight"] = realistic(128, 128, seed=10 + layer)
        tv[p + "mlp.c_fc.weight"] = realistic(4 * 128, 128, seed=20 + layer)
        tv[p + "mlp.c_proj.weight"] = realistic(128, 4 * 128, seed=30 + layer)
        tv[p + "ln_1.weight"] = torch.randn(128, generator=g)
    ref = boost_task_vector(tv, 0.0, route="svd")
    for route in ("auto", "gram", "svd-tall"):
        out = boost_task_vector(tv, 0.0, route=route)
        for key in tv:
            if key.endswith("ln_1.weight"):
                assert out[key] is tv[key]
            else:
                assert rel(out[key], ref[key]) < 1e-4, (route, key)


def test_bad_route_and_inputs():
    with pytest.raises(ValueError, match="route"):
        subspace_boost(torch.ones(3, 3), 0.0, route="fast")
    bad = realistic(200, 150)
    bad[3, 4] = float("inf")
    with pytest.raises(ValueError, match="weird.key"):
        boost_matrices([bad], 0.0, route="gram", names=["weird.key"])
    with pytest.raises(ValueError, match="betas"):
        boost_matrices([bad, bad], [0.0], route="gram")


def _spectrum_matrix(m: int, n: int, s: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    return ((u * s) @ v.T).float()


@pytest.mark.parametrize("kind", ["geometric", "power", "task-like"])
@pytest.mark.parametrize("kappa", [3.0, 30.0, 300.0])
def test_float32_gram_error_estimate_bounds_the_error(kind, kappa):
    """The float32-Gram shortcut is taken only where SAFETY × estimate ≤ MAX_ERR; check that
    the estimate (times the safety factor) bounds the measured error of the resulting polar
    factor, here on 1024 × 256 matrices."""
    m, n = 1024, 256
    i = torch.arange(n, dtype=torch.float64)
    if kind == "geometric":
        s = kappa ** (-i / (n - 1))
    elif kind == "power":
        s = (1 + i) ** (-math.log(kappa) / math.log(n))
    else:  # a few strong directions over a flat bulk
        s = torch.where(i < 4, 1.0 / (1 + i), torch.full_like(i, 1.0 / kappa)) * (1 + 0.1 * torch.rand(n, dtype=torch.float64))
        s = s.sort(descending=True).values
    x = _spectrum_matrix(m, n, s, seed=int(kappa))
    lam, v = torch.linalg.eigh(_gram(x.unsqueeze(0), True, torch.float32).double())
    f = lam[0, -1].sqrt() / lam[0].clamp(min=1e-300).sqrt()
    approx = x.double() @ ((v[0] * f) @ v[0].T)
    u_, s_, vh_ = torch.linalg.svd(x.double(), full_matrices=False)
    err = rel(approx, s_[0] * (u_ @ vh_))
    est = float(_gram32_error(lam, m)[0])
    assert err <= _GRAM32_SAFETY * est, (err, est)


def test_float32_gram_is_used_only_when_safe():
    good = realistic(2048, 256, seed=12, spike=3.0)  # well conditioned: float32 Gram accepted
    i = torch.arange(256, dtype=torch.float64)
    bad = _spectrum_matrix(2048, 256, 1000.0 ** (-i / 255), seed=13)  # κ = 1e3: float64 Gram
    _, _, used = _gram_eigh(torch.stack([good, bad]), True)
    assert used == ["float32", "float64"]
    for mat in (good, bad):
        assert rel(subspace_boost(mat, 0.0, route="gram"), sb64(mat, 0.0)) < _GRAM32_MAX_ERR
