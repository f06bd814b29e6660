"""Real checkpoints: the public open_clip task-vector releases, loaded from a local folder.

Nothing is downloaded. Files are found and read by :mod:`subboost.io`: the two public
layouts (``tall_masks`` and ``task_vectors``, detected with ``layout="auto"``) are described
in :mod:`subboost.io.layouts`, the one key rule (wrapper prefixes such as ``model.`` or
``image_encoder.model.`` removed, so keys are open_clip's) in :mod:`subboost.io.statedict`.
Pickled checkpoints (the older release's experts, every release's heads) need
``allow_pickle=True``; they are read with the restricted unpickler of
:mod:`subboost.io.unpickle` (the releases' ``src.*`` classes become inert placeholders; no
code from the file runs).

Evaluation data (``data_root``), per task and split (``val``, ``test``), either:

- ``{data_root}/{Task}/{split}.pt``: a dict ``{"images": uint8 (N, 3, H, W), "labels": int64 (N,),
  "classnames": [...] (optional)}`` (float images in ``[0, 1]`` are accepted too); or
- ``{data_root}/{Task}/{split}/{class}/*.png|jpg|jpeg`` (ImageFolder style). Class folders map
  to head rows in the order of ``{data_root}/{Task}/classes.txt`` (one folder name per line)
  if present, else numerically when every folder name is an integer, else alphabetically.

Images whose size differs from the model's input are resized as CLIP's validation transform
does (shorter side to the input size, bicubic, centre crop); normalisation uses CLIP's mean
and std. Fine-tuned and zero-shot accuracies are computed on this data on first use (pass
``recorded_accuracies=True`` to use ``{root}/{model}/nonlinear_ft_accuracies.json`` and
``zeroshot_accuracies.json`` instead; keys ``Task`` = test, ``TaskVal`` = validation).
"""

from __future__ import annotations

import contextlib
import json
import logging
from functools import partial
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from subboost.evaluate import Suite, TaskData
from subboost.io import (
    LAYOUTS,
    PAPER_TASKS,
    atomic_path,
    base_path,
    detect_layout,
    discover_tasks,
    expert_path,
    head_path,
    load_state_dict,
)

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")

__all__ = ["load_suite", "load_head_weight", "load_task_data", "save_task_data", "read_accuracies",
           "quiet_open_clip", "LAYOUTS", "PAPER_TASKS"]


def load_head_weight(path: str | Path, allow_pickle: bool = False) -> Tensor:
    """The ``(C, D)`` weight of a classification head file (state dict with ``weight``, or a
    pickled ``ClassificationHead``). A non-zero bias is refused (heads of the releases have none)."""
    state = load_state_dict(path, allow_pickle=allow_pickle)
    weight = state.get("weight")
    if weight is None or weight.ndim != 2:
        raise ValueError(f"{path}: no 2-D 'weight' in the head (keys: {sorted(state)[:5]})")
    bias = state.get("bias")
    if bias is not None and bool(bias.any()):
        raise ValueError(f"{path}: the head has a non-zero bias, which the evaluation does not model")
    return weight.float()


def read_accuracies(root: str | Path, model: str) -> dict[str, dict[str, float]]:
    """Recorded accuracies from ``{root}/{model}/nonlinear_ft_accuracies.json`` and
    ``zeroshot_accuracies.json`` (missing files give empty tables)."""
    d = Path(root) / model
    out: dict[str, dict[str, float]] = {"finetuned": {}, "zeroshot": {}}
    for kind, name in (("finetuned", "nonlinear_ft_accuracies.json"), ("zeroshot", "zeroshot_accuracies.json")):
        p = d / name
        if p.is_file():
            out[kind] = {k: float(v) for k, v in json.loads(p.read_text()).items()}
    return out


# ---------------------------------------------------------------- data


