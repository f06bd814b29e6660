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
    ties_keep_count,
    ties_trim_thresholds,
    tsv_merge,
    iso_cts_split,
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
    out = ties(tvs, top_k=0.5, trim="top_k")  # each task keeps its 2 largest of 4 entries
    # task 0 keeps 4.0 and -3.0; task 1 keeps 0.3 and 0.2
    assert out["a"].tolist() == pytest.approx([(4.0 + 0.3) / 2, 0.2])
    assert out["b"].tolist() == pytest.approx([0.0, -3.0])
    # the official rule keeps ⌊4·0.5⌋ + 1 = 3: task 0 adds 0.2, task 1 adds -0.1;
    # entry b[0]: 0.2 - 0.1 > 0 elects +, only 0.2 agrees
    out = ties(tvs, top_k=0.5)
    assert out["a"].tolist() == pytest.approx([(4.0 + 0.3) / 2, 0.2])
    assert out["b"].tolist() == pytest.approx([0.2, -3.0])
    with pytest.raises(ValueError, match="top_k"):
        ties(tvs, top_k=20)
    with pytest.raises(ValueError, match="trim"):
        ties(tvs, trim="nope")


def test_ties_keep_counts_official_and_top_k():
    # official: k = d - int(d*K), keep |x| >= kthvalue -> int(d*K) + 1 entries
    assert [ties_keep_count(10, K) for K in (0.05, 0.2, 0.25, 1.0)] == [1, 3, 3, 10]
    assert [ties_keep_count(10, K, "top_k") for K in (0.05, 0.2, 0.25, 1.0)] == [1, 2, 2, 10]


def test_ties_threshold_in_float64():
    # magnitudes that float32 cannot tell apart: 1 + 3e-12 > 1 + 2e-12 > 1 + 1e-12 > 1
    vals = [1 + 3e-12, -(1 + 2e-12), 1 + 1e-12, 1.0, 0.5, 0.25, 0.125, 0.1, 0.05, 0.01]
    tv = [{"w": torch.tensor(vals, dtype=torch.float64)}]
    kept = lambda out: int((out["w"] != 0).sum())  # noqa: E731
    assert kept(ties(tv, top_k=0.2, trim="top_k")) == 2   # a float32 threshold (1.0) keeps 4
    assert kept(ties(tv, top_k=0.2)) == 3
    assert ties_trim_thresholds(tv, 0.2) == [1 + 1e-12]
    # a genuine tie at the threshold is kept under both rules
    tie = [{"w": torch.tensor([3.0, 2.0, 2.0, 2.0, 1.0, 0.5, 0.4, 0.3, 0.2, 0.1], dtype=torch.float64)}]
    assert kept(ties(tie, top_k=0.2, trim="top_k")) == 4
    assert kept(ties(tie, top_k=0.2)) == 4


def test_ties_sum_aggregate_and_zero_majority():
    tvs = vecs([1, -2, 3, 0], [2, 1, -3, 0.5], [-1, -1, 1, -0.5])
    out = ties(tvs, top_k=1.0, aggregate="sum")["w"].tolist()
    assert out == pytest.approx([3.0, -3.0, 4.0, 0.5])
    # elected signs +, - sum to 0: the official code then keeps the negative values of a tie
    tvs = vecs([1, -1, 1], [1, -1, -1])
    assert ties(tvs, top_k=1.0)["w"].tolist() == pytest.approx([1, -1, -1])


def test_tall_masks_and_consensus_hand():
    tvs = vecs([1.0, 0.1, -2.0], [1.0, -0.1, 0.0], [0.1, 0.05, 2.0])
    mtl = as_np([2.1, 0.05, 0.0])
    masks = tall_masks(tvs, lambdas=[0.5, 0.5, 1.0])
    for t, lam in enumerate([0.5, 0.5, 1.0]):
        d = as_np(tvs[t]["w"])
        assert masks[t]["w"].tolist() == list(np.abs(d) > lam * np.abs(mtl - d))
    counts = sum(np.array(m["w"].tolist(), dtype=int) for m in masks)
    out = consensus(tvs, k=2, lambdas=[0.5, 0.5, 1.0])["w"].numpy()
    np.testing.assert_allclose(out, np.where(counts >= 2, mtl, 0.0))
    with pytest.raises(ValueError, match="lambdas"):
        tall_masks(tvs, lambdas=[0.1, 0.2])


