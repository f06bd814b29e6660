"""The claims' verdict rules, on hand-made inputs on both sides of every threshold, and the
chapter records behind the findings page."""

from __future__ import annotations

import json
import math

import pytest

from subboost import claims as C
from subboost import paper

R, P, N, T = C.REPRODUCED, C.PARTLY, C.NOT_REPRODUCED, C.NOT_TESTABLE
eps = 1e-9


def test_rank_collapse():
    assert C.rank_collapse({4: 10.0, 8: 8.0, 20: 5.0}, share_falling=C.RANK_FALLING_SHARE).verdict == R
    assert C.rank_collapse({4: 10.0, 8: 8.0, 20: 5.0}, share_falling=C.RANK_FALLING_SHARE - eps).verdict == P
    assert C.rank_collapse({4: 10.0, 8: 11.0, 20: 5.0}, share_falling=0.9).verdict == P  # not monotone
    assert C.rank_collapse({4: 10.0, 20: 10.0}, share_falling=0.9).verdict == N
    assert C.rank_collapse({4: 10.0}, share_falling=1.0).verdict == T
    v = C.rank_collapse({8: 6.0, 4: 10.0}, share_falling=0.75)
    assert "10 → 6" in v.ours and "75%" in v.ours and "N = 4 → 8" in v.ours


def test_rank_accuracy_pearson_thresholds():
    # y = x gives r = 1; hand-made series with r just around the thresholds
    assert C.rank_accuracy([1, 2, 3], [1, 2, 3]).verdict == R
    assert C.rank_accuracy([1, 2, 3], [3, 2, 1]).verdict == N
    # x = (0, 1, 2), y = (0, 1.5, 1): sxy = 1, sxx = 2, syy = 7/6 → r = sqrt(3/7) ≈ 0.655
    a_mid = 1.5
    rv = C._pearson([0, 1, 2], [0, a_mid, 1])
    assert rv == pytest.approx(math.sqrt(3 / 7))
    assert C.WEAK_CORRELATION <= rv < C.STRONG_CORRELATION
    # y = (0, 3, 1): sxy = 1, syy = 14/3 → r = sqrt(3/28) ≈ 0.327, just above the weak threshold
    assert C._pearson([0, 1, 2], [0, 3, 1]) == pytest.approx(math.sqrt(3 / 28))
    assert C.rank_accuracy([0, 1, 2], [0, 3, 1]).verdict == P
    # y = (0, 4, 1): syy = 26/3 → r = sqrt(3/52) ≈ 0.240, below it
    assert C.rank_accuracy([0, 1, 2], [0, 4, 1]).verdict == N
    assert C.rank_accuracy([0, 1, 2], [0, a_mid, 1]).verdict == P
    assert C.rank_accuracy([1, 2], [1, 2]).verdict == T
    assert C.rank_accuracy([1, 2, 3], [5, 5, 5]).verdict == T
    with pytest.raises(ValueError, match="length"):
        C.rank_accuracy([1, 2, 3], [1, 2])


def test_pearson_against_hand_computation():
    # x = (1, 2, 3, 4), y = (2, 1, 4, 3): sxy = 3, sxx = syy = 5 → r = 0.6
    assert C._pearson([1, 2, 3, 4], [2, 1, 4, 3]) == pytest.approx(0.6)


def test_sb_raises_rank():
    assert C.sb_raises_rank({"TA": (2.0, 50.0), "TIES": (3.0, 40.0)}).verdict == R
    assert C.sb_raises_rank({"TA": (2.0, 50.0), "TIES": (3.0, 3.0)}).verdict == P
    assert C.sb_raises_rank({"TA": (2.0, 1.0)}).verdict == N
    assert C.sb_raises_rank({}).verdict == T


def test_sb_improves_merging():
    big = C.LARGE_GAIN
    assert C.sb_improves_merging({"TA": {8: big, 14: big}}).verdict == R
    assert C.sb_improves_merging({"TA": {8: big - eps, 14: big - eps}}).verdict == P
    assert C.sb_improves_merging({"TA": {8: 10.0, 14: -0.1}}).verdict == P  # mean large, one loss
    assert C.sb_improves_merging({"TA": {8: 1.0, 14: -1.0}}).verdict == N
    assert C.sb_improves_merging({}).verdict == T
    assert "mean +3.0" in C.sb_improves_merging({"TA": {8: 3.0}}).ours


def test_sb_lines_complementary():
    assert C.sb_lines_complementary({8: 80.0, 14: 70}, {8: 79.0, 14: 69}, {8: 78.0, 14: 60}).verdict == R
    assert C.sb_lines_complementary({8: 80.0, 14: 70}, {8: 79.0, 14: 70}, {8: 78.0, 14: 60}).verdict == P
    assert C.sb_lines_complementary({8: 80.0}, {8: 81.0}, {8: 70.0}).verdict == N
    assert C.sb_lines_complementary({8: 80.0}, {14: 81.0}, {8: 70.0}).verdict == T


