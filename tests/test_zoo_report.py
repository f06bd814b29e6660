"""The zoo report's thresholds, on a stub suite with hand-chosen accuracies."""

import pandas as pd
import pytest
import torch

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


# ----------------------------------------------------------------- calibration section

W = "visual.transformer.resblocks.0.mlp.c_fc.weight"


class TinySuite:
    """Two tasks, one 4×4 block matrix: A's task vector is rank 1, B's rank 2; an expert is
    'accurate' (0.9) only when evaluated with its own full task vector."""

    task_names = ["A", "B"]

    def __init__(self):
        self.base_state = {W: torch.eye(4) * 2.0}
        a = torch.zeros(4, 4)
        a[0, 1] = 1.0
        b = torch.zeros(4, 4)
        b[2, 3], b[3, 2] = 1.0, 0.5
        self.vectors = {"A": {W: a}, "B": {W: b}}

    def task_vectors(self, tasks=None):
        return {t: dict(self.vectors[t]) for t in (tasks or self.task_names)}

    def accuracy(self, state, task, split="test"):
        own = self.base_state[W] + self.vectors[task][W]
        return 0.9 if torch.allclose(state[W], own, atol=1e-6) else 0.0

    def finetuned_accuracy(self, task, split="test"):
        return 0.9


def test_calibration_measurements_on_a_tiny_suite():
    from subboost.zoo.report import calibration_measurements

    config = dict(finetune_lr=1e-4, finetune_steps=100, finetune_batch=32, finetune_weight_decay=0.1,
                  finetune_warmup=10)
    m = calibration_measurements(TinySuite(), config)
    assert m["cosine_mean"] == pytest.approx(0.0) and m["cosine_max"] == pytest.approx(0.0)  # disjoint supports
    # storage rank of a 4×4 matrix at 10% is 1: A (rank 1) survives whole, B (rank 2) does not
    assert m["lowrank_accuracy_retained"] == pytest.approx(0.5)
    assert m["lowrank_energy_at_10pct"] == pytest.approx((1.0 + 1.0 / 1.25) / 2)
    assert m["rank_fraction_99"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    # ‖W0‖ = 4; ‖ΔA‖ = 1, ‖ΔB‖ = √1.25
    assert m["relative_size"] == pytest.approx((0.25 + 1.25 ** 0.5 / 4) / 2)
    assert m["finetune_lr"] == 1e-4 and m["finetune_warmup_share"] == pytest.approx(0.1)
    assert "alpha_ta_8" not in m and "mean_stable_rank_4" not in m  # two tasks: no merges of 8 or 4


def test_calibration_written_as_csv_and_markdown(tmp_path):
    from subboost.calibration import calibration_table
    from subboost.zoo.report import markdown_table, write_calibration

    table = calibration_table({"alpha_ta_8": 0.05, "cosine_mean": 0.123456})
    csv_path, md_path = write_calibration(table, tmp_path / "out")
    back = pd.read_csv(csv_path)
    assert list(back.quantity) == list(table.quantity)
    md = md_path.read_text().splitlines()
    assert md[0].startswith("| quantity |") and len(md) == len(table) + 2
    assert "| 0.123 |" in markdown_table(table.iloc[:1][["quantity", "zoo"]].assign(zoo=[0.123456]))
