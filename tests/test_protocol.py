"""The one evaluation protocol (:mod:`subboost.evaluate`) on both kinds of suite.

The vision smoke zoo and the language smoke zoo go through the same functions. The reference
is what each zoo's build recorded on disk with its own training code (read here from the JSON
files, not through the suite): θ0 + 0·Δ is the base model, so every task must score its
recorded zero-shot accuracy; θ0 + 1·Δ_t is expert t, so task t must score its recorded
fine-tuned accuracy (normalised accuracy 1).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from subboost.evaluate import SPLITS, alpha_sweep, best_alpha, evaluate_delta, tune_and_test
from subboost.langzoo import model as lang_model


def _recorded_vision(suite) -> dict[str, dict[str, float]]:
    folder = Path(suite.info["checkpoint_root"]) / suite.model_name
    return {"zeroshot": json.loads((folder / "zeroshot_accuracies.json").read_text()),
            "finetuned": json.loads((folder / "nonlinear_ft_accuracies.json").read_text())}


def _recorded_language(suite) -> dict[str, dict[str, float]]:
    return json.loads((suite.folder / "accuracies.json").read_text())


@pytest.fixture(scope="module", params=["vision", "language"])
def smoke(request):
    """``(suite, recorded accuracies)`` of a smoke zoo (built into the cache if missing)."""
    if request.param == "vision":
        from subboost.zoo import load_suite

        suite = load_suite("smoke", device="cpu", progress=False)
        return suite, _recorded_vision(suite)
    if importlib.util.find_spec(lang_model.MODULE) is None:
        pytest.skip(f"{lang_model.PACKAGE} is not installed")
    from subboost.langzoo import load_suite

    suite = load_suite("smoke", device="cpu", progress=False)
    return suite, _recorded_language(suite)


def _key(task: str, split: str) -> str:
    return task if split == "test" else f"{task}Val"


def test_alpha_zero_is_the_base_and_alpha_one_the_expert(smoke):
    suite, recorded = smoke
    vectors = suite.task_vectors()
    for t in suite.task_names:
        for split in SPLITS:
            zero = evaluate_delta(suite, vectors[t], 0.0, suite.task_names, split)
            assert zero.accuracy.tolist() == [recorded["zeroshot"][_key(u, split)] for u in suite.task_names]
            one = evaluate_delta(suite, vectors[t], 1.0, [t], split)
            assert one.accuracy.iloc[0] == recorded["finetuned"][_key(t, split)]
            assert one.normalized_accuracy.iloc[0] == pytest.approx(1.0)


def test_sweep_and_tune_follow_the_protocol(smoke):
    """α chosen on validation by the best mean normalised accuracy (ties: the smaller α), then
    one test evaluation at that α. With one task's vector and α ∈ {0, 1} the choice is known
    from the recorded accuracies: the expert (α = 1) if it beats the base on validation."""
    suite, recorded = smoke
    vectors = suite.task_vectors()
    for t in suite.task_names:
        zs, ft = recorded["zeroshot"][_key(t, "val")], recorded["finetuned"][_key(t, "val")]
        expected = 1.0 if ft > zs else 0.0
        sweep = alpha_sweep(suite, vectors[t], [t], alphas=(0.0, 1.0), split="val")
        assert list(sweep.columns) == ["alpha", "task", "accuracy", "normalized_accuracy"]
        assert sweep.accuracy.tolist() == [zs, ft]
        assert best_alpha(sweep) == expected
        alpha, test, sw = tune_and_test(suite, vectors[t], [t], alphas=(0.0, 1.0))
        assert alpha == expected and sw.equals(sweep)
        kind = "finetuned" if expected == 1.0 else "zeroshot"
        assert test.accuracy.iloc[0] == recorded[kind][t]
        assert test.attrs["alpha"] == expected and test.attrs["split"] == "test"
