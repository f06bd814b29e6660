"""Evaluation: the suite interface and the papers' evaluation protocol, written once.

:class:`EvaluationSuite` is what every suite offers: task names, the base state θ0, task
vectors, the recorded fine-tuned and zero-shot accuracies, and evaluation of a merged update:
``load_merged(Δ, α)`` loads θ0 + α·Δ, ``predict(model, task, split)`` predicts a split's labels
with it and ``labels(task, split)`` gives the true ones. Two classes implement it:

- :class:`VisionSuite` (here): a CLIP image tower with zero-shot heads; built by
  :func:`subboost.zoo.load_suite` (the mini zoo, trained here) and by
  :func:`subboost.release.load_suite` (public checkpoints on disk);
- :class:`subboost.langzoo.suite.LanguageSuite`: the language zoo.

:func:`evaluate_delta`, :func:`alpha_sweep`, :func:`best_alpha` and :func:`tune_and_test` work on
any of them.

Protocol of the papers (task vectors, TIES, TALL masks, Subspace Boosting):

- top-1 accuracy per task with that task's head; normalised accuracy = merged top-1 / the
  task's fine-tuned top-1 on the same split; both averaged over tasks;
- the merging coefficient α is chosen on the validation splits (best mean normalised
  accuracy over the merged tasks; ties go to the smaller α), then the merged model is
  evaluated once on the test splits (:func:`tune_and_test`).

Accuracies are fractions in ``[0, 1]``. A :class:`VisionSuite` evaluates in batches under
``torch.no_grad`` with one reusable image tower; the split tensors are cached on the suite after
first use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import pandas as pd
import torch
from torch import Tensor

from subboost.taskvector import StateDict, apply_task_vector, task_vector

SPLITS = ("val", "test")
DEFAULT_ALPHAS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(1, 11))
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
VISUAL_PREFIX = "visual."


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU raises ``ValueError``."""
    if isinstance(device, torch.device):
        return device
    device = str(device).lower()
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but torch finds no CUDA device; use 'cpu' or 'auto'")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:i]', got '{device}'")
    return torch.device(device)


