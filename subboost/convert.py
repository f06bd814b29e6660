"""Convert a downloaded release into the layout the book reads fastest and safest.

``python -m subboost.release convert --out NEW_ROOT [--checkpoints RELEASE --model NAME] [--data AUTHORS_DATA]``

Checkpoints
    Every expert, base and head of ``{RELEASE}/{model}`` (either layout of
    :mod:`subboost.release`) is loaded once (pickles only with ``--allow-pickle``, read by the restricted
    unpickler of :mod:`subboost.io`: no code from the files runs) and written as ``.safetensors`` under ``{NEW_ROOT}/{model}`` at
    the same relative path, keys in open_clip's names; heads as ``{"weight": (C, D)}``. The
    public 20-task ``tall_masks`` release ships no zero-shot base (the authors' code takes
    open_clip's pretrained weights); pass one with ``--base FILE`` (any state dict of the same
    architecture, e.g. ``torch.save(open_clip.create_model(model, pretrained="openai").state_dict(), FILE)``),
    which is written, restricted to the experts' keys, as ``{first task}Val/nonlinear_zeroshot.safetensors``.
    ``{RELEASE}/{model}.json`` (a custom open_clip config) and the recorded-accuracy JSON files
    are copied.

Data (``--data``, the authors' ``location`` folder)
    Supported formats (as read by nik-dim/tall_masks and mlfoundations/task_vectors): the
    torchvision ``ImageFolder`` folders of DTD (``dtd/{train,val}``), EuroSAT
    (``EuroSAT_splits/{train,val,test}``) and SUN397 (``sun397/{train,val}``); GTSRB
    (``gtsrb/GTSRB/Training/{class}/*.ppm`` and ``gtsrb/GTSRB/Final_Test/Images`` with
    ``gtsrb/GT-final_test.csv``); RESISC45 (``resisc45/NWPU-RESISC45/{class}/`` filtered by
    ``resisc45/resisc45-{train,test}.txt``). The test split is the authors' test split; the validation split ("{Task}Val") is, as in the authors' code, a seeded
    random split of the training folder: ``int(0.1 · n)`` images, at most 5000, the last
    part of ``torch.randperm(n)`` drawn with ``torch.Generator().manual_seed(0)`` over the
    ImageFolder order (classes sorted, files sorted within each class), except where the
    authors read a ready ``val`` folder (EuroSAT). Images are copied (never moved) to
    ``{NEW_ROOT}/data/{Task}/{val,test}/{class}/`` with ``classes.txt`` giving the training
    folder's class order, i.e. the heads' row order. Other datasets (MNIST, SVHN, Cars, ...)
    are stored by torchvision in their own binary or annotation formats: write them with
    :func:`subboost.release.save_task_data`.

The destination must not exist or be an empty folder; everything is written into a temporary
sibling folder that is renamed onto it at the end (removed on error or interruption). Progress
goes to stderr, a summary to stdout. Exit codes: 0 done, 1 internal error, 2 bad input,
130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from subboost.io import (
    base_path,
    detect_layout,
    discover_tasks,
    expert_path,
    head_path,
    load_state_dict,
    save_state_dict,
)
from subboost.release import load_head_weight
from subboost.taskvector import all_finite

# task → (training folder, test folder, ready validation folder or None), relative to the authors' location;
# GTSRB and RESISC45 are read by their own functions below (a CSV, split lists)
AUTHORS_FOLDERS: dict[str, tuple[str, str, str | None]] = {
    "DTD": ("dtd/train", "dtd/val", None),
    "EuroSAT": ("EuroSAT_splits/train", "EuroSAT_splits/test", "EuroSAT_splits/val"),
    "SUN397": ("sun397/train", "sun397/val", None),
    "GTSRB": ("gtsrb/GTSRB/Training", "gtsrb/GTSRB/Final_Test/Images", None),
    "RESISC45": ("resisc45/NWPU-RESISC45", "resisc45/NWPU-RESISC45", None),
}
VAL_FRACTION = 0.1
MAX_VAL = 5000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # torchvision's


class ConvertError(ValueError):
    """Bad input to the converter (exit code 2)."""


@dataclass
class Summary:
    checkpoints: list[str] = field(default_factory=list)
    data: dict[str, dict[str, int]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- data


def image_folder(directory: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES,
                 keep=None) -> tuple[list[str], list[tuple[Path, int]]]:
    """torchvision ``ImageFolder`` order: class folders sorted by name, files of a class found
    recursively, directories and names sorted; returns ``(classes, [(file, class index)])``.
    ``keep(name)`` filters files by base name (the authors' RESISC45 split lists)."""
    if not directory.is_dir():
        raise ConvertError(f"data folder not found: {directory}")
    classes = sorted(e.name for e in os.scandir(directory) if e.is_dir())
    if not classes:
        raise ConvertError(f"{directory}: no class folders")
    samples = []
    for ci, c in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(directory / c, followlinks=True)):
            samples.extend((Path(dirpath) / n, ci) for n in sorted(names)
                           if n.lower().endswith(suffixes) and (keep is None or keep(n)))
    return classes, samples


