"""Fast Subspace Boosting routes against the reference (paper Alg. 1 by float32 SVD) and
against a float64 brute force, on small inputs; the cost model's decisions for given inputs.
Timings are never asserted here."""

from __future__ import annotations

import math

import pytest
import torch

from subboost.boost import (
    COST_MODELS,
    GRAM32_MAX_ERR,
    GRAM32_SAFETY,
    MAX_COND,
    ROUTES,
    CostModel,
    _gram_boost,
    _gram_probe,
    _Probe,
    boost_cutoff_index,
    boost_matrices,
    boost_singular_values,
    boost_task_vector,
    boost_task_vector_with_report,
    choose_route,
    cost_model,
    predicted_seconds,
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
    assert report.route.tolist()[0] in ("svd", "svd-tall", "gram", "polar")
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


@pytest.mark.parametrize("route", ["gram", "polar"])
def test_ill_conditioned_full_rank_falls_back(route):
    g = torch.Generator().manual_seed(6)
    u = torch.linalg.qr(torch.randn(200, 150, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(150, 150, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0, -math.log10(MAX_COND) - 1, 150, dtype=torch.float64)
    m = (u * s) @ v.T
    (_, _, used), = boost_matrices([m], 0.0, route=route)
    assert used == "svd"
    ok = (u * s.clamp(min=1e-3)) @ v.T
    (out, _, used_ok), = boost_matrices([ok], 0.0, route=route)
    assert used_ok == route
    assert rel(out, sb64(ok, 0.0)) < 1e-10


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


def test_several_matrices_keep_order():
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
    for route in ("auto", "gram", "svd-tall", "polar"):
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


def _spectrum(n: int, kind: str, kappa: float) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    if kind == "geometric":
        return kappa ** (-i / (n - 1))
    if kind == "power":
        return (1 + i) ** (-math.log(kappa) / math.log(n))
    # a few strong directions over a flat bulk
    g = torch.Generator().manual_seed(int(kappa))
    s = torch.where(i < 4, 1.0 / (1 + i), torch.full_like(i, 1.0 / kappa)) * (1 + 0.1 * torch.rand(n, generator=g, dtype=torch.float64))
    return s.sort(descending=True).values


@pytest.mark.parametrize("kind", ["geometric", "power", "task-like"])
@pytest.mark.parametrize("kappa", [3.0, 30.0, 300.0])
def test_float32_gram_error_estimate_bounds_the_error(kind, kappa):
    """The float32-Gram shortcut is taken only where SAFETY × estimate ≤ MAX_ERR; check that
    the probe's estimate (times the safety factor) bounds the measured error of the result
    computed from the float32 Gram (float64 product), on 1024 × 256 matrices."""
    x = _spectrum_matrix(1024, 256, _spectrum(256, kind, kappa), seed=int(kappa))
    probe = _gram_probe(x)
    got = _gram_boost(x, 0.0, _Probe(probe.gram, gram64=False, apply64=True), apply64=True)[0]
    err = rel(got, sb64(x, 0.0))
    assert err <= GRAM32_SAFETY * probe.gram32_error, (err, probe.gram32_error)


def test_float32_gram_is_used_only_when_safe():
    good = realistic(2048, 256, seed=12, spike=3.0)  # well conditioned: float32 Gram accepted
    bad = _spectrum_matrix(2048, 256, _spectrum(256, "geometric", 1000.0), seed=13)  # κ = 1e3: float64
    assert not _gram_probe(good).gram64 and _gram_probe(bad).gram64
    for mat in (good, bad):
        out = _gram_boost(mat, 0.0)[0]
        assert rel(out, sb64(mat, 0.0)) < GRAM32_MAX_ERR
    assert _gram_boost(bad, 0.0)[2:] == (True, True)


def test_probe_estimate_grows_with_conditioning():
    estimates = [_gram_probe(_spectrum_matrix(512, 128, _spectrum(128, "power", k), seed=1)).gram32_error
                 for k in (3.0, 30.0, 300.0)]
    assert estimates[0] < estimates[1] < estimates[2]
    singular = torch.randn(512, 8) @ torch.randn(8, 128)  # rank 8: the Cholesky probe fails
    probe = _gram_probe(singular)
    assert probe.gram64 and probe.apply64 and math.isinf(probe.gram32_error)


# ----------------------------------------------------------------------------- polar route


@pytest.mark.parametrize("shape", [(240, 160), (160, 240), (160, 160)])
@pytest.mark.parametrize("beta", [0.0, 0.01, 0.1, 0.3, 0.9, 1.0])
def test_polar_route_matches_float64_alg1(shape, beta):
    m = realistic(*shape, seed=sum(shape))
    (out, idx, used), = boost_matrices([m], beta, route="polar")
    assert used == "polar" and out.dtype == m.dtype
    s = torch.linalg.svdvals(m.double())
    assert idx == boost_cutoff_index(s, beta)
    assert rel(out, sb64(m, beta)) < 1e-6  # float64 inside: the float32 rounding of the output
    assert rel(out, subspace_boost(m, beta, route="svd")) < 1e-4


@pytest.mark.parametrize("kappa", [1e2, 1e4, 1e5])
def test_polar_route_badly_conditioned_float64(kappa):
    """Float64 input, power-law spectrum with three strong directions: the QDWH polar factor
    plus the rank-idx correction against the float64 SVD."""
    i = torch.arange(120, dtype=torch.float64)
    s = (1 + i) ** (-math.log(kappa / 4) / math.log(120))
    s[:3] = torch.tensor([4.0, 2.5, 1.2])
    m = _spectrum_matrix(300, 120, s, seed=3).double()
    for beta in (0.0, 0.05, 0.2):
        (out, _, used), = boost_matrices([m], beta, route="polar")
        assert used == "polar"
        assert rel(out, sb64(m, beta)) < 1e-9


def test_polar_top_eigenpairs_and_full_spectrum_paths_agree():
    """idx from the leading eigenpairs of H (small idx) and from its full spectrum (β = 0.95
    needs most of them) both match Alg. 1; β = 0 is S₀·polar(M)."""
    m = realistic(220, 140, seed=21).double()
    u, s, vh = torch.linalg.svd(m, full_matrices=False)
    assert rel(subspace_boost(m, 0.0, route="polar"), s[0] * (u @ vh)) < 1e-10
    for beta in (0.05, 0.95):
        assert rel(subspace_boost(m, beta, route="polar"), sb64(m, beta)) < 1e-10


@pytest.mark.parametrize("shape", [(200, 150), (150, 200), (160, 160)])
def test_polar_route_rank_deficient_and_near_singular_fall_back(shape):
    g = torch.Generator().manual_seed(5)
    low = torch.randn(shape[0], 12, generator=g) @ torch.randn(12, shape[1], generator=g)  # rank 12
    (out, _, used), = boost_matrices([low], 0.0, route="polar")
    assert used == "svd" and torch.equal(out, subspace_boost(low, 0.0, route="svd"))
    k = min(shape)
    s = torch.ones(k, dtype=torch.float64)
    s[-1] = 1e-12  # near-singular: polar(M) ill-conditioned
    near = _spectrum_matrix(shape[0], shape[1], s, seed=2).double() if shape[0] >= shape[1] else \
        _spectrum_matrix(shape[1], shape[0], s, seed=2).double().T
    (out, _, used), = boost_matrices([near], 0.0, route="polar")
    assert used == "svd" and torch.isfinite(out).all()


# ----------------------------------------------------------------------------- cost model


UNIT = CostModel(svd_mk2=1.0, svd_k3=1.0, svd_wide=2.0, gemm32=0.1, gemm64=0.2, eigh64=1.0, chol64=0.3, f64=2.0)


def test_predicted_seconds_by_hand():
    """The formulas of CostModel, checked on one shape with unit-like constants."""
    m, n = 40, 10  # tall, k = 10 < 256: plain Gram products (share 1)
    t = predicted_seconds((m, n), torch.float32, UNIT)
    assert t["svd"] == pytest.approx(40 * 100 + 1000)
    assert t["svd-tall"] == t["svd"]
    # eigh 1000 + W 0.2·1000 + Gram32 0.1·4000 + product32 0.1·4000 + Cholesky probe 0.3·1000/3
    assert t["gram"] == pytest.approx(1000 + 200 + 400 + 400 + 100)
    t64 = predicted_seconds((m, n), torch.float32, UNIT, gram64=True, apply64=True)
    # after the probe: what is left, a float64 Gram and product
    assert t64["gram"] == pytest.approx(1000 + 200 + 800 + 800)
    assert UNIT.gram(m, n, True, True, probe=True) == pytest.approx(1000 + 200 + 800 + 800 + 400 + 100)
    assert predicted_seconds((n, m), torch.float32, UNIT)["svd"] == pytest.approx(2 * t["svd"])
    assert predicted_seconds((m, n), torch.float64, UNIT)["svd"] == pytest.approx(2 * t["svd"])


def test_choose_route_decisions():
    cheap_svd = CostModel(svd_mk2=1e-3, svd_k3=1e-3, svd_wide=1.0, gemm32=1.0, gemm64=2.0, eigh64=1.0, chol64=1.0)
    assert choose_route((3072, 768), torch.float32, cheap_svd) == "svd"
    wide_penalty = CostModel(svd_mk2=1e-3, svd_k3=1e-3, svd_wide=5.0, gemm32=1.0, gemm64=2.0, eigh64=1.0, chol64=1.0)
    assert choose_route((768, 3072), torch.float32, wide_penalty) == "svd-tall"
    assert choose_route((3072, 768), torch.float32, wide_penalty) == "svd"  # tall: no penalty, tie → svd
    # the SVD costs between the float32 and the float64 Gram route: the probe's verdict decides
    # (4000 × 100: SVD 4.1e7; Gram route 9.1e6 in float32 with the probe, 4.9e7 left in float64)
    mid = CostModel(svd_mk2=1.0, svd_k3=1.0, svd_wide=1.0, gemm32=0.1, gemm64=0.6, eigh64=0.5, chol64=0.1)
    assert choose_route((4000, 100), torch.float32, mid) == "gram"
    assert choose_route((4000, 100), torch.float32, mid, gram64=True, apply64=True) == "svd"
    # float64 inputs: the SVD costs f64 = 2 times more (8.2e7), the Gram route 4.9e7 (no probe)
    assert choose_route((4000, 100), torch.float64, mid) == "gram"
    # without a measured model: the aspect-ratio rule
    assert choose_route((384, 128), torch.float32, None) == "gram"
    assert choose_route((128, 128), torch.float32, None) == "svd"
    assert choose_route((96, 32), torch.float32, None) == "svd"


def test_cpu_model_decisions_at_vit_b32_shapes():
    """The measured CPU model: the Gram route for the tall/wide ViT-B/32 matrices at either
    precision, the SVD for the square out_proj and for small matrices; no model for GPUs."""
    model = cost_model("cpu", 1)
    assert model is COST_MODELS["cpu"] and cost_model("cpu", 2) is model
    for shape in [(3072, 768), (2304, 768), (768, 3072)]:
        assert choose_route(shape, torch.float32, model) == "gram"
        assert choose_route(shape, torch.float32, model, gram64=True, apply64=True) == "gram"
    assert choose_route((768, 768), torch.float32, model) == "svd"
    assert choose_route((192, 64), torch.float32, model) == "svd"
    assert choose_route((64, 256), torch.float32, model) == "svd-tall"
    assert cost_model("meta") is None
