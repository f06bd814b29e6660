"""Real-checkpoint loading without downloads: a randomly initialised open_clip ViT-B-32 saved in
the public layouts, two tiny synthetic tasks, then load → merge → evaluate."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from subboost.evaluate import evaluate_delta
from subboost.merging import merge
from subboost.io import detect_layout
from subboost.io import load_state_dict as load_checkpoint
from subboost.release import (
    load_head_weight,
    load_suite,
    load_task_data,
    save_task_data,
)


def _fake_release_module(name: str) -> types.ModuleType:
    """A module standing in for the releases' ``src.*`` code (importable only while saving)."""
    mod = types.ModuleType(name)

    class ClassificationHead(torch.nn.Linear):
        def __init__(self, normalize: bool, weights: torch.Tensor) -> None:
            out_features, in_features = weights.shape
            super().__init__(in_features, out_features)
            self.normalize = normalize
            self.weight = torch.nn.Parameter(weights.clone())
            self.bias = torch.nn.Parameter(torch.zeros(out_features))

    class ImageEncoder(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

    ClassificationHead.__module__ = ImageEncoder.__module__ = name
    ClassificationHead.__qualname__, ImageEncoder.__qualname__ = "ClassificationHead", "ImageEncoder"
    mod.ClassificationHead, mod.ImageEncoder = ClassificationHead, ImageEncoder
    return mod


def _save_pickled(obj: object, path, module: types.ModuleType) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    parents = [module.__name__.rsplit(".", i)[0] for i in range(module.__name__.count(".") , 0, -1)]
    added = [p for p in parents if p not in sys.modules]
    for p in added:
        sys.modules[p] = types.ModuleType(p)
    sys.modules[module.__name__] = module
    try:
        torch.save(obj, path)
    finally:
        del sys.modules[module.__name__]  # as on a machine without the release's code
        for p in added:
            del sys.modules[p]


def _png_folder(root, task: str, split: str, n_per_class: int, classes: list[str], size: int, seed: int) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    for c in classes:
        d = root / task / split / c
        d.mkdir(parents=True)
        for i in range(n_per_class):
            arr = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(arr).save(d / f"{i}.png")


@pytest.fixture(scope="module")
def vit_b_32_release(tmp_path_factory):
    """tall_masks layout: ImageEncoder state dicts (``model.`` prefix, no text transformer),
    pickled heads, tasks MNIST (PNG folders) and Toy (.pt tensors)."""
    import open_clip

    root = tmp_path_factory.mktemp("release")
    torch.manual_seed(0)
    clip = open_clip.create_model("ViT-B-32", pretrained=None)
    base = {f"model.{k}": v for k, v in clip.state_dict().items() if not k.startswith("transformer.")}
    mdir = root / "ViT-B-32"
    (mdir / "MNISTVal").mkdir(parents=True)
    torch.save(base, mdir / "MNISTVal" / "nonlinear_zeroshot.pt")
    g = torch.Generator().manual_seed(1)
    touched = ["model.visual.transformer.resblocks.11.mlp.c_fc.weight", "model.visual.proj"]
    for task in ("MNIST", "Toy"):
        expert = dict(base)
        for k in touched:
            expert[k] = base[k] + 0.01 * torch.randn(base[k].shape, generator=g)
        (mdir / f"{task}Val").mkdir(parents=True, exist_ok=True)
        torch.save(expert, mdir / f"{task}Val" / "nonlinear_finetuned.pt")
    fake = _fake_release_module("src.modeling")
    for task, classes in (("MNIST", 3), ("Toy", 2)):
        w = torch.randn(classes, 512, generator=g)
        head = fake.ClassificationHead(True, w / w.norm(dim=1, keepdim=True) * 100)
        _save_pickled(head, mdir / f"head_{task}Val.pt", fake)
    data = root / "data"
    for split, seed in (("val", 5), ("test", 6)):
        _png_folder(data, "MNIST", split, 1, ["0", "1", "2"], 8, seed)
        imgs = torch.randint(0, 256, (2, 3, 16, 16), generator=g, dtype=torch.uint8)
        save_task_data(data, "Toy", split, imgs, torch.tensor([0, 1]), ["cat", "dog"])
    return root, touched


def test_pickled_heads_need_allow_pickle(vit_b_32_release):
    root, _ = vit_b_32_release
    assert detect_layout(root, "ViT-B-32") == "tall_masks"
    with pytest.raises(ValueError, match="head of task 'MNIST'.*allow_pickle=True"):
        load_suite(root, "ViT-B-32", device="cpu")  # refused before any work starts
    suite = load_suite(root, "ViT-B-32", device="cpu", probe=False)
    assert suite.task_names == ["MNIST", "Toy"]  # the paper's order first
    with pytest.raises(ValueError, match="--allow-pickle.*allow_pickle=True"):
        suite.head("MNIST")


def test_vit_b_32_load_merge_evaluate(vit_b_32_release):
    root, touched = vit_b_32_release
    suite = load_suite(root, "ViT-B-32", data_root=root / "data", allow_pickle=True, device="cpu")
    base = suite.base_state
    assert "visual.transformer.resblocks.0.attn.in_proj_weight" in base
    assert not any(k.startswith("model.") for k in base)
    assert suite.head("MNIST").shape == (3, 512)
    assert suite.data("MNIST", "test").images.shape == (3, 3, 224, 224)
    assert suite.data("Toy", "val").labels.tolist() == [0, 1]
    vectors = suite.task_vectors()
    changed = {k for k, v in vectors["MNIST"].items() if v.any()}
    assert changed == {k.removeprefix("model.") for k in touched}
    delta = merge(vectors, "ta")  # Subspace Boosting is exercised on the zoo (cheaper)
    df = evaluate_delta(suite, delta, 0.3, split="test")
    assert df.task.tolist() == ["MNIST", "Toy"]
    assert df.accuracy.between(0, 1).all() and df.normalized_accuracy.notna().all()
    assert 0.0 <= suite.finetuned_accuracy("Toy") <= 1.0


def test_missing_files_are_named(tmp_path):
    mdir = tmp_path / "ViT-B-32"
    (mdir / "DTDVal").mkdir(parents=True)
    torch.save({"model.visual.proj": torch.zeros(2, 2)}, mdir / "DTDVal" / "nonlinear_zeroshot.pt")
    with pytest.raises(FileNotFoundError, match=r"DTDVal/nonlinear_finetuned\.pt"):
        load_suite(tmp_path, "ViT-B-32", tasks=["DTD"])
    torch.save({"model.visual.proj": torch.ones(2, 2)}, mdir / "DTDVal" / "nonlinear_finetuned.pt")
    with pytest.raises(FileNotFoundError, match=r"head_DTDVal\.pt"):
        load_suite(tmp_path, "ViT-B-32", tasks=["DTD"])
    torch.save({"weight": torch.ones(3, 2)}, mdir / "head_DTDVal.pt")
    with pytest.raises(FileNotFoundError, match=r"data/DTD"):
        load_suite(tmp_path, "ViT-B-32", tasks=["DTD"])
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        load_suite(tmp_path, "ViT-L-14")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "nope.pt")
    assert load_head_weight(mdir / "head_DTDVal.pt").shape == (3, 2)
    torch.save({"weight": torch.ones(3, 2), "bias": torch.ones(3)}, mdir / "head_DTDVal.pt")
    with pytest.raises(ValueError, match="bias"):
        load_head_weight(mdir / "head_DTDVal.pt")


