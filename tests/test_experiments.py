"""Results tables: the row format and the first-tasks (interference) column, on a stub suite
whose accuracies are set by hand."""

import pandas as pd
import pytest
import torch

from subboost import experiments as ex
from subboost.chapters import subspace_boosting


class StubSuite:
    """Three tasks, each of 100 examples labelled 0; a merge of N tasks (TA: Δm = Σ Δi = N·1)
    scores task t at normalised accuracy 1 − 0.1·(N − 1) on the first task and 0.9 elsewhere;
    the experts' own accuracy is 0.8, zero-shot 0.4. It implements the suite interface
    (:class:`subboost.evaluate.EvaluationSuite`) with hand-set predictions."""

    task_names = ["A", "B", "C"]
    base_state = {"w": torch.zeros(2, 2)}

    def task_vectors(self, tasks=None):
        return {t: {"w": torch.ones(2, 2)} for t in (tasks or self.task_names)}

    def finetuned_accuracy(self, task, split="test"):
        return 0.8

    def zeroshot_accuracy(self, task, split="test"):
        return 0.4

    def load_merged(self, delta, alpha):
        return round(float(delta["w"][0, 0]))  # the number of tasks merged

    def labels(self, task, split="test"):
        return torch.zeros(100, dtype=torch.long)

    def predict(self, n, task, split="test"):
        norm = 1 - 0.1 * (n - 1) if task == "A" else 0.9
        out = torch.zeros(100, dtype=torch.long)
        out[:round(100 * (1 - 0.8 * norm))] = 1  # wrong predictions
        return out


def test_results_table_first_tasks_column():
    long = ex.results_table(StubSuite(), [2, 3], [ex.Variant("TA", "ta", alpha_grid=(0.5,))], progress=False)
    ta = long[long.method == "TA"].set_index("n_tasks")
    # the first min(task_counts) = 2 tasks are A and B
    assert ta.loc[2, "first_normalized_accuracy"] == pytest.approx(100 * (0.9 + 0.9) / 2)
    assert ta.loc[3, "first_normalized_accuracy"] == pytest.approx(100 * (0.8 + 0.9) / 2)
    assert ta.loc[3, "normalized_accuracy"] == pytest.approx(100 * (0.8 + 0.9 + 0.9) / 3)
    zs = long[long.method == "Zero-shot"].set_index("n_tasks")
    assert zs.loc[3, "first_normalized_accuracy"] == pytest.approx(50.0)
    ft = long[long.method == "Fine-tuned"].set_index("n_tasks")
    assert ft.loc[2, "first_normalized_accuracy"] == pytest.approx(100.0)
    assert set(long.method) == {"Zero-shot", "Fine-tuned", "TA"}


@pytest.mark.slow
def test_benchmark_script_runs_and_reports_accuracy(tmp_path):
    """benchmarks/run.py through the book's helper: a table with the reference, ours and the
    largest relative error (timings are reported, never asserted)."""
    table = subspace_boosting.run_benchmarks(tmp_path, sections=("hogsvd",))
    assert set(table.section) == {"hogsvd"}
    assert len(table) == 2  # quick: N = 8 and 20
    assert (table.max_rel_err < 1e-10).all() and (table.eigenvalue_max_rel_err < 1e-8).all()
    assert (table.torch_route_max_rel_err < 1e-10).all()  # the batched torch (GPU) route too
    assert (table.ref_median_s > 0).all() and (table.ours_median_s > 0).all()
    assert (tmp_path / "benchmarks.json").is_file()


