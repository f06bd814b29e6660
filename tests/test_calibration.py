"""Calibration measures on small hand-made task vectors with known answers."""

import math

import pandas as pd
import pytest
import torch

from subboost import calibration as C
from subboost import paper

KEY = "visual.transformer.resblocks.0.mlp.c_fc.weight"
BIAS = "visual.transformer.resblocks.0.mlp.c_fc.bias"
TEXT = "transformer.resblocks.0.mlp.c_fc.weight"


def _vec(w, b=None, text=None):
    return {KEY: torch.as_tensor(w, dtype=torch.float32),
            BIAS: torch.as_tensor(b if b is not None else [0.0, 0.0], dtype=torch.float32),
            TEXT: torch.zeros(2, 2) if text is None else torch.as_tensor(text, dtype=torch.float32)}


def test_orthogonal_vectors_have_cosine_zero_and_parallel_one():
    vecs = {"a": _vec([[1.0, 0.0], [0.0, 0.0]]), "b": _vec([[0.0, 2.0], [0.0, 0.0]]),
            "c": _vec([[3.0, 0.0], [0.0, 0.0]])}
    sim = C.pairwise_cosine(vecs)
    assert sim.loc["a", "b"] == pytest.approx(0.0)
    assert sim.loc["a", "c"] == pytest.approx(1.0)
    assert sim.loc["b", "c"] == pytest.approx(0.0)
    pairs = C.off_diagonal(sim)
    assert len(pairs) == 3 and pairs.mean() == pytest.approx(1 / 3) and pairs.max() == pytest.approx(1.0)


def test_cosine_hand_computed_and_spans_all_changed_keys():
    # flattened over the matrix and the bias: a = (1, 1, 0, 0 | 1, 0), b = (1, 0, 0, 0 | 0, 1)
    vecs = {"a": _vec([[1.0, 1.0], [0.0, 0.0]], b=[1.0, 0.0]), "b": _vec([[1.0, 0.0], [0.0, 0.0]], b=[0.0, 1.0])}
    assert C.changed_keys(vecs) == [KEY, BIAS]  # the untouched (text) key is left out
    sim = C.pairwise_cosine(vecs)
    assert sim.loc["a", "b"] == pytest.approx(1 / (math.sqrt(3) * math.sqrt(2)))
    assert sim.loc["a", "b"] == pytest.approx(C.pairwise_cosine(vecs, keys=[KEY, BIAS, TEXT]).loc["a", "b"])


def test_zero_task_vector_has_cosine_zero():
    vecs = {"a": _vec([[1.0, 0.0], [0.0, 0.0]]), "z": _vec([[0.0, 0.0], [0.0, 0.0]])}
    assert C.pairwise_cosine(vecs).loc["a", "z"] == 0.0
    with pytest.raises(ValueError):
        C.pairwise_cosine({"a": vecs["a"]})


def test_rank_one_matrix_keeps_all_energy_at_rank_one():
    m = torch.outer(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, -1.0, 0.5, 2.0]))
    s = torch.linalg.svdvals(m.double())
    assert C.energy_retained(s, 1) == pytest.approx(1.0)
    assert C.rank_fraction_for_energy(s, 0.99) == pytest.approx(1 / 3)
    assert torch.allclose(C.truncate_matrix(m, 1), m, atol=1e-5)


def test_energy_and_rank_fraction_of_a_known_spectrum():
    s = torch.tensor([3.0, 2.0, 1.0, 0.0])  # σ² = 9, 4, 1, 0; total 14
    assert C.energy_retained(s, 0) == 0.0
    assert C.energy_retained(s, 1) == pytest.approx(9 / 14)
    assert C.energy_retained(s, 2) == pytest.approx(13 / 14)
    assert C.rank_fraction_for_energy(s, 0.9) == pytest.approx(2 / 4)  # 13/14 ≥ 0.9 > 9/14
    assert C.rank_fraction_for_energy(s, 0.99) == pytest.approx(3 / 4)
    assert C.energy_retained(torch.zeros(3), 1) == 1.0


def test_storage_rank():
    assert C.storage_rank((768, 768), 0.10) == 38  # 0.1·768²/1536 = 38.4
    assert C.storage_rank((512, 128), 0.10) == 10  # 0.1·65536/640 = 10.24
    assert C.storage_rank((4, 4), 0.10) == 1  # at least one direction
    assert C.storage_rank((4, 6), 1.0) == 2  # 24/10 = 2.4
    with pytest.raises(ValueError):
        C.storage_rank((4, 4), 0.0)