def _split_list(path: Path) -> set[str]:
    if not path.is_file():
        raise ConvertError(f"split list not found: {path}")
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


def authors_splits(location: Path, task: str) -> tuple[list[str], list, list, list | None, dict[str, Path]]:
    """``(classes, train, test, val or None, roots)`` of one task as the authors read it; samples
    are ``(file, class index)``, ``roots`` the folder each split's class folders live in."""
    train_rel, test_rel, val_rel = AUTHORS_FOLDERS[task]
    if task == "GTSRB":  # train: class folders of .ppm; test: one folder and a CSV of labels
        classes, train = image_folder(location / train_rel, (".ppm",))
        csv_path = location / "gtsrb" / "GT-final_test.csv"
        if not csv_path.is_file():
            raise ConvertError(f"GTSRB test labels not found: {csv_path}")
        import csv

        with open(csv_path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter=";", skipinitialspace=True))
        test = [(location / test_rel / r["Filename"], int(r["ClassId"])) for r in rows]
        bad = [c for _, c in test if not 0 <= c < len(classes)]
        if bad:
            raise ConvertError(f"{csv_path}: ClassId {bad[0]} outside the {len(classes)} training classes")
        return classes, train, test, None, {"train": location / train_rel, "test": location / test_rel}
    if task == "RESISC45":  # one ImageFolder, filtered by the split lists
        folder = location / train_rel
        keep_train = _split_list(location / "resisc45" / "resisc45-train.txt")
        keep_test = _split_list(location / "resisc45" / "resisc45-test.txt")
        classes, train = image_folder(folder, keep=keep_train.__contains__)
        _, test = image_folder(folder, keep=keep_test.__contains__)
        return classes, train, test, None, {"train": folder, "test": folder}
    classes, train = image_folder(location / train_rel)
    test_classes, test = image_folder(location / test_rel)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(test_classes) - set(classes))
    if unknown:
        raise ConvertError(f"{location / test_rel}: class folders {unknown[:5]} are not in {location / train_rel}")
    test = [(p, index[test_classes[ci]]) for p, ci in test]
    roots = {"train": location / train_rel, "test": location / test_rel}
    val = None
    if val_rel is not None:
        val_classes, val = image_folder(location / val_rel)
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise ConvertError(f"{location / val_rel}: class folders {unknown[:5]} are not in {location / train_rel}")
        val = [(p, index[val_classes[ci]]) for p, ci in val]
        roots["val"] = location / val_rel
    return classes, train, test, val, roots


def authors_val_indices(n_train: int, seed: int = 0, fraction: float = VAL_FRACTION, max_val: int = MAX_VAL) -> list[int]:
    """Indices (into the ImageFolder order) of the authors' "{Task}Val" split of a training
    set of ``n_train`` images: ``int(fraction·n)`` capped at ``max_val``, the second part of
    ``torch.utils.data.random_split(train, [n - v, v])`` seeded with ``seed``."""
    val = min(int(n_train * fraction), max_val)
    if val <= 0 or val >= n_train:
        raise ConvertError(f"a training folder of {n_train} images gives a validation split of {val}")
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[n_train - val:]


def _copy_split(samples: Sequence[tuple[Path, int]], classes: Sequence[str], root: Path, dest: Path,
                desc: str) -> int:
    for path, ci in tqdm(samples, desc=desc, unit="img", file=sys.stderr, leave=False):
        if not path.is_file():
            raise ConvertError(f"image listed but not found: {path}")
        inside = root / classes[ci]
        rel = path.relative_to(inside) if inside in path.parents else Path(path.name)
        target = dest / classes[ci] / "__".join(rel.parts)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return len(samples)


