"""Subspace Boosting (paper Alg. 1) against hand-computed and float64 brute-force references."""

import numpy as np
import pytest
import torch

from subboost.boost import (
    boost_cutoff_index,
    boost_task_vector,
    boost_task_vector_with_report,
    subspace_boost,
)


def np_reference_sb(m: np.ndarray, beta: float) -> np.ndarray:
    """Independent float64 implementation of Alg. 1 with an explicit loop."""
    u, s, vt = np.linalg.svd(m.astype(np.float64), full_matrices=False)
    total, running, idx = s.sum(), 0.0, len(s) - 1
    for i, x in enumerate(s):
        running += x
        if running / total >= beta:
            idx = i
            break
    s2 = np.maximum(s, s[idx])
    return (u * s2) @ vt


def low_rank_heavy_tail(m=24, n=16, seed=0):
    g = np.random.default_rng(seed)
    u, _ = np.linalg.qr(g.standard_normal((m, n)))
    v, _ = np.linalg.qr(g.standard_normal((n, n)))
    s = 10.0 * 0.5 ** np.arange(n)
    return (u * s) @ v.T


def test_hand_computed_diagonal():
    m = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    # cumsum / sum = 0.4, 0.7, 0.9, 1.0
    cases = {0.0: [4, 4, 4, 4], 0.35: [4, 4, 4, 4], 0.5: [4, 3, 3, 3], 0.85: [4, 3, 2, 2], 1.0: [4, 3, 2, 1]}
    for beta, expected in cases.items():
        out = subspace_boost(m, beta)
        assert torch.allclose(out, torch.diag(torch.tensor(expected, dtype=torch.float64)), atol=1e-12), beta


def test_cutoff_index_hand():
    s = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert [boost_cutoff_index(s, b) for b in (0.0, 0.4, 0.41, 0.95, 1.0)] == [0, 0, 1, 3, 3]
    assert boost_cutoff_index(torch.zeros(3), 0.5) == 0


def test_beta_zero_is_top_singular_value_times_polar():
    m = low_rank_heavy_tail()
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    expected = s[0] * (u @ vt)
    out = subspace_boost(torch.tensor(m), 0.0).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-10 * s[0])


@pytest.mark.parametrize("beta", [0.0, 0.01, 0.3, 0.6, 0.9, 0.999])
@pytest.mark.parametrize("shape", [(24, 16), (16, 24), (20, 20)])
def test_matches_float64_bruteforce(beta, shape):
    m = np.random.default_rng(1).standard_normal(shape) @ np.diag(np.linspace(3, 0.1, shape[1]))
    out32 = subspace_boost(torch.tensor(m, dtype=torch.float32), beta).double().numpy()
    ref = np_reference_sb(m, beta)
    assert np.linalg.norm(out32 - ref) / np.linalg.norm(ref) < 1e-5


def test_positive_homogeneity():
    m = torch.tensor(low_rank_heavy_tail(seed=3))
    for c in (0.1, 2.0, 37.5):
        for beta in (0.0, 0.2, 0.7):
            assert torch.allclose(subspace_boost(c * m, beta), c * subspace_boost(m, beta), rtol=1e-9, atol=1e-9)


def test_rank_deficient_beta_zero_fills_spectrum():
    g = np.random.default_rng(4)
    m = g.standard_normal((10, 2)) @ g.standard_normal((2, 8))  # rank 2
    s0 = np.linalg.svd(m, compute_uv=False)[0]
    out = subspace_boost(torch.tensor(m), 0.0).numpy()
    np.testing.assert_allclose(np.linalg.svd(out, compute_uv=False), np.full(8, s0), rtol=1e-9)
    # on the row space of m the boosted map agrees with S0 * polar(m)
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    np.testing.assert_allclose(out @ vt[:2].T, s0 * u[:, :2], atol=1e-9)


def test_rank_deficient_beta_one_lifts_null_space_to_last_nonzero():
    g = np.random.default_rng(5)
    m = g.standard_normal((10, 3)) @ g.standard_normal((3, 8))  # rank 3
    s = np.linalg.svd(m, compute_uv=False)
    # exact arithmetic: cumsum(S)/sum(S) reaches 1 at index 2 (the last nonzero value), so
    # every smaller singular value, the 5 zero ones included, is raised to S[2]
    assert boost_cutoff_index(torch.tensor(s), 1.0) == 2
    out = subspace_boost(torch.tensor(m), 1.0).numpy()
    np.testing.assert_allclose(np.linalg.svd(out, compute_uv=False), [s[0], s[1]] + [s[2]] * 6, rtol=1e-9)
    u, _, vt = np.linalg.svd(m, full_matrices=False)
    np.testing.assert_allclose(out @ vt[:3].T, u[:, :3] * s[:3], atol=1e-9)


