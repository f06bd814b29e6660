"""Chapter 4's module (subboost.chapters.hogsvd_alignment) on tiny synthetic task vectors and a fake evaluator:
hand-computed alignment summaries, the Fig. 5a bookkeeping, the selection protocols' structure,
determinism and caching, and the Table 9 rows."""

import numpy as np
import pandas as pd
import pytest
import torch

from subboost.chapters import hogsvd_alignment as it
from subboost.hogsvd import AlignmentResult, alignment_matrix
from subboost.paper import TABLE5, TABLE9_VIT_B32, TABLE10

KEY = "visual.transformer.resblocks.{l}.{sub}"
NAMES20 = [f"T{i:02d}" for i in range(20)]


# ---------------------------------------------------------------- sizes and protocols


def test_chapter_sizes_profiles_and_overrides():
    assert it.chapter_sizes("ci", 20) == it.PROFILE_SIZES["ci"]
    full = it.chapter_sizes("full", 20)
    assert (full.pool, full.candidates, full.external, full.select_k) == (3, 14, 3, 5)
    assert (full.table5_draws, full.table10_k, full.table10_draws) == (10, 8, 20)
    smoke = it.chapter_sizes("smoke", 3, n_random_draws=4)
    assert smoke.table5_tasks <= 3 and smoke.table5_draws == smoke.table10_draws == 4
    assert it.PROFILE_SIZES["ci"].counts_for_table9([20, 8, 14]) == [8]
    assert it.PROFILE_SIZES["full"].counts_for_table9([20, 8, 14]) == [8, 14, 20]


@pytest.mark.parametrize("kwargs, name", [
    (dict(profile="ci", n_tasks=8), "profile"),
    (dict(profile="nope", n_tasks=20), "profile"),
    (dict(profile="ci", n_tasks=20, n_random_draws=0), "n_random_draws"),
    (dict(profile="ci", n_tasks=20, n_random_draws=2.5), "n_random_draws"),
])
def test_chapter_sizes_errors_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=f"parameter '{name}'"):
        it.chapter_sizes(**kwargs)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), "0.01", True])
def test_check_pi(bad):
    assert it.check_pi(0.01) == 0.01
    with pytest.raises(ValueError, match="parameter 'pi'"):
        it.check_pi(bad)


def test_protocols_split_the_tasks_like_the_paper():
    sizes = it.PROFILE_SIZES["ci"]
    p5 = it.table5_protocol(NAMES20, sizes, seed=3)
    assert p5.pool == tuple(NAMES20[:3]) and p5.candidates == tuple(NAMES20[3:17])
    assert p5.groups == {"Pool": tuple(NAMES20[:3]), "Ext": tuple(NAMES20[17:])}
    assert p5.alignment_tasks == NAMES20[:17]  # the external tasks are never looked at
    assert p5.eval_tasks == NAMES20[:3] + NAMES20[17:] and p5.k == 5 and p5.seed == 3
    p10 = it.table10_protocol(NAMES20, sizes)
    assert p10.pool == () and p10.candidates == tuple(NAMES20) and p10.k == 8
    assert p10.eval_tasks == NAMES20
    smoke = it.table5_protocol(NAMES20[:3], it.PROFILE_SIZES["smoke"])
    assert smoke.groups == {"Pool": ("T00",)} and smoke.candidates == ("T01", "T02")


# ---------------------------------------------------------------- alignment summaries


def test_mean_offdiagonal_hand_computed():
    a = np.array([[0.0, 1.0, 2.0], [1.0, 0.0, 3.0], [2.0, 3.0, 0.0]])
    assert it.mean_offdiagonal(a) == pytest.approx(2.0)
    b = np.array([[5.0, 1.0], [3.0, 7.0]])  # the diagonal is ignored, asymmetry kept
    assert it.mean_offdiagonal(pd.DataFrame(b)) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        it.mean_offdiagonal(np.zeros((2, 3)))


