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
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from subboost.evaluate import TaskData, VisionSuite
from subboost.taskvector import StateDict
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

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff")  # torchvision's

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


def _split_folders(task_dir: Path) -> list[Path]:
    return [task_dir / s for s in ("val", "test") if (task_dir / s).is_dir()]


def class_mapping(task_dir: str | Path) -> tuple[list[str], dict[str, int], str]:
    """One class → head-row mapping for every split of a task in the ImageFolder layout.

    Returns ``(classnames, index, source)``: ``index`` maps a class folder name to its head
    row; ``source`` says where the order came from. The order is, in this preference:

    - ``classes.txt`` in the task folder (one folder name per line, line i = head row i;
      written by ``python -m subboost.release convert``);
    - ``integers``: every folder name is an integer, and the integer *is* the row (``"07"``
      → 7), whichever classes a split happens to contain;
    - ``sorted``: the sorted names of the union of the class folders over all splits
      (torchvision's ImageFolder order, correct only when the union holds every class).

    A folder name missing from ``classes.txt`` raises ``ValueError`` naming both.
    """
    task_dir = Path(task_dir)
    folders = sorted({p.name for s in _split_folders(task_dir) for p in s.iterdir() if p.is_dir()})
    listing = task_dir / "classes.txt"
    if listing.is_file():
        names = [line.strip() for line in listing.read_text().splitlines() if line.strip()]
        if len(set(names)) != len(names):
            raise ValueError(f"{listing}: a class name is listed twice")
        unknown = sorted(set(folders) - set(names))
        if unknown:
            raise ValueError(f"{task_dir}: class folders {unknown[:5]} are not listed in {listing}")
        return names, {n: i for i, n in enumerate(names)}, "classes.txt"
    if folders and all(f.isdigit() for f in folders):
        index = {f: int(f) for f in folders}
        if len(set(index.values())) != len(index):
            raise ValueError(f"{task_dir}: two class folders name the same integer ({folders[:5]} ...)")
        width = max(index.values()) + 1
        return [str(i) for i in range(width)], index, "integers"
    return folders, {n: i for i, n in enumerate(folders)}, "sorted"


def check_classes(task: str, head_rows: int, num_classes: int | None, max_label: int | None,
                  source: str = "data", order: str = "") -> None:
    """``ValueError`` naming the task and both sizes when the data's classes do not fit the head.

    ``num_classes`` is the number of classes the data declares (``None``: unknown), and
    ``max_label`` its largest label (``None``: no labels read); ``source`` names the data in the
    message and ``order`` is :func:`class_mapping`'s source for folders. Integer-named folders
    (``order="integers"``) may declare fewer classes than the head has rows (a split need not
    contain the last classes)."""
    if num_classes is not None and not (order == "integers" and num_classes <= head_rows) and num_classes != head_rows:
        hint = (" (the class folders do not cover every class: write classes.txt listing the head's classes in "
                "order, as `python -m subboost.release convert` does)") if order == "sorted" else ""
        raise ValueError(f"task '{task}': the head has {head_rows} classes but the {source} names {num_classes}{hint}")
    if max_label is not None and max_label >= head_rows:
        raise ValueError(f"task '{task}': label {max_label} in the {source} but the head has only {head_rows} rows "
                         f"(classes); the data and the head belong to different tasks or class orders")


