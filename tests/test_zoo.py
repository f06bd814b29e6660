"""The mini zoo: tasks, tokenizer, model config, and a real build of the smoke profile."""

from __future__ import annotations

from dataclasses import replace
import json
import re
from pathlib import Path

import pytest
import torch

from subboost.io import load_state_dict
from subboost.zoo import TASK_NAMES, TASKS, build, generate, get_config, get_task, zoo_dir
from subboost.zoo import render as R
from subboost.zoo.model import WordTokenizer, build_head, create_model, split_words
from subboost.zoo.tasks import pretraining_batch, vocabulary


def test_twenty_tasks_in_fixed_order():
    assert len(TASKS) == 20
    assert len(set(TASK_NAMES)) == 20
    assert TASK_NAMES[:3] == ("Shapes", "Textures", "Orientation")
    counts = [t.num_classes for t in TASKS]
    assert min(counts) == 2 and max(counts) >= 10
    for t in TASKS:
        assert len(set(t.classnames)) == t.num_classes, t.name
        assert all("{}" in tmpl for tmpl in t.templates), t.name
    with pytest.raises(ValueError, match="unknown zoo task"):
        get_task("NoSuchTask")


@pytest.mark.parametrize("task", TASK_NAMES)
def test_generate_is_seeded_balanced_and_uint8(task):
    x, y = generate(task, 40, "val", seed=3)
    x2, y2 = generate(task, 40, "val", seed=3)
    x3, _ = generate(task, 40, "val", seed=4)
    assert x.dtype == torch.uint8 and x.shape == (40, 3, 32, 32)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, x3)
    c = get_task(task).num_classes
    counts = torch.bincount(y, minlength=c)
    assert int(counts.max() - counts.min()) <= 1
    assert x.float().std() > 5  # not blank


def test_splits_differ_and_digit_pools_are_disjoint():
    a, _ = generate("Digits", 20, "train", seed=0)
    b, _ = generate("Digits", 20, "test", seed=0)
    assert not torch.equal(a, b)
    pools = {s: R.digit_pool(s)[0] for s in ("train", "val", "test")}
    assert sum(p.shape[0] for p in pools.values()) == 1797
    flat = {s: {tuple(img.flatten().tolist()) for img in p} for s, p in pools.items()}
    # sklearn's digits contain a few exact duplicates; pools are split by index, so overlap is tiny
    assert len(flat["train"] & flat["test"]) <= 3


def test_rune_alphabet_is_fixed_and_distinct():
    p = R.rune_prototypes(10)
    assert p.shape == (10, 3, 4)
    assert torch.equal(p, R.rune_prototypes(10))


def test_tokenizer_covers_every_prompt_and_pools_at_eot():
    tok = WordTokenizer(tuple(vocabulary()), 24)
    assert tok.eot == tok.vocab_size - 1 and tok.sot == tok.vocab_size - 2
    for t in TASKS:
        for prompts in t.prompts():
            ids = tok(prompts)
            assert not (ids == WordTokenizer.UNK).any(), (t.name, prompts)
            assert (ids.argmax(dim=1) == (ids != 0).sum(dim=1) - 1).all()  # EOT is the largest id
    g = torch.Generator().manual_seed(0)
    images, captions = pretraining_batch(16, g)
    assert images.shape == (16, 3, 32, 32) and len(captions) == 16
    for c in captions:
        assert WordTokenizer.UNK not in tok.encode(c), c
    assert split_words("A Red, circle.") == ["a", "red", "circle"]
    assert WordTokenizer.from_json(tok.to_json()) == tok


def test_model_config_has_vit_b_32_key_names(tmp_path):
    import open_clip

    cfg = get_config("smoke")
    from subboost.zoo.build import architecture

    model = create_model(cfg.model_name, architecture(cfg), tmp_path, seed=0)
    keys = set(model.state_dict())
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert cfg.model_name in open_clip.list_models()
    # ViT-B-32's own config with small sizes: key names do not depend on widths
    ref_cfg = open_clip.get_model_config("ViT-B-32")
    ref_cfg["vision_cfg"].update(width=64, layers=cfg.layers)
    ref_cfg["text_cfg"].update(width=64, layers=1, vocab_size=100)
    ref = open_clip.CLIP(**ref_cfg)

    def strip_deep(k: str, layers: int) -> bool:
        m = re.search(r"resblocks\.(\d+)\.", k)
        return m is None or int(m.group(1)) < layers

    ref_keys = {k for k in ref.state_dict() if k.startswith("visual.") and strip_deep(k, cfg.layers)}
    ours = {k for k in keys if k.startswith("visual.")}
    assert ours == ref_keys
    # same seed, same initial weights
    again = create_model(cfg.model_name, architecture(cfg), tmp_path, seed=0)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())