@dataclass(frozen=True)
class TaskData:
    """One split of one task: ``images`` uint8 ``(N, 3, H, W)`` at the model's resolution
    (normalised with CLIP's mean and std at use) or float, already normalised; int64 ``labels``."""

    images: Tensor
    labels: Tensor
    classnames: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W), got {tuple(self.images.shape)}")
        if self.labels.ndim != 1 or self.labels.numel() != self.images.shape[0]:
            raise ValueError(f"labels must be (N,) with N = {self.images.shape[0]}, got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return int(self.labels.numel())


def normalize_batch(images: Tensor) -> Tensor:
    """uint8 images → float normalised with CLIP's mean and std; float images pass through."""
    if images.dtype != torch.uint8:
        return images.float()
    x = images.float() / 255.0
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def visual_state(state: Mapping[str, Tensor]) -> StateDict:
    """The image-tower part of a CLIP state dict, keys without the ``visual.`` prefix."""
    out = {k[len(VISUAL_PREFIX):]: v for k, v in state.items() if k.startswith(VISUAL_PREFIX)}
    if not out:
        sample = list(state)[:3]
        raise ValueError(f"state dict has no '{VISUAL_PREFIX}*' keys (image tower); first keys: {sample}")
    return out


def check_architecture(state: Mapping[str, Tensor], visual: torch.nn.Module, model: str, source: object = "checkpoint") -> None:
    """``ValueError`` in one line naming ``model`` when the image-tower weights in ``state``
    (keys ``visual.*``) do not have the keys and shapes of the architecture ``visual``."""
    theirs = visual_state(state)
    ours = visual.state_dict()
    missing = [k for k in ours if k not in theirs]
    extra = [k for k in theirs if k not in ours]
    shapes = [k for k in ours if k in theirs and tuple(ours[k].shape) != tuple(theirs[k].shape)]
    if not (missing or extra or shapes):
        return
    parts = [f"{len(x)} {what}" for x, what in ((missing, "image-tower keys missing"), (extra, "unexpected"),
                                                 (shapes, "with other shapes")) if x]
    if shapes:
        k = shapes[0]
        example = f"visual.{k}: checkpoint {tuple(theirs[k].shape)} vs model {tuple(ours[k].shape)}"
    else:
        example = f"visual.{(missing or extra)[0]}"
    raise ValueError(f"model '{model}' does not match {source}: {', '.join(parts)} (e.g. {example}); set `model` to "
                     f"the open_clip architecture the checkpoints were trained with")


class EvaluationSuite(Protocol):
    """What the experiment drivers and the evaluation protocol need from a suite of models.

    ``base_state`` is θ0 and ``task_vectors(tasks)`` the Δ_task = θ_task − θ0 (default: all
    tasks, in the order given). ``finetuned_accuracy`` and ``zeroshot_accuracy`` are the top-1
    accuracies of a task's own expert (the normaliser of normalised accuracy) and of the base
    model, on ``split`` (``"val"`` or ``"test"``). ``load_merged(delta, alpha)`` makes the model
    θ0 + α·Δ (in place in a reused working copy is fine: the returned handle is only valid until
    the next call) and ``predict(model, task, split)`` returns its predicted labels of a task's
    split, compared with ``labels(task, split)`` (int64, same length).
    """

    task_names: list[str]
    base_state: StateDict

    def task_vectors(self, tasks: Sequence[str] | None = None) -> dict[str, StateDict]: ...

    def finetuned_accuracy(self, task: str, split: str = "test") -> float: ...

    def zeroshot_accuracy(self, task: str, split: str = "test") -> float: ...

    def load_merged(self, delta: Mapping[str, Tensor], alpha: float) -> Any: ...

    def predict(self, model: Any, task: str, split: str = "test") -> Tensor: ...

    def labels(self, task: str, split: str = "test") -> Tensor: ...


def check_split(split: str) -> None:
    """``ValueError`` unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got '{split}'")


class SuiteBase:
    """What :class:`VisionSuite` and the language suite share: the task check, the number of
    classes (rows of a task's head), and the reference accuracies (fine-tuned, zero-shot) in the
    public JSON convention (key ``Task`` = test, ``TaskVal`` = validation), recorded at build time
    or measured on first request by the subclass's :meth:`_measure_reference`."""

    name: str
    task_names: list[str]
    _acc: dict[str, dict[str, float]]
    #: identifies the checkpoints, data and recorded accuracies exactly (a mini zoo's folder and
    #: build record); ``None``: unknown, so results are never cached across chapters
    #: (:class:`subboost.experiments.ResultCache`)
    fingerprint: str | None = None

    def head(self, task: str) -> Tensor:
        """The ``(C, D)`` zero-shot head of ``task`` (logit scale included)."""
        raise NotImplementedError

    def _measure_reference(self, kind: str, task: str, split: str) -> float:
        """Top-1 accuracy of the expert of ``task`` (``kind="finetuned"``) or of the base model
        (``"zeroshot"``) on a split, for a reference accuracy not recorded."""
        raise NotImplementedError

    def _check_task(self, task: str) -> None:
        if task not in self.task_names:
            raise ValueError(f"unknown task '{task}' for suite {self.name}; tasks: {', '.join(self.task_names)}")

    def num_classes(self, task: str) -> int:
        return int(self.head(task).shape[0])

    def _recorded(self, kind: str, task: str, split: str) -> float:
        self._check_task(task)
        check_split(split)
        key = task if split == "test" else f"{task}Val"
        table = self._acc.setdefault(kind, {})
        if key not in table:
            table[key] = self._measure_reference(kind, task, split)
        return float(table[key])

    def finetuned_accuracy(self, task: str, split: str = "test") -> float:
        """Top-1 accuracy of the task's own expert (the normaliser of normalised accuracy)."""
        return self._recorded("finetuned", task, split)

    def zeroshot_accuracy(self, task: str, split: str = "test") -> float:
        """Top-1 accuracy of the base model with the task's zero-shot head."""
        return self._recorded("zeroshot", task, split)

    def reference(self, tasks: Sequence[str] | None = None, split: str = "test") -> pd.DataFrame:
        """Per task: number of classes, chance, zero-shot and fine-tuned accuracy."""
        tasks = self.task_names if tasks is None else list(tasks)
        rows = [dict(task=t, num_classes=self.num_classes(t), chance=1.0 / self.num_classes(t),
                     zeroshot=self.zeroshot_accuracy(t, split), finetuned=self.finetuned_accuracy(t, split))
                for t in tasks]
        return pd.DataFrame(rows, columns=["task", "num_classes", "chance", "zeroshot", "finetuned"])

    def accuracy_records(self) -> dict[str, dict[str, float]]:
        """Copies of the recorded accuracies in the public JSON convention."""
        return {k: dict(v) for k, v in self._acc.items()}


class VisionSuite(SuiteBase):
    """A CLIP base model, experts, zero-shot heads and evaluation data: an :class:`EvaluationSuite`
    for the mini zoo and for real open_clip checkpoints.

    Loading is lazy and cached per instance (no global state): the base state once, each
    expert on first use (kept when ``cache_experts``), each head and data split once.

    Parameters are callables so that the zoo and real releases share this class:
    ``load_base()`` and ``load_expert(task)`` return CLIP state dicts with open_clip key names,
    ``load_head(task)`` the ``(C, D)`` head weight (logit scale included), ``load_data(task,
    split)`` a :class:`TaskData`, ``make_visual()`` a fresh open_clip image tower of the right
    architecture. ``accuracies`` may pre-record ``{"finetuned": {...}, "zeroshot": {...}}``
    in the public JSON convention (key ``Task`` = test, ``TaskVal`` = validation); missing
    entries are computed on first request.
    """

    def __init__(
        self,
        *,
        name: str,
        model_name: str,
        task_names: Sequence[str],
        load_base: Callable[[], StateDict],
        load_expert: Callable[[str], StateDict],
        load_head: Callable[[str], Tensor],
        load_data: Callable[[str, str], TaskData],
        make_visual: Callable[[], torch.nn.Module],
        accuracies: Mapping[str, Mapping[str, float]] | None = None,
        device: str | torch.device = "auto",
        batch_size: int = 512,
        cache_experts: bool = True,
        info: Mapping | None = None,
    ) -> None:
        self.name = name
        self.model_name = model_name
        self.task_names: list[str] = list(task_names)
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.cache_experts = bool(cache_experts)
        self.info: dict = dict(info or {})
        self._load_base = load_base
        self._load_expert = load_expert
        self._load_head = load_head
        self._load_data = load_data
        self._make_visual = make_visual
        self._acc: dict[str, dict[str, float]] = {k: dict(v) for k, v in (accuracies or {}).items()}
        self._acc.setdefault("finetuned", {})
        self._acc.setdefault("zeroshot", {})
        self._base: StateDict | None = None
        self._experts: dict[str, StateDict] = {}
        self._heads: dict[str, Tensor] = {}
        self._data: dict[tuple[str, str], TaskData] = {}
        self._visual: torch.nn.Module | None = None
        self._base_on_device: StateDict | None = None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.name!r}, model={self.model_name!r}, tasks={len(self.task_names)}, "
                f"device={self.device})")

    # ------------------------------------------------------------ checkpoints

    @property
    def base_state(self) -> StateDict:
        """θ0, the pretrained (zero-shot) model's state dict (loaded once)."""
        if self._base is None:
            self._base = self._load_base()
        return self._base

    def expert_state(self, task: str) -> StateDict:
        """θ_task, the expert fine-tuned on ``task``."""
        self._check_task(task)
        if task in self._experts:
            return self._experts[task]
        state = self._load_expert(task)
        if self.cache_experts:
            self._experts[task] = state
        return state

    def task_vectors(self, tasks: Sequence[str] | None = None) -> dict[str, StateDict]:
        """Δ_task = θ_task − θ0 for each task (default: all), in the order given."""
        tasks = self.task_names if tasks is None else list(tasks)
        return {t: task_vector(self.base_state, self.expert_state(t), name=t) for t in tasks}

    def head(self, task: str) -> Tensor:
        """The ``(C, D)`` zero-shot head of ``task`` (float32, CPU)."""
        self._check_task(task)
        if task not in self._heads:
            self._heads[task] = self._load_head(task).detach().float().cpu()
        return self._heads[task]

    def data(self, task: str, split: str = "test") -> TaskData:
        """A split (``val`` or ``test``) of a task's evaluation data (loaded once)."""
        self._check_task(task)
        check_split(split)
        key = (task, split)
        if key not in self._data:
            data = self._load_data(task, split)
            rows = self.num_classes(task)
            if len(data) and int(data.labels.min()) < 0:
                raise ValueError(f"task '{task}' ({split}): negative label {int(data.labels.min())}")
            if len(data) and int(data.labels.max()) >= rows:
                raise ValueError(f"task '{task}' ({split}): label {int(data.labels.max())} but the head has only "
                                 f"{rows} rows (classes); the data and the head belong to different tasks")
            if data.classnames is not None and len(data.classnames) != rows:
                raise ValueError(f"task '{task}' ({split}): the head has {rows} classes but the data names "
                                 f"{len(data.classnames)}")
            self._data[key] = data
        return self._data[key]

    # ------------------------------------------------------------ evaluation

    def load_visual(self, state: Mapping[str, Tensor]) -> torch.nn.Module:
        """The suite's image tower with the ``visual.*`` weights of ``state`` loaded."""
        if self._visual is None:
            self._visual = self._make_visual().to(self.device).eval()
        try:
            self._visual.load_state_dict(visual_state(state), strict=True)
        except RuntimeError:
            check_architecture(state, self._visual, self.model_name)
            raise
        return self._visual

    @torch.no_grad()
    def load_merged(self, delta: Mapping[str, Tensor], alpha: float) -> torch.nn.Module:
        """The suite's image tower holding θ0 + α·Δ (image-tower part), written in place into
        its parameters: no merged state dict is built per α (same values as
        :func:`merged_state` + :meth:`load_visual`: float32 arithmetic, cast to the tower's dtype)."""
        if not math.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha}")
        if self._visual is None:
            self._visual = self._make_visual().to(self.device).eval()
        if self._base_on_device is None:
            base = visual_state(self.base_state)
            if set(base) != set(self._visual.state_dict()):
                check_architecture(self.base_state, self._visual, self.model_name)
            self._base_on_device = {k: v.to(self.device) for k, v in base.items()}
        for key, target in self._visual.state_dict().items():
            b = self._base_on_device[key]
            d = delta.get(VISUAL_PREFIX + key)
            if d is None or not target.is_floating_point():
                target.copy_(b)
                continue
            if tuple(d.shape) != tuple(target.shape):
                raise ValueError(f"shape mismatch for key '{VISUAL_PREFIX + key}': base {tuple(b.shape)} vs "
                                 f"update {tuple(d.shape)}")
            target.copy_((b.to(torch.float32) + alpha * d.to(self.device, torch.float32)).to(b.dtype))
        return self._visual

    @torch.inference_mode()
    def predict(self, visual: torch.nn.Module, task: str, split: str = "test") -> Tensor:
        """Predicted labels of a split with an already loaded image tower."""
        d = self.data(task, split)
        w = self.head(task).to(self.device)
        preds = []
        for i in range(0, len(d), self.batch_size):
            x = normalize_batch(d.images[i:i + self.batch_size].to(self.device))
            f = visual(x)
            f = f / f.norm(dim=-1, keepdim=True)
            preds.append((f @ w.T).argmax(dim=1).cpu())
        return torch.cat(preds)

    def accuracy(self, state: Mapping[str, Tensor], task: str, split: str = "test") -> float:
        """Top-1 accuracy of the model ``state`` on one task split."""
        visual = self.load_visual(state)
        return float((self.predict(visual, task, split) == self.labels(task, split)).float().mean())

    def labels(self, task: str, split: str = "test") -> Tensor:
        """The true labels of a split (int64)."""
        return self.data(task, split).labels

    def _measure_reference(self, kind: str, task: str, split: str) -> float:
        state = self.expert_state(task) if kind == "finetuned" else self.base_state
        return self.accuracy(state, task, split)