def test_beta_robust():
    s, t = C.BETA_SPREAD, C.BETA0_TOLERANCE
    assert C.beta_robust({0.0: {8: 80.0}, 0.01: {8: 80.0 - s}}).verdict == R
    assert C.beta_robust({0.0: {8: 80.0}, 0.01: {8: 80.0 - s - 0.01}}).verdict == P  # spread too large, β=0 best
    assert C.beta_robust({0.0: {8: 80.0 - t}, 0.01: {8: 80.0}}).verdict == R
    assert C.beta_robust({0.0: {8: 80.0 - t - 0.01}, 0.01: {8: 80.0}}).verdict == P  # robust, β=0 not best
    assert C.beta_robust({0.0: {8: 70.0}, 0.01: {8: 80.0}}).verdict == N
    assert C.beta_robust({0.0: {8: 70.0}}).verdict == T
    assert C.beta_robust({0.01: {8: 70.0}, 0.02: {8: 70.5}}).verdict == P  # no β = 0: robust only


def test_both_layer_types():
    assert C.both_layer_types(86.5, 83.9, 87.7).verdict == R  # the paper's Table 3b
    assert C.both_layer_types(86.5, 83.9, 85.0).verdict == P
    assert C.both_layer_types(86.5, 83.9, 83.9).verdict == N


def test_matches_sota():
    tol = C.MATCH_TOLERANCE
    assert C.matches_sota({8: 80.0 - tol, 14: 75}, {8: 80.0, 14: 74}).verdict == R
    assert C.matches_sota({8: 80.0 - tol - 0.01, 14: 75}, {8: 80.0, 14: 74}).verdict == P
    assert C.matches_sota({8: 70.0}, {8: 80.0}).verdict == N
    assert C.matches_sota({8: 70.0}, {14: 80.0}).verdict == T


def test_merge_time():
    k = C.MIN_SPEEDUP
    assert C.merge_time(1.0, {"TSV-M": k, "Iso-CTS": 5.0}).verdict == R
    assert C.merge_time(1.0, {"TSV-M": k - 0.01}).verdict == P
    assert C.merge_time(1.0, {"TSV-M": 1.0}).verdict == N
    assert C.merge_time(0.0, {"TSV-M": 1.0}).verdict == T
    assert C.merge_time(1.0, {"TSV-M": float("nan")}).verdict == T
    assert "TSV-M 6.4×" in C.merge_time(9.7, {"TSV-M": 62.0}).ours


def test_prop1():
    lim = paper.PROP_EXPONENTS["prop1_unique"] + C.SLOPE_TOLERANCE
    assert C.prop1(10, 10, lim, -0.9).verdict == R
    assert C.prop1(10, 10, lim + 0.01, -0.9).verdict == P
    assert C.prop1(9, 10, -0.5, -0.9).verdict == N


def test_prop2():
    assert C.prop2(0.5, 0.01, -1.0).verdict == R
    assert C.prop2(0.5, 0.01, 0.1).verdict == P
    assert C.prop2(0.5, 0.5, -1.0).verdict == N


def test_prop3():
    lim = paper.PROP_EXPONENTS["prop3_ratio"] - C.SLOPE_TOLERANCE
    assert C.prop3(lim, C.ALPHA_INDEPENDENCE, 5, 5).verdict == R
    assert C.prop3(lim - 0.01, C.ALPHA_INDEPENDENCE, 5, 5).verdict == P
    assert C.prop3(lim, C.ALPHA_INDEPENDENCE * 10, 5, 5).verdict == P
    assert C.prop3(lim - 0.01, 1.0, 4, 5).verdict == N


def test_prop4():
    assert C.prop4(1.0, 16).verdict == R
    assert C.prop4(C.PROP4_PARTLY, 16).verdict == P
    assert C.prop4(C.PROP4_PARTLY - 0.01, 16).verdict == N
    assert C.prop4(1.0, 0).verdict == T


def test_n_gamma():
    g = C.GAMMA_TOLERANCE
    assert C.n_gamma(1.0 + g - eps, 0.5 - g + eps, real_vectors=True).verdict == R
    assert C.n_gamma(1.0 + g + 0.01, 0.5, real_vectors=True).verdict == N
    syn_ok = C.n_gamma(1.0, 0.5, real_vectors=False)
    syn_bad = C.n_gamma(1.0, 0.8, real_vectors=False)
    assert syn_ok.verdict == syn_bad.verdict == T
    assert "collapse as predicted" in syn_ok.reason and "do not collapse" in syn_bad.reason


def test_gsv_lower_rank():
    assert C.gsv_lower_rank(3, 3, 2.0, 4.0).verdict == R
    assert C.gsv_lower_rank(1, 3, 2.0, 4.0).verdict == P
    assert C.gsv_lower_rank(0, 3, 5.0, 4.0).verdict == N
    assert C.gsv_lower_rank(0, 0, 0.0, 0.0).verdict == T