def test_tall_masks_strict():
    # task 0: |d| = 1, |mtl - d| = 2, λ = 0.5: equality, which the official strict '>' rejects
    tvs = vecs([1.0], [2.0])
    assert tall_masks(tvs, lambdas=0.5)[0]["w"].tolist() == [False]
    assert tall_masks(tvs, lambdas=0.49)[0]["w"].tolist() == [True]


def test_consensus_over_ties_hand():
    # top_k = 1 (no trimming), λ = 0.5, two entries
    tvs = vecs([1.0, 1.0], [0.2, 1.0], [-1.1, -0.5])
    # TIES dis-sum: entry 0: sum 0.1 elects +, 1.0 + 0.2 = 1.2; entry 1: 2.0
    np.testing.assert_allclose(ties(tvs, top_k=1.0, aggregate="sum")["w"].numpy(), [1.2, 2.0])
    # masks against the TIES vector: entry 0: 1 > .5·.2 yes, .2 > .5·1.0 no, 1.1 > .5·2.3 no -> 1 mask;
    # entry 1: 1 > .5·1 yes, 1 > .5·1 yes, .5 > .5·2.5 no -> 2 masks
    out = consensus(tvs, k=2, lambdas=0.5, base="ties", top_k=1.0)["w"].numpy()
    np.testing.assert_allclose(out, [0.0, 2.0])
    # against the TA sum (0.1, 1.5) entry 0 would get 3 masks: 1 > .45, .2 > .05, 1.1 > .6
    np.testing.assert_allclose(consensus(tvs, k=2, lambdas=0.5, base="ta")["w"].numpy(), [0.1, 1.5])
    # the dis-mean variant: entry 0: mean 0.6, masks of tasks 0 and 2 at least; entry 1: 1.0
    out = consensus(tvs, k=2, lambdas=0.5, base="ties", top_k=1.0, ties_aggregate="mean")["w"].numpy()
    np.testing.assert_allclose(out, [0.6, 1.0])


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


def test_iso_cts_split_official():
    # k = floor(0.8 r); total = round((r - k)/N)·N (half to even); common = r - total
    assert iso_cts_split(768, 8) == (768 - 152, 19)    # k = 614, 154/8 = 19.25 -> 19
    assert iso_cts_split(768, 20) == (768 - 160, 8)    # 154/20 = 7.7 -> 8: common shrinks to 608
    assert iso_cts_split(10, 4) == (10, 0)             # k = 8, 2/4 = 0.5 -> 0 (half to even)
    assert iso_cts_split(30, 4) == (22, 2)             # k = 24, 6/4 = 1.5 -> 2
    assert iso_cts_split(50, 4) == (42, 2)             # k = 40, 10/4 = 2.5 -> 2 (half to even)
    assert iso_cts_split(12, 4) == (8, 1)              # k = 9, 3/4 = 0.75 -> 1: common shrinks to 8
    assert iso_cts_split(10, 4, 0.1) == (2, 2)         # k = 1, 9/4 = 2.25 -> 2
    assert iso_cts_split(10, 6, 0.1) == (4, 1)         # k = 1, 9/6 = 1.5 -> 2 would need 12 > 10: ⌊10/6⌋
    for r, n in ((768, 8), (768, 14), (768, 20), (1024, 14), (10, 3), (10, 30)):
        c, s = iso_cts_split(r, n)
        assert c + n * s == r and c >= 0 and s >= 0


def iso_cts_reference(mats, common, per_task):
    total = sum(mats)
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    uc = u[:, :common]
    us, ss, vs = [uc], [s[:common]], [vt[:common].T]
    for m in mats:
        ut, st, vtt = np.linalg.svd(m - uc @ uc.T @ m, full_matrices=False)
        us.append(ut[:, :per_task]); ss.append(st[:per_task]); vs.append(vtt[:per_task].T)
    return np.concatenate(ss).mean() * polar(np.hstack(us)) @ polar(np.hstack(vs)).T


def test_iso_cts_reference_and_iso_c_limit():
    tvs = block_vectors(n=2, shape=(10, 10), seed=3)
    mats = [as_np(t[W]) for t in tvs]
    # r = 10, k = 8, round(2/2)·2 = 2: common 8, one direction per task
    np.testing.assert_allclose(as_np(iso_cts(tvs, common_fraction=0.8)[W]), iso_cts_reference(mats, 8, 1), atol=1e-9)
    np.testing.assert_allclose(as_np(iso_cts(tvs, common_fraction=1.0)[W]), as_np(iso_c(tvs)[W]), atol=1e-9)