def _fake_alignment(values):
    """values[(layer, sublayer)] = the constant off-diagonal of that matrix (3 experts)."""
    keys, per_layer = [], {}
    for (layer, sub), v in values.items():
        key = KEY.format(l=layer, sub=sub)
        keys.append(key)
        per_layer[key] = v * (1.0 - np.eye(3))
    mean = np.mean(list(per_layer.values()), axis=0)
    names = ["a", "b", "c"]
    return AlignmentResult(matrix=pd.DataFrame(mean, index=names, columns=names), per_layer=per_layer,
                           sigma={}, keys=keys, names=names, pi=0.01, eps=1e-12)


def test_alignment_by_block_and_depth_trend_hand_computed():
    res = _fake_alignment({(0, "attn.out_proj.weight"): 0.1, (0, "mlp.c_fc.weight"): 0.3,
                           (1, "attn.out_proj.weight"): 0.2, (1, "mlp.c_fc.weight"): 0.2,
                           (2, "attn.out_proj.weight"): 0.5, (2, "mlp.c_fc.weight"): 0.7})
    by = it.alignment_by_block(res)
    assert list(by.layer) == [0, 0, 1, 1, 2, 2]
    assert list(by.sublayer) == ["attn.out_proj", "mlp.c_fc"] * 3
    np.testing.assert_allclose(by.mean_alignment, [0.1, 0.3, 0.2, 0.2, 0.5, 0.7])
    trend = it.depth_trend(by)
    np.testing.assert_allclose(trend["per_block"].values, [0.2, 0.2, 0.6])
    assert trend["first"] == pytest.approx(0.2) and trend["last"] == pytest.approx(0.6)
    assert trend["rising_sublayers"] == ["attn.out_proj", "mlp.c_fc"]
    assert trend["monotone_sublayers"] == ["attn.out_proj"]  # c_fc dips at block 1
    # Spearman by hand: ranks of layer (1.5,1.5,3.5,3.5,5.5,5.5), of alignment (1,4,2.5,2.5,5,6)
    x = np.array([1.5, 1.5, 3.5, 3.5, 5.5, 5.5])
    y = np.array([1, 4, 2.5, 2.5, 5, 6])
    assert trend["spearman"] == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert trend["n_blocks"] == 3
    assert trend["monotone_mean"] and trend["spearman_blocks"] == pytest.approx(np.corrcoef([1, 2, 3], [1.5, 1.5, 3])[0, 1])
    assert trend["verdict"].verdict == "reproduced"
    np.testing.assert_allclose(by.std_alignment, 0.0, atol=1e-15)  # constant off-diagonals
    falling = it.depth_trend(it.alignment_by_block(_fake_alignment({(0, "mlp.c_fc.weight"): 0.5,
                                                                     (1, "mlp.c_fc.weight"): 0.6,
                                                                     (2, "mlp.c_fc.weight"): 0.4})))
    assert falling["verdict"].verdict == "not reproduced" and not falling["monotone_mean"]
    partly = it.depth_trend(it.alignment_by_block(_fake_alignment({(0, "mlp.c_fc.weight"): 0.3,
                                                                    (1, "mlp.c_fc.weight"): 0.2,
                                                                    (2, "mlp.c_fc.weight"): 0.4})))
    assert partly["verdict"].verdict == "partly"


def _vectors(rng, n_tasks, layers=2, d=6, shared=0.0):
    common = rng.standard_normal((d, d))
    out = {}
    for t in range(n_tasks):
        sd = {}
        for l in range(layers):
            sd[KEY.format(l=l, sub="attn.out_proj.weight")] = torch.tensor(
                shared * common + rng.standard_normal((d, d)), dtype=torch.float32)
            sd[KEY.format(l=l, sub="mlp.c_fc.weight")] = torch.tensor(rng.standard_normal((2 * d, d)),
                                                                      dtype=torch.float32)
            sd[KEY.format(l=l, sub="mlp.c_proj.weight")] = torch.tensor(rng.standard_normal((d, 2 * d)),
                                                                        dtype=torch.float32)
        sd["visual.ln_post.weight"] = torch.zeros(d)
        out[f"task{t}"] = sd
    return out