def test_zero_matrix_unchanged_no_nan():
    z = torch.zeros(6, 4)
    for beta in (0.0, 0.5):
        out = subspace_boost(z, beta)
        assert torch.equal(out, z) and not torch.isnan(out).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_preserved(dtype):
    # moderate condition number: float32 SVD resolves every direction
    g = np.random.default_rng(6)
    m = torch.tensor(g.standard_normal((24, 16)) @ np.diag(np.linspace(4, 0.5, 16)), dtype=dtype)
    out = subspace_boost(m, 0.0)
    assert out.dtype == dtype
    ref = torch.tensor(np_reference_sb(m.double().numpy(), 0.0))
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5, torch.float64: 1e-12}[dtype]
    assert float((out.double() - ref).norm() / ref.norm()) < tol


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="2-D"):
        subspace_boost(torch.ones(3), 0.0)
    with pytest.raises(ValueError, match="my.key"):
        subspace_boost(torch.ones(2, 2, 2), 0.0, name="my.key")
    bad = torch.ones(3, 3)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        subspace_boost(bad)
    with pytest.raises(ValueError, match="beta"):
        subspace_boost(torch.ones(3, 3), 1.5)


def clip_like_task_vector(seed=0, layers=2, width=8):
    g = torch.Generator().manual_seed(seed)
    tv = {}
    for l in range(layers):
        p = f"visual.transformer.resblocks.{l}."
        tv[p + "attn.in_proj_weight"] = torch.randn(3 * width, width, generator=g)
        tv[p + "attn.in_proj_bias"] = torch.randn(3 * width, generator=g)
        tv[p + "attn.out_proj.weight"] = torch.randn(width, width, generator=g)
        tv[p + "mlp.c_fc.weight"] = torch.randn(4 * width, width, generator=g)
        tv[p + "mlp.c_proj.weight"] = torch.randn(width, 4 * width, generator=g)
        tv[p + "ln_1.weight"] = torch.randn(width, generator=g)
        tv[f"transformer.resblocks.{l}.mlp.c_fc.weight"] = torch.zeros(4 * width, width)  # frozen text tower
    tv["visual.proj"] = torch.randn(width, 4, generator=g)
    tv["visual.positional_embedding"] = torch.randn(5, width, generator=g)
    return tv


def test_boost_task_vector_touches_only_block_matrices():
    tv = clip_like_task_vector()
    out, report = boost_task_vector_with_report(tv, 0.0)
    for key, value in tv.items():
        boosted = key.endswith(("in_proj_weight", "out_proj.weight", "c_fc.weight", "c_proj.weight")) and key.startswith("visual")
        if boosted:
            s = torch.linalg.svdvals(out[key].double())
            assert torch.allclose(s, s[0].expand_as(s), rtol=1e-5), key
        else:
            assert torch.equal(out[key], value), key
    zero_rows = report[report.skipped_zero]
    assert set(zero_rows.key) == {f"transformer.resblocks.{l}.mlp.c_fc.weight" for l in range(2)}
    assert (report[~report.skipped_zero].cutoff_index == 0).all()


def test_boost_layer_types_and_per_type_beta():
    tv = clip_like_task_vector()
    attn_only = boost_task_vector(tv, 0.0, layer_types=["attn"])
    assert torch.equal(attn_only["visual.transformer.resblocks.0.mlp.c_fc.weight"], tv["visual.transformer.resblocks.0.mlp.c_fc.weight"])
    assert not torch.equal(attn_only["visual.transformer.resblocks.0.attn.out_proj.weight"], tv["visual.transformer.resblocks.0.attn.out_proj.weight"])
    mixed = boost_task_vector(tv, 0.0, beta_mlp=1.0)  # β = 1 leaves a full-rank matrix unchanged
    assert torch.allclose(mixed["visual.transformer.resblocks.1.mlp.c_fc.weight"], tv["visual.transformer.resblocks.1.mlp.c_fc.weight"], atol=1e-5)
    with_proj = boost_task_vector(tv, 0.0, include_proj=True)
    assert not torch.allclose(with_proj["visual.proj"], tv["visual.proj"])
    with pytest.raises(ValueError, match="layer_types"):
        boost_task_vector(tv, 0.0, layer_types=["conv"])


IN_PROJ = "visual.transformer.resblocks.0.attn.in_proj_weight"


def block_in_proj(d=8, heads=2, seed=0):
    """A (3d × d) in_proj whose Q, K, V blocks have very different spectra (float64)."""
    g = np.random.default_rng(seed)
    blocks = [low_rank_heavy_tail(d, d, seed + i) * (10.0 ** i) + 0.01 * g.standard_normal((d, d)) for i in range(3)]
    return np.vstack(blocks)


