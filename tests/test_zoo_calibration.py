"""The appendix's comparison of zoos: which verdicts changed, which values lie outside their range."""

from __future__ import annotations

import pandas as pd
import pytest

from subboost import calibration as C, claims
from subboost.chapters import zoo_calibration as zc


def _run(label: str, verdicts: dict[str, str]) -> zc.HeadlineRun:
    empty = pd.DataFrame()
    return zc.HeadlineRun(label, empty, empty, empty, None, {},
                          {cid: claims.Verdict(v, "reason", f"{label} numbers") for cid, v in verdicts.items()})


def test_verdict_comparison_marks_changed_claims_and_names_them():
    same = {cid: claims.PARTLY for cid in zc.HEADLINE_CLAIMS}
    other = dict(same, beta=claims.REPRODUCED)
    table = zc.verdict_comparison([_run("zoo v2", same), _run("zoo v3", other)])
    assert list(table.index) == list(zc.HEADLINE_CLAIMS)
    assert table["same verdict"].tolist() == [cid != "beta" for cid in zc.HEADLINE_CLAIMS]
    assert table.loc["beta", "zoo v3: verdict"] == claims.REPRODUCED
    assert table.loc["beta", "zoo v2: ours"] == "zoo v2 numbers"
    text = zc.changes_sentence(table, ["zoo v2", "zoo v3"])
    assert text == ("1 of 6 headline verdicts change with the zoo: beta (partly on zoo v2, reproduced on zoo v3). "
                    "The other 5 stay the same.")
    unchanged = zc.verdict_comparison([_run("zoo v2", same), _run("zoo v3", same)])
    assert zc.changes_sentence(unchanged, ["zoo v2", "zoo v3"]) == "All 6 headline verdicts are the same on both zoos."
    all_changed = zc.verdict_comparison([_run("a", same), _run("b", {c: claims.NOT_REPRODUCED for c in same})])
    assert zc.changes_sentence(all_changed, ["a", "b"]).endswith("selection-pool (partly on a, not reproduced on b).")


def test_outside_sentence_counts_only_ranged_quantities():
    table = C.comparison_table({"zoo v2": {"alpha_ta_20": 0.05, "alpha_ta_8": 0.3, "cosine_mean": 0.02},
                                "zoo v3": {"alpha_ta_20": 0.2, "alpha_ta_8": 0.3}})
    v2 = zc.outside_sentence(table, "zoo v2")
    assert v2.startswith("1 of 2 quantities with a published range lie outside it")
    assert "TA α chosen on validation, 20 tasks" in v2
    assert zc.outside_sentence(table, "zoo v3").startswith("0 of 2 ") and v2.count("(outside:") == 1


def test_zoo_sets_name_the_profile():
    assert [z for _, z in zc.zoo_set("ci")] == ["ci-v2", "ci"]  # the chapters' zoo last
    with pytest.raises(ValueError, match="parameter 'profile'"):
        zc.zoo_set("huge")


def test_alpha_sentence_reads_the_measurements():
    same = zc.alpha_sentence({"zoo v2": {"alpha_ta_20": 0.05, "relative_size": 0.06},
                              "zoo v3": {"alpha_ta_20": 0.05, "relative_size": 0.03}})
    assert "0.05 on zoo v2 (relative size ‖Δ‖/‖θ0‖ 6.0%)" in same and "shrank by 2.0×" in same and "below" in same
    inside = zc.alpha_sentence({"a": {"alpha_ta_20": 0.3, "relative_size": 0.06},
                                "b": {"alpha_ta_20": 0.2, "relative_size": 0.03}})
    assert "shrank" not in inside and inside.endswith("lies inside the paper's grid (0.1 … 1).")
    assert "not measured" in zc.alpha_sentence({"a": {"relative_size": 0.1}})


def test_beta_note_names_zoos_where_beta_changes_nothing():
    def run(label, accs):
        betas = pd.DataFrame({"method": [f"TA+SB β={b}" for b in (0.0, 0.01, 0.02)] + ["Zero-shot"],
                              "accuracy": [*accs, 40.0]})
        return zc.HeadlineRun(label, pd.DataFrame(), betas, pd.DataFrame(), None, {})
    assert zc.beta_note([run("zoo v2", [55.0, 55.0, 55.0]), run("zoo v3", [55.0, 54.0, 55.0])]).startswith(
        "On zoo v2 every β")
    assert zc.beta_note([run("a", [1.0, 2.0, 3.0])]) == ""