def test_beside_paper_left_join_and_all_rows():
    ours = pd.DataFrame({"ours 8": [70.0, 60.0]}, index=pd.Index(["TA", "Ours only"], name="method"))
    paper = pd.DataFrame({"paper 8": [69.7, 77.2]}, index=["TA", "Paper only"])
    left = ex.beside_paper(ours, paper)
    assert list(left.index) == ["TA", "Ours only"]
    assert left.loc["TA", "paper 8"] == 69.7 and pd.isna(left.loc["Ours only", "paper 8"])
    both = ex.beside_paper(ours, paper, all_rows=True)
    assert list(both.index) == ["TA", "Ours only", "Paper only"]
    assert pd.isna(both.loc["Paper only", "ours 8"]) and both.loc["Paper only", "paper 8"] == 77.2


def test_task_counts_for_smoke_and_fit():
    class Stub:
        task_names = ["a", "b", "c", "d"]

    assert ex.task_counts_for(Stub(), [20, 8], "smoke") == [2, 3]
    assert ex.task_counts_for(Stub(), [4, 2], "ci") == [2, 4]
    with pytest.raises(ValueError, match="'task_counts'"):
        ex.task_counts_for(Stub(), [2, 5], "ci")


def test_language_task_counts_skips_what_does_not_fit():
    from subboost.chapters.language import language_task_counts

    class Stub:
        task_names = ["a", "b", "c", "d", "e", "f"]

    assert language_task_counts(Stub(), [8, 2, 6, 4], "ci") == ([2, 4, 6], [8])
    assert language_task_counts(Stub(), [8, 2], "smoke") == ([2, 3], [])
    with pytest.raises(ValueError, match="'task_counts'"):
        language_task_counts(Stub(), [1, 8], "ci")


class CountingSuite(StubSuite):
    """The stub with a fingerprint (so its results may be cached) that counts evaluations."""

    def __init__(self, fingerprint="stub:1"):
        self.fingerprint = fingerprint
        self.device = "cpu"
        self.loads = 0

    def load_merged(self, delta, alpha):
        self.loads += 1
        return super().load_merged(delta, alpha)


def test_result_cache_reads_back_the_hand_computed_rows_without_evaluating(tmp_path):
    cache = ex.ResultCache(tmp_path / "cache")
    first = CountingSuite()
    ex.results_table(first, [2, 3], [ex.Variant("TA", "ta", alpha_grid=(0.5, 1.0))], progress=False, cache=cache)
    assert first.loads == 2 * (2 + 1)  # per N: two α on validation, one test
    assert len(list((tmp_path / "cache").glob("*.json"))) == 2
    again = CountingSuite()
    # another label, the same grid given to the table instead of the variant: the same merges
    long = ex.results_table(again, [2, 3], [ex.Variant("Task Arithmetic", "ta")], alpha_grid=(0.5, 1.0),
                            progress=False, cache=cache)
    assert again.loads == 0
    row = long[long.method == "Task Arithmetic"].set_index("n_tasks")
    assert row.loc[3, "normalized_accuracy"] == pytest.approx(100 * (0.8 + 0.9 + 0.9) / 3)
    assert row.loc[3, "first_normalized_accuracy"] == pytest.approx(100 * (0.8 + 0.9) / 2)
    assert row.loc[2, "accuracy"] == pytest.approx(100 * 0.8 * 0.9)
    assert list(long.columns) == list(ex.results_table(CountingSuite(), [2, 3], [ex.Variant("TA", "ta")],
                                                       alpha_grid=(0.5, 1.0), progress=False).columns)
    hit = ex.evaluate_variant(again, ["A", "B", "C"], ex.Variant("TA", "ta"), alpha_grid=(0.5, 1.0), cache=cache)
    assert again.loads == 0
    assert hit["per_task"].task.tolist() == ["A", "B", "C"]
    assert hit["per_task"].normalized_accuracy.tolist() == pytest.approx([0.8, 0.9, 0.9])
    assert hit["per_task"].attrs["alpha"] == 0.5 and hit["per_task"].attrs["split"] == "test"