def load_task_data(data_root: str | Path, task: str, split: str, image_size: int,
                   max_samples: int | None = None, num_classes: int | None = None) -> TaskData:
    """One task split from ``data_root`` in either documented layout, as uint8 images at
    ``image_size`` (CLIP's resize and centre crop when needed). ``max_samples`` keeps the
    first N (in file order; ImageFolder files sorted per class, classes interleaved).

    ImageFolder labels come from :func:`class_mapping` (the same for every split). With
    ``num_classes`` (the head's rows), labels and class counts are checked against it
    (:func:`check_classes`)."""
    task_dir = Path(data_root) / task
    pt = task_dir / f"{split}.pt"
    folder = task_dir / split
    if pt.is_file():
        blob = torch.load(pt, map_location="cpu", weights_only=True)
        if not isinstance(blob, Mapping) or "images" not in blob or "labels" not in blob:
            raise ValueError(f"{pt}: expected a dict with 'images' and 'labels'")
        images, labels = blob["images"], blob["labels"].long()
        names = blob.get("classnames")
        if num_classes is not None:
            check_classes(task, num_classes, None if names is None else len(names),
                          int(labels.max()) if labels.numel() else None, source=str(pt))
        if max_samples is not None:
            images, labels = images[:max_samples], labels[:max_samples]
        return TaskData(_as_uint8(images, image_size), labels, tuple(names) if names is not None else None)
    if folder.is_dir():
        from PIL import Image

        classes, index, source = class_mapping(task_dir)
        present = sorted((p.name for p in folder.iterdir() if p.is_dir()), key=lambda n: index[n])
        if num_classes is not None:
            check_classes(task, num_classes, len(classes), max((index[n] for n in present), default=None),
                          source=f"class folders of {task_dir}", order=source)
        per_class = [(index[c], sorted(p for p in (folder / c).rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES))
                     for c in present]
        files: list[tuple[Path, int]] = []
        depth = max((len(f) for _, f in per_class), default=0)
        for i in range(depth):  # interleave classes so that max_samples stays balanced
            files.extend((f[i], c) for c, f in per_class if i < len(f))
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
        if num_classes is not None and source == "integers":
            classes = [str(i) for i in range(num_classes)]
        return TaskData(torch.cat(tensors), labels, tuple(classes))
    raise FileNotFoundError(f"no evaluation data for task '{task}', split '{split}': expected {pt} or {folder}/{{class}}/*.png")


