"""The zoo report's thresholds, on a stub suite with hand-chosen accuracies."""

import pandas as pd
import pytest

from subboost.zoo.report import ZooReport, expert_table


class StubSuite:
    task_names = ["A", "B", "C", "D"]

    def reference(self, tasks=None, split="test"):
        return pd.DataFrame(dict(task=self.task_names, num_classes=[2, 4, 10, 5], chance=[0.5, 0.25, 0.1, 0.2],
                                 zeroshot=[0.50, 0.90, 0.30, 0.80], finetuned=[0.95, 0.96, 0.39, 0.85]))


def test_expert_table_marks_specialised_experts():
    df = expert_table(StubSuite())
    assert df.gain.round(2).tolist() == [0.45, 0.06, 0.09, 0.05]
    # A: +45 points; B: +6 points but ≥ 95%; C: +9 points and 39%; D: +5 points and 85%
    assert df.specialised.tolist() == [True, True, False, False]


def test_checks_against_targets():
    experts = expert_table(StubSuite())
    inter = pd.DataFrame(dict(method=["TA", "TA", "TA+SB", "TA+SB"], n_tasks=[8, 20, 8, 20],
                              shared_normalized_accuracy=[70.0, 61.5, 75.0, 70.0]))
    rep = ZooReport(build={"timings": {"total_s": 540.0}}, experts=experts, interference=inter)
    checks = rep.checks().set_index("check")
    assert checks.loc["build time (s)", "met"]
    assert checks.loc["mean fine-tuned accuracy", "measured"] == pytest.approx((0.95 + 0.96 + 0.39 + 0.85) / 4)
    assert not checks.loc["mean fine-tuned accuracy", "met"]  # 0.7875 < 0.85
    assert checks.loc["mean zero-shot gap", "measured"] == pytest.approx(0.1625)
    assert not checks.loc["specialised experts", "met"]
    drop = [c for c in checks.index if c.startswith("TA interference")][0]
    assert checks.loc[drop, "measured"] == pytest.approx(8.5) and checks.loc[drop, "met"]
    slow = ZooReport(build={"timings": {"total_s": 601.0}}, experts=experts, interference=None).checks()
    assert not slow.set_index("check").loc["build time (s)", "met"] and len(slow) == 4
