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


def _numbers_run(label: str, ta: dict, sb: dict, ranks: dict, ho: float, random: list[float]) -> zc.HeadlineRun:
    results = pd.DataFrame(
        [dict(method="Zero-shot", n_tasks=n, accuracy=10.0) for n in ta]
        + [dict(method="TA", n_tasks=n, accuracy=a) for n, a in ta.items()]
        + [dict(method="TA+SB", n_tasks=n, accuracy=a) for n, a in sb.items()])
    rank_rows = pd.DataFrame([dict(n_tasks=n, stable_rank=r) for n, rs in ranks.items() for r in rs])
    rows = pd.DataFrame([dict(kind="HO-GSVD", **{"Pool accuracy": ho})]
                        + [dict(kind="Random", **{"Pool accuracy": r}) for r in random])

    class Selection:
        pass

    sel = Selection()
    sel.rows = rows
    return zc.HeadlineRun(label, results, pd.DataFrame(), rank_rows, sel, {},
                          {cid: claims.Verdict(claims.PARTLY, "r", "o") for cid in zc.HEADLINE_CLAIMS})


def test_seed_spread_mean_and_standard_error_by_hand():
    a = _numbers_run("s0", {8: 50.0, 20: 40.0}, {8: 56.0, 20: 43.0}, {8: [2.0, 4.0]}, 60.0, [50.0, 54.0])
    b = _numbers_run("s1", {8: 54.0, 20: 40.0}, {8: 58.0, 20: 45.0}, {8: [4.0, 4.0]}, 58.0, [52.0, 52.0])
    spread = zc.seed_spread([a, b])
    assert spread.loc["TA accuracy, N=8", "mean"] == pytest.approx(52.0)
    # two values 50, 54: sample std 2·√2, standard error 2·√2 / √2 = 2
    assert spread.loc["TA accuracy, N=8", "standard error"] == pytest.approx(2.0)
    assert spread.loc["TA accuracy, N=20", "standard error"] == pytest.approx(0.0)
    assert spread.loc["TA+SB − TA, N=8", "mean"] == pytest.approx((6.0 + 4.0) / 2)
    assert spread.loc["TA+SB − TA, N=20", "min"] == pytest.approx(3.0)
    assert spread.loc["TA mean stable rank, N=8", "mean"] == pytest.approx((3.0 + 4.0) / 2)
    assert spread.loc["random draws, pool accuracy (mean)", "mean"] == pytest.approx(52.0)
    assert spread.loc["HO-GSVD selection, pool accuracy", "max"] == pytest.approx(60.0)
    assert (spread.seeds == 2).all()
    assert "Zero-shot accuracy, N=8" not in spread.index
    assert zc.seed_spread([a]).empty


def test_seed_sentence_names_seed_dependent_verdicts():
    a = _run("seed 0", {cid: claims.PARTLY for cid in zc.HEADLINE_CLAIMS})
    b = _run("seed 1", {**{cid: claims.PARTLY for cid in zc.HEADLINE_CLAIMS}, "sb-lines": claims.REPRODUCED})
    assert zc.seed_sentence([a, a]).endswith("all 6 headline verdicts are the same on every seed.")
    assert "1 of 6 headline verdicts depend on the seed: sb-lines (partly on seed 0, reproduced on seed 1)" in \
        zc.seed_sentence([a, b])
    assert "One expert seed" in zc.seed_sentence([a])


def test_seed_zoos_share_everything_but_the_experts_seed():
    from subboost.zoo.build import get_config, pretraining_key

    book = get_config("ci")
    (label, cfg), = zc.seed_zoos("ci", [0, 3])
    assert label == "zoo v3, expert seed 3" and cfg.expert_seed == 3 and book.expert_seed == 0
    assert pretraining_key(cfg) == pretraining_key(book)  # the base is shared, not retrained
    assert cfg.dirname() != book.dirname()
    assert zc.seed_zoos("ci", None) == []  # ci: the book's zoo only
    # an unset finetune_seed leaves the config's hash (and so every cached zoo's folder) as before
    assert "finetune_seed" not in book.to_json() and cfg.to_json()["finetune_seed"] == 3


def test_ta_normalised_sentence_against_the_papers_ratios():
    from subboost import paper

    theirs = [100 * a / f for a, f in zip(paper.TABLE1_VIT_B32["TA"], paper.TABLE1_VIT_B32["Fine-tuned"])]
    v2 = {"ta_normalised_8": theirs[0] - 10, "ta_normalised_14": theirs[1] - 12, "ta_normalised_20": theirs[2] - 4}
    v3 = {"ta_normalised_8": theirs[0] - 11, "ta_normalised_14": theirs[1] - 11, "ta_normalised_20": theirs[2] - 2}
    text = zc.ta_normalised_sentence({"zoo v2": v2, "zoo v3": v3})
    assert "Zoo v3 is 2.0–11.0 points below the paper's at every count" in text
    assert f"changes by {(theirs[2] - 2) - (theirs[0] - 11):+.1f} points from 8 to 20 tasks" in text
    assert "moved it by at most 2.0 points" in text
    assert "keep less of their experts' accuracy" in text and "unlike them" not in text  # both fall with N
    assert "wider or deeper model" in text and "wider or deeper" not in zc.ta_normalised_sentence({"z": v3}, "full")
    flat = {k: theirs[0] - 20 for k in v3}  # flat in N while the paper's falls
    assert "unlike them, do not lose more as N grows" in zc.ta_normalised_sentence({"z": flat})
    assert "not measured" in zc.ta_normalised_sentence({"z": {"ta_normalised_8": 50.0}})


def test_one_seed_sentence_names_the_unmeasured_zoo_changes():
    run = _run("zoo v3", {cid: claims.PARTLY for cid in zc.HEADLINE_CLAIMS})
    text = zc.seed_sentence([run], ["rank-accuracy", "sb-lines"])
    assert "(rank-accuracy, sb-lines)" in text and "not measured" in text
    assert "not measured" not in zc.seed_sentence([run])