# ---------------------------------------------------------------- functions on suites


def _tasks(suite: EvaluationSuite, tasks: Iterable[str] | None) -> list[str]:
    tasks = suite.task_names if tasks is None else list(tasks)
    if not tasks:
        raise ValueError("need at least one task")
    return tasks


def evaluate(suite: VisionSuite, state_dict: Mapping[str, Tensor], tasks: Iterable[str] | None = None,
             split: str = "test") -> pd.DataFrame:
    """Top-1 and normalised accuracy of one model (a full CLIP state dict) on each task.

    Returns a DataFrame with columns ``task``, ``accuracy``, ``normalized_accuracy`` (one row
    per task); the means are in ``df.attrs["mean_accuracy"]`` and
    ``df.attrs["mean_normalized_accuracy"]`` (see also :func:`summarize`).
    """
    tasks = _tasks(suite, tasks)
    # normalisers first: computing a missing one loads the expert into the shared tower
    finetuned = {t: suite.finetuned_accuracy(t, split) for t in tasks}
    return _score(suite, suite.load_visual(state_dict), tasks, split, finetuned)


def _score(suite: EvaluationSuite, model: Any, tasks: Sequence[str], split: str,
           finetuned: Mapping[str, float]) -> pd.DataFrame:
    """The evaluation table of a loaded ``model`` (a handle from the suite's loading)."""
    rows = []
    for t in tasks:
        acc = float((suite.predict(model, t, split) == suite.labels(t, split)).float().mean())
        ft = finetuned[t]
        rows.append(dict(task=t, accuracy=acc, normalized_accuracy=acc / ft if ft > 0 else float("nan")))
    df = pd.DataFrame(rows, columns=["task", "accuracy", "normalized_accuracy"])
    df.attrs.update(summarize(df))
    df.attrs["split"] = split
    return df