# ---------------------------------------------------------------- Fig. 5a


def test_gsv_spectra_structure_and_triangle_inequality():
    rng = np.random.default_rng(0)
    vecs = _vectors(rng, 4)
    keys = [KEY.format(l=0, sub="attn.out_proj.weight"), KEY.format(l=1, sub="mlp.c_proj.weight")]
    spec = it.gsv_spectra(vecs, keys, pi=0.01)
    assert set(spec.key) == set(keys)
    assert list(dict.fromkeys(spec.matrix)) == ["task0", "task1", "task2", "task3", "average of 4"]
    assert (spec[spec.kind == "merged"].matrix == "average of 4").all()
    # c_proj (6 × 12, wide) is decomposed transposed: 6 shared directions, like the 6 × 6 out_proj
    assert spec.groupby("key").direction.nunique().tolist() == [6, 6]
    summary = it.gsv_summary(spec)
    # σ_avg,k ≤ mean_i σ_ik for every direction (the average's coefficients are the mean of the singles')
    for key in keys:
        sub = spec[spec.key == key]
        single = sub[sub.kind == "single"].pivot(index="direction", columns="matrix", values="sigma")
        merged = sub[sub.kind == "merged"].set_index("direction").sigma
        assert (merged <= single.mean(axis=1) * (1 + 1e-9) + 1e-12).all()
    assert (summary.coherence_median <= 1 + 1e-9).all() and (summary.merged_over_single < 1).all()
    assert set(summary.columns) >= {"srank_single", "srank_merged", "near_zero_single", "near_zero_merged",
                                    "frac_below_all"}


def test_gsv_identical_experts_are_fully_coherent():
    rng = np.random.default_rng(1)
    one = _vectors(rng, 1)["task0"]
    vecs = {"a": one, "b": {k: v.clone() for k, v in one.items()}, "c": {k: v.clone() for k, v in one.items()}}
    key = KEY.format(l=0, sub="attn.out_proj.weight")
    summary = it.gsv_summary(it.gsv_spectra(vecs, [key]))
    assert summary.coherence_median.iloc[0] == pytest.approx(1.0, abs=1e-8)
    assert summary.merged_over_single.iloc[0] == pytest.approx(1.0, abs=1e-8)
    assert summary.srank_merged.iloc[0] == pytest.approx(summary.srank_single.iloc[0], rel=1e-8)


# ---------------------------------------------------------------- expert selection


def _planted_alignment(names, good, bonus=1.0):
    """Alignment 0.1 everywhere, ``bonus`` more for every pair involving a 'good' expert."""
    a = np.full((len(names), len(names)), 0.1)
    for i, x in enumerate(names):
        for j, y in enumerate(names):
            if x in good or y in good:
                a[i, j] += bonus
    np.fill_diagonal(a, 0.0)
    return pd.DataFrame(a, index=names, columns=names)


class _Evaluator:
    """Fake merge + evaluate: accuracy of a task is 0.5 + 0.1·(number of 'good' experts merged)."""

    def __init__(self, good):
        self.good, self.calls = set(good), []

    def __call__(self, merged, eval_tasks):
        self.calls.append(tuple(merged))
        acc = 0.5 + 0.1 * len(self.good & set(merged)) / max(1, len(merged))
        df = pd.DataFrame(dict(task=list(eval_tasks), accuracy=acc, normalized_accuracy=acc / 0.9))
        return 0.3, df