def convert_data(location: Path, out: Path, tasks: Sequence[str] | None, seed: int, summary: Summary) -> None:
    """The authors' folders of ``tasks`` (default: every supported one present) → ``out/{Task}``."""
    location = Path(location)
    if not location.is_dir():
        raise ConvertError(f"--data: folder not found: {location}")
    if tasks is None:
        tasks = [t for t, (train, _, _) in AUTHORS_FOLDERS.items() if (location / train).is_dir()]
        if not tasks:
            raise ConvertError(f"--data {location}: none of the supported folders "
                               f"({', '.join(v[0] for v in AUTHORS_FOLDERS.values())}) is there")
    unknown = [t for t in tasks if t not in AUTHORS_FOLDERS]
    if unknown:
        raise ConvertError(f"--data: no folder format known for {unknown}; supported: {', '.join(AUTHORS_FOLDERS)}")
    for task in tasks:
        classes, train, test, val, roots = authors_splits(location, task)
        if val is None:
            val = [train[i] for i in authors_val_indices(len(train), seed)]
            roots["val"] = roots["train"]
        task_out = out / task
        task_out.mkdir(parents=True)
        (task_out / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
        counts = {"classes": len(classes),
                  "val": _copy_split(val, classes, roots["val"], task_out / "val", f"{task} val"),
                  "test": _copy_split(test, classes, roots["test"], task_out / "test", f"{task} test")}
        summary.data[task] = counts


# ---------------------------------------------------------------- checkpoints


def _write(state: dict, path: Path, what: str) -> None:
    bad = [k for k, v in state.items() if isinstance(v, torch.Tensor) and not all_finite(v)]
    if bad:
        raise ConvertError(f"{what}: tensor '{bad[0]}' holds NaN or Inf; not written")
    save_state_dict(state, path)


def convert_checkpoints(release: Path, model: str, out: Path, *, base: Path | None, allow_pickle: bool,
                        tasks: Sequence[str] | None, summary: Summary) -> None:
    release = Path(release)
    layout = detect_layout(release, model)
    found = discover_tasks(release, model, layout)
    tasks = list(tasks) if tasks is not None else found
    missing = [t for t in tasks if t not in found]
    if missing:
        raise ConvertError(f"--tasks: no expert for {missing} under {release / model} ({layout} layout)")
    src_dir, dst_dir = release / model, out / model
    try:
        shipped = base_path(release, model, layout)
    except FileNotFoundError:
        shipped = None
    if base is None and shipped is None:  # checked before any file is converted
        raise ConvertError(
            f"{release / model} has no zero-shot base (the public {layout} release ships none: the authors' code "
            f"uses open_clip's pretrained weights); pass --base FILE, e.g. a file written by "
            f"torch.save(open_clip.create_model('{model}', pretrained='openai').state_dict(), FILE)")
    source = Path(base) if base is not None else shipped
    if not source.is_file():
        raise ConvertError(f"--base: file not found: {source}")
    expert_keys: list[str] = []
    with tqdm(total=2 * len(tasks) + 1, desc="checkpoints", unit="file", file=sys.stderr, leave=False) as pbar:
        for t in tasks:
            path = expert_path(release, model, t, layout)
            state = load_state_dict(path, allow_pickle)
            expert_keys = expert_keys or list(state)
            _write(state, (dst_dir / path.relative_to(src_dir)).with_suffix(".safetensors"), str(path))
            summary.checkpoints.append(str(path.relative_to(release)))
            pbar.update()
            hpath = head_path(release, model, t)
            _write({"weight": load_head_weight(hpath, allow_pickle).contiguous()},
                   (dst_dir / hpath.relative_to(src_dir)).with_suffix(".safetensors"), str(hpath))
            summary.checkpoints.append(str(hpath.relative_to(release)))
            pbar.update()
        state = load_state_dict(source, allow_pickle)
        absent = [k for k in expert_keys if k not in state]
        if absent:
            raise ConvertError(f"--base {source}: keys of the experts missing from the base, e.g. {absent[:3]} "
                               f"(is it a checkpoint of '{model}'?)")
        state = {k: state[k] for k in expert_keys}
        if layout == "tall_masks":
            first = "MNIST" if "MNIST" in tasks else tasks[0]
            target = dst_dir / f"{first}Val" / "nonlinear_zeroshot.safetensors"
        else:
            target = dst_dir / "zeroshot.safetensors"
        _write(state, target, str(source))
        summary.checkpoints.append(f"base from {source}")
        pbar.update()
    for extra in (release / f"{model}.json", src_dir / "nonlinear_ft_accuracies.json", src_dir / "zeroshot_accuracies.json"):
        if extra.is_file():
            dest = out / extra.relative_to(release)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(extra, dest)
    summary.notes.append(f"{layout} layout, {len(tasks)} tasks: {', '.join(tasks)}")


# ---------------------------------------------------------------- command line


def convert(out: str | Path, *, checkpoints: str | Path | None = None, model: str | None = None,
            base: str | Path | None = None, allow_pickle: bool = False, data: str | Path | None = None,
            tasks: Sequence[str] | None = None, seed: int = 0) -> Summary:
    """Convert into the new root ``out`` (see the module docstring); returns the summary.

    ``out`` must not exist or be empty; it appears only when everything is written."""
    out = Path(out)
    if checkpoints is None and data is None:
        raise ConvertError("nothing to convert: give --checkpoints (with --model) and/or --data")
    if checkpoints is not None and not model:
        raise ConvertError("--checkpoints needs --model (the open_clip architecture, e.g. ViT-B-32)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"--out {out} exists and is not empty; the converter never writes into an existing release")
    for src in (checkpoints, data):
        if src is None:
            continue
        a, b = Path(src).resolve(), out.resolve()
        if a == b or a in b.parents or b in a.parents:
            raise ConvertError(f"--out {out} overlaps the source {src}; conversion is never in place")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    summary = Summary()
    try:
        if checkpoints is not None:
            convert_checkpoints(Path(checkpoints), model, tmp, base=Path(base) if base else None,
                                allow_pickle=allow_pickle, tasks=tasks, summary=summary)
        if data is not None:
            data_tasks = tasks
            if checkpoints is not None:  # the release's tasks whose folders are supported and present
                wanted = tasks or discover_tasks(checkpoints, model, detect_layout(checkpoints, model))
                data_tasks = [t for t in wanted
                              if t in AUTHORS_FOLDERS and (Path(data) / AUTHORS_FOLDERS[t][0]).is_dir()]
                skipped = [t for t in wanted if t not in data_tasks]
                if skipped:
                    summary.notes.append(f"no data converted for {', '.join(skipped)} (format not supported or "
                                         f"folder absent): write it with subboost.release.save_task_data")
                if not data_tasks:
                    raise ConvertError(f"--data {data}: no supported folder for the tasks {wanted}")
            convert_data(Path(data), tmp / "data", data_tasks, seed, summary)
        os.chmod(tmp, 0o777 & ~_umask())
        if out.exists():
            out.rmdir()  # empty, checked above
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return summary


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m subboost.release",
                                description="Tools for the public checkpoint releases.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="a release (pickles) -> safetensors, the authors' data folders -> data_root",
                       description=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--out", required=True, help="the NEW root (must not exist or be empty)")
    c.add_argument("--checkpoints", help="the downloaded release root ({root}/{model}/...)")
    c.add_argument("--model", help="open_clip architecture of the release (ViT-B-32, ViT-B-16, ViT-L-14)")
    c.add_argument("--base", help="zero-shot base checkpoint to add (the public tall_masks release has none)")
    c.add_argument("--allow-pickle", action="store_true",
                   help="load pickled files (runs code from them: only for files you trust)")
    c.add_argument("--data", help="the authors' data location (dtd/, EuroSAT_splits/, sun397/ ...)")
    c.add_argument("--tasks", help="comma-separated tasks (default: all found)")
    c.add_argument("--seed", type=int, default=0, help="seed of the authors' validation split (theirs: 0)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def on_term(signum, frame):  # noqa: ARG001 - signal API
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        summary = convert(args.out, checkpoints=args.checkpoints, model=args.model, base=args.base,
                          allow_pickle=args.allow_pickle, data=args.data,
                          tasks=[t.strip() for t in args.tasks.split(",") if t.strip()] if args.tasks else None,
                          seed=args.seed)
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"wrote {args.out}")
    if summary.checkpoints:
        print(f"  checkpoints: {len(summary.checkpoints)} files written as safetensors")
    for note in summary.notes:
        print(f"  {note}")
    for task, counts in summary.data.items():
        print(f"  data/{task}: {counts['classes']} classes, val {counts['val']} images, test {counts['test']} images")
    return 0