def summarize(df: pd.DataFrame) -> dict[str, float]:
    """Mean accuracy and mean normalised accuracy of an :func:`evaluate` table."""
    return {"mean_accuracy": float(df["accuracy"].mean()),
            "mean_normalized_accuracy": float(df["normalized_accuracy"].mean())}


def _visual_only(state: Mapping[str, Tensor]) -> StateDict:
    return {k: v for k, v in state.items() if k.startswith(VISUAL_PREFIX)}


def merged_state(suite: VisionSuite, delta: Mapping[str, Tensor], alpha: float) -> StateDict:
    """θ0 + α·Δm restricted to the image tower (all that evaluation needs)."""
    base = _visual_only(suite.base_state)
    return apply_task_vector(base, _visual_only(delta), alpha)


def evaluate_delta(suite: EvaluationSuite, delta: Mapping[str, Tensor], alpha: float,
                   tasks: Iterable[str] | None = None, split: str = "test") -> pd.DataFrame:
    """Top-1 and normalised accuracy of θ0 + α·Δm (``suite.load_merged``) on each task split:
    the table of :func:`evaluate` (columns ``task``, ``accuracy``, ``normalized_accuracy``;
    means in ``df.attrs``)."""
    tasks = _tasks(suite, tasks)
    finetuned = {t: suite.finetuned_accuracy(t, split) for t in tasks}
    return _score(suite, suite.load_merged(delta, alpha), tasks, split, finetuned)