def test_run_selection_structure_determinism_and_planted_choice():
    sizes = it.PROFILE_SIZES["ci"]
    proto = it.table5_protocol(NAMES20, sizes, seed=7)
    good = ["T04", "T07", "T09", "T12", "T15"]
    align = _planted_alignment(proto.alignment_tasks, good)
    ev = _Evaluator(good)
    run = it.run_selection(proto, align, ev, progress=False)
    assert run.selection.selected == good
    rows = run.rows
    assert len(rows) == 1 + sizes.table5_draws
    assert list(rows.kind) == ["HO-GSVD"] + ["Random"] * sizes.table5_draws
    assert list(rows.draw) == list(range(-1, sizes.table5_draws))
    for col in ("Pool accuracy", "Pool normalized", "Ext accuracy", "Ext normalized", "score", "alpha", "chosen"):
        assert col in rows
    assert rows["Pool accuracy"].iloc[0] == pytest.approx(100 * (0.5 + 0.1 * 5 / 8))
    assert set(run.per_task.task) == set(proto.eval_tasks)
    # every merged set contains the pool and k chosen candidates, evaluated on pool + external
    assert all(c[:3] == proto.pool and len(c) == 8 for c in ev.calls)
    # the same seed gives the same draws; another seed other draws
    again = it.run_selection(proto, align, _Evaluator(good), progress=False)
    assert list(again.rows.chosen) == list(rows.chosen)
    other = it.run_selection(it.table5_protocol(NAMES20, sizes, seed=8), align, _Evaluator(good), progress=False)
    assert list(other.rows.chosen)[1:] != list(rows.chosen)[1:]
    summary = it.selection_summary(run)
    assert list(summary.index) == ["Pool accuracy", "Pool normalized", "Ext accuracy", "Ext normalized"]
    assert summary.loc["Pool accuracy", "HO-GSVD beats"].endswith(f"of {sizes.table5_draws}")
    assert summary.loc["Pool accuracy", "Random mean"] == pytest.approx(rows["Pool accuracy"].iloc[1:].mean())
    vs = it.selection_vs_paper(run, TABLE5, {"Pool accuracy": 0, "Ext accuracy": 1})
    assert vs.loc["HO-GSVD", "paper: Pool accuracy"] == "75.7" and vs.loc["Random", "paper: Ext accuracy"] == "47.6"
    assert "±" in vs.loc["Random", "ours: Pool accuracy"]
    assert it.alignment_predicts_accuracy(run, "Pool accuracy") > 0.9  # planted: J and accuracy agree


def test_run_selection_reuses_repeated_sets_and_table10():
    sizes = it.PROFILE_SIZES["smoke"]
    proto = it.table10_protocol(["a", "b", "c"], it.chapter_sizes("smoke", 3, n_random_draws=6))
    ev = _Evaluator(["a"])
    run = it.run_selection(proto, _planted_alignment(["a", "b", "c"], ["a"]), ev, progress=False)
    assert len(run.rows) == 7 and sizes.table10_k == 2
    assert len(ev.calls) == len(set(map(frozenset, ev.calls))) == run.evaluations <= 3  # C(3, 2) sets at most
    assert "a" in run.selection.selected
    vs = it.selection_vs_paper(run, TABLE10, {"All accuracy": None})
    assert vs.loc["HO-GSVD", "paper: All accuracy"] == "69.7"


def test_selection_on_a_real_alignment_matrix():
    rng = np.random.default_rng(2)
    vecs = _vectors(rng, 4)
    align = alignment_matrix(vecs)
    proto = it.SelectionProtocol("t", ("task0",), ("task1", "task2", "task3"), 2, {"Pool": ("task0",)}, 3, 0)
    run = it.run_selection(proto, align, _Evaluator([]), progress=False)
    assert len(run.selection.selected) == 2 and set(run.selection.selected) <= set(proto.candidates)


# ---------------------------------------------------------------- Table 9