def test_heads_are_normalised_averages_times_logit_scale(tmp_path):
    cfg = get_config("smoke")
    from subboost.zoo.build import architecture, tokenizer_for

    model = create_model(cfg.model_name, architecture(cfg), tmp_path, seed=0)
    tok = tokenizer_for(cfg)
    spec = get_task("Shapes")
    head = build_head(model, tok, spec.classnames, spec.templates)
    assert head.shape == (8, cfg.embed_dim)
    scale = float(model.logit_scale.exp().detach())
    assert torch.allclose(head.norm(dim=1), torch.full((8,), scale), rtol=1e-5)
    with torch.no_grad():
        e = model.encode_text(tok(spec.prompts()[2]))
        e = e / e.norm(dim=-1, keepdim=True)
        m = e.mean(0)
        expected = m / m.norm() * scale
    assert torch.allclose(head[2], expected, atol=1e-5)


@pytest.fixture(scope="module")
def smoke_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    out = build("smoke", root=root, device="cpu", progress=False, workers=2)  # experts in 2 processes
    return root, out


def test_smoke_build_writes_the_public_layout(smoke_zoo):
    root, out = smoke_zoo
    cfg = get_config("smoke")
    assert out == zoo_dir(cfg, root) and out.name.startswith("smoke-")
    m = out / cfg.model_name
    base = m / f"{cfg.tasks[0]}Val" / "nonlinear_zeroshot.pt"
    assert base.is_file() and base.with_suffix(".safetensors").is_file()
    for task in cfg.tasks:
        for f in (m / f"{task}Val" / "nonlinear_finetuned.pt", m / f"head_{task}Val.pt",
                  out / "data" / task / "val.pt", out / "data" / task / "test.pt"):
            assert f.is_file(), f
        assert f.with_suffix(".safetensors").is_file() or f.parent.parent.name == "data"
    pt = load_state_dict(m / f"{cfg.tasks[1]}Val" / "nonlinear_finetuned.pt")
    st = load_state_dict(m / f"{cfg.tasks[1]}Val" / "nonlinear_finetuned.safetensors")
    assert pt.keys() == st.keys() and all(torch.equal(pt[k], st[k]) for k in pt)
    acc = json.loads((m / "nonlinear_ft_accuracies.json").read_text())
    zs = json.loads((m / "zeroshot_accuracies.json").read_text())
    assert set(acc) == set(zs) == {k for t in cfg.tasks for k in (t, f"{t}Val")}
    assert all(0.0 <= v <= 1.0 for v in list(acc.values()) + list(zs.values()))
    summary = json.loads((out / "build.json").read_text())
    assert summary["config"] == cfg.to_json()
    # experts differ from the base only in the image tower
    b = load_state_dict(base)
    assert any(not torch.equal(pt[k], b[k]) for k in pt if k.startswith("visual."))
    assert all(torch.equal(pt[k], b[k]) for k in pt if not k.startswith("visual."))


def test_rebuild_is_a_no_op(smoke_zoo):
    root, out = smoke_zoo
    stamp = (out / "build.json").stat().st_mtime_ns
    assert build("smoke", root=root, device="cpu", progress=False) == out  # found, not rebuilt (same stamp)
    assert (out / "build.json").stat().st_mtime_ns == stamp


def test_resume_after_interruption_gives_the_same_expert(smoke_zoo):
    root, out = smoke_zoo
    cfg = get_config("smoke")
    m = out / cfg.model_name
    task = cfg.tasks[-1]
    before = load_state_dict(m / f"{task}Val" / "nonlinear_finetuned.pt")
    # simulate an interrupted build: the last expert and the done-mark are missing
    for f in (m / f"{task}Val" / "nonlinear_finetuned.pt", m / f"{task}Val" / "accuracy.json", out / "build.json"):
        f.unlink()
    build("smoke", root=root, device="cpu", progress=False)
    after = load_state_dict(m / f"{task}Val" / "nonlinear_finetuned.pt")
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)