@pytest.mark.parametrize("change", ["grid", "tasks", "params", "boost", "suite"])
def test_result_cache_misses_when_anything_the_row_depends_on_changes(tmp_path, change):
    cache = ex.ResultCache(tmp_path)
    base = dict(tasks=["A", "B"], variant=ex.Variant("TA", "ta"), grid=(0.5,), suite="stub:1")
    ex.evaluate_variant(CountingSuite(base["suite"]), base["tasks"], base["variant"], alpha_grid=base["grid"],
                        cache=cache)
    other = dict(base)
    other.update({"grid": dict(grid=(0.5, 1.0)), "tasks": dict(tasks=["A", "C"]),
                  "params": dict(variant=ex.Variant("TA", "ta", {"scale": 1.0})),
                  "boost": dict(variant=ex.Variant("TA", "ta", boost_beta=0.0)),
                  "suite": dict(suite="stub:2")}[change])
    suite = CountingSuite(other["suite"])
    if change in ("params", "boost"):  # the stub's merge ignores them: count evaluations only
        suite.load_merged = lambda delta, alpha, s=suite: (setattr(s, "loads", s.loads + 1), 2)[1]
    try:
        ex.evaluate_variant(suite, other["tasks"], other["variant"], alpha_grid=other["grid"], cache=cache)
    except TypeError:  # "scale" is not a TA option: the merge ran, so the cache missed
        assert change == "params"
        return
    assert suite.loads > 0


def test_result_cache_skips_suites_without_a_fingerprint(tmp_path):
    cache = ex.ResultCache(tmp_path)
    ex.results_table(StubSuite(), [2], [ex.Variant("TA", "ta", alpha_grid=(0.5,))], progress=False, cache=cache)
    assert list(tmp_path.iterdir()) == []


def test_selection_evaluator_shares_the_cache_and_keys_on_the_evaluation_tasks(tmp_path):
    from subboost.chapters.hogsvd_alignment import merge_and_evaluate

    cache = ex.ResultCache(tmp_path)
    first = CountingSuite()
    alpha, df = merge_and_evaluate(first, ex.Variant("TA+SB(β=0.0)", "ta"), [0.5, 1.0], cache)(["A", "B"], ["A", "C"])
    assert first.loads == 2 + 1 and alpha == 0.5
    again = CountingSuite()
    evaluator = merge_and_evaluate(again, ex.Variant("TA+SB", "ta"), (0.5, 1.0), cache)  # another label
    alpha2, df2 = evaluator(["A", "B"], ["A", "C"])
    assert again.loads == 0 and alpha2 == alpha
    # merging A and B: task A scores normalised 0.9 (n = 2), C 0.9; accuracy = 0.8 · 0.9
    assert df2.task.tolist() == ["A", "C"] and df2.accuracy.tolist() == pytest.approx([0.72, 0.72])
    evaluator(["A", "B"], ["A", "B"])  # other evaluation tasks: evaluated (two α, one test)
    assert again.loads == 3
    # a row of evaluate_variant with the same merged tasks is a different key
    assert ex.evaluate_variant(again, ["A", "B"], ex.Variant("TA", "ta"), alpha_grid=(0.5, 1.0), cache=cache)
    assert again.loads == 3 + 3


def test_lines_variant_chooses_b_and_alpha_on_validation_and_tests_once():
    """Three LiNeS b × two α on validation, then one test evaluation at the choice (not one per b)."""
    suite = CountingSuite()
    suite.load_merged = lambda delta, alpha, s=suite: (setattr(s, "loads", s.loads + 1), 2)[1]
    row = ex.evaluate_variant(suite, ["A", "B"], ex.Variant("TA+LiNeS", "ta", lines_b_grid=(0.0, 0.5, 1.0)),
                              alpha_grid=(0.5, 1.0))
    assert suite.loads == 3 * 2 + 1
    assert row["lines_b"] == 0.0 and row["alpha"] == 0.5  # every (b, α) ties here: the first of each grid
    assert row["per_task"].attrs["alpha"] == 0.5