def probe_task_classes(data_root: str | Path, task: str, head_rows: int) -> None:
    """Check a task's evaluation data against its head without decoding any image: class
    folders through :func:`class_mapping`, ``.pt`` splits through a memory-mapped read of
    their labels and class names. ``ValueError`` (:func:`check_classes`) on a mismatch."""
    task_dir = Path(data_root) / task
    if _split_folders(task_dir):
        classes, index, source = class_mapping(task_dir)
        labels = [index[p.name] for s in _split_folders(task_dir) for p in s.iterdir() if p.is_dir()]
        check_classes(task, head_rows, len(classes), max(labels, default=None),
                      source=f"class folders of {task_dir}", order=source)
    for split in ("val", "test"):
        pt = task_dir / f"{split}.pt"
        if not pt.is_file():
            continue
        try:
            blob = torch.load(pt, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zip archive: mmap unsupported
            blob = torch.load(pt, map_location="cpu", weights_only=True)
        if not isinstance(blob, Mapping) or "labels" not in blob:
            raise ValueError(f"{pt}: expected a dict with 'images' and 'labels'")
        labels, names = blob["labels"], blob.get("classnames")
        check_classes(task, head_rows, None if names is None else len(names),
                      int(labels.max()) if labels.numel() else None, source=str(pt))


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


def ensure_model_config(checkpoint_root: str | Path, model: str) -> None:
    """Make ``model`` known to open_clip: a built-in architecture, or a config file
    ``{checkpoint_root}/{model}.json`` (open_clip's model-config format) registered here.
    ``ValueError`` naming ``model`` otherwise."""
    import open_clip

    if open_clip.get_model_config(model) is not None:
        return
    path = Path(checkpoint_root) / f"{model}.json"
    if path.is_file():
        open_clip.add_model_config(path)
        if open_clip.get_model_config(model) is not None:
            return
    raise ValueError(f"model '{model}' is neither an open_clip architecture (open_clip.list_models()) nor "
                     f"described by {path}; set `model` to the architecture of the checkpoints (e.g. ViT-B-32)")


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


def _output_dim(visual: torch.nn.Module) -> int | None:
    dim = getattr(visual, "output_dim", None)
    return int(dim) if dim is not None else None


def _probe(model: str, base_file: Path, expert_file: Path, head_files: Mapping[str, Path], data_root: Path,
           allow_pickle: bool) -> dict:
    """Load every head, the base and one expert and check them against ``model`` and the data
    (see :func:`load_suite`); returns what was loaded so that nothing is read twice."""
    from subboost.evaluate import check_architecture

    heads = {}
    for task, path in head_files.items():
        try:
            heads[task] = load_head_weight(path, allow_pickle)
        except ValueError as err:
            raise ValueError(f"head of task '{task}': {err}") from None
    visual = _make_visual(model)
    base = load_state_dict(base_file, allow_pickle)
    check_architecture(base, visual, model, base_file)
    expert = load_state_dict(expert_file, allow_pickle)
    check_architecture(expert, visual, model, expert_file)
    if set(expert) < set(base):  # e.g. a base saved from open_clip with its text tower
        base = {k: base[k] for k in expert}
    width = _output_dim(visual)
    for task, w in heads.items():
        if width is not None and w.shape[1] != width:
            raise ValueError(f"task '{task}': the head {head_files[task]} has width {w.shape[1]} but model '{model}' "
                             f"embeds images in {width} dimensions")
        probe_task_classes(data_root, task, int(w.shape[0]))
    return {"heads": heads, "base": base, "visual": visual}


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
    probe: bool = True,
    base: str | Path | None = None,
) -> VisionSuite:
    """A :class:`~subboost.evaluate.VisionSuite` over public checkpoints in ``checkpoint_root``.

    ``model`` is an open_clip model name (``ViT-B-32``, ``ViT-B-16``, ``ViT-L-14``, or a
    registered config); ``tasks`` defaults to every task with an expert (paper order);
    ``data_root`` holds the evaluation data (layouts in the module docstring; default
    ``{checkpoint_root}/data``). Files are checked up front, so a missing checkpoint, head or
    data folder fails here with its path. With ``probe`` (default) every head, the base and the
    first expert are also loaded here, before any work starts: a pickle without
    ``allow_pickle``, a ``model`` that does not match the weights, a head whose width is not the
    model's embedding size or whose rows do not fit the data's classes fails at once with one
    line naming the task, file or parameter. Experts are read from disk on each use unless
    ``cache_experts`` (a ViT-B-32 expert is ~350 MB).

    ``base`` is a zero-shot checkpoint to use instead of the release's (the public 20-task
    ``tall_masks`` release ships none; e.g. ``open_clip.create_model(model,
    pretrained="openai").state_dict()`` saved with ``torch.save``). With ``probe``, a base
    holding more than the experts (the text tower) is restricted to the experts' keys.
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
    if base is not None:
        base_file = Path(base)
        if not base_file.is_file():
            raise FileNotFoundError(f"base checkpoint not found: {base_file} (parameter base)")
    else:
        base_file = base_path(root, model, layout)
    experts = {t: expert_path(root, model, t, layout) for t in task_list}
    heads = {t: head_path(root, model, t) for t in task_list}
    for t in task_list:
        d = data_root / t
        if not d.is_dir():
            raise FileNotFoundError(f"no evaluation data for task '{t}': folder {d} is missing")
    ensure_model_config(root, model)
    probed: dict = {}
    if probe:
        probed = _probe(model, base_file, experts[task_list[0]], heads, data_root, allow_pickle)

    acc: dict[str, dict[str, float]] = {"finetuned": {}, "zeroshot": {}}
    if recorded_accuracies:
        acc = read_accuracies(root, model)
    for kind, table in (accuracies or {}).items():
        acc.setdefault(kind, {}).update({k: float(v) for k, v in table.items()})

    def make_visual() -> torch.nn.Module:
        visual = probed.pop("visual", None)
        return visual if visual is not None else _make_visual(model)

    def load_base() -> StateDict:
        state = probed.pop("base", None)
        return state if state is not None else load_state_dict(base_file, allow_pickle)

    def load_head(task: str) -> Tensor:
        weight = probed.get("heads", {}).pop(task, None)
        return weight if weight is not None else load_head_weight(heads[task], allow_pickle)

    def image_size() -> int:
        import open_clip

        cfg = open_clip.get_model_config(model)
        size = None if cfg is None else cfg.get("vision_cfg", {}).get("image_size")
        if size is None:
            return _image_size(_make_visual(model))
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    def load_data(task: str, split: str) -> TaskData:
        rows = int(suite.head(task).shape[0])
        return load_task_data(data_root, task, split, image_size(), max_samples, num_classes=rows)

    suite = VisionSuite(
        name=name or f"{root.name}/{model}",
        model_name=model,
        task_names=task_list,
        load_base=load_base,
        load_expert=lambda t: load_state_dict(experts[t], allow_pickle),
        load_head=load_head,
        load_data=load_data,
        make_visual=make_visual,
        accuracies=acc,
        device=device,
        batch_size=batch_size,
        cache_experts=cache_experts,
        info={"checkpoint_root": str(root), "data_root": str(data_root), "layout": layout,
              "base_checkpoint": str(base_file)},
    )
    return suite


if __name__ == "__main__":
    from subboost.convert import main

    raise SystemExit(main())