@pytest.mark.parametrize("beta", [0.0, 0.3])
def test_attention_qkv_and_heads_equal_blockwise_reference(beta):
    d, heads = 8, 2
    m = block_in_proj(d, heads)
    tv = {IN_PROJ: torch.tensor(m), "visual.transformer.resblocks.0.attn.out_proj.weight": torch.tensor(m[:d])}
    # fused: the whole (3d × d) matrix, as before
    fused = boost_task_vector(tv, beta)[IN_PROJ].numpy()
    np.testing.assert_allclose(fused, np_reference_sb(m, beta), atol=1e-10)
    # qkv: each d × d block on its own
    qkv = boost_task_vector(tv, beta, attention="qkv")
    ref = np.vstack([np_reference_sb(m[i * d:(i + 1) * d], beta) for i in range(3)])
    np.testing.assert_allclose(qkv[IN_PROJ].numpy(), ref, atol=1e-10)
    assert not np.allclose(ref, fused)
    # heads: each head's d/heads rows of Q, K and V on their own
    dh = d // heads
    out, report = boost_task_vector_with_report(tv, beta, attention="heads", num_heads=heads)
    ref = np.vstack([np_reference_sb(m[r:r + dh], beta) for r in range(0, 3 * d, dh)])
    np.testing.assert_allclose(out[IN_PROJ].numpy(), ref, atol=1e-10)
    # out_proj is never split
    np.testing.assert_allclose(out["visual.transformer.resblocks.0.attn.out_proj.weight"].numpy(),
                               np_reference_sb(m[:d], beta), atol=1e-10)
    assert list(report[report.key == IN_PROJ].part) == [f"{p}.h{h}" for p in "qkv" for h in range(heads)]
    assert list(report[report.key != IN_PROJ].part) == [""]


def test_attention_block_diagonal_in_proj():
    # Q, K, V blocks with disjoint column supports: boosting per block = boosting each block
    d = 6
    g = np.random.default_rng(3)
    m = np.zeros((3 * d, 3 * d))
    for i in range(3):
        m[i * d:(i + 1) * d, i * d:(i + 1) * d] = g.standard_normal((d, d)) * (i + 1)
    got = boost_task_vector({IN_PROJ: torch.tensor(m)}, 0.0, attention="qkv")[IN_PROJ].numpy()
    for i in range(3):
        blk = m[i * d:(i + 1) * d, i * d:(i + 1) * d]
        np.testing.assert_allclose(got[i * d:(i + 1) * d, i * d:(i + 1) * d], np_reference_sb(blk, 0.0), atol=1e-10)
        off = np.delete(got[i * d:(i + 1) * d], np.s_[i * d:(i + 1) * d], axis=1)
        np.testing.assert_allclose(off, 0.0, atol=1e-10)


def test_attention_separate_projections_and_errors():
    q = "encoder.layer.0.attention.self.query.weight"
    g = torch.Generator().manual_seed(0)
    tv = {q: torch.randn(8, 8, generator=g, dtype=torch.float64)}
    # separate q/k/v matrices: "qkv" is the same as "fused"; "heads" splits their rows
    assert torch.equal(boost_task_vector(tv, 0.0, attention="qkv")[q], boost_task_vector(tv, 0.0)[q])
    heads = boost_task_vector(tv, 0.0, attention="heads", num_heads=4)[q].numpy()
    ref = np.vstack([np_reference_sb(tv[q].numpy()[r:r + 2], 0.0) for r in range(0, 8, 2)])
    np.testing.assert_allclose(heads, ref, atol=1e-10)
    with pytest.raises(ValueError, match="num_heads"):
        boost_task_vector(tv, 0.0, attention="heads")
    with pytest.raises(ValueError, match="num_heads=3"):
        boost_task_vector(tv, 0.0, attention="heads", num_heads=3)
    with pytest.raises(ValueError, match="attention must be one of"):
        boost_task_vector(tv, 0.0, attention="per_head")


def test_infer_num_heads():
    from subboost.boost import infer_num_heads

    mha = torch.nn.Sequential(torch.nn.MultiheadAttention(16, 4), torch.nn.MultiheadAttention(16, 4))
    assert infer_num_heads(mha) == 4
    assert infer_num_heads({"vision_cfg": {"width": 768, "layers": 12}}) == 12
    assert infer_num_heads({"vision_cfg": {"width": 128, "head_width": 32}}) == 4
    with pytest.raises(ValueError, match="num_heads"):
        infer_num_heads(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="num_heads"):
        infer_num_heads({"text_cfg": {}})