def test_truncate_task_vector_only_touches_block_matrices():
    torch.manual_seed(0)
    w = torch.randn(20, 20)
    delta = {KEY: w, BIAS: torch.randn(20), TEXT: torch.zeros(20, 20)}
    out = C.truncate_task_vector(delta, 0.10)  # k = floor(0.1·400/40) = 1
    assert torch.equal(out[BIAS], delta[BIAS]) and torch.equal(out[TEXT], delta[TEXT])
    sv = torch.linalg.svdvals(out[KEY].double())
    assert sv[1] < 1e-5 * sv[0]  # rank 1 up to float32 rounding
    u, s, vh = torch.linalg.svd(w.double())
    assert torch.allclose(out[KEY].double(), s[0] * torch.outer(u[:, 0], vh[0]), atol=1e-5)
    assert torch.equal(delta[KEY], w)  # input untouched


def test_relative_size_over_trained_keys():
    base = {KEY: torch.full((2, 2), 2.0), BIAS: torch.zeros(2), TEXT: torch.full((2, 2), 100.0)}
    delta = _vec([[1.0, 0.0], [0.0, 0.0]])  # text part zero: left out
    assert C.relative_size(base, delta) == pytest.approx(1 / 4)  # ‖Δ‖ = 1, ‖W0‖ = 4
    assert C.relative_size(base, delta, keys=[KEY, TEXT]) == pytest.approx(1 / math.sqrt(16 + 40000))
    blocks = C.block_table(base, {"a": delta})
    assert list(blocks.key) == [KEY]  # the zero text matrix is skipped
    assert blocks.relative_size.iloc[0] == pytest.approx(0.25) and blocks.energy_at_k.iloc[0] == pytest.approx(1.0)


def test_stable_rank_trend():
    ranks = pd.DataFrame(dict(n_tasks=[4, 4, 4, 20, 20, 20], key=["a", "b", "c"] * 2,
                              stable_rank=[5.0, 3.0, 2.0, 4.0, 3.5, 1.0]))
    t = C.stable_rank_trend(ranks)
    assert t["mean_stable_rank_4"] == pytest.approx(10 / 3) and t["mean_stable_rank_20"] == pytest.approx(8.5 / 3)
    assert t["share_falling"] == pytest.approx(2 / 3)


def test_calibration_table_status_and_sources():
    table = C.calibration_table({"alpha_ta_8": 0.05, "alpha_ta_20": 0.3, "lowrank_accuracy_retained": 0.995,
                                 "stable_rank_share_falling": 0.4, "cosine_mean": 0.2}).set_index("quantity")
    assert table.loc["alpha_ta_8", "status"] == "outside"  # below the paper's grid
    assert table.loc["alpha_ta_20", "status"] == "inside"
    assert table.loc["lowrank_accuracy_retained", "status"] == "inside"
    assert table.loc["stable_rank_share_falling", "status"] == "outside"
    assert table.loc["cosine_mean", "status"] == "no range"  # plotted only: no number to compare
    assert table.loc["relative_size", "status"] == "not measured"
    assert (table.source.str.len() > 0).all()
    # Table 1 values come from subboost.paper, not typed here
    assert table.loc["finetuned_8", "published"] == f"{paper.TABLE1_VIT_B32['Fine-tuned'][0]:g}"
    assert C.table1_normalised("TA")[0] == pytest.approx(100 * 69.7 / 90.5)


def test_comparison_table_has_a_column_and_a_status_per_suite():
    table = C.comparison_table({"zoo v2": {"alpha_ta_20": 0.05, "stable_rank_share_falling": 0.7},
                                "zoo v3": {"alpha_ta_20": 0.3}})
    row = table.set_index("quantity").loc["alpha_ta_20"]
    assert (row["zoo v2"], row["status zoo v2"]) == (0.05, "outside")
    assert (row["zoo v3"], row["status zoo v3"]) == (0.3, "inside")
    falling = table.set_index("quantity").loc["stable_rank_share_falling"]
    assert falling["status zoo v2"] == "inside" and falling["status zoo v3"] == "not measured"
    assert list(table.columns[-4:]) == ["zoo v2", "zoo v3", "status zoo v2", "status zoo v3"]
    assert len(table) == len(C.published_values())
