"""Merging methods against hand-computed and float64 brute-force references."""

import numpy as np
import pytest
import torch

from subboost.boost import boost_task_vector
from subboost.merging import (
    METHODS,
    consensus,
    get_method,
    iso_c,
    iso_cts,
    lines_default_a,
    lines_scale,
    lines_scales,
    merge,
    tall_masks,
    task_arithmetic,
    ties,
    tsv_merge,
)

def as_np(x):
    return x.numpy() if torch.is_tensor(x) else np.array(x)


W = "visual.transformer.resblocks.0.attn.out_proj.weight"


def vecs(*rows):
    return [{"w": torch.tensor(r, dtype=torch.float64)} for r in rows]


def test_registry():
    for name in ("ta", "ties", "consensus", "iso-c", "iso-cts", "tsv", "ho-sb", "average"):
        assert name in METHODS
    assert max(METHODS["tsv"].alpha_grid) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="unknown merging method 'foo'.*ta"):
        get_method("foo")


def test_task_arithmetic_sum():
    out = task_arithmetic(vecs([1, 2], [3, -1], [0.5, 0.5]))
    assert out["w"].tolist() == [4.5, 1.5]


def test_ties_sign_election_and_disjoint_mean_hand():
    tvs = vecs([1, -2, 3, 0], [2, 1, -3, 0.5], [-1, -1, 1, -0.5])
    # sums 2, -2, 1, 0 -> signs +, -, +, tie; majority of elected signs (+1-1+1) is + -> tie gets +
    out = ties(tvs, top_k=1.0)["w"].tolist()
    assert out == pytest.approx([1.5, -1.5, 2.0, 0.5])


def test_ties_tie_takes_negative_majority():
    tvs = vecs([-1, -1, 1], [-1, -1, -1])
    # sums -2, -2, 0 -> the tie at entry 2 takes the majority sign (-): only -1 agrees
    assert ties(tvs, top_k=1.0)["w"].tolist() == pytest.approx([-1, -1, -1])


def test_ties_trim_is_global_per_task():
    tvs = [{"a": torch.tensor([4.0, -0.1]), "b": torch.tensor([0.2, -3.0])},
           {"a": torch.tensor([0.3, 0.2]), "b": torch.tensor([-0.1, 0.05])}]
    out = ties(tvs, top_k=0.5)  # each task keeps its 2 largest of 4 entries
    # task 0 keeps 4.0 and -3.0; task 1 keeps 0.3 and 0.2
    assert out["a"].tolist() == pytest.approx([(4.0 + 0.3) / 2, 0.2])
    assert out["b"].tolist() == pytest.approx([0.0, -3.0])
    with pytest.raises(ValueError, match="top_k"):
        ties(tvs, top_k=20)


def test_tall_masks_and_consensus_hand():
    tvs = vecs([1.0, 0.1, -2.0], [1.0, -0.1, 0.0], [0.1, 0.05, 2.0])
    mtl = as_np([2.1, 0.05, 0.0])
    masks = tall_masks(tvs, lambdas=[0.5, 0.5, 1.0])
    for t, lam in enumerate([0.5, 0.5, 1.0]):
        d = as_np(tvs[t]["w"])
        assert masks[t]["w"].tolist() == list(np.abs(d) >= lam * np.abs(mtl - d))
    counts = sum(np.array(m["w"].tolist(), dtype=int) for m in masks)
    out = consensus(tvs, k=2, lambdas=[0.5, 0.5, 1.0])["w"].numpy()
    np.testing.assert_allclose(out, np.where(counts >= 2, mtl, 0.0))
    with pytest.raises(ValueError, match="lambdas"):
        tall_masks(tvs, lambdas=[0.1, 0.2])


def test_lines_layer_indices():
    keys = [f"visual.transformer.resblocks.{l}.mlp.c_fc.weight" for l in range(4)] + ["visual.proj", "visual.conv1.weight"]
    s = lines_scales(keys, a=0.2, b=0.6)
    assert [s[k] for k in keys[:4]] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert s["visual.proj"] == s["visual.conv1.weight"] == pytest.approx(0.2)
    # stacks counted separately: a 2-block text tower reaches a+b at its own last block
    s2 = lines_scales(keys[:4] + ["transformer.resblocks.0.ln_1.weight", "transformer.resblocks.1.ln_1.weight"], 0.0, 1.0)
    assert s2["transformer.resblocks.1.ln_1.weight"] == pytest.approx(1.0)


def test_lines_default_a_for_ta_is_one_over_t():
    tvs = [{"x": torch.randn(5)} for _ in range(4)]
    assert lines_default_a(tvs, task_arithmetic(tvs)) == pytest.approx(0.25)
    merged = lines_scale({"visual.transformer.resblocks.0.ln_1.weight": torch.ones(2), "visual.transformer.resblocks.1.ln_1.weight": torch.ones(2)}, b=1.0, a=0.5)
    assert merged["visual.transformer.resblocks.1.ln_1.weight"].tolist() == [1.5, 1.5]


