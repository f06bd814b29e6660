"""The mini zoo: a tiny open_clip CLIP, 20 procedural tasks, one expert per task.

Public checkpoints cannot be downloaded everywhere, so the book's default suite is a zoo
trained here, in the same architecture family (open_clip ``CLIP``, ViT-B-32 key names) and the
same file layout as the public releases, so that one code path
(:class:`subboost.evaluate.VisionSuite`) serves both::

    from subboost.zoo import load_suite
    suite = load_suite("ci")            # builds into the cache on first use (≤ 10 min, 2 CPU cores)
    suite.task_names, suite.base_state, suite.task_vectors(suite.task_names[:8])

Command line: ``python -m subboost.zoo build --profile ci [--root DIR] [--device auto|cpu|cuda]``.

Modules: :mod:`~subboost.zoo.render` (drawing), :mod:`~subboost.zoo.tasks` (the 20 tasks and
the pretraining captions), :mod:`~subboost.zoo.model` (config, tokenizer, heads),
:mod:`~subboost.zoo.train` (pretraining, fine-tuning), :mod:`~subboost.zoo.build` (profiles,
cache, build).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from subboost.zoo.build import (
    PROFILES,
    ZooConfig,
    build,
    default_root,
    get_config,
    is_built,
    register,
    zoo_dir,
)
from subboost.zoo.tasks import TASK_NAMES, TASKS, TaskSpec, generate, get_task

__all__ = [
    "PROFILES", "TASKS", "TASK_NAMES", "TaskSpec", "ZooConfig", "build", "default_root", "generate",
    "get_config", "get_task", "is_built", "load_suite", "register", "zoo_dir",
]


def load_suite(
    profile: str | ZooConfig = "ci",
    root: str | Path | None = None,
    device: str = "auto",
    *,
    build_if_missing: bool = True,
    progress: bool = True,
    batch_size: int = 1024,
):
    """The zoo of ``profile`` as a :class:`~subboost.evaluate.VisionSuite` (built first if missing).

    ``root`` defaults to ``$SUBBOOST_ZOO_ROOT`` or ``zoo_cache/`` in the repository. Loading
    goes through :func:`subboost.release.load_suite`, the same path as real checkpoints, with
    the accuracies recorded at build time.
    """
    from subboost.release import load_suite as load_release
    from subboost.zoo.build import get_config as _get_config

    config = _get_config(profile)
    folder = zoo_dir(config, root)
    if not (folder / "build.json").is_file():
        if not build_if_missing:
            raise FileNotFoundError(f"zoo '{config.profile}' is not built at {folder}; run "
                                    f"python -m subboost.zoo build --profile {config.profile}")
        build(config, root=root, device=device, progress=progress)
    name = register(config, folder)
    suite = load_release(folder, model=name, tasks=list(config.tasks), data_root=folder / "data",
                         layout="tall_masks", device=device, batch_size=batch_size, recorded_accuracies=True,
                         cache_experts=True, name=f"zoo:{config.dirname()}")
    build_record = hashlib.sha256((folder / "build.json").read_bytes()).hexdigest()[:16]
    suite.fingerprint = f"zoo:{config.dirname()}:{build_record}:batch{int(batch_size)}"
    return suite
