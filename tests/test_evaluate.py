"""Evaluation harness: exact checks on a hand-made suite, then the smoke zoo end to end."""

from __future__ import annotations

import pytest
import torch

from subboost.evaluate import (
    DEFAULT_ALPHAS,
    TaskData,
    VisionSuite,
    alpha_sweep,
    best_alpha,
    evaluate,
    evaluate_delta,
    merged_state,
    resolve_device,
    summarize,
    tune_and_test,
)
from subboost.merging import merge


class _Tower(torch.nn.Module):
    """A 'visual tower' whose features are a linear map of the flattened image."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(2, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x.flatten(1)[:, :2])


def _data(points: torch.Tensor, labels: list[int]) -> TaskData:
    # float images (already "normalised"): the tower reads the first two flattened values
    imgs = torch.zeros(points.shape[0], 3, 1, 1)
    imgs[:, 0, 0, 0] = points[:, 0]
    imgs[:, 1, 0, 0] = points[:, 1]
    return TaskData(imgs, torch.tensor(labels))


POINTS = torch.tensor([[1.0, 0.2], [0.9, -0.1], [0.2, 1.0], [-0.1, 0.8]])


def _toy_suite(counter: dict | None = None, accuracies=None) -> VisionSuite:
    base = {"visual.proj.weight": torch.eye(2), "text.w": torch.zeros(3)}
    # expert A swaps the features (learns the opposite labelling), expert B keeps identity
    experts = {"A": {"visual.proj.weight": torch.tensor([[0.0, 1.0], [1.0, 0.0]]), "text.w": torch.zeros(3)},
               "B": {"visual.proj.weight": 2 * torch.eye(2), "text.w": torch.zeros(3)}}
    labels = {"A": [1, 1, 0, 0], "B": [0, 0, 1, 1]}

    def load_expert(task: str):
        if counter is not None:
            counter[task] = counter.get(task, 0) + 1
        return experts[task]

    return VisionSuite(name="toy", model_name="toy", task_names=["A", "B"], load_base=lambda: base,
                       load_expert=load_expert, load_head=lambda t: torch.eye(2) * 100.0,
                       load_data=lambda t, s: _data(POINTS, labels[t]), make_visual=_Tower,
                       accuracies=accuracies, device="cpu", batch_size=3)


def test_evaluate_columns_accuracy_and_normalisation():
    suite = _toy_suite()
    assert suite.finetuned_accuracy("A") == 1.0 and suite.finetuned_accuracy("B") == 1.0
    assert suite.zeroshot_accuracy("A") == 0.0 and suite.zeroshot_accuracy("B") == 1.0
    df = evaluate(suite, suite.base_state)
    assert list(df.columns) == ["task", "accuracy", "normalized_accuracy"]
    assert df.accuracy.tolist() == [0.0, 1.0]
    assert df.attrs["mean_accuracy"] == 0.5 and summarize(df)["mean_normalized_accuracy"] == 0.5


def test_normalisation_uses_recorded_finetuned_accuracy():
    suite = _toy_suite(accuracies={"finetuned": {"B": 0.5, "BVal": 0.25}})
    df = evaluate(suite, suite.base_state, ["B"])
    assert df.normalized_accuracy.iloc[0] == pytest.approx(2.0)
    df = evaluate(suite, suite.base_state, ["B"], split="val")
    assert df.normalized_accuracy.iloc[0] == pytest.approx(4.0)


def test_experts_load_once_and_task_vectors():
    counter: dict = {}
    suite = _toy_suite(counter)
    tv = suite.task_vectors()
    suite.task_vectors(["B"])
    suite.expert_state("A")
    assert counter == {"A": 1, "B": 1}
    assert list(tv) == ["A", "B"]
    assert torch.equal(tv["B"]["visual.proj.weight"], torch.eye(2))
    assert not tv["A"]["text.w"].any()
    with pytest.raises(ValueError, match="unknown task"):
        suite.expert_state("C")
    with pytest.raises(ValueError, match="split"):
        suite.data("A", "train")


def test_alpha_sweep_and_tune_and_test():
    suite = _toy_suite()
    delta = merge(suite.task_vectors(), "ta")
    alphas = [0.0, 0.5, 1.0, 3.0]
    sweep = alpha_sweep(suite, delta, alphas=alphas)
    assert list(sweep.columns) == ["alpha", "task", "accuracy", "normalized_accuracy"]
    assert len(sweep) == 8 and set(sweep.alpha) == set(alphas)
    # θ0 + α(ΔA + ΔB) = [[1, α], [α, 1]]: α < 1 keeps B's labelling, α > 1 flips to A's
    by_alpha = sweep.pivot(index="alpha", columns="task", values="accuracy")
    assert by_alpha.loc[0.5].tolist() == [0.0, 1.0]
    assert by_alpha.loc[3.0].tolist() == [1.0, 0.0]
    alpha, test, sw = tune_and_test(suite, delta, alphas=alphas)
    means = sw.groupby("alpha").normalized_accuracy.mean()
    assert means[alpha] == means.max()
    assert alpha == min(a for a in alphas if means[a] == means.max())  # ties → smallest α
    assert test.attrs["alpha"] == alpha and sw.attrs["split"] == "val"
    assert test.equals(evaluate_delta(suite, delta, alpha))
    state = merged_state(suite, delta, 0.5)
    assert set(state) == {"visual.proj.weight"}
    assert torch.allclose(state["visual.proj.weight"], torch.tensor([[1.0, 0.5], [0.5, 1.0]]))
    assert evaluate_delta(suite, delta, 0.5).equals(evaluate(suite, state))
    assert DEFAULT_ALPHAS[0] == 0.1 and DEFAULT_ALPHAS[-1] == 1.0 and len(DEFAULT_ALPHAS) == 10


def test_best_alpha_prefers_the_smallest_of_ties():
    import pandas as pd

    sweep = pd.DataFrame(dict(alpha=[0.1, 0.1, 0.2, 0.2, 0.3, 0.3], task=["a", "b"] * 3,
                              accuracy=[0.5, 0.7, 0.6, 0.8, 0.6, 0.8],
                              normalized_accuracy=[0.5, 0.7, 0.6, 0.8, 0.6, 0.8]))
    assert best_alpha(sweep) == 0.2
    assert best_alpha(sweep, metric="accuracy") == 0.2


def test_taskdata_and_devices_are_checked():
    with pytest.raises(ValueError, match="images"):
        TaskData(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        TaskData(torch.zeros(2, 3, 4, 4), torch.zeros(3, dtype=torch.long))
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(ValueError):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            resolve_device("cuda")


def test_state_without_image_tower_is_refused():
    suite = _toy_suite()
    with pytest.raises(ValueError, match="visual"):
        evaluate(suite, {"text.w": torch.zeros(3)})


# ---------------------------------------------------------------- the smoke zoo, end to end


@pytest.fixture(scope="module")
def smoke_suite():
    from subboost.zoo import load_suite

    return load_suite("smoke", device="cpu", progress=False)


def test_smoke_suite_reproduces_recorded_accuracies(smoke_suite):
    suite = smoke_suite
    assert suite.task_names == ["Shapes", "Textures", "Orientation"]
    ref = suite.reference()
    base_df = evaluate(suite, suite.base_state)
    assert base_df.accuracy.tolist() == pytest.approx(ref.zeroshot.tolist(), abs=1e-9)
    t = suite.task_names[0]
    df = evaluate(suite, suite.expert_state(t), [t])
    assert df.accuracy.iloc[0] == pytest.approx(suite.finetuned_accuracy(t), abs=1e-9)
    assert df.normalized_accuracy.iloc[0] == pytest.approx(1.0)


def test_smoke_suite_merge_tune_and_test(smoke_suite):
    suite = smoke_suite
    vectors = suite.task_vectors()
    for method, beta in (("ta", None), ("ta", 0.0)):
        delta = merge(vectors, method, boost_beta=beta)
        alpha, test, sweep = tune_and_test(suite, delta, suite.task_names, alphas=(0.3, 0.6, 1.0))
        assert alpha in (0.3, 0.6, 1.0)
        assert len(test) == 3 and len(sweep) == 9
        assert test.accuracy.between(0, 1).all()