def alpha_sweep(suite: EvaluationSuite, delta: Mapping[str, Tensor], tasks: Iterable[str] | None = None,
                alphas: Sequence[float] | None = None, split: str = "val") -> pd.DataFrame:
    """Evaluate θ0 + α·Δm for each α (default 0.1 … 1.0) on a split (default validation).

    Long format: one row per (alpha, task) with columns ``alpha``, ``task``, ``accuracy``,
    ``normalized_accuracy``.
    """
    tasks = _tasks(suite, tasks)
    alphas = DEFAULT_ALPHAS if alphas is None else tuple(float(a) for a in alphas)
    if not alphas:
        raise ValueError("alphas is empty")
    frames = []
    for a in alphas:
        df = evaluate_delta(suite, delta, a, tasks, split)
        df.insert(0, "alpha", a)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    out.attrs["split"] = split
    return out


def best_alpha(sweep: pd.DataFrame, metric: str = "normalized_accuracy") -> float:
    """α with the best mean ``metric`` over tasks in an :func:`alpha_sweep` table (ties: smallest α).

    ``ValueError`` naming the tasks when a score is NaN (e.g. normalised accuracy of a task whose
    fine-tuned accuracy is 0), and when the sweep is empty: NaN is never chosen or skipped."""
    if sweep.empty:
        raise ValueError("best_alpha: the α sweep is empty (no α or no task evaluated)")
    if sweep[metric].isna().any():  # pandas' mean would skip them silently
        bad = sweep.loc[sweep[metric].isna(), "task"].unique().tolist() if "task" in sweep else []
        raise ValueError(f"best_alpha: {metric} is NaN for task(s) {bad} (a fine-tuned accuracy of 0 or a NaN "
                         f"score); check their data and heads, α cannot be chosen")
    means = sweep.groupby("alpha", sort=True)[metric].mean()
    best = means.max()
    return float(means[means >= best - 1e-12].index.min())


def tune_and_test(suite: EvaluationSuite, delta: Mapping[str, Tensor], tasks: Iterable[str] | None = None,
                  alphas: Sequence[float] | None = None,
                  metric: str = "normalized_accuracy") -> tuple[float, pd.DataFrame, pd.DataFrame]:
    """The papers' protocol: choose α on validation (best mean ``metric``), test once.

    Returns ``(alpha, test_df, sweep_df)``: the chosen α, the :func:`evaluate_delta` table on the
    test splits at that α, and the validation sweep (long format).
    """
    tasks = _tasks(suite, tasks)
    sweep = alpha_sweep(suite, delta, tasks, alphas, split="val")
    alpha = best_alpha(sweep, metric)
    test = evaluate_delta(suite, delta, alpha, tasks, split="test")
    test.attrs["alpha"] = alpha
    return alpha, test, sweep