def test_alignment_depth():
    assert C.alignment_depth([0.2, 0.2, 0.6], 1, 2).verdict == R  # half the sublayers rise
    assert C.alignment_depth([0.2, 0.2, 0.6], 1, 3).verdict == P  # fewer than half rise
    assert C.alignment_depth([0.3, 0.2, 0.4], 2, 2).verdict == P  # dips
    assert C.alignment_depth([0.5, 0.6, 0.4], 1, 1).verdict == N
    assert C.alignment_depth([0.5], 1, 1).verdict == T


def test_selection_beats_random_noise_threshold():
    # std 2, 4 draws → standard error 1, noise threshold 2 points
    assert C.selection_beats_random(52.0 + eps * 1e3, 50.0, 2.0, 4).verdict == R
    assert C.selection_beats_random(52.0, 50.0, 2.0, 4).verdict == P  # exactly 2 s.e.: not beyond
    assert C.selection_beats_random(49.0, 50.0, 2.0, 4).verdict == N
    assert C.selection_beats_random(60.0, 50.0, 2.0, 1).verdict == T
    assert C.selection_beats_random(60.0, 50.0, 0.0, 4).verdict == P  # no spread: noise unknown
    assert not C.beyond_noise(5.0, float("nan"), 4)


def test_higher_order_sb():
    gap = C.COMPETITIVE_GAP
    assert C.higher_order_sb({8: 80.0 - gap}, {8: 80.0}).verdict == R
    assert C.higher_order_sb({8: 80.0 - gap - 0.01, 14: 70}, {8: 80.0, 14: 70}).verdict == P
    assert C.higher_order_sb({8: 70.0}, {8: 80.0}).verdict == N
    assert C.higher_order_sb({}, {8: 80.0}).verdict == T


def test_language_sb():
    g = C.LARGE_GAIN
    assert C.language_sb(60.0, 61.0, 60.5, 60.0 + g).verdict == R
    assert C.language_sb(60.0, 61.0, 60.5, 60.0 + g - 0.01).verdict == P
    assert C.language_sb(60.0, 59.0, 60.5, 65.0).verdict == P
    assert C.language_sb(60.0, 59.0, 60.5, 59.0).verdict == N


def test_every_claim_is_well_formed():
    required = {"rank-collapse", "rank-accuracy", "sb-raises-rank", "sb-improves", "sb-lines", "beta",
                "layer-types", "sota", "merge-time", "prop1", "prop2", "prop3", "prop4", "n-gamma",
                "alignment-depth", "selection-pool", "selection-all", "higher-order-sb", "language"}
    assert required <= set(C.CLAIMS)
    for c in C.CLAIMS.values():
        assert c.statement and c.where and c.paper and c.rule_text and callable(c.rule)
        assert c.chapter[:2] in {"01", "02", "03", "04", "05"} and c.section.startswith("claim-")
    # the paper's numbers come from subboost.paper
    assert "+13.4/+10.8/+6.1" in C.CLAIMS["sb-improves"].paper
    assert "75.7 vs 72.9" in C.CLAIMS["selection-pool"].paper
    with pytest.raises(ValueError, match="verdict must be"):
        C.Verdict("maybe", "x")


def test_records_and_findings(tmp_path):
    rows = C.findings_rows(tmp_path)
    assert [r["id"] for r in rows] == list(C.CLAIMS)
    assert {r["verdict"] for r in rows} == {C.NOT_RUN}
    v = C.CLAIMS["prop4"].judge(agreement=1.0, cases=16)
    prov = dict(commit="abc", dirty=True, profile="smoke", device="cpu")
    path = C.write_record(tmp_path / "02_propositions", "02_propositions", {"prop4": v}, prov, suite="synthetic")
    assert json.loads(path.read_text())["verdicts"]["prop4"]["verdict"] == R
    rows = {r["id"]: r for r in C.findings_rows(tmp_path)}
    assert rows["prop4"]["verdict"] == R and rows["prop4"]["commit"] == "abc+" and rows["prop4"]["profile"] == "smoke"
    assert rows["prop1"]["verdict"] == C.NOT_RUN
    md = C.findings_markdown(list(rows.values()), linked=lambda ch: ch == "02_propositions")
    assert "{ref}`Supp. E, Eq. 29 <claim-prop4>`" in md and "<claim-table1>" not in md
    assert sum(ln.startswith("| ") for ln in md.splitlines()) == len(C.CLAIMS) + 1  # header + one row per claim
    assert "reproduced" in C.findings_text(list(rows.values()))
    assert C.short_suite("Suite('zoo:smoke-5c34', model='ZooViT', tasks=3)") == "zoo:smoke-5c34"
    assert C.short_suite("synthetic task vectors") == "synthetic task vectors"
    with pytest.raises(ValueError, match="belongs to chapter"):
        C.write_record(tmp_path, "01_rank_collapse", {"prop4": v})
    with pytest.raises(ValueError, match="unknown claim"):
        C.write_record(tmp_path, "02_propositions", {"nope": v})
    assert C.write_record(None, "02_propositions", {"prop4": v}) is None
