"""The evaluation protocol shared by the book's chapters 1, 3, 4 and 5.

A *suite* is anything that provides the suite interface (:class:`Suite`, that is
:class:`subboost.evaluate.EvaluationSuite`): the mini zoo (:func:`subboost.zoo.load_suite`), real
checkpoints (:func:`subboost.release.load_suite`) and the language zoo
(:func:`subboost.langzoo.load_suite`) all do, so every chapter runs on any of them. Following
the papers, each merged model gets its α (and LiNeS' b) chosen on the validation splits of the
merged tasks, then one evaluation on the test splits (:func:`subboost.evaluate.tune_and_test`).

Here: loading a chapter's suite from its parameters and the task counts it uses, merge
variants (:class:`Variant`), results tables (:func:`results_table`; Tables 1, 4, 9 and their
units for :mod:`subboost.executor`), rank tables per task count (:func:`rank_collapse_table`),
our tables beside the paper's, and one-sentence trends. What only one chapter uses lives in
that chapter's module under :mod:`subboost.chapters`.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Sequence

import pandas as pd
import torch
from tqdm import tqdm  # plain text bar: the book kernels have no ipywidgets

from subboost.evaluate import EvaluationSuite as Suite
from subboost.evaluate import alpha_sweep, best_alpha, evaluate_delta
from subboost.merging import get_method, merge
from subboost.spectral import rank_table
from subboost.taskvector import StateDict

if TYPE_CHECKING:
    from subboost.executor import Executor, SuiteSpec


@dataclass(frozen=True)
class Variant:
    """One row of a results table: a registered method, its parameters, ± SB, ± LiNeS."""

    label: str
    method: str = "ta"
    params: Mapping = field(default_factory=dict)
    boost_beta: float | None = None
    boost_options: Mapping | None = None
    lines_b_grid: tuple[float, ...] | None = None  # LiNeS on: b chosen on validation
    alpha_grid: tuple[float, ...] | None = None  # default: the method's grid from the papers

    def alphas(self) -> tuple[float, ...]:
        return self.alpha_grid or get_method(self.method).alpha_grid


LINES_B = (0.0, 0.5, 1.0)

TABLE1_VARIANTS = (
    Variant("TA", "ta"),
    Variant("TA+SB", "ta", boost_beta=0.0),
    Variant("TA+LiNeS", "ta", lines_b_grid=LINES_B),
    Variant("TA+LiNeS+SB", "ta", boost_beta=0.0, lines_b_grid=LINES_B),
    Variant("TIES", "ties", {"top_k": 0.2}),
    Variant("TIES+SB", "ties", {"top_k": 0.2}, boost_beta=0.0),
    Variant("Consensus", "consensus", {"k": 2, "lambdas": 0.4}),
    Variant("Consensus+SB", "consensus", {"k": 2, "lambdas": 0.4}, boost_beta=0.0),
)


def task_subsets(suite: Suite, task_counts: Iterable[int]) -> dict[int, list[str]]:
    """The first N tasks of the suite's fixed order, as in the paper's 8 / 14 / 20 benchmarks."""
    subsets = {}
    for n in task_counts:
        n = int(n)
        if not 2 <= n <= len(suite.task_names):
            raise ValueError(f"task_counts: {n} is outside 2..{len(suite.task_names)} (tasks available)")
        subsets[n] = list(suite.task_names[:n])
    return subsets


def reference_rows(suite: Suite, task_counts: Iterable[int]) -> pd.DataFrame:
    """Zero-shot and fine-tuned mean accuracy (percent) on the first N tasks."""
    rows = []
    for n, tasks in task_subsets(suite, task_counts).items():
        for label, fn in (("Zero-shot", suite.zeroshot_accuracy), ("Fine-tuned", suite.finetuned_accuracy)):
            acc = [fn(t) for t in tasks]
            zs = [fn(t) / suite.finetuned_accuracy(t) for t in tasks]
            rows.append(dict(method=label, n_tasks=n, accuracy=100 * sum(acc) / n,
                             normalized_accuracy=100 * sum(zs) / n, alpha=float("nan"), lines_b=float("nan"),
                             merge_seconds=float("nan")))
    return pd.DataFrame(rows)


def merge_variant(vectors: Mapping[str, StateDict], variant: Variant, lines_b: float | None = None) -> tuple[StateDict, float]:
    """Merge with a variant; returns Δm and the wall time of the merge in seconds."""
    start = time.perf_counter()
    delta = merge(vectors, variant.method, boost_beta=variant.boost_beta,
                  boost_options=variant.boost_options, lines_b=lines_b, **dict(variant.params))
    return delta, time.perf_counter() - start


class ResultCache:
    """Evaluated merges shared between the chapters of one book run, kept on disk.

    Chapters 1, 3 and 4 and the appendix evaluate some of the same merges (TA and TA+SB at the
    Table 1 counts, TA+LiNeS(+SB), the β ablation, the selection test's sets) with the same protocol; with one cache folder (the book
    runner passes ``executed/.results_cache`` as the chapters' ``results_cache`` parameter) a
    later chapter reads what an earlier one measured instead of merging and evaluating again.
    A cached row is the row :func:`evaluate_variant` computed, so a chapter gives the same
    numbers whether it runs alone or after the others (only ``merge_seconds``, a timing, comes
    from the first run).

    The key holds everything the row depends on: the suite's ``fingerprint`` (the zoo's
    folder, a digest of its ``build.json`` and the evaluation batch size; a suite without one, e.g. real checkpoints, is
    never cached), the tasks in order, the variant's fields except its label, the α grid used, the
    device, torch's version and thread count, and a digest of this package's source (a code
    change never reuses an older row). Rows are published atomically (one JSON file per key)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._code = _source_digest()

    def key(self, suite: Suite, tasks: Sequence[str], variant: Variant, alphas: Sequence[float],
            **protocol: object) -> str | None:
        """The row's key (hex digest), or ``None`` when ``suite`` has no fingerprint. ``tasks``
        are the merged tasks; ``protocol`` names any other setting the row depends on (e.g. the
        selection experiments' evaluation tasks), JSON-serialisable."""
        fingerprint = getattr(suite, "fingerprint", None)
        if not fingerprint:
            return None
        fields = {k: v for k, v in asdict(variant).items() if k not in ("label", "alpha_grid")}  # α: ``alphas``
        parts = dict(suite=fingerprint, tasks=list(tasks), variant=fields, alphas=[float(a) for a in alphas],
                     protocol=protocol, device=str(getattr(suite, "device", "cpu")), torch=torch.__version__,
                     threads=torch.get_num_threads(), code=self._code)
        text = json.dumps(parts, sort_keys=True, default=repr)
        return hashlib.sha256(text.encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.json"

    def load(self, key: str, label: str | None = None) -> dict | None:
        """The row stored under ``key`` (with ``method`` set to ``label`` when given), or ``None``."""
        path = self._path(key)
        if not path.is_file():
            return None
        stored = json.loads(path.read_text())
        row = {k: v for k, v in stored["row"]}
        per_task = pd.DataFrame(stored["per_task"], columns=stored["per_task_columns"])
        per_task.attrs.update(stored["per_task_attrs"])
        if label is not None:
            row["method"] = label
        row["per_task"] = per_task
        return row

    def get_or_compute(self, key: str | None, compute: Callable[[], dict], label: str | None = None) -> dict:
        """The row under ``key`` if stored (:meth:`load`), else ``compute()`` stored under it;
        ``key=None`` (an uncacheable suite) only computes."""
        if key is not None:
            row = self.load(key, label)
            if row is not None:
                return row
        row = compute()
        if key is not None:
            self.store(key, row)
        return row

    def store(self, key: str, row: Mapping) -> None:
        """Publish ``row`` (a row of :func:`evaluate_variant`, or any dict of JSON values with a
        ``per_task`` evaluation table) under ``key``."""
        from subboost.zoo_common import write_json

        per_task = row["per_task"]
        write_json(self._path(key), {
            "row": [[k, v] for k, v in row.items() if k != "per_task"],
            "per_task": per_task.to_dict("list"), "per_task_columns": list(per_task.columns),
            "per_task_attrs": dict(per_task.attrs)})


def _source_digest() -> str:
    """sha256 of the package's Python sources (a cache key part: a code change invalidates)."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def as_result_cache(cache: "ResultCache | str | Path | None") -> "ResultCache | None":
    """A chapter's ``results_cache`` parameter (a folder or ``None``) as a :class:`ResultCache`."""
    if cache is None or isinstance(cache, ResultCache):
        return cache
    return ResultCache(cache)


def evaluate_variant(suite: Suite, tasks: Sequence[str], variant: Variant,
                     vectors: Mapping[str, StateDict] | None = None,
                     alpha_grid: Sequence[float] | None = None, cache: ResultCache | None = None) -> dict:
    """Merge the tasks' experts with ``variant``, choose α (and LiNeS b) on validation, test once.

    Returns a row: method, n_tasks, accuracy and normalized_accuracy (test, percent, mean over
    tasks), alpha, alpha_at_edge (the chosen α is the grid's smallest or largest: widen the
    grid), lines_b, merge_seconds, per_task (DataFrame of the test evaluation). ``alpha_grid``
    overrides the variant's own grid. With ``cache`` (:class:`ResultCache`) a row evaluated
    before with the same key is read back instead; ``vectors`` must then be the suite's own
    task vectors of ``tasks`` (or ``None``).
    """
    alphas = tuple(alpha_grid) if alpha_grid is not None else variant.alphas()
    if cache is None:
        return _evaluate_variant(suite, tasks, variant, vectors, alphas)
    return cache.get_or_compute(cache.key(suite, tasks, variant, alphas),
                                lambda: _evaluate_variant(suite, tasks, variant, vectors, alphas), variant.label)


def _evaluate_variant(suite: Suite, tasks: Sequence[str], variant: Variant,
                      vectors: Mapping[str, StateDict] | None, alphas: tuple[float, ...]) -> dict:
    vectors = vectors if vectors is not None else suite.task_vectors(tasks)
    best = None  # (α, LiNeS b) chosen on validation; the test splits evaluated once, at the choice
    for b in (variant.lines_b_grid or (None,)):
        delta, seconds = merge_variant(vectors, variant, lines_b=b)
        sweep = alpha_sweep(suite, delta, tasks, alphas, split="val")
        alpha = best_alpha(sweep)
        val_score = float(sweep.loc[sweep.alpha == alpha, "normalized_accuracy"].mean())
        if best is None or val_score > best[0]:
            best = (val_score, alpha, b, delta, seconds)
        del delta
    _, alpha, b, delta, seconds = best
    test_df = evaluate_delta(suite, delta, alpha, tasks, split="test")
    test_df.attrs["alpha"] = alpha
    return dict(method=variant.label, n_tasks=len(tasks), accuracy=100 * float(test_df.accuracy.mean()),
                normalized_accuracy=100 * float(test_df.normalized_accuracy.mean()), alpha=alpha,
                alpha_at_edge=len(alphas) > 1 and alpha in (min(alphas), max(alphas)), lines_b=float("nan") if b is None else b, merge_seconds=seconds, per_task=test_df)


@dataclass(frozen=True)
class VariantUnit:
    """One unit of a results table, as parameters only: merge the first ``len(tasks)`` tasks
    of the suite of ``suite`` with ``variant``, choose α on validation, test once.
    ``first`` are the tasks of ``first_normalized_accuracy``. A worker rebuilds everything
    from these fields (:func:`run_variant_unit`); no tensor travels with a unit."""

    suite: "SuiteSpec"
    tasks: tuple[str, ...]
    variant: Variant
    alpha_grid: tuple[float, ...] | None
    first: tuple[str, ...]

    def describe(self) -> str:
        return f"{self.variant.label} on {len(self.tasks)} tasks"


def _table_row(row: dict, first: Sequence[str]) -> dict:
    """A row of :func:`evaluate_variant` without its per-task frame, plus the normalised
    accuracy on the ``first`` tasks."""
    per_task = row.pop("per_task")
    row["first_normalized_accuracy"] = 100 * float(per_task[per_task.task.isin(list(first))].normalized_accuracy.mean())
    return row


def run_variant_unit(unit: VariantUnit) -> dict:
    """Evaluate one :class:`VariantUnit` in this process, loading the suite and the task
    vectors through the per-process caches of :mod:`subboost.executor` (what a Ray worker runs)."""
    from subboost.executor import cached_suite, cached_task_vectors

    suite = cached_suite(unit.suite)
    vectors = cached_task_vectors(unit.suite, unit.tasks)
    row = evaluate_variant(suite, list(unit.tasks), unit.variant, vectors, unit.alpha_grid)
    return _table_row(row, unit.first)


def suite_spec(suite: Suite) -> "SuiteSpec":
    """The parameters a worker reloads ``suite`` from (set by :func:`load_suite_from_parameters`);
    ``ValueError`` for a suite built another way."""
    spec = getattr(suite, "spec", None)
    if spec is None:
        raise ValueError(f"executor: the suite {suite!r} was not loaded with load_suite_from_parameters, "
                         "so workers cannot rebuild it; use executor='local'")
    from dataclasses import replace

    return replace(spec, threads=torch.get_num_threads())


def results_table(suite: Suite, task_counts: Iterable[int], variants: Sequence[Variant] = TABLE1_VARIANTS,
                  alpha_grid: Sequence[float] | None = None, progress: bool = True,
                  executor: "str | Executor | None" = None, ray_address: str | None = None,
                  cache: ResultCache | None = None) -> pd.DataFrame:
    """Long table (method, n_tasks, accuracy, normalized_accuracy, alpha, ...) for the variants,
    plus zero-shot and fine-tuned reference rows.

    ``first_normalized_accuracy`` is the normalised accuracy (percent) on the first
    min(task_counts) tasks only, the tasks every merge contains: it isolates interference
    (what adding experts costs the tasks already merged) from the changing task mix.

    ``executor``: ``None`` / ``"local"`` (this process, one set of task vectors in memory),
    ``"ray"`` with ``ray_address`` (one Ray task per (N, variant), the suite rebuilt on the
    workers from its parameters), or an executor of :mod:`subboost.executor`. Rows come
    back in the same order and with the same values whatever the executor; only
    ``merge_seconds`` is a timing. ``cache`` (:class:`ResultCache`, local executor only): rows
    evaluated before with the same settings are read back, new ones stored."""
    subsets = task_subsets(suite, task_counts)
    first = subsets[min(subsets)]
    jobs = [(n, v) for n in subsets for v in variants]
    bar = tqdm(total=len(jobs), desc="merge + evaluate", disable=not progress)
    if getattr(executor, "name", executor) in (None, "local"):  # today's loop, in this process
        rows = []
        held: dict[int, dict] = {}
        for n, variant in jobs:
            if n not in held:
                held.clear()  # keep one set of task vectors in memory
                held[n] = suite.task_vectors(subsets[n])
            rows.append(_table_row(evaluate_variant(suite, subsets[n], variant, held[n], alpha_grid, cache), first))
            bar.update(1)
    else:
        from subboost.executor import make_executor

        spec = suite_spec(suite)
        grid = tuple(float(a) for a in alpha_grid) if alpha_grid is not None else None
        units = [VariantUnit(spec, tuple(subsets[n]), v, grid, tuple(first)) for n, v in jobs]
        runner = make_executor(executor, ray_address, device=str(getattr(suite, "device", "cpu")))
        try:
            rows = runner.map(run_variant_unit, units, progress=bar.update, describe=VariantUnit.describe)
        finally:
            if runner is not executor:
                runner.close()
    bar.close()
    ref = reference_rows(suite, task_counts)
    ref["first_normalized_accuracy"] = [100 * sum(getattr(suite, f"{m}_accuracy")(t) / suite.finetuned_accuracy(t)
                                                  for t in first) / len(first)
                                        for m in ref.method.map({"Zero-shot": "zeroshot", "Fine-tuned": "finetuned"})]
    return pd.concat([ref, pd.DataFrame(rows)], ignore_index=True)


def pivot_results(long: pd.DataFrame, value: str = "accuracy") -> pd.DataFrame:
    """Methods as rows, task counts as columns, in the order the methods first appear."""
    order = list(dict.fromkeys(long.method))
    wide = long.pivot(index="method", columns="n_tasks", values=value).reindex(order)
    wide.columns = [f"ours {c}" for c in wide.columns]
    return wide


def rank_collapse_table(suite: Suite, task_counts: Iterable[int], method: str = "ta",
                        boost_beta: float | None = None, fractions: Sequence[float] = (0.5, 0.3),
                        **params) -> pd.DataFrame:
    """Rank metrics of every block matrix of the merged task vector for each N (paper Fig. 2, 8, 9).

    Rank metrics are scale-invariant, so α does not matter here.
    """
    frames = []
    for n, tasks in task_subsets(suite, task_counts).items():
        delta = merge(suite.task_vectors(tasks), method, boost_beta=boost_beta, **params)
        df = rank_table(delta, fractions=fractions)
        df.insert(0, "n_tasks", n)
        frames.append(df)
    return pd.concat(frames, ignore_index=True)


#: The task counts of every chapter on the smoke profile (its zoos have 3 tasks).
SMOKE_TASK_COUNTS = (2, 3)


SMALL_MODEL_WIDTH = 256


def _vision_width(params: Mapping) -> int | None:
    """Width of the image tower of the real checkpoints named by ``params`` (``None``: unknown)."""
    try:
        import open_clip

        from subboost.release import ensure_model_config

        model = params.get("model") or "ViT-B-32"
        ensure_model_config(params["checkpoint_root"], model)
        return int(open_clip.get_model_config(model)["vision_cfg"]["width"])
    except Exception:  # noqa: BLE001 -- an unknown model is reported by load_suite, with its own message
        return None


def configure_cpu_threads(params: Mapping) -> int:
    """Use one intra-op thread for small models on the CPU; returns the thread count in force.

    The zoo's matrices are tiny (≤ 256 wide): multi-threaded LAPACK and GEMM calls on them
    cost more in synchronisation than they gain, and on a busy 2-core machine a 256×64 SVD
    was measured at 0.2-0.8 s with 2 threads versus 0.5 ms with one, and evaluations on a
    64-wide stand-in release took 22× longer with 2 threads than with one
    (``benchmarks/real_checkpoints.py``). So one thread for the mini zoo and for real
    checkpoints whose image tower is at most ``SMALL_MODEL_WIDTH`` wide; real ViTs (768 wide
    and more) and GPUs keep torch's default. This sets torch's process-wide thread count, so
    notebooks call it once, at the top.
    """
    if params.get("device", "cpu") == "cpu":
        width = _vision_width(params) if params.get("checkpoint_root") else 0
        if width is not None and width <= SMALL_MODEL_WIDTH:
            torch.set_num_threads(1)
    return torch.get_num_threads()


def load_suite_from_parameters(params: Mapping) -> Suite:
    """The suite a chapter runs on: real checkpoints when ``checkpoint_root`` is set (with
    ``model``, optional ``data_root``, ``tasks`` (a list, or comma-separated names) and
    ``allow_pickle`` (a bool)), otherwise the mini zoo of ``profile`` (built on first use under
    ``zoo_root``). The suite's ``spec`` holds these parameters
    (:class:`subboost.executor.SuiteSpec`), so that workers of a cluster can load it too."""
    from subboost.executor import SuiteSpec

    if params.get("checkpoint_root"):
        from subboost.release import load_suite

        allow_pickle = params.get("allow_pickle", False)
        if not isinstance(allow_pickle, bool):
            raise ValueError(f"parameter 'allow_pickle': expected true or false, got {allow_pickle!r}")
        tasks = params.get("tasks")
        if isinstance(tasks, str):
            tasks = [t.strip() for t in tasks.split(",") if t.strip()]
        if tasks is not None and (not isinstance(tasks, (list, tuple)) or not tasks
                                  or not all(isinstance(t, str) and t for t in tasks)):
            raise ValueError(f"parameter 'tasks': expected a non-empty list of task names, got {tasks!r}")
        suite = load_suite(params["checkpoint_root"], model=params.get("model") or "ViT-B-32",
                           tasks=tasks, data_root=params.get("data_root"),
                           allow_pickle=allow_pickle, device=params.get("device", "auto"))
    else:
        from subboost.zoo import load_suite

        suite = load_suite(params.get("profile", "ci"), root=params.get("zoo_root"), device=params.get("device", "auto"))
    suite.spec = SuiteSpec.from_parameters(params)  # what a worker reloads it from (subboost.executor)
    return suite


def task_counts_for(suite: Suite, task_counts: Sequence[int], profile: str) -> list[int]:
    """The task counts a chapter uses: the smoke profile (3 tasks) always uses 2 and 3; other
    profiles must fit the suite, else a ``ValueError`` names ``task_counts``."""
    available = len(suite.task_names)
    if profile == "smoke":
        return [n for n in SMOKE_TASK_COUNTS if n <= available]
    too_big = [int(n) for n in task_counts if int(n) > available]
    if too_big:
        raise ValueError(f"parameter 'task_counts': {too_big} exceed the {available} tasks of this suite")
    return sorted(int(n) for n in task_counts)


def beside_paper(ours: pd.DataFrame, paper: pd.DataFrame, all_rows: bool = False) -> pd.DataFrame:
    """Our wide table next to the paper's, rows matched by method label.

    Rows of ``ours`` without a paper row get blank paper columns. Rows only the paper has are
    left out, or with ``all_rows`` kept after ours, blank on our side."""
    if not all_rows:
        return ours.join(paper, how="left")
    order = list(dict.fromkeys(list(ours.index) + list(paper.index)))
    return pd.concat([ours.reindex(order), paper.reindex(order)], axis=1)


def describe_trend(values: Mapping[int, float], what: str, unit: str = "") -> str:
    """One sentence stating how a quantity moved with N, with the measured numbers."""
    items = sorted(values.items())
    (n0, v0), (n1, v1) = items[0], items[-1]
    change = (v1 - v0) / abs(v0) if v0 else float("nan")
    direction = "fell" if v1 < v0 else "rose" if v1 > v0 else "stayed flat"
    series = ", ".join(f"N={n}: {v:.3g}{unit}" for n, v in items)
    return f"{what} {direction} from {v0:.3g}{unit} at N={n0} to {v1:.3g}{unit} at N={n1} ({change:+.0%}); {series}."
