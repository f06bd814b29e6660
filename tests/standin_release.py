"""A stand-in for the public checkpoint releases, written with the authors' save semantics.

What the releases are (read from nik-dim/tall_masks and mlfoundations/task_vectors):

- ``tall_masks``: ``{model}/{Task}Val/nonlinear_finetuned.pt`` is ``torch.save`` of the state
  dict of the ``ImageEncoder`` wrapper (keys ``model.*``, the text transformer deleted), heads
  ``{model}/head_{Task}Val.pt`` are pickled ``src.models.modeling.ClassificationHead`` modules,
  and the public 20-task release ships **no** zero-shot base;
- ``task_vectors``: ``{model}/zeroshot.pt`` and ``{model}/{Task}/finetuned.pt`` are whole pickled
  ``src.modeling.ImageEncoder`` modules (torchvision transforms and ``cache_dir`` inside), heads
  ``{model}/head_{Task}.pt`` pickled ``src.modeling.ClassificationHead`` modules;
- data in the authors' torchvision folders (``dtd/{train,val}``, ``EuroSAT_splits/{train,val,test}``,
  ``sun397/{train,val}``), the test split of DTD and SUN397 being their ``val`` folder.

The authors' classes are recreated in a temporary ``src`` package on ``sys.path``, which is
removed (and purged from ``sys.modules``) before anything is loaded, as on a user's machine.
The model is a tiny random-weight open_clip ViT registered from ``{root}/{model}.json``. Each
class of each task is a fixed random pattern plus noise, and each head row is the expert's mean
normalised feature of its class, so a correct loader gives the experts high accuracy and a
wrong class order gives low accuracy.
"""

from __future__ import annotations

import contextlib
import json
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

MODEL = "standin-vit-tiny"
CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}
# task → (authors' folder of the training split, of the test split, of a ready validation split or None, classes)
TASKS: dict[str, tuple[str, str, str | None, list[str]]] = {
    "DTD": ("dtd/train", "dtd/val", None, ["banded", "blotchy", "braided", "bubbly"]),
    "EuroSAT": ("EuroSAT_splits/train", "EuroSAT_splits/test", "EuroSAT_splits/val",
                ["AnnualCrop", "Forest", "Highway"]),
    "SUN397": ("sun397/train", "sun397/val", None, ["a_abbey", "a_airport", "b_bakery", "b_bar", "c_canal"]),
    # special formats: GTSRB test images in one folder labelled by a CSV; RESISC45 one folder + split lists
    "GTSRB": ("gtsrb/GTSRB/Training", "gtsrb/GTSRB/Final_Test/Images", None, ["00000", "00001", "00002"]),
    "RESISC45": ("resisc45/NWPU-RESISC45", "resisc45/NWPU-RESISC45", None, ["airplane", "beach", "river"]),
}

_SRC_FILES = {
    "src/__init__.py": "",
    "src/models/__init__.py": "",
    "src/models/modeling.py": '''
        import torch


        class ImageEncoder(torch.nn.Module):
            def __init__(self, model, keep_lang=False):
                super().__init__()
                self.model = model
                self.cache_dir = "/authors/cache"
                if not keep_lang and hasattr(self.model, "transformer"):
                    delattr(self.model, "transformer")


        class ClassificationHead(torch.nn.Linear):
            def __init__(self, normalize, weights, biases=None):
                output_size, input_size = weights.shape
                super().__init__(input_size, output_size)
                self.normalize = normalize
                self.weight = torch.nn.Parameter(weights.clone())
                self.bias = torch.nn.Parameter(torch.zeros_like(self.bias) if biases is None else biases.clone())
        ''',
    "src/modeling.py": '''
        import torch


        class ImageEncoder(torch.nn.Module):
            def __init__(self, model, train_preprocess, val_preprocess, keep_lang=False):
                super().__init__()
                self.model = model
                self.train_preprocess = train_preprocess
                self.val_preprocess = val_preprocess
                self.cache_dir = "/authors/cache"
                if not keep_lang and hasattr(self.model, "transformer"):
                    delattr(self.model, "transformer")


        class ClassificationHead(torch.nn.Linear):
            def __init__(self, normalize, weights, biases=None):
                output_size, input_size = weights.shape
                super().__init__(input_size, output_size)
                self.normalize = normalize
                self.weight = torch.nn.Parameter(weights.clone())
                self.bias = torch.nn.Parameter(torch.zeros_like(self.bias) if biases is None else biases.clone())
        ''',
}