def test_a_zoo_differing_only_in_its_experts_shares_the_base(smoke_zoo, tmp_path):
    """A recipe variant finds the finished zoo with the same pretraining and copies its base:
    the base files are byte-identical, the experts follow the variant's own recipe, and a zoo
    with other pretraining finds nothing to share."""
    import shutil

    from subboost.zoo.build import find_shared_base

    root, out = smoke_zoo
    cfg = get_config("smoke")
    variant = replace(cfg, profile="smoke-probe", finetune_lr=cfg.finetune_lr / 2, finetune_weight_decay=0.1)
    own_root = tmp_path / "root"
    shutil.copytree(out, own_root / out.name)  # keep the module's zoo untouched
    assert find_shared_base(variant, own_root) == own_root / out.name / cfg.model_name / f"{cfg.tasks[0]}Val" / \
        "nonlinear_zeroshot.pt"
    assert find_shared_base(get_config("smoke", pretrain_steps=cfg.pretrain_steps + 1), own_root) is None
    lines = []
    got = build(variant, root=own_root, device="cpu", progress=False, log=lines.append, workers=1)
    assert any("same pretraining" in line for line in lines)
    assert not json.loads((got / "build.json").read_text())["timings"].get("pretrain_s")
    rel = cfg.model_name + f"/{cfg.tasks[0]}Val/nonlinear_zeroshot"
    for suffix in (".pt", ".safetensors"):
        assert (got / (rel + suffix)).read_bytes() == (out / (rel + suffix)).read_bytes()
    a = load_state_dict(out / cfg.model_name / f"{cfg.tasks[0]}Val" / "nonlinear_finetuned.pt")
    b = load_state_dict(got / cfg.model_name / f"{cfg.tasks[0]}Val" / "nonlinear_finetuned.pt")
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("visual."))
    # heads depend on the base only: the same heads
    head = f"head_{cfg.tasks[1]}Val.pt"
    assert torch.equal(load_state_dict(out / cfg.model_name / head)["weight"],
                       load_state_dict(got / cfg.model_name / head)["weight"])


def test_prefetched_pretraining_batches_are_the_same_batches():
    from subboost.zoo.train import pretraining_batches

    inline = list(pretraining_batches(3, 8, seed=5, image_size=32, workers=0))
    ahead = list(pretraining_batches(3, 8, seed=5, image_size=32, workers=1))
    other = next(iter(pretraining_batches(1, 8, seed=6, image_size=32, workers=0)))
    assert len(ahead) == 3
    for (xa, ca), (xb, cb) in zip(inline, ahead):
        assert torch.equal(xa, xb) and ca == cb
    assert not torch.equal(inline[0][0], other[0])


def test_config_hash_names_the_folder():
    a = get_config("smoke")
    b = get_config("smoke", seed=1)
    assert a.digest() != b.digest()
    assert a.digest() == get_config("smoke").digest()
    with pytest.raises(ValueError, match="unknown zoo profile"):
        get_config("huge")


def test_rebuild_from_scratch_gives_the_same_numbers(smoke_zoo, tmp_path):
    _, out = smoke_zoo
    cfg = get_config("smoke")
    again = build("smoke", root=tmp_path, device="cpu", progress=False, workers=1)  # experts in sequence
    for rel in (f"{cfg.tasks[0]}Val/nonlinear_zeroshot.pt", f"{cfg.tasks[0]}Val/nonlinear_finetuned.pt",
                f"head_{cfg.tasks[1]}Val.pt"):
        a = load_state_dict(out / cfg.model_name / rel)
        b = load_state_dict(again / cfg.model_name / rel)
        assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), rel
    acc_a = json.loads((out / cfg.model_name / "nonlinear_ft_accuracies.json").read_text())
    acc_b = json.loads((again / cfg.model_name / "nonlinear_ft_accuracies.json").read_text())
    assert acc_a == pytest.approx(acc_b, abs=1e-9)


def test_cli_path_and_build_no_op(smoke_zoo, capsys):
    from subboost.zoo.__main__ import main

    root, out = smoke_zoo
    assert main(["path", "--profile", "smoke", "--root", str(root)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert main(["build", "--profile", "smoke", "--root", str(root), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert str(out) in text and "mean zero-shot" in text


def test_default_root_outside_a_checkout_is_a_user_cache(tmp_path, monkeypatch):
    """An installed package (no pyproject.toml beside it) caches zoos under XDG_CACHE_HOME, never
    inside site-packages; in a checkout the cache is zoo_cache/ at the repository root."""
    import importlib.util
    import shutil

    from subboost import zoo_common

    monkeypatch.delenv("SUBBOOST_ZOO_ROOT", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert zoo_common.default_root() == Path(zoo_common.__file__).resolve().parents[1] / "zoo_cache"
    site = tmp_path / "site-packages" / "subboost"
    site.mkdir(parents=True)
    shutil.copy(zoo_common.__file__, site / "zoo_common.py")
    spec = importlib.util.spec_from_file_location("installed_zoo_common", site / "zoo_common.py")
    installed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(installed)
    assert installed.default_root() == tmp_path / "xdg" / "subboost" / "zoo"
    monkeypatch.setenv("SUBBOOST_ZOO_ROOT", str(tmp_path / "mine"))
    assert installed.default_root() == tmp_path / "mine"