def block_vectors(n=3, shape=(12, 8), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [{W: torch.randn(*shape, generator=g, dtype=dtype), "visual.ln_post.weight": torch.randn(8, generator=g, dtype=dtype)} for _ in range(n)]


def test_iso_c_flat_spectrum_at_mean():
    tvs = block_vectors()
    out = iso_c(tvs)
    total = sum(as_np(t[W]) for t in tvs)
    s_sum = np.linalg.svd(total, compute_uv=False)
    s_out = np.linalg.svd(as_np(out[W]), compute_uv=False)
    np.testing.assert_allclose(s_out, np.full_like(s_out, s_sum.mean()), rtol=1e-10)
    u, _, vt = np.linalg.svd(total, full_matrices=False)
    np.testing.assert_allclose(as_np(out[W]), s_sum.mean() * u @ vt, atol=1e-10)
    np.testing.assert_allclose(as_np(out["visual.ln_post.weight"]), sum(as_np(t["visual.ln_post.weight"]) for t in tvs) / 3)


def polar(x):
    p, _, qt = np.linalg.svd(x, full_matrices=False)
    return p @ qt


def test_tsv_against_numpy_reference():
    tvs = block_vectors(n=3, shape=(12, 9))
    k = 9 // 3
    us, ss, vs = [], [], []
    for t in tvs:
        u, s, vt = np.linalg.svd(as_np(t[W]), full_matrices=False)
        us.append(u[:, :k]); ss.append(s[:k]); vs.append(vt[:k].T)
    ref = polar(np.hstack(us)) @ np.diag(np.concatenate(ss)) @ polar(np.hstack(vs)).T
    np.testing.assert_allclose(as_np(tsv_merge(tvs)[W]), ref, atol=1e-10)


def test_tsv_exact_on_disjoint_low_rank_tasks():
    # tasks living in orthogonal row and column blocks, rank ≤ r/N: TSV-M reproduces their sum
    tvs = []
    for i in range(3):
        m = torch.zeros(12, 9, dtype=torch.float64)
        m[4 * i:4 * i + 4, 3 * i:3 * i + 3] = torch.randn(4, 3, dtype=torch.float64)
        tvs.append({W: m})
    assert torch.allclose(tsv_merge(tvs)[W], sum(t[W] for t in tvs), atol=1e-10)


def test_iso_cts_reference_and_iso_c_limit():
    tvs = block_vectors(n=2, shape=(10, 10), seed=3)
    mats = [as_np(t[W]) for t in tvs]
    total = sum(mats)
    u, s, vt = np.linalg.svd(total)
    k = 8
    uc = u[:, :k]
    us, ss, vs = [uc], [s[:k]], [vt[:k].T]
    for m in mats:
        ut, st, vtt = np.linalg.svd(m - uc @ uc.T @ m)
        us.append(ut[:, :1]); ss.append(st[:1]); vs.append(vtt[:1].T)
    sig = np.concatenate(ss).mean()
    ref = sig * polar(np.hstack(us)) @ polar(np.hstack(vs)).T
    np.testing.assert_allclose(as_np(iso_cts(tvs, common_fraction=0.8)[W]), ref, atol=1e-9)
    np.testing.assert_allclose(as_np(iso_cts(tvs, common_fraction=1.0)[W]), as_np(iso_c(tvs)[W]), atol=1e-9)


def test_spectral_methods_skip_zero_matrices():
    tvs = [{W: torch.zeros(6, 4), "visual.ln_post.weight": torch.ones(4)} for _ in range(3)]
    for name in ("iso-c", "iso-cts", "tsv"):
        out = merge(tvs, name)
        assert torch.equal(out[W], torch.zeros(6, 4)) and not torch.isnan(out[W]).any()


def test_merge_masks_first_boost_second():
    tvs = block_vectors(n=3, shape=(12, 8), seed=5)
    expected = boost_task_vector(consensus(tvs, k=2, lambdas=0.3), 0.0)
    got = merge(tvs, "consensus", k=2, lambdas=0.3, boost_beta=0.0)
    for key in expected:
        assert torch.allclose(got[key], expected[key])
    # SB commutes with LiNeS' per-layer scalar on the block matrices
    a = merge(tvs, "ta", boost_beta=0.0, lines_b=0.5, lines_a=0.3)
    b = boost_task_vector(lines_scale(task_arithmetic(tvs), b=0.5, a=0.3), 0.0)
    assert torch.allclose(a[W], b[W], atol=1e-10)


def test_merge_bad_inputs():
    a = {"x": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="keys differ"):
        merge([a, {"y": torch.zeros(2, 2)}], "ta")
    with pytest.raises(ValueError, match="shape mismatch for key 'x'"):
        merge({"cars": a, "dtd": {"x": torch.zeros(3, 2)}}, "ta")
    with pytest.raises(ValueError, match="unknown merging method"):
        merge([a, a], "nope")