@contextlib.contextmanager
def authors_src(where: Path) -> Iterator[tuple[object, object]]:
    """The authors' ``src.models.modeling`` and ``src.modeling``, importable only inside."""
    import importlib

    pkg_root = where / "authors_code"
    for rel, text in _SRC_FILES.items():
        path = pkg_root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    sys.path.insert(0, str(pkg_root))
    try:
        yield importlib.import_module("src.models.modeling"), importlib.import_module("src.modeling")
    finally:
        sys.path.remove(str(pkg_root))
        for name in [m for m in sys.modules if m == "src" or m.startswith("src.")]:
            del sys.modules[name]
        importlib.invalidate_caches()


@dataclass(frozen=True)
class StandIn:
    """Where a written stand-in release lives."""

    root: Path  # checkpoint root: {root}/{model}/... and {root}/{model}.json
    model: str
    layout: str
    tasks: tuple[str, ...]
    authors_data: Path  # the authors' data folders
    base_file: Path | None  # open_clip state dict of the base (tall_masks: the user supplies it)


def _register(root: Path) -> None:
    from subboost.zoo.model import register_model_config

    register_model_config(MODEL, CONFIG, root)


def _patterns(task_index: int, n_classes: int, size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + task_index)
    return torch.randint(0, 256, (n_classes, 3, size, size), generator=g, dtype=torch.uint8)