def test_table9_variants_and_beside_paper():
    variants = it.table9_variants(0.0, 0.02)
    assert [v.label for v in variants] == list(TABLE9_VIT_B32)
    ho = variants[-1]
    assert ho.method == "ho-sb" and ho.params == {"beta": 0.0, "pi": 0.02} and ho.boost_beta is None
    assert all(v.lines_b_grid for v in variants)
    assert all(v.boost_beta == 0.0 for v in variants[:3])
    with pytest.raises(ValueError, match="unknown Table 9 rows"):
        it.table9_variants(methods=["TA"])
    long = pd.DataFrame(dict(method=["TA+SB+LiNeS", "Higher-Order SB+LiNeS"] * 2, n_tasks=[8, 8, 14, 14],
                             accuracy=[70.0, 69.0, 60.0, 61.0]))
    t = it.table9_beside_paper(long, TABLE9_VIT_B32)
    assert list(t.index[:2]) == ["TA+SB+LiNeS", "Higher-Order SB+LiNeS"]
    assert t.loc["Higher-Order SB+LiNeS", "ours N=14"] == 61.0
    assert t.loc["CSM+SB+LiNeS", "paper (ViT-B/32) N=20"] == 77.2
    assert np.isnan(t.loc["CSM+SB+LiNeS", "ours N=8"])


def test_merged_similarity():
    rng = np.random.default_rng(3)
    a = _vectors(rng, 1)["task0"]
    keys = [k for k in a if "resblocks" in k]
    sim = it.merged_similarity(a, {k: 2 * v for k, v in a.items()}, keys)
    np.testing.assert_allclose(sim.cosine, 1.0, atol=1e-6)
    np.testing.assert_allclose(sim.spectral_ratio, 0.5, rtol=1e-6)
    neg = it.merged_similarity(a, {k: -v for k, v in a.items()}, keys)
    np.testing.assert_allclose(neg.cosine, -1.0, atol=1e-6)


def test_compare_to_random_hand_computed():
    rows = pd.DataFrame(dict(kind=["HO-GSVD", "Random", "Random", "Random", "Random"],
                             chosen=["x", "a", "b", "c", "d"], score=[1.0, 0.1, 0.2, 0.3, 0.4],
                             acc=[60.0, 50.0, 52.0, 54.0, 56.0]))
    run = it.SelectionRun(protocol=None, selection=None, rows=rows, per_task=pd.DataFrame())
    c = it.compare_to_random(run, "acc")
    assert c.ho == 60.0 and c.random_mean == 53.0 and c.draws == 4 and c.beats == 4
    assert c.random_std == pytest.approx(np.std([50, 52, 54, 56], ddof=1))
    assert c.stderr == pytest.approx(c.random_std / 2) and c.diff == pytest.approx(7.0)
    assert c.beyond_noise  # 7 > 2 · 1.29
    assert "7.0 points above" in c.sentence("the pool") and "beats 4 of them" in c.sentence("the pool")
    close = it.compare_to_random(it.SelectionRun(None, None, rows.assign(acc=[53.5, 50, 52, 54, 56]),
                                                 pd.DataFrame()), "acc")
    assert not close.beyond_noise and close.beats == 2
    one = it.compare_to_random(it.SelectionRun(None, None, rows.iloc[:2], pd.DataFrame()), "acc")
    assert one.draws == 1 and not one.beyond_noise and "std" not in one.sentence("x")
    same = it.compare_to_random(it.SelectionRun(None, None, rows.assign(acc=[60.0, 50, 50, 50, 50]),
                                                pd.DataFrame()), "acc")
    assert not same.beyond_noise and "cannot be estimated" in same.sentence("x")


def test_sizes_beside_paper_reads_the_papers_sizes():
    from subboost.chapters import hogsvd_alignment as ha

    table = ha.sizes_beside_paper(ha.chapter_sizes("ci", 20), 20, [8])
    assert table["paper"].tolist()[:8] == [8, 20, "3 / 14 / 3", 5, 10, "8 of 20", 20, "8, 14, 20"]  # paper Tables 5, 9, 10
    assert table.loc["Table 9: task counts N", "this run"] == "8"
    assert table.loc["Table 5: random draws", "this run"] == 8