def _clip_resize(images: Tensor, size: int) -> Tensor:
    """Shorter side to ``size`` (bicubic, antialiased), centre crop; float in [0, 1] in and out."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(images, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top:top + size, left:left + size].clamp(0, 1)


def _as_uint8(images: Tensor, size: int) -> Tensor:
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    if tuple(x.shape[-2:]) == (size, size) and images.dtype == torch.uint8:
        return images
    return (_clip_resize(x, size) * 255).round().to(torch.uint8)


def _class_folders(task_dir: Path, split_dir: Path) -> list[str]:
    listing = task_dir / "classes.txt"
    folders = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if listing.is_file():
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        unknown = sorted(set(folders) - set(names))
        if unknown:
            raise ValueError(f"{split_dir}: class folders {unknown[:5]} are not listed in {listing}")
        return names
    if folders and all(f.isdigit() for f in folders):
        return sorted(folders, key=int)
    return folders


def load_task_data(data_root: str | Path, task: str, split: str, image_size: int,
                   max_samples: int | None = None) -> TaskData:
    """One task split from ``data_root`` in either documented layout, as uint8 images at
    ``image_size`` (CLIP's resize and centre crop when needed). ``max_samples`` keeps the
    first N (in file order; ImageFolder files sorted per class, classes interleaved)."""
    task_dir = Path(data_root) / task
    pt = task_dir / f"{split}.pt"
    folder = task_dir / split
    if pt.is_file():
        blob = torch.load(pt, map_location="cpu", weights_only=True)
        if not isinstance(blob, Mapping) or "images" not in blob or "labels" not in blob:
            raise ValueError(f"{pt}: expected a dict with 'images' and 'labels'")
        images, labels = blob["images"], blob["labels"].long()
        if max_samples is not None:
            images, labels = images[:max_samples], labels[:max_samples]
        names = blob.get("classnames")
        return TaskData(_as_uint8(images, image_size), labels, tuple(names) if names is not None else None)
    if folder.is_dir():
        from PIL import Image

        classes = _class_folders(task_dir, folder)
        per_class = [sorted(p for p in (folder / c).iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
                     if (folder / c).is_dir() else [] for c in classes]
        files: list[tuple[Path, int]] = []
        depth = max((len(f) for f in per_class), default=0)
        for i in range(depth):  # interleave classes so that max_samples stays balanced
            files.extend((f[i], c) for c, f in enumerate(per_class) if i < len(f))
        if max_samples is not None:
            files = files[:max_samples]
        if not files:
            raise FileNotFoundError(f"{folder}: no images ({', '.join(_IMAGE_SUFFIXES)}) in class folders")
        tensors = []
        for path, _ in files:
            with Image.open(path) as im:
                arr = torch.frombuffer(bytearray(im.convert("RGB").tobytes()), dtype=torch.uint8)
                w, h = im.size
            x = arr.view(h, w, 3).permute(2, 0, 1).unsqueeze(0)
            tensors.append(_as_uint8(x, image_size))
        labels = torch.tensor([c for _, c in files], dtype=torch.long)
        return TaskData(torch.cat(tensors), labels, tuple(classes))
    raise FileNotFoundError(f"no evaluation data for task '{task}', split '{split}': expected {pt} or {folder}/{{class}}/*.png")


def save_task_data(data_root: str | Path, task: str, split: str, images: Tensor, labels: Tensor,
                   classnames: Sequence[str] | None = None) -> Path:
    """Write one split in the ``{data_root}/{Task}/{split}.pt`` layout (atomically)."""
    path = Path(data_root) / task / f"{split}.pt"
    blob = {"images": images.contiguous(), "labels": labels.long().contiguous()}
    if classnames is not None:
        blob["classnames"] = list(classnames)
    with atomic_path(path) as tmp:
        torch.save(blob, tmp)
    return path


# ---------------------------------------------------------------- the suite


@contextlib.contextmanager
def quiet_open_clip() -> Iterator[None]:
    """Silence open_clip's root-logger warning that no pretrained weights were loaded
    (intended here: weights come from the checkpoints); the level is restored on exit."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _make_visual(model: str) -> torch.nn.Module:
    import open_clip

    with quiet_open_clip():
        return open_clip.create_model(model, pretrained=None).visual


def _image_size(visual: torch.nn.Module) -> int:
    size = getattr(visual, "image_size", None)
    if isinstance(size, (tuple, list)):
        size = size[0]
    if size is None:
        raise ValueError("cannot tell the model's input size (visual.image_size missing)")
    return int(size)


def load_suite(
    checkpoint_root: str | Path,
    model: str = "ViT-B-32",
    tasks: Sequence[str] | None = None,
    data_root: str | Path | None = None,
    *,
    layout: str = "auto",
    allow_pickle: bool = False,
    device: str | torch.device = "auto",
    batch_size: int = 128,
    max_samples: int | None = None,
    recorded_accuracies: bool = False,
    accuracies: Mapping[str, Mapping[str, float]] | None = None,
    cache_experts: bool = False,
    name: str | None = None,
) -> Suite:
    """A :class:`~subboost.evaluate.Suite` over public checkpoints in ``checkpoint_root``.

    ``model`` is an open_clip model name (``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``, or a
    registered config); ``tasks`` defaults to every task with an expert (paper order);
    ``data_root`` holds the evaluation data (layouts in the module docstring; default
    ``{checkpoint_root}/data``). Files are checked up front, so a missing checkpoint, head or
    data folder fails here with its path. Experts are read from disk on each use unless
    ``cache_experts`` (a ViT-B-32 expert is ~350 MB).
    """
    root = Path(checkpoint_root)
    if layout == "auto":
        layout = detect_layout(root, model)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}, got '{layout}'")
    task_list = list(tasks) if tasks is not None else discover_tasks(root, model, layout)
    if not task_list:
        raise FileNotFoundError(f"no experts found under {root / model} ({layout} layout)")
    data_root = Path(data_root) if data_root is not None else root / "data"
    base_file = base_path(root, model, layout)
    experts = {t: expert_path(root, model, t, layout) for t in task_list}
    heads = {t: head_path(root, model, t) for t in task_list}
    for t in task_list:
        d = data_root / t
        if not d.is_dir():
            raise FileNotFoundError(f"no evaluation data for task '{t}': folder {d} is missing")

    acc: dict[str, dict[str, float]] = {"finetuned": {}, "zeroshot": {}}
    if recorded_accuracies:
        acc = read_accuracies(root, model)
    for kind, table in (accuracies or {}).items():
        acc.setdefault(kind, {}).update({k: float(v) for k, v in table.items()})

    def make_visual() -> torch.nn.Module:
        return _make_visual(model)

    def image_size() -> int:
        import open_clip

        cfg = open_clip.get_model_config(model)
        size = None if cfg is None else cfg.get("vision_cfg", {}).get("image_size")
        if size is None:
            return _image_size(_make_visual(model))
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    def load_data(task: str, split: str) -> TaskData:
        return load_task_data(data_root, task, split, image_size(), max_samples)

    return Suite(
        name=name or f"{root.name}/{model}",
        model_name=model,
        task_names=task_list,
        load_base=partial(load_state_dict, base_file, allow_pickle),
        load_expert=lambda t: load_state_dict(experts[t], allow_pickle),
        load_head=lambda t: load_head_weight(heads[t], allow_pickle),
        load_data=load_data,
        make_visual=make_visual,
        accuracies=acc,
        device=device,
        batch_size=batch_size,
        cache_experts=cache_experts,
        info={"checkpoint_root": str(root), "data_root": str(data_root), "layout": layout,
              "base_checkpoint": str(base_file)},
    )