def test_task_vectors_layout_with_pickled_modules(tmp_path):
    """Older release: zeroshot.pt and {Task}/finetuned.pt are pickled ImageEncoder modules whose
    class cannot be imported at load time; a tiny registered open_clip config keeps it fast."""
    import open_clip

    from subboost.zoo import get_config, register

    cfg = get_config("smoke")
    name = register(cfg, tmp_path)
    torch.manual_seed(0)
    clip = open_clip.create_model(name, pretrained=None)
    fake = _fake_release_module("src.models.modeling")
    mdir = tmp_path / "ckpt" / name
    _save_pickled(fake.ImageEncoder(clip), mdir / "zeroshot.pt", fake)
    for task in ("SVHN", "GTSRB"):
        with torch.no_grad():
            clip.visual.proj.add_(0.01)
        _save_pickled(fake.ImageEncoder(clip), mdir / task / "finetuned.pt", fake)
        w = torch.randn(4, cfg.embed_dim)
        _save_pickled(fake.ClassificationHead(True, w), mdir / f"head_{task}.pt", fake)
        for split in ("val", "test"):
            save_task_data(tmp_path / "data", task, split, torch.randint(0, 256, (5, 3, 40, 40), dtype=torch.uint8),
                           torch.tensor([0, 1, 2, 3, 0]))
    with pytest.raises(ValueError, match="allow_pickle"):
        load_checkpoint(mdir / "zeroshot.pt")
    suite = load_suite(tmp_path / "ckpt", name, data_root=tmp_path / "data", allow_pickle=True, device="cpu")
    assert suite.info["layout"] == "task_vectors"
    assert suite.task_names == ["GTSRB", "SVHN"]  # paper order: GTSRB before SVHN
    tv = suite.task_vectors()
    assert torch.allclose(tv["SVHN"]["visual.proj"], torch.full_like(tv["SVHN"]["visual.proj"], 0.01), atol=1e-6)
    assert torch.allclose(tv["GTSRB"]["visual.proj"], torch.full_like(tv["GTSRB"]["visual.proj"], 0.02), atol=1e-6)
    df = evaluate_delta(suite, merge(tv, "ta"), 0.5)
    assert len(df) == 2
    # images were resized from 40 to the model's 32
    assert suite.data("SVHN", "val").images.shape[-1] == cfg.image_size


def test_image_folder_class_order(tmp_path):
    _png_folder(tmp_path, "T", "val", 1, ["10", "2", "1"], 4, 0)
    d = load_task_data(tmp_path, "T", "val", image_size=4)
    assert d.labels.tolist() == [1, 2, 10]  # integer folder names are the head's rows
    assert d.classnames == tuple(str(i) for i in range(11))
    (tmp_path / "T" / "classes.txt").write_text("2\n10\n1\n")
    d = load_task_data(tmp_path, "T", "val", image_size=4)
    assert d.classnames == ("2", "10", "1")
    assert d.images.dtype == torch.uint8 and d.images.shape == (3, 3, 4, 4)
    d = load_task_data(tmp_path, "T", "val", image_size=8, max_samples=2)
    assert d.images.shape == (2, 3, 8, 8) and d.labels.tolist() == [0, 1]
