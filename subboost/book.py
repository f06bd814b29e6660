"""The book runner: execute the chapters with papermill, then render them with Jupyter Book.

Chapters are jupytext MyST-markdown notebooks ``notebooks/NN_name.md`` (the source of truth),
each with exactly one code cell tagged ``parameters``. The runner

1. ``execute``: converts each chapter to ``.ipynb`` with the jupytext Python API, injects
   ``profile``, ``device``, ``seed``, ``output_dir`` and any ``--param k=v`` with papermill,
   executes it and stores ``<executed_dir>/<chapter>.ipynb`` (default ``_build/executed``;
   figures and data of a chapter go to ``<executed_dir>/<chapter>/``). A cell error stops the
   run with a non-zero exit code and writes ``<executed_dir>/execution_report.txt`` naming the
   chapter, the cell (with its line in the ``.md`` source) and the traceback; the failed
   notebook is kept as ``<chapter>.failed.ipynb``;
2. ``build``: stages ``_config.yml``, ``_toc.yml``, ``book/`` and the executed notebooks in
   ``_build/book_src`` and runs ``jupyter-book build`` there with warnings as errors. The
   site lands in ``_build/html``; nothing is re-executed (``execute_notebooks: off``), and the
   theme's download button offers each chapter's executed ``.ipynb``;
3. ``all``: both.

Command line::

    python -m subboost.book all --profile ci --device auto
    python -m subboost.book execute --profile smoke --chapters 02 --param "betas=[0.0, 0.5]"
    python -m subboost.book build

Notebooks call :func:`validate_parameters` right after their parameters cell and end with a
cell that displays :func:`provenance`.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
EXECUTED_DIR = REPO_ROOT / "_build" / "executed"
STAGE_DIR = REPO_ROOT / "_build" / "book_src"
SITE_DIR = REPO_ROOT / "_build" / "html"

PROFILES = ("smoke", "ci", "full")
DEVICES = ("auto", "cpu", "cuda")
#: Every chapter's parameters cell must define these (the runner injects them).
REQUIRED_PARAMETERS = ("profile", "device", "seed", "output_dir")
REPORT_NAME = "execution_report.txt"
RESULTS_CACHE_NAME = ".results_cache"  # under the executed folder: merges evaluated once per book run
MANIFEST_NAME = "manifest.json"

Log = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


# =============================================================================== parameters


class ParameterError(ValueError):
    """A parameter value a chapter cannot run with; the message starts with its name."""

    def __init__(self, name: str, message: str) -> None:
        self.name = name
        super().__init__(f"parameter '{name}': {message}")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _as_list(name: str, value: Any) -> list[Any]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ParameterError(name, f"expected a list, got {value!r}")
    items = list(value)
    if not items:
        raise ParameterError(name, "the list is empty")
    return items


def _task_counts(name: str, value: Any) -> list[int]:
    items = _as_list(name, value)
    for v in items:
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ParameterError(name, f"task counts are integers ≥ 1, got {v!r} in {items}")
    if len(set(items)) != len(items):
        raise ParameterError(name, f"duplicate task counts in {items}")
    return sorted(items)


_REQUIRED_VALUES = ("profile", "device", "seed", "task_counts", "betas", "alpha_grid", "gammas")


def _is_list_parameter(name: str) -> bool:
    return name.endswith(("task_counts", "betas", "alpha_grid", "gammas", "_seeds"))


def _device_parameter(device: str) -> str:
    """The ``device`` parameter resolved to ``cpu`` or ``cuda`` by
    :func:`subboost.evaluate.resolve_device`; :class:`ParameterError` for a value outside
    :data:`DEVICES` and for ``cuda`` without a GPU."""
    if device not in DEVICES:
        raise ParameterError("device", f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    from subboost.evaluate import resolve_device

    try:
        return resolve_device(device).type
    except ValueError as err:
        raise ParameterError("device", str(err)) from None


def validate_parameters(**params: Any) -> dict[str, Any]:
    """Check a chapter's parameters and return them normalised; raise :class:`ParameterError`
    (a ``ValueError`` whose message names the parameter) at the first bad value.

    Known names and rules:

    - ``profile`` ∈ {smoke, ci, full}; ``device`` ∈ {auto, cpu, cuda}, resolved (the
      request is kept as ``device_requested``);
    - ``seed``: integer ≥ 0;
    - ``output_dir``, ``results_cache``: a path (created) or ``None``;
    - ``task_counts`` and every ``*_task_counts``: non-empty list of distinct integers ≥ 1
      (returned sorted);
    - ``betas`` and every ``*betas``: non-empty list of numbers in [0, 1] (Alg. 1's β);
    - ``alpha_grid`` and every ``*alpha_grid``: non-empty list of finite numbers > 0;
    - ``gammas`` and every ``*gammas``: non-empty list of finite numbers ≥ 0 (Supp. E.4);
    - every ``*_seeds``: non-empty list of distinct integers ≥ 0;
    - ``zoo_root``, ``checkpoint_root``, ``data_root``: ``None`` or an existing directory;
    - ``model``: ``None`` or a non-empty string;
    - ``pi``: a finite number > 0 (HO-GSVD's π, :func:`subboost.chapters.hogsvd_alignment.check_pi`);
    - ``n_random_draws``, ``n_repeats``, ``matrix_size``: ``None`` or an integer ≥ 1;
      ``esm_images``: an integer ≥ 1; ``run_*``: true, false or ``None`` (the profile's choice);
    - ``lines_b_grid``: non-empty list of finite numbers.
    - ``executor`` ∈ {local, ray} and ``ray_address`` (``host:port`` of a Ray head, needed
      with ``ray`` and checked to answer; :mod:`subboost.executor`).

    ``None`` is accepted for the prefixed list names (e.g. ``sweep_task_counts``), meaning
    "the profile's default"; never for ``task_counts``, ``betas``, ``alpha_grid``, ``gammas``.
    Other names are passed through unchanged (chapter-specific settings).
    """
    out: dict[str, Any] = {}
    for name, value in params.items():
        if value is None and name not in _REQUIRED_VALUES and _is_list_parameter(name):
            out[name] = None  # a chapter-specific list left to its profile default
            continue
        if name == "profile":
            if value not in PROFILES:
                raise ParameterError(name, f"unknown profile {value!r}; choose one of {', '.join(PROFILES)}")
            out[name] = value
        elif name == "device":
            out["device_requested"] = value
            out[name] = _device_parameter(value)
        elif name == "seed":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ParameterError(name, f"expected an integer ≥ 0, got {value!r}")
            out[name] = value
        elif name in ("output_dir", "results_cache"):
            if value is None:
                out[name] = None
            else:
                if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
                    raise ParameterError(name, f"expected a folder path, got {value!r}")
                path = Path(value)
                try:
                    path.mkdir(parents=True, exist_ok=True)
                except OSError as err:
                    raise ParameterError(name, f"cannot create {path}: {err}") from None
                out[name] = path
        elif name == "task_counts" or name.endswith("_task_counts"):
            out[name] = _task_counts(name, value)
        elif name == "betas" or name.endswith("betas"):
            items = _as_list(name, value)
            for v in items:
                if not _is_number(v) or not 0.0 <= float(v) <= 1.0:
                    raise ParameterError(name, f"β must lie in [0, 1] (Alg. 1), got {v!r} in {items}")
            out[name] = [float(v) for v in items]
        elif name.endswith("_seeds"):
            items = _as_list(name, value)
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items):
                raise ParameterError(name, f"expected integers ≥ 0, got {items}")
            if len(set(items)) != len(items):
                raise ParameterError(name, f"seeds must be distinct, got {items}")
            out[name] = list(items)
        elif name == "alpha_grid" or name.endswith("alpha_grid"):
            items = _as_list(name, value)
            for v in items:
                if not _is_number(v) or float(v) <= 0:
                    raise ParameterError(name, f"merging coefficients must be finite and > 0, got {v!r} in {items}")
            out[name] = [float(v) for v in items]
        elif name == "gammas" or name.endswith("gammas"):
            items = _as_list(name, value)
            for v in items:
                if not _is_number(v) or float(v) < 0:
                    raise ParameterError(name, f"exponents γ must be finite and ≥ 0, got {v!r} in {items}")
            out[name] = [float(v) for v in items]
        elif name == "pi":
            from subboost.chapters.hogsvd_alignment import check_pi

            try:
                out[name] = check_pi(value)
            except ValueError as err:
                raise ParameterError(name, str(err).split(": ", 1)[-1]) from None
        elif name in ("n_random_draws", "n_repeats", "matrix_size", "esm_images"):
            if value is None and name != "esm_images":
                out[name] = None
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ParameterError(name, f"expected {'None or ' if name != 'esm_images' else ''}an integer ≥ 1, got {value!r}")
            else:
                out[name] = value
        elif name.startswith("run_"):
            if value is not None and not isinstance(value, bool):
                raise ParameterError(name, f"expected true, false or None (the profile's choice), got {value!r}")
            out[name] = value
        elif name == "lines_b_grid":
            items = _as_list(name, value)
            if not all(_is_number(v) for v in items):
                raise ParameterError(name, f"LiNeS b values must be finite numbers, got {items}")
            out[name] = [float(v) for v in items]
        elif name in ("zoo_root", "checkpoint_root", "data_root"):
            if value is not None and not Path(value).is_dir():
                raise ParameterError(name, f"{value!r} is not an existing directory")
            out[name] = None if value is None else Path(value)
        elif name == "model":
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ParameterError(name, f"expected a model name, got {value!r}")
            out[name] = value
        else:
            out[name] = value
    if "executor" in params or params.get("ray_address") is not None:
        from subboost.executor import validate_executor

        out["executor"], out["ray_address"] = validate_executor(params.get("executor", "local"), params.get("ray_address"))
    return out


# =============================================================================== provenance


def git_commit(root: Path = REPO_ROOT) -> tuple[str, bool]:
    """(short commit hash, whether tracked files differ from it); ("unknown", False) outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=20, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                capture_output=True, text=True, timeout=20, check=True).stdout
        return commit or "unknown", bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        return "unknown", False


@dataclass(frozen=True)
class Provenance:
    """Where a chapter's numbers come from; displays as one Markdown line."""

    commit: str
    dirty: bool
    profile: str
    device: str
    wall_time_s: float
    finished_utc: str
    torch_version: str
    python_version: str
    device_name: str = ""

    def __str__(self) -> str:
        commit = self.commit + (" + uncommitted changes" if self.dirty else "")
        dev = self.device + (f" ({self.device_name})" if self.device_name else "")
        return (f"Provenance: git commit {commit} · profile {self.profile} · device {dev} · "
                f"wall time {self.wall_time_s:.1f} s · finished {self.finished_utc} · "
                f"Python {self.python_version}, torch {self.torch_version}")

    def _repr_markdown_(self) -> str:
        commit = f"`{self.commit}`" + (" (with uncommitted changes)" if self.dirty else "")
        dev = f"`{self.device}`" + (f" ({self.device_name})" if self.device_name else "")
        return (f"**Provenance.** git commit {commit} · profile `{self.profile}` · device {dev} · "
                f"wall time {self.wall_time_s:.1f} s · finished {self.finished_utc} · "
                f"Python {self.python_version}, torch {self.torch_version}")

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def provenance(profile: str, device: str, started: float | datetime) -> Provenance:
    """The provenance line of a chapter: git commit, profile, device (resolved, with the GPU's
    name), wall time since ``started`` (``time.time()`` or an aware/naive UTC datetime)."""
    import platform

    import torch

    now = time.time()
    t0 = started.timestamp() if isinstance(started, datetime) else float(started)
    commit, dirty = git_commit()
    resolved = device if device in ("cpu", "cuda") else _device_parameter(device)
    name = torch.cuda.get_device_name(0) if resolved == "cuda" and torch.cuda.is_available() else ""
    return Provenance(
        commit=commit, dirty=dirty, profile=profile, device=resolved, wall_time_s=now - t0,
        finished_utc=datetime.fromtimestamp(now, timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        torch_version=torch.__version__, python_version=platform.python_version(), device_name=name,
    )


# =============================================================================== chapters


class BookError(RuntimeError):
    """A problem with the book's sources, execution or build (message is user-facing)."""


class BookInputError(BookError):
    """A bad request to the runner (unknown chapter or parameter, a runner option passed as
    ``--param``); exit code 2 like :class:`ParameterError`, not 1 (a chapter failed)."""


@dataclass(frozen=True)
class Chapter:
    """One chapter: ``name`` (file stem, e.g. ``02_propositions``) and its MyST source."""

    name: str
    source: Path


def discover_chapters(notebooks_dir: Path = NOTEBOOKS_DIR) -> list[Chapter]:
    """The chapters ``NN_*.md`` in ``notebooks_dir``, in file-name order."""
    paths = sorted(p for p in Path(notebooks_dir).glob("*.md") if re.match(r"^\d\d_", p.name))
    return [Chapter(p.stem, p) for p in paths]


def select_chapters(chapters: Sequence[Chapter], selectors: Sequence[str] | None) -> list[Chapter]:
    """Chapters whose name equals or starts with a selector (``02`` or ``02_propositions``);
    all when ``selectors`` is empty. An unmatched selector raises :class:`BookError`."""
    if not selectors:
        return list(chapters)
    picked: list[Chapter] = []
    for sel in selectors:
        hits = [c for c in chapters if c.name == sel or c.name.startswith(sel)]
        if not hits:
            raise BookInputError(f"no chapter matches '{sel}'; chapters: {', '.join(c.name for c in chapters)}")
        picked.extend(h for h in hits if h not in picked)
    return sorted(picked, key=lambda c: c.name)


def load_chapter(chapter: Chapter) -> Any:
    """The chapter as an nbformat notebook, read with the jupytext Python API."""
    import jupytext

    nb = jupytext.read(chapter.source, fmt="md:myst")
    nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    return nb


def parameters_cell_index(nb: Any, name: str = "notebook") -> int:
    """Index of the one code cell tagged ``parameters``; :class:`BookError` unless exactly one."""
    hits = [i for i, c in enumerate(nb.cells)
            if c.cell_type == "code" and "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(hits) != 1:
        raise BookError(f"{name}: needs exactly one code cell tagged 'parameters', found {len(hits)}")
    return hits[0]


def declared_parameters(nb: Any, name: str = "notebook") -> dict[str, Any]:
    """Names and default values assigned in the parameters cell (literal values; anything
    else is reported as its source text)."""
    cell = nb.cells[parameters_cell_index(nb, name)]
    try:
        tree = ast.parse(cell.source)
    except SyntaxError as err:
        raise BookError(f"{name}: the parameters cell is not valid Python: {err}") from None
    out: dict[str, Any] = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        value = getattr(node, "value", None)
        for t in targets:
            if isinstance(t, ast.Name):
                try:
                    out[t.id] = ast.literal_eval(value) if value is not None else None
                except ValueError:
                    out[t.id] = ast.get_source_segment(cell.source, value)
    return out


def parse_param(text: str) -> tuple[str, Any]:
    """``k=v`` → (k, v) with v parsed as YAML (``[4, 8]``, ``0.5``, ``null``, ``cuda``)."""
    import yaml

    if "=" not in text:
        raise BookInputError(f"--param expects key=value, got '{text}'")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key.isidentifier():
        raise BookInputError(f"--param: '{key}' is not a valid parameter name")
    try:
        return key, yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise BookInputError(f"--param {key}: cannot parse value '{raw}': {err}") from None


# =============================================================================== execution


@dataclass
class ChapterRun:
    """Outcome of executing one chapter."""

    chapter: str
    status: str  # "ok" | "failed"
    wall_time_s: float
    notebook: Path
    parameters: dict[str, Any] = field(default_factory=dict)
    error: str = ""


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _strip_ansi(text: str) -> str:
    return _ANSI.sub("", text)


def _source_line(source_file: Path, cell_source: str) -> int | None:
    """1-based line of the failing cell's first non-empty line in the MyST source."""
    first = next((ln for ln in cell_source.splitlines() if ln.strip()), None)
    if first is None:
        return None
    for i, ln in enumerate(source_file.read_text(encoding="utf-8").splitlines(), 1):
        if ln.rstrip() == first.rstrip():
            return i
    return None


def _failure_report(chapter: Chapter, params: Mapping[str, Any], err: BaseException, failed_nb: Path) -> str:
    from papermill.exceptions import PapermillExecutionError

    lines = [f"Chapter {chapter.name} FAILED",
             f"source: {chapter.source}",
             f"parameters: {json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in params.items()}, default=str)}"]
    if isinstance(err, PapermillExecutionError):
        line = _source_line(chapter.source, err.source)
        where = f" (line {line} of {chapter.source.name})" if line else ""
        lines += [f"failing cell: index {err.cell_index} of the executed notebook, execution count {err.exec_count}{where}",
                  "", "--- cell source ---", err.source.rstrip(),
                  "", "--- error ---", f"{err.ename}: {err.evalue}",
                  "", "--- traceback ---", _strip_ansi("\n".join(err.traceback)).rstrip()]
    else:
        lines += ["failing cell: none (the kernel or the runner failed)", "", "--- error ---",
                  f"{type(err).__name__}: {err}", "", "--- traceback ---",
                  "".join(traceback.format_exception(type(err), err, err.__traceback__)).rstrip()]
    lines += ["", f"notebook with the error output: {failed_nb}"]
    return "\n".join(lines) + "\n"


def execute_chapter(
    chapter: Chapter,
    *,
    profile: str,
    device: str,
    seed: int,
    executed_dir: Path,
    overrides: Mapping[str, Any] | None = None,
    timeout: int | None = None,
    cwd: Path = REPO_ROOT,
    progress: bool = False,
) -> tuple[ChapterRun, str]:
    """Execute one chapter with papermill. Returns the run record and, on failure, the text of
    its report (empty on success). Never raises for a cell error. With ``progress``, the
    terminal (stderr) shows the cell being run and the kernel's progress bars
    (:func:`live_progress`)."""
    import nbformat
    import papermill as pm

    executed_dir = Path(executed_dir)
    executed_dir.mkdir(parents=True, exist_ok=True)
    nb = load_chapter(chapter)
    declared = declared_parameters(nb, chapter.name)
    missing = [p for p in REQUIRED_PARAMETERS if p not in declared]
    if missing:
        raise BookError(f"{chapter.name}: the parameters cell must define {', '.join(missing)}")
    params: dict[str, Any] = dict(profile=profile, device=device, seed=seed,
                                  output_dir=str(executed_dir / chapter.name))
    if "results_cache" in declared:  # chapters share evaluated merges (subboost.experiments.ResultCache)
        params["results_cache"] = str(executed_dir / RESULTS_CACHE_NAME)
    params.update({k: v for k, v in (overrides or {}).items() if k in declared})

    inputs = executed_dir / ".inputs"
    inputs.mkdir(exist_ok=True)
    src_nb = inputs / f"{chapter.name}.ipynb"
    nbformat.write(nb, src_nb)
    final = executed_dir / f"{chapter.name}.ipynb"
    failed = executed_dir / f"{chapter.name}.failed.ipynb"
    running = executed_dir / f"{chapter.name}.running.ipynb"
    for stale in (final, failed, executed_dir / chapter.name / "claims.json"):  # the chapter's verdicts, rewritten
        stale.unlink(missing_ok=True)
    t0 = time.perf_counter()
    try:
        with live_progress(chapter.name, executed_dir, progress) as progress_bar:
            pm.execute_notebook(str(src_nb), str(running), parameters=params, kernel_name="python3",
                                cwd=str(cwd), progress_bar=progress_bar, execution_timeout=timeout,
                                request_save_on_cell_execute=False)
    except Exception as err:  # noqa: BLE001 -- every failure becomes a report
        wall = time.perf_counter() - t0
        if running.exists():
            os.replace(running, failed)
        report = _failure_report(chapter, params, err, failed)
        first = f"{getattr(err, 'ename', type(err).__name__)}: {getattr(err, 'evalue', str(err))}"
        return ChapterRun(chapter.name, "failed", wall, failed, params, first.strip()), report
    wall = time.perf_counter() - t0
    os.replace(running, final)
    return ChapterRun(chapter.name, "ok", wall, final, params), ""


def _check_overrides(chapters: Sequence[Chapter], overrides: Mapping[str, Any]) -> None:
    declared: set[str] = set()
    for ch in chapters:
        declared |= set(declared_parameters(load_chapter(ch), ch.name))
    unknown = [k for k in overrides if k not in declared]
    if unknown:
        raise BookInputError(f"parameter '{unknown[0]}' is not declared by any selected chapter "
                        f"(declared: {', '.join(sorted(declared))})")


def check_chapter_parameters(chapter: Chapter, *, profile: str, device: str, seed: int,
                             overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Validate the parameters one chapter will run with (its declared defaults, the
    runner's values and the ``overrides`` it declares) with the checks its own validation
    cell applies, without starting a kernel; raise :class:`ParameterError` naming the
    parameter. Chapter 2's sizes go through :func:`subboost.chapters.propositions.chapter_setup`."""
    declared = declared_parameters(load_chapter(chapter), chapter.name)
    values = {k: v for k, v in declared.items() if not isinstance(v, str) or k in ("profile", "device", "model")
              or k.endswith("_root")}
    values.update(profile=profile, device=device, seed=seed)
    values.update({k: v for k, v in (overrides or {}).items() if k in declared})
    values.pop("output_dir", None)  # set by the runner per chapter; created when it runs
    checked = validate_parameters(**values)
    sizes = ("matrix_size", "n_repeats", "common_rank", "noise_fraction")
    if any(k in declared for k in sizes):
        from subboost.chapters.propositions import chapter_setup

        kwargs = {k: checked[k] for k in sizes + ("sweep_task_counts",) if k in checked}
        try:
            chapter_setup(checked["profile"], seed=checked["seed"], **kwargs)
        except ValueError as err:
            m = re.match(r"parameter '(\w+)': (.*)", str(err))
            raise ParameterError(m.group(1), m.group(2)) if m else ParameterError("profile", str(err)) from None
    return checked


def execute_book(
    *,
    profile: str,
    device: str,
    seed: int = 0,
    chapters: Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    notebooks_dir: Path = NOTEBOOKS_DIR,
    executed_dir: Path = EXECUTED_DIR,
    timeout: int | None = None,
    keep_going: bool = False,
    log: Log = _quiet,
    progress: bool = False,
    executor: str = "local",
    ray_address: str | None = None,
) -> list[ChapterRun]:
    """Execute the selected chapters in order; write ``execution_report.txt`` and
    ``manifest.json`` into ``executed_dir``. Parameters are validated before any kernel starts
    (:class:`ParameterError`). Raises :class:`BookError` after the first failed chapter (after
    all of them with ``keep_going``); the report names chapter, cell and traceback.

    ``executor="ray"`` with ``ray_address``: the chapters run at the same time as Ray tasks on
    that cluster (:func:`execute_chapters_ray`; every chapter runs, as with ``keep_going``),
    and chapters that declare ``executor`` / ``ray_address`` get them, so their sweeps are
    spread over the cluster too. The executed notebooks come back to ``executed_dir``."""
    from subboost.executor import validate_executor

    executor, ray_address = validate_executor(executor, ray_address)  # an unreachable address stops here
    overrides = dict(overrides or {})
    reserved = [k for k in overrides if k in REQUIRED_PARAMETERS]
    if reserved:
        raise BookInputError(f"set {', '.join(reserved)} with the runner's own options (--profile, --device, --seed, "
                        f"--executed-dir), not with --param")
    validate_parameters(profile=profile, device=device, seed=seed, **overrides)
    selected = select_chapters(discover_chapters(notebooks_dir), chapters)
    if not selected:
        raise BookError(f"no chapters found in {notebooks_dir}")
    _check_overrides(selected, overrides)
    for ch in selected:  # every chapter's values, before the first kernel starts
        check_chapter_parameters(ch, profile=profile, device=device, seed=seed, overrides=overrides)
    executed_dir = Path(executed_dir)
    executed_dir.mkdir(parents=True, exist_ok=True)
    report_path = executed_dir / REPORT_NAME
    runs: list[ChapterRun] = []
    failures: list[str] = []
    if executor == "ray":
        cluster_overrides = {"executor": "ray", "ray_address": ray_address, **overrides}
        for run, report in execute_chapters_ray(selected, address=ray_address, profile=profile, device=device,
                                                seed=seed, executed_dir=executed_dir, overrides=cluster_overrides,
                                                timeout=timeout, log=log):
            runs.append(run)
            if run.status != "ok":
                failures.append(report)
    for ch in selected if executor == "local" else ():
        log(f"[book] executing {ch.name} (profile {profile}, device {device}) ...")
        run, report = execute_chapter(ch, profile=profile, device=device, seed=seed, executed_dir=executed_dir,
                                      overrides=overrides, timeout=timeout, cwd=notebooks_dir.parent,
                                      progress=progress)
        runs.append(run)
        log(f"[book]   {ch.name}: {run.status} in {run.wall_time_s:.1f} s -> {run.notebook}")
        if run.status != "ok":
            failures.append(report)
            if not keep_going:
                break
    _write_manifest(executed_dir, runs, profile, device, seed)
    summary = [f"Book execution: profile {profile}, device {device}, seed {seed}, "
               f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M:%S UTC')}"]
    summary += [f"  {r.chapter:<28} {r.status:<7} {r.wall_time_s:8.1f} s  {r.notebook}" for r in runs]
    not_run = [c.name for c in selected if c.name not in {r.chapter for r in runs}]
    if not_run:
        summary.append(f"  not executed after the failure: {', '.join(not_run)}")
    text = "\n".join(summary) + "\n"
    if failures:
        text += "\n" + "\n\n".join("=" * 78 + "\n" + f for f in failures)
    report_path.write_text(text, encoding="utf-8")
    if failures:
        bad = [r for r in runs if r.status != "ok"]
        raise BookError(f"{len(bad)} chapter(s) failed: "
                        + "; ".join(f"{r.chapter}: {r.error}" for r in bad)
                        + f". Report: {report_path}")
    return runs


def _run_chapter_remotely(name: str, source_text: str, profile: str, device: str, seed: int,
                          overrides: Mapping[str, Any], timeout: int | None) -> tuple[ChapterRun, str, dict[str, bytes]]:
    """What a Ray worker runs for one chapter: execute it from its source text in a private
    folder and return the run, the failure report and the files it produced (notebook and
    output folder) as bytes, so the driver needs no shared filesystem for them."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix=f"book-{name}-") as tmp:
        src = Path(tmp) / "notebooks" / f"{name}.md"
        src.parent.mkdir()
        src.write_text(source_text, encoding="utf-8")
        out = Path(tmp) / "executed"
        run, report = execute_chapter(Chapter(name, src), profile=profile, device=device, seed=seed, executed_dir=out,
                                      overrides=overrides, timeout=timeout, cwd=REPO_ROOT)
        files = {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
                 if p.is_file() and not p.relative_to(out).parts[0].startswith(".")}
        return run, report.replace(str(out), "{executed_dir}").replace(str(src), "{source}"), files


def execute_chapters_ray(chapters: Sequence[Chapter], *, address: str, profile: str, device: str, seed: int,
                         executed_dir: Path, overrides: Mapping[str, Any], timeout: int | None = None,
                         log: Log = _quiet) -> list[tuple[ChapterRun, str]]:
    """Execute ``chapters`` at the same time as Ray tasks on the cluster at ``address``; return
    (run, failure report) per chapter in the chapters' order, with the executed notebooks
    and output folders written into ``executed_dir`` (the same files as a local run).

    Each chapter asks for one CPU, and one GPU when ``device`` is ``cuda``; a chapter that
    spreads its own sweeps over the cluster (it declares ``executor``) asks for no CPU, so
    that its units can use them. Workers need the package and the zoo or checkpoints at the
    same paths; the chapters' sources travel with the tasks."""
    import ray

    from subboost.executor import RayExecutor

    with RayExecutor(address, check=False) as runner:
        refs = []
        for ch in chapters:
            declared = declared_parameters(load_chapter(ch), ch.name)
            own = {k: v for k, v in overrides.items() if k in declared}
            cpus = 0 if own.get("executor") == "ray" else 1
            task = ray.remote(_run_chapter_remotely).options(num_cpus=cpus, num_gpus=1 if device == "cuda" else 0,
                                                             max_retries=runner.max_retries)
            log(f"[book] submitting {ch.name} to the Ray cluster at {address} ...")
            refs.append(task.remote(ch.name, ch.source.read_text(encoding="utf-8"), profile, device, seed, own, timeout))
        results = []
        for ch, ref in zip(chapters, refs):
            try:
                run, report, files = ray.get(ref)
            except ray.exceptions.RayError as err:
                first = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                run = ChapterRun(ch.name, "failed", float("nan"), executed_dir / f"{ch.name}.failed.ipynb", dict(overrides), first)
                results.append((run, f"Chapter {ch.name} FAILED on the Ray cluster at {address}\n{first}\n"))
                log(f"[book]   {ch.name}: failed on the cluster ({first})")
                continue
            for stale in (executed_dir / f"{ch.name}.ipynb", executed_dir / f"{ch.name}.failed.ipynb"):
                stale.unlink(missing_ok=True)
            if (executed_dir / ch.name).is_dir():
                shutil.rmtree(executed_dir / ch.name)
            for rel, data in files.items():
                dst = executed_dir / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                part = dst.with_name(dst.name + ".part")
                part.write_bytes(data)
                os.replace(part, dst)
            run.notebook = executed_dir / Path(run.notebook).name
            run.parameters["output_dir"] = str(executed_dir / ch.name)
            report = report.replace("{executed_dir}", str(executed_dir)).replace("{source}", str(ch.source))
            log(f"[book]   {ch.name}: {run.status} in {run.wall_time_s:.1f} s (on the cluster) -> {run.notebook}")
            results.append((run, report))
    return results


def _write_manifest(executed_dir: Path, runs: Sequence[ChapterRun], profile: str, device: str, seed: int) -> None:
    path = executed_dir / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    except json.JSONDecodeError:
        manifest = {}
    commit, dirty = git_commit()
    for r in runs:
        manifest[r.chapter] = dict(status=r.status, wall_time_s=round(r.wall_time_s, 2), profile=profile,
                                   device=device, seed=seed, commit=commit, dirty=dirty,
                                   notebook=str(r.notebook), error=r.error,
                                   finished_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")


# =============================================================================== build


def _toc_files(toc_path: Path) -> list[str]:
    import yaml

    toc = yaml.safe_load(toc_path.read_text(encoding="utf-8"))
    files: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "file" in node:
                files.append(str(node["file"]))
            if "root" in node:
                files.append(str(node["root"]))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(toc)
    return files


def stage_site(
    *,
    root: Path = REPO_ROOT,
    executed_dir: Path = EXECUTED_DIR,
    stage_dir: Path = STAGE_DIR,
) -> Path:
    """Assemble the Jupyter Book sources in ``stage_dir``: ``_config.yml``, ``_toc.yml``, the
    ``book/`` pages and, for every toc entry under ``notebooks/``, the executed notebook from
    ``executed_dir`` (never the unexecuted source). A missing or failed chapter raises
    :class:`BookError` naming it and the command that produces it."""
    root, executed_dir, stage_dir = Path(root), Path(executed_dir), Path(stage_dir)
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    stage_dir.mkdir(parents=True)
    for name in ("_config.yml", "_toc.yml"):
        if not (root / name).is_file():
            raise BookError(f"missing {root / name}")
        shutil.copy2(root / name, stage_dir / name)
    if (root / "book").is_dir():
        shutil.copytree(root / "book", stage_dir / "book",
                        ignore=shutil.ignore_patterns("_build", "_executed", "__pycache__", ".ipynb_checkpoints"))
    stage_benchmark_fragments(root, stage_dir)
    missing = []
    for entry in _toc_files(root / "_toc.yml"):
        if not entry.startswith("notebooks/"):
            continue
        name = Path(entry).with_suffix("").name
        src = executed_dir / f"{name}.ipynb"
        if not src.is_file():
            missing.append(name)
            continue
        dst = stage_dir / "notebooks" / f"{name}.ipynb"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
        collapse_parameter_cells(dst)
        # figures or data a chapter links to (e.g. with {download}) travel with it
        if (executed_dir / name).is_dir():
            shutil.copytree(executed_dir / name, stage_dir / "notebooks" / name)
    if missing:
        failed = [m for m in missing if (executed_dir / f"{m}.failed.ipynb").exists()]
        hint = f" ({', '.join(failed)} failed: see {executed_dir / REPORT_NAME})" if failed else ""
        raise BookError(f"no executed notebook in {executed_dir} for: {', '.join(missing)}{hint}; run "
                        f"`python -m subboost.book execute --profile ci` first")
    write_generated_pages(stage_dir, executed_dir)
    return stage_dir


def collapse_parameter_cells(path: Path) -> None:
    """Tag the parameters cell and papermill's injected-parameters cell of a staged notebook
    ``hide-input``, so the page opens with the chapter's claim, not with its settings."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        tags = cell.get("metadata", {}).get("tags", [])
        if cell.cell_type == "code" and {"parameters", "injected-parameters"} & set(tags) and "hide-input" not in tags:
            cell.metadata["tags"] = [*tags, "hide-input"]
    nbformat.write(nb, path)


#: Benchmark outputs that book pages include: (results folder, file stem, the command that makes them).
BENCHMARK_FRAGMENTS = (("benchmarks/results", "ray_scaling", "python benchmarks/ray_scaling.py"),)


def stage_benchmark_fragments(root: Path, stage_dir: Path) -> None:
    """Put ``book/_generated/<stem>.md`` (and its figure) in the staged sources for every
    entry of :data:`BENCHMARK_FRAGMENTS`: the fragment the benchmark script wrote, when it
    has been run in this checkout, else one sentence naming the command, so that a page
    including it builds either way."""
    out = Path(stage_dir) / "book" / "_generated"
    out.mkdir(parents=True, exist_ok=True)
    for folder, stem, command in BENCHMARK_FRAGMENTS:
        src = Path(root) / folder
        if (src / f"{stem}.md").is_file() and (src / f"{stem}.png").is_file():
            shutil.copy2(src / f"{stem}.md", out / f"{stem}.md")
            shutil.copy2(src / f"{stem}.png", out / f"{stem}.png")
        else:
            (out / f"{stem}.md").write_text(
                f"*Not measured in this build:* `{command}` writes the table and the figure into "
                f"`{folder}/`, and the next `python -m subboost.book build` shows them here.\n", encoding="utf-8")


def build_site(
    *,
    root: Path = REPO_ROOT,
    executed_dir: Path = EXECUTED_DIR,
    stage_dir: Path = STAGE_DIR,
    site_dir: Path = SITE_DIR,
    log: Log = _quiet,
) -> Path:
    """Stage the sources and run ``jupyter-book build`` with warnings as errors. Returns the
    folder of the rendered HTML (``site_dir``). Raises :class:`BookError` with the end of the
    build log if Sphinx reports a warning or an error."""
    stage = stage_site(root=root, executed_dir=executed_dir, stage_dir=stage_dir)
    site_dir = Path(site_dir)
    out_parent = stage / "_out"
    cmd = [sys.executable, "-c", "import sys; from jupyter_book.cli.main import main; sys.exit(main())",
           "build", str(stage), "--path-output", str(out_parent), "--warningiserror", "--keep-going",
           "--all"]
    log(f"[book] building the site from {stage} ...")
    proc = subprocess.run(cmd, cwd=stage, capture_output=True, text=True)
    (stage / "build.log").write_text(proc.stdout + "\n" + proc.stderr, encoding="utf-8")
    built = out_parent / "_build" / "html"
    if proc.returncode != 0 or not built.is_dir():
        tail = "\n".join((proc.stdout + "\n" + proc.stderr).strip().splitlines()[-40:])
        raise BookError(f"jupyter-book build failed (warnings are errors); full log: {stage / 'build.log'}\n{tail}")
    if site_dir.exists():
        shutil.rmtree(site_dir)
    site_dir.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(built), str(site_dir))
    return site_dir


def first_chapter_page(site_dir: Path = SITE_DIR) -> Path:
    """The page ``index.html`` redirects to (open this one in a browser)."""
    text = (Path(site_dir) / "index.html").read_text(encoding="utf-8")
    m = re.search(r'url=([^"\s>]+)', text)
    return Path(site_dir) / (m.group(1) if m else "index.html")


# =============================================================================== live progress

#: Environment variable naming the side channel a chapter's kernel writes its progress to.
PROGRESS_ENV = "SUBBOOST_PROGRESS_FILE"


def route_progress() -> bool:
    """Call in a chapter's kernel (its set-up cell): when the runner watches the run, send the
    kernel's stderr (progress bars of the zoo build and of long loops, warnings) to the
    runner's side channel instead of the notebook, so the terminal shows them live and the
    executed notebook stays free of progress noise. Returns whether it did (False outside the
    runner: then nothing changes)."""
    path = os.environ.get(PROGRESS_ENV)
    if not path:
        return False
    sys.stderr = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 -- lives as long as the kernel
    return True


class _Terminal:
    """The runner's stderr, shared by papermill's cell bar (``\r`` updates, no newline) and
    the side-channel lines: a line starts on a fresh row even while the bar's row is open."""

    def __init__(self, stream: Any) -> None:
        import threading

        self.stream, self._open, self._lock = stream, False, threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self.stream.write(text)
            if text:
                self._open = not text.endswith("\n")
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def line(self, text: str) -> None:
        with self._lock:
            self.stream.write(("\n" if self._open else "") + text + "\n")
            self._open = False
            self.stream.flush()


class _Tail:
    """Print what a chapter's kernel writes to its side channel, prefixed with the chapter and
    the elapsed time: every finished line, and the newest state of a progress bar (``\r``
    updates) at most every ``interval`` seconds."""

    def __init__(self, path: Path, chapter: str, stream: _Terminal, interval: float = 5.0) -> None:
        import threading

        self.path, self.chapter, self.stream, self.interval = path, chapter, stream, interval
        self.t0 = time.perf_counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._pending = ""
        self._shown = ""
        self._last = 0.0

    def __enter__(self) -> "_Tail":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _say(self, text: str) -> None:
        text = _strip_ansi(text).strip()
        if text and text != self._shown:
            m, s = divmod(int(time.perf_counter() - self.t0), 60)
            self.stream.line(f"[{self.chapter} {m:02d}:{s:02d}] {text}")
            self._shown, self._last = text, time.perf_counter()

    def _run(self) -> None:
        pos = 0
        while True:
            stopping = self._stop.wait(0.5)
            try:
                with open(self.path, encoding="utf-8", errors="replace") as fh:
                    fh.seek(pos)
                    chunk = fh.read()
                    pos = fh.tell()
            except OSError:
                chunk = ""
            self._pending += chunk
            *done, self._pending = re.split(r"\n", self._pending)
            for line in done:
                self._say(line.split("\r")[-1] if "\r" in line else line)
            latest = self._pending.split("\r")
            if len(latest) > 1 and (stopping or time.perf_counter() - self._last >= self.interval):
                self._say(latest[-2] if not latest[-1].strip() else latest[-1])
            if stopping:
                return


@contextmanager
def live_progress(chapter: str, executed_dir: Path, enabled: bool, stream: Any = None):
    """While a chapter runs: papermill's cell bar (chapter, cell k of n, elapsed) on ``stream``
    (stderr), and the kernel's side channel (``<executed_dir>/.progress/<chapter>.log``, see
    :func:`route_progress`) tailed onto it. Yields papermill's ``progress_bar`` argument."""
    if not enabled:
        yield False
        return
    stream = _Terminal(stream or sys.stderr)
    side = Path(executed_dir) / ".progress" / f"{chapter}.log"
    side.parent.mkdir(parents=True, exist_ok=True)
    side.write_text("", encoding="utf-8")
    before = os.environ.get(PROGRESS_ENV)
    os.environ[PROGRESS_ENV] = str(side)
    try:
        with _Tail(side, chapter, stream):
            yield {"desc": chapter, "file": stream, "mininterval": 2.0, "ascii": True, "dynamic_ncols": False}
    finally:
        if before is None:
            os.environ.pop(PROGRESS_ENV, None)
        else:
            os.environ[PROGRESS_ENV] = before


# =============================================================================== generated pages

FINDINGS_PAGE = "book/findings.md"
EXECUTION_PAGE = "book/execution.md"


def _manifest(executed_dir: Path) -> dict[str, Any]:
    path = Path(executed_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except json.JSONDecodeError:
        return {}


def timing_rows(executed_dir: Path = EXECUTED_DIR) -> list[dict[str, Any]]:
    """One row per chapter of the manifest: chapter, status, wall time, profile, device,
    commit, finished (the last execution of each chapter)."""
    rows = []
    for name, m in sorted(_manifest(executed_dir).items()):
        rows.append(dict(chapter=name, status=m.get("status", ""), wall_time_s=float(m.get("wall_time_s", 0.0)),
                         profile=m.get("profile", ""), device=m.get("device", ""),
                         commit=str(m.get("commit", "")) + ("+" if m.get("dirty") else ""),
                         finished=m.get("finished_utc", "")))
    return rows


def timing_text(executed_dir: Path = EXECUTED_DIR) -> str:
    """The per-chapter timing table for the terminal."""
    rows = timing_rows(executed_dir)
    lines = [f"  {'chapter':<28} {'status':<7} {'wall time':>10}  profile  device  finished"]
    lines += [f"  {r['chapter']:<28} {r['status']:<7} {r['wall_time_s']:9.1f}s  {r['profile']:<7}  {r['device']:<6}  "
              f"{r['finished']}" for r in rows]
    lines.append(f"  {'total':<28} {'':<7} {sum(r['wall_time_s'] for r in rows):9.1f}s")
    return "\n".join(lines)


def findings_text(executed_dir: Path = EXECUTED_DIR) -> str:
    """The findings table (:mod:`subboost.claims`) for the terminal."""
    from subboost import claims

    return claims.findings_text(claims.findings_rows(executed_dir))


def write_generated_pages(stage_dir: Path, executed_dir: Path) -> list[Path]:
    """Write the pages built from the executed chapters' records into the staged sources:
    "Findings at a glance" (every claim's verdict, :mod:`subboost.claims`) and "Execution
    status" (per-chapter timings from the manifest). Only pages listed in the toc are written."""
    from subboost import claims

    stage_dir, executed_dir = Path(stage_dir), Path(executed_dir)
    toc = set(_toc_files(stage_dir / "_toc.yml"))
    written = []
    if Path(FINDINGS_PAGE).with_suffix("").as_posix() in toc:
        rows = claims.findings_rows(executed_dir)
        counts = {v: sum(r["verdict"] == v for r in rows) for v in (*claims.VERDICTS, claims.NOT_RUN)}
        summary = ", ".join(f"{n} {v}" for v, n in counts.items() if n)
        text = ("# Findings at a glance\n\n"
                "Every claim of the paper that this book tests, with the paper's number, ours, and the verdict "
                "that a rule of `subboost.claims` computed from the executed chapter's measurements (never typed). "
                "The evidence column links to the section of the chapter that shows it; the last column names the "
                "run that produced it. Our suite is far smaller than the paper's models: a verdict is about the "
                "direction and size of an effect on this suite, not about equal numbers. "
                f"This build: {summary}.\n\n"
                + claims.findings_markdown(rows, linked=lambda ch: (stage_dir / "notebooks" / f"{ch}.ipynb").is_file()))
        path = stage_dir / FINDINGS_PAGE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        written.append(path)
    if Path(EXECUTION_PAGE).with_suffix("").as_posix() in toc:
        rows = timing_rows(executed_dir)
        lines = ["# Execution status", "",
                 "How long each chapter took in the run that produced this book (from the runner's manifest), "
                 "as `python -m subboost.book execute` recorded it.", "",
                 "| Chapter | Status | Wall time [s] | Profile | Device | Commit | Finished (UTC) |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['chapter']} | {r['status']} | {r['wall_time_s']:.1f} | {r['profile']} | {r['device']} | "
                  f"{r['commit']} | {r['finished']} |" for r in rows]
        lines += ["", f"Total: {sum(r['wall_time_s'] for r in rows):.1f} s."]
        path = stage_dir / EXECUTION_PAGE
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(path)
    return written


# =============================================================================== CLI


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m subboost.book", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def add_exec(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--profile", choices=PROFILES, default="ci", help="size of every experiment (default: ci)")
        sp.add_argument("--device", choices=DEVICES, default="auto", help="torch device (default: auto)")
        sp.add_argument("--seed", type=int, default=0, help="seed injected into every chapter (default: 0)")
        sp.add_argument("--chapters", nargs="+", metavar="NAME",
                        help="chapters to execute, by name or prefix (e.g. 02); default: all")
        sp.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="extra papermill parameter, value parsed as YAML (repeatable)")
        sp.add_argument("--timeout", type=int, default=None, help="per-cell timeout in seconds (default: none)")
        sp.add_argument("--keep-going", action="store_true", help="execute the other chapters after a failure")
        sp.add_argument("--executor", choices=("local", "ray"), default="local",
                        help="local: one chapter after the other here (default); ray: chapters as Ray tasks")
        sp.add_argument("--address", dest="ray_address", default=None, metavar="HOST:PORT",
                        help="the Ray head to use with --executor ray (ray start --head prints it)")
        sp.add_argument("--notebooks-dir", type=Path, default=NOTEBOOKS_DIR, help=argparse.SUPPRESS)

    def add_build(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--site-dir", type=Path, default=SITE_DIR, help=f"rendered site (default: {SITE_DIR})")
        sp.add_argument("--stage-dir", type=Path, default=STAGE_DIR, help=argparse.SUPPRESS)

    for name, helptext in (("execute", "execute the chapters with papermill"),
                           ("build", "render the executed chapters with jupyter-book"),
                           ("all", "execute, then build")):
        sp = sub.add_parser(name, help=helptext)
        sp.add_argument("--executed-dir", type=Path, default=EXECUTED_DIR,
                        help=f"where executed notebooks and their outputs go (default: {EXECUTED_DIR})")
        if name in ("execute", "all"):
            add_exec(sp)
        if name in ("build", "all"):
            add_build(sp)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 ok, 1 execution/build failure, 2 bad input)."""
    args = _parser().parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    try:
        if args.command in ("execute", "all"):
            overrides = dict(parse_param(p) for p in args.param)
            t0 = time.perf_counter()
            execute_book(profile=args.profile, device=args.device, seed=args.seed, chapters=args.chapters,
                         overrides=overrides, notebooks_dir=args.notebooks_dir, executed_dir=args.executed_dir,
                         timeout=args.timeout, keep_going=args.keep_going, log=log, progress=True,
                         executor=args.executor, ray_address=args.ray_address)
            log(f"[book] executed in {time.perf_counter() - t0:.1f} s; report: {args.executed_dir / REPORT_NAME}")
            log("[book] execution times:\n" + timing_text(args.executed_dir))
        if args.command in ("build", "all"):
            t0 = time.perf_counter()
            site = build_site(executed_dir=args.executed_dir, stage_dir=args.stage_dir, site_dir=args.site_dir, log=log)
            log(f"[book] site built in {time.perf_counter() - t0:.1f} s: {first_chapter_page(site)}")
            log("[book] findings at a glance:\n" + findings_text(args.executed_dir))
    except (ParameterError, BookInputError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BookError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