def _samples(patterns: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((n,) + tuple(patterns.shape[1:]), generator=g) * 12
    return (patterns.float() + noise).clamp(0, 255).to(torch.uint8)


def _write_png(path: Path, image: torch.Tensor) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(path)


def write_authors_data(location: Path, tasks: tuple[str, ...], per_class: dict[str, int] | None = None,
                       size: int = 40) -> None:
    """Authors' data folders for ``tasks``: ``per_class`` training images per class (default 10),
    3 test images per class (EuroSAT: also 2 in its own ``val`` folder)."""
    for ti, task in enumerate(tasks):
        train_dir, test_dir, val_dir, classes = TASKS[task]
        pats = _patterns(ti, len(classes), size)
        n_train = (per_class or {}).get(task, 10)
        if task in ("GTSRB", "RESISC45"):
            _write_special(location, task, pats, n_train, ti)
            continue
        for ci, c in enumerate(classes):
            for split_dir, n, seed in ((train_dir, n_train, 1), (test_dir, 3, 2), (val_dir, 2, 3)):
                if split_dir is None:
                    continue
                imgs = _samples(pats[ci:ci + 1], n, seed * 1000 + ti * 50 + ci)
                for i in range(n):
                    _write_png(location / split_dir / c / f"{c}_{i:04d}.png", imgs[i])


def _write_special(location: Path, task: str, pats: torch.Tensor, n_train: int, ti: int) -> None:
    from PIL import Image

    train_dir, test_dir, _, classes = TASKS[task]
    if task == "GTSRB":  # .ppm training images (and a per-class CSV that is not an image), CSV-labelled test
        rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
        for ci, c in enumerate(classes):
            imgs = _samples(pats[ci:ci + 1], n_train + 2, 4000 + ti * 50 + ci)
            d = location / train_dir / c
            d.mkdir(parents=True, exist_ok=True)
            (d / f"GT-{c}.csv").write_text("not an image\n")
            for i in range(n_train):
                Image.fromarray(imgs[i].permute(1, 2, 0).numpy()).save(d / f"00000_{i:05d}.ppm")
            for i in range(2):
                name = f"{ci:02d}{i:03d}.ppm"
                t = location / test_dir / name
                t.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(imgs[n_train + i].permute(1, 2, 0).numpy()).save(t)
                rows.append(f"{name};40;40;0;0;39;39;{ci}")
        (location / "gtsrb" / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
        return
    train, test = [], []  # RESISC45: every image in its class folder, the split lists decide
    for ci, c in enumerate(classes):
        imgs = _samples(pats[ci:ci + 1], n_train + 3, 5000 + ti * 50 + ci)
        for i in range(n_train + 3):
            name = f"{c}_{i:03d}.jpg"
            _write_png(location / train_dir / c / name, imgs[i])
            (train if i < n_train else test).append(name)
    (location / "resisc45" / "resisc45-train.txt").write_text("\n".join(train) + "\n")
    (location / "resisc45" / "resisc45-test.txt").write_text("\n".join(test) + "\n")


@torch.no_grad()
def _class_means(clip: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, n: int) -> torch.Tensor:
    from subboost.evaluate import normalize_batch
    from subboost.release import _clip_resize

    x = _clip_resize(images.float() / 255.0, CONFIG["vision_cfg"]["image_size"])
    f = clip.visual(normalize_batch((x * 255).round().to(torch.uint8)))
    f = f / f.norm(dim=-1, keepdim=True)
    means = torch.stack([f[labels == c].mean(0) for c in range(n)])
    return means / means.norm(dim=-1, keepdim=True) * 100.0  # logit scale folded in, as in the releases


def write_standin(root: Path, layout: str = "tall_masks", tasks: tuple[str, ...] = ("DTD", "EuroSAT", "SUN397"),
                  base_in_release: bool | None = None, seed: int = 0) -> StandIn:
    """Write a stand-in release under ``root`` (checkpoints in ``root/release``, the authors'
    data in ``root/authors_data``). ``base_in_release`` defaults to the public releases' choice
    (tall_masks: no base; task_vectors: ``zeroshot.pt``); without it the base is written as a
    plain open_clip state dict to ``root/openclip_base.pt`` for the user to supply."""
    import open_clip

    from subboost.release import quiet_open_clip

    if base_in_release is None:
        base_in_release = layout == "task_vectors"
    release = root / "release"
    release.mkdir(parents=True)
    (release / f"{MODEL}.json").write_text(json.dumps(CONFIG, indent=2))
    _register(release)
    authors_data = root / "authors_data"
    write_authors_data(authors_data, tasks, size=40)
    with quiet_open_clip(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base_clip = open_clip.create_model(MODEL, pretrained=None)
    mdir = release / MODEL
    base_file = None
    if not base_in_release:
        base_file = root / "openclip_base.pt"
        torch.save(base_clip.state_dict(), base_file)
    g = torch.Generator().manual_seed(seed + 1)
    with authors_src(root) as (models_modeling, modeling):
        import torchvision.transforms as T

        preprocess = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()])
        if base_in_release:
            if layout == "task_vectors":
                enc = modeling.ImageEncoder(_copy(base_clip), preprocess, preprocess)
                _save(enc, mdir / "zeroshot.pt")
            else:
                enc = models_modeling.ImageEncoder(_copy(base_clip))
                _save(enc.state_dict(), mdir / "MNISTVal" / "nonlinear_zeroshot.pt")
        for ti, task in enumerate(tasks):
            expert = _copy(base_clip)
            for name, p in expert.visual.named_parameters():
                if p.ndim == 2 and "resblocks" in name:
                    p.data.add_(0.02 * p.data.std() * torch.randn(p.shape, generator=g))
            classes = TASKS[task][3]
            pats = _patterns(ti, len(classes), 40)
            imgs = torch.cat([_samples(pats[c:c + 1], 6, 7000 + c) for c in range(len(classes))])
            labels = torch.arange(len(classes)).repeat_interleave(6)
            weights = _class_means(expert, imgs, labels, len(classes))
            if layout == "task_vectors":
                _save(modeling.ImageEncoder(expert, preprocess, preprocess), mdir / task / "finetuned.pt")
                _save(modeling.ClassificationHead(True, weights), mdir / f"head_{task}.pt")
            else:
                _save(models_modeling.ImageEncoder(expert).state_dict(), mdir / f"{task}Val" / "nonlinear_finetuned.pt")
                _save(models_modeling.ClassificationHead(True, weights), mdir / f"head_{task}Val.pt")
    assert not any(m == "src" or m.startswith("src.") for m in sys.modules)
    return StandIn(release, MODEL, layout, tuple(tasks), authors_data, base_file)


def _copy(model: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model)


def _save(obj: object, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