def test_iso_cts_fills_every_direction():
    # r = 12, N = 3: k = 9, (12 - 9)/3 = 1 -> common 9, one per task (floor split: the same);
    # r = 12, N = 5: k = 9, 3/5 = 0.6 rounds to 1 -> 5 task directions, common re-set to 7
    # (the floor split would add none); N = 7: 3/7 rounds to 0 -> common 12 (= Iso-C)
    for n, (c, s) in ((3, (9, 1)), (5, (7, 1)), (7, (12, 0))):
        tvs = block_vectors(n=n, shape=(16, 12), seed=n)
        mats = [as_np(t[W]) for t in tvs]
        np.testing.assert_allclose(as_np(iso_cts(tvs)[W]), iso_cts_reference(mats, c, s), atol=1e-9)
    np.testing.assert_allclose(as_np(iso_cts(tvs)[W]), as_np(iso_c(tvs)[W]), atol=1e-9)


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


def sb0(m):
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return s[0] * u @ vt


def test_lines_order_with_sb():
    g = torch.Generator().manual_seed(7)
    keys = [f"visual.transformer.resblocks.{l}.mlp.c_fc.weight" for l in range(3)] + ["visual.ln_post.weight"]
    shapes = [(12, 6)] * 3 + [(6,)]
    tvs = [{k: torch.randn(*sh, generator=g, dtype=torch.float64) for k, sh in zip(keys, shapes)} for _ in range(4)]
    total = {k: sum(as_np(t[k]) for t in tvs) for k in keys}
    boosted = {k: sb0(v) if v.ndim == 2 else v for k, v in total.items()}
    l1 = lambda d: sum(np.abs(v).sum() for v in d.values())  # noqa: E731
    depth = {keys[0]: 0.0, keys[1]: 0.5, keys[2]: 1.0, keys[3]: None}
    b = 0.6

    def scaled(d, a):
        return {k: (a if depth[k] is None else a + b * depth[k]) * v for k, v in d.items()}

    a_after = l1(total) / l1(boosted) / 4       # LiNeS sees the boosted update
    a_before = l1(total) / l1(total) / 4        # LiNeS sees the plain TA sum: 1/T
    ref_after = scaled(boosted, a_after)
    ref_before = {k: sb0(v) if v.ndim == 2 else v for k, v in scaled(total, a_before).items()}
    after = merge(tvs, "ta", boost_beta=0.0, lines_b=b)
    before = merge(tvs, "ta", boost_beta=0.0, lines_b=b, lines_order="before_boost")
    for k in keys:
        np.testing.assert_allclose(as_np(after[k]), ref_after[k], atol=1e-10)
        np.testing.assert_allclose(as_np(before[k]), ref_before[k], atol=1e-10)
    assert a_after < a_before  # boosting raises ‖Δm‖1, so the default a drops
    assert not np.allclose(as_np(after[keys[0]]), as_np(before[keys[0]]))
    # an explicit a: the orders agree (SB(cM) = c·SB(M))
    e1 = merge(tvs, "ta", boost_beta=0.0, lines_b=b, lines_a=0.3)
    e2 = merge(tvs, "ta", boost_beta=0.0, lines_b=b, lines_a=0.3, lines_order="before_boost")
    for k in keys:
        np.testing.assert_allclose(as_np(e1[k]), as_np(e2[k]), atol=1e-10)
    with pytest.raises(ValueError, match="lines_order"):
        merge(tvs, "ta", lines_b=b, lines_order="sideways")


def test_registry_declares_kernels_and_statistics():
    from subboost.merging import InMemoryTaskVectors, run_merge

    for name, method in METHODS.items():
        assert (method.kernel is None) == method.whole_model, name
    assert METHODS["ties"].statistics is not None and METHODS["ta"].statistics is None
    # whole-model statistics use every key even when fewer keys are asked for: TIES keeps the
    # top 1 of the 4 entries (|x| ≥ 10, in "b"), so nothing of "a" survives (on "a" alone, 3
    # would); keeping the top 2 (|x| ≥ 3) keeps a's 3
    tvs = [{"a": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor([10.0])}]
    _, items = run_merge("ties", InMemoryTaskVectors(tvs), {"top_k": 0.25, "trim": "top_k"}, keys=["a"])
    got = dict(items)
    assert list(got) == ["a"] and got["a"].tolist() == [0.0, 0.0, 0.0]
    _, items = run_merge("ties", InMemoryTaskVectors(tvs), {"top_k": 0.5, "trim": "top_k"}, keys=["a"])
    assert dict(items)["a"].tolist() == [0.0, 0.0, 3.0]
