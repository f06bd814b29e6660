"""The public checkpoint layouts (nothing is downloaded; files must be on disk).

``tall_masks`` (the 8/14/20-task releases of the TALL-masks / Consensus lineage)::

    {root}/{model}/{Task}Val/nonlinear_finetuned.{safetensors,pt}   expert of each task
    {root}/{model}/MNISTVal/nonlinear_zeroshot.{safetensors,pt}     the base (else any {Task}Val/nonlinear_zeroshot.*)
    {root}/{model}/head_{Task}Val.{safetensors,pt}                  zero-shot head

``task_vectors`` (the older 8-task release of Ilharco et al.)::

    {root}/{model}/zeroshot.{safetensors,pt}                        the base
    {root}/{model}/{Task}/finetuned.{safetensors,pt}                experts
    {root}/{model}/head_{Task}.{safetensors,pt} or head_{Task}Val.*  heads

Where both a ``.safetensors`` and a ``.pt`` file of the same stem exist, the
``.safetensors`` one is used (no unpickling, memory-mapped). Task names may be given with
or without the ``Val`` suffix. Missing files raise
:class:`~subboost.io.errors.CheckpointNotFound` listing what was tried.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from subboost.io.errors import CheckpointNotFound, InputError
from subboost.paper import PAPER_TASKS  # the paper's task order (tasks are found in it first)

LAYOUTS = ("tall_masks", "task_vectors")

SUFFIXES = (".safetensors", ".pt")
"""Checkpoint suffixes, preferred first."""


def _candidates(stem: Path) -> list[Path]:
    return [stem.with_name(stem.name + s) for s in SUFFIXES]


def _first_existing(candidates: Sequence[Path]) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


def _plain(task: str) -> str:
    return task[:-3] if task.endswith("Val") and len(task) > 3 else task


def _model_dir(root: str | Path, model: str) -> Path:
    d = Path(root) / model
    if not d.is_dir():
        raise CheckpointNotFound(f"no checkpoint folder {d} (expected {{root}}/{{model}}/...)")
    return d


def detect_layout(root: str | Path, model: str) -> str:
    """``tall_masks`` or ``task_vectors``, from the files under ``{root}/{model}``."""
    d = _model_dir(root, model)
    if any(d.glob("*Val/nonlinear_finetuned.*")) or any(d.glob("*Val/nonlinear_zeroshot.*")):
        return "tall_masks"
    if _first_existing(_candidates(d / "zeroshot")) or any(d.glob("*/finetuned.*")):
        return "task_vectors"
    raise CheckpointNotFound(
        f"{d}: found neither {{Task}}Val/nonlinear_finetuned.pt (tall_masks layout) nor zeroshot.pt / "
        f"{{Task}}/finetuned.pt (task_vectors layout)")


def _check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise InputError(f"layout must be 'auto' or one of {LAYOUTS}, got '{layout}'")


def discover_tasks(root: str | Path, model: str, layout: str) -> list[str]:
    """Tasks with an expert checkpoint, in the paper's order first, then alphabetically."""
    _check_layout(layout)
    d = Path(root) / model
    if layout == "tall_masks":
        found = {p.parent.name[:-3] for p in d.glob("*Val/nonlinear_finetuned.*") if p.suffix in SUFFIXES}
    else:
        found = {p.parent.name for p in d.glob("*/finetuned.*") if p.suffix in SUFFIXES}
    order = {t: i for i, t in enumerate(PAPER_TASKS)}
    return sorted(found, key=lambda t: (order.get(t, len(order)), t))


def base_path(root: str | Path, model: str, layout: str) -> Path:
    """The base (zero-shot) checkpoint of a layout."""
    _check_layout(layout)
    d = _model_dir(root, model)
    if layout == "tall_masks":
        tried = _candidates(d / "MNISTVal" / "nonlinear_zeroshot")
        found = _first_existing(tried)
        if found is None:
            others = sorted(p.parent for p in d.glob("*Val/nonlinear_zeroshot.*") if p.suffix in SUFFIXES)
            found = _first_existing(_candidates(others[0] / "nonlinear_zeroshot")) if others else None
            tried = tried + [d / "{Task}Val" / "nonlinear_zeroshot.pt"]
    else:
        tried = _candidates(d / "zeroshot")
        found = _first_existing(tried)
    if found is None:
        hint = ""
        if layout == "tall_masks":
            hint = (f"; the public tall_masks releases ship no zero-shot base: save one from open_clip's pretrained "
                    f"weights, e.g. torch.save(open_clip.create_model('{model}', pretrained='openai').state_dict(), "
                    f"'base.pt'), and pass it (CLI --base base.pt; library base='base.pt')")
        raise CheckpointNotFound("base (zero-shot) checkpoint not found; tried: " + ", ".join(map(str, tried)) + hint)
    return found


def expert_path(root: str | Path, model: str, task: str, layout: str) -> Path:
    """A task's expert (fine-tuned) checkpoint."""
    _check_layout(layout)
    d = _model_dir(root, model)
    plain = _plain(task)
    stem = d / f"{plain}Val" / "nonlinear_finetuned" if layout == "tall_masks" else d / plain / "finetuned"
    tried = _candidates(stem)
    found = _first_existing(tried)
    if found is None:
        raise CheckpointNotFound(f"expert checkpoint for task '{task}' not found; tried: " + ", ".join(map(str, tried)))
    return found


def head_path(root: str | Path, model: str, task: str) -> Path:
    """A task's classification head (``head_{Task}Val`` or ``head_{Task}``)."""
    d = _model_dir(root, model)
    plain = _plain(task)
    tried = _candidates(d / f"head_{plain}Val") + _candidates(d / f"head_{plain}")
    found = _first_existing(tried)
    if found is None:
        raise CheckpointNotFound(f"classification head for task '{task}' not found; tried: " + ", ".join(map(str, tried)))
    return found


def checkpoint_root_paths(root: str | Path, model: str, tasks: Sequence[str],
                          layout: str = "auto", base: str | Path | None = None) -> tuple[Path, list[Path]]:
    """Base and expert files of ``tasks`` under a checkpoint root (layout detected). A given
    ``base`` file replaces the root's base (the public 20-task release ships none)."""
    if layout == "auto":
        layout = detect_layout(root, model)
    experts = [expert_path(root, model, t, layout) for t in tasks]
    return (Path(base) if base is not None else base_path(root, model, layout)), experts


def expert_names(paths: Sequence[Path]) -> list[str]:
    """Readable, unique names for expert files: stems, else parent folders, else both, else
    numbered."""
    paths = [Path(p) for p in paths]
    for candidate in ([p.stem for p in paths], [p.parent.name for p in paths],
                      [f"{p.parent.name}/{p.stem}" for p in paths]):
        if len(set(candidate)) == len(candidate) and all(candidate):
            return candidate
    return [f"expert{i}" for i in range(len(paths))]
