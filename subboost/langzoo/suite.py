"""The language zoo as a suite for the experiment drivers, and its evaluation protocol.

:class:`LanguageSuite` offers what :class:`subboost.experiments.Suite` asks for
(``task_names``, ``base_state``, ``task_vectors``, ``finetuned_accuracy``,
``zeroshot_accuracy``) plus evaluation: :func:`tune_and_test` here follows the same protocol and
return convention as :func:`subboost.evaluate.tune_and_test` (α chosen on validation by the
best mean normalised accuracy, ties to the smaller α, then one test evaluation).

Task vectors hold the tensors the experts train (the top encoder blocks); every other tensor
of an expert equals the base's, so its Δ is zero and is left out, as the public CLIP task
vectors leave out the frozen text tower. Evaluation exploits the same fact: the hidden states
entering the lowest block an update touches are computed once per task and split with the base
model and cached; a merged model only runs the blocks from there up.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import pandas as pd
import torch
from torch import Tensor

from subboost.io import load_state_dict
from subboost.evaluate import DEFAULT_ALPHAS, best_alpha, resolve_device
from subboost.langzoo import tasks as T
from subboost.langzoo.build import LangZooConfig, load_expert_tensors, split_inputs
from subboost.langzoo.model import block_of, load_base
from subboost.langzoo.train import predict
from subboost.taskvector import StateDict, is_zero, task_vector

SPLITS = ("val", "test")


class LanguageSuite:
    """A built language zoo: base (from the package), experts, heads and evaluation splits.

    Loading is lazy and cached per instance: the base model once, each expert's tensors, head
    and split on first use, the split hidden states per (task, split, block).
    """

    def __init__(self, folder: str | Path, device: str | torch.device = "auto", batch_size: int = 256) -> None:
        self.folder = Path(folder)
        if not (self.folder / "build.json").is_file():
            raise FileNotFoundError(f"{self.folder} is not a finished language zoo build (no build.json)")
        saved = json.loads((self.folder / "config.json").read_text())
        self.config = LangZooConfig(**{**saved, "tasks": tuple(saved["tasks"])})
        self.task_names: list[str] = list(self.config.tasks)
        self.name = f"langzoo:{self.folder.name}"
        self.model_name = self.config.base
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)
        self.info: dict = json.loads((self.folder / "build.json").read_text())
        acc = json.loads((self.folder / "accuracies.json").read_text())
        self._acc: dict[str, dict[str, float]] = {k: dict(v) for k, v in acc.items()}
        self._model = None
        self._tokenizer = None
        self._base: StateDict | None = None
        self._experts: dict[str, StateDict] = {}
        self._heads: dict[str, Tensor] = {}
        self._data: dict[tuple[str, str], T.TextSplit] = {}
        self._hidden: dict[tuple[str, str, int], tuple[Tensor, Tensor]] = {}
        self._work: torch.nn.ModuleList | None = None

    def __repr__(self) -> str:
        return (f"LanguageSuite({self.name!r}, model={self.model_name!r}, tasks={len(self.task_names)}, "
                f"trained blocks={self.config.trained_blocks}, device={self.device})")

    # ------------------------------------------------------------ checkpoints

    def _check_task(self, task: str) -> None:
        if task not in self.task_names:
            raise ValueError(f"unknown task '{task}' for suite {self.name}; tasks: {', '.join(self.task_names)}")

    def _ensure_model(self) -> None:
        if self._model is None:
            self._model, self._tokenizer = load_base()

    @property
    def model(self):
        """The base ``transformers`` BERT (eval mode, frozen)."""
        self._ensure_model()
        return self._model

    @property
    def tokenizer(self):
        self._ensure_model()
        return self._tokenizer

    @property
    def base_state(self) -> StateDict:
        """θ0: the base model's floating-point state dict (copies, loaded once)."""
        if self._base is None:
            self._base = {k: v.detach().clone() for k, v in self.model.state_dict().items() if v.is_floating_point()}
        return self._base

    def expert_tensors(self, task: str) -> StateDict:
        """The tensors the expert of ``task`` fine-tuned (the top encoder blocks)."""
        self._check_task(task)
        if task not in self._experts:
            self._experts[task] = load_expert_tensors(self.folder, task)
        return self._experts[task]

    def expert_state(self, task: str) -> StateDict:
        """θ_task: the base state with the expert's fine-tuned tensors in place."""
        return {**self.base_state, **self.expert_tensors(task)}

    def task_vectors(self, tasks: Sequence[str] | None = None) -> dict[str, StateDict]:
        """Δ_task = θ_task − θ0 over the fine-tuned tensors, for each task in the order given."""
        tasks = self.task_names if tasks is None else list(tasks)
        out = {}
        for t in tasks:
            tensors = self.expert_tensors(t)
            out[t] = task_vector({k: self.base_state[k] for k in tensors}, tensors, name=t)
        return out

    def head(self, task: str) -> Tensor:
        """The ``(C, D)`` zero-shot head of ``task`` (logit scale included)."""
        self._check_task(task)
        if task not in self._heads:
            self._heads[task] = load_state_dict(self.folder / "heads" / f"{task}.safetensors")["weight"].float()
        return self._heads[task]

    def num_classes(self, task: str) -> int:
        return int(self.head(task).shape[0])

    def data(self, task: str, split: str = "test") -> T.TextSplit:
        """A split (``val`` or ``test``) of a task: sentences, labels, class names."""
        self._check_task(task)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
        if (task, split) not in self._data:
            saved = json.loads((self.folder / "data" / f"{task}.json").read_text())
            for s in SPLITS:
                self._data[(task, s)] = T.TextSplit.from_json(saved[s])
        return self._data[(task, split)]

    def hidden(self, task: str, split: str, layer: int) -> tuple[Tensor, Tensor]:
        """Hidden states entering block ``layer`` for a split, and the attention mask (cached)."""
        key = (task, split, int(layer))
        if key not in self._hidden:
            self._hidden[key] = split_inputs(self.model, self.tokenizer, self.data(task, split).texts,
                                             self.config.max_length, int(layer), device=self.device)
        return self._hidden[key]

    # ------------------------------------------------------------ evaluation

    def first_block(self, update: Mapping[str, Tensor]) -> int:
        """Lowest encoder block with a non-zero tensor in ``update`` (number of blocks if none).

        Raises ``ValueError`` for a non-zero tensor outside the encoder blocks (embeddings,
        pooler): the zoo's experts never change those, and evaluation assumes it.
        """
        n = len(self.model.encoder.layer)
        first = n
        for key, value in update.items():
            if is_zero(value):
                continue
            block = block_of(key)
            if block is None:
                raise ValueError(f"update changes '{key}', outside the encoder blocks; the language suite "
                                 "evaluates updates of encoder blocks only")
            first = min(first, block)
        return first

    def load_blocks(self, update: Mapping[str, Tensor], alpha: float = 1.0, first: int | None = None
                    ) -> tuple[torch.nn.ModuleList, int]:
        """Encoder blocks ``first..`` with weights θ0 + α·update (a reused working copy) and ``first``."""
        first = self.first_block(update) if first is None else int(first)
        n = len(self.model.encoder.layer)
        first = min(first, n - 1)  # an all-zero update still runs the top block
        if self._work is None:
            self._work = copy.deepcopy(self.model.encoder.layer).to(self.device).eval()
        base = self.base_state
        with torch.no_grad():
            for i in range(first, n):
                for name, p in self._work[i].named_parameters():
                    key = f"encoder.layer.{i}.{name}"
                    value = base[key].to(torch.float32)
                    if key in update:
                        value = value + float(alpha) * update[key].to(torch.float32)
                    p.copy_(value.to(self.device))
        return self._work[first:], first

    @torch.no_grad()
    def predict(self, blocks: torch.nn.ModuleList, first: int, task: str, split: str = "test") -> Tensor:
        """Predicted labels of a split with blocks loaded by :meth:`load_blocks`."""
        hidden, mask = self.hidden(task, split, first)
        return predict(blocks, hidden, mask, self.head(task), batch_size=self.batch_size, device=self.device)

    def accuracy_of_update(self, update: Mapping[str, Tensor], task: str, split: str = "test",
                           alpha: float = 1.0) -> float:
        """Top-1 accuracy of θ0 + α·update on one task split."""
        blocks, first = self.load_blocks(update, alpha)
        labels = torch.tensor(self.data(task, split).labels)
        return float((self.predict(blocks, first, task, split) == labels).float().mean())

    def _recorded(self, kind: str, task: str, split: str) -> float:
        self._check_task(task)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got '{split}'")
        key = task if split == "test" else f"{task}Val"
        table = self._acc.setdefault(kind, {})
        if key not in table:
            update = self.task_vectors([task])[task] if kind == "finetuned" else {}
            table[key] = self.accuracy_of_update(update, task, split)
        return float(table[key])

    def finetuned_accuracy(self, task: str, split: str = "test") -> float:
        """Top-1 accuracy of the task's own expert (recorded at build time)."""
        return self._recorded("finetuned", task, split)

    def zeroshot_accuracy(self, task: str, split: str = "test") -> float:
        """Top-1 accuracy of the base model with the task's zero-shot head (recorded at build time)."""
        return self._recorded("zeroshot", task, split)

    def reference(self, tasks: Sequence[str] | None = None, split: str = "test") -> pd.DataFrame:
        """Per task: classes, chance, zero-shot and fine-tuned accuracy, what decides the class."""
        tasks = self.task_names if tasks is None else list(tasks)
        rows = [dict(task=t, num_classes=self.num_classes(t), chance=1.0 / self.num_classes(t),
                     zeroshot=self.zeroshot_accuracy(t, split), finetuned=self.finetuned_accuracy(t, split),
                     classes=", ".join(T.get_task(t).classnames), summary=T.get_task(t).summary)
                for t in tasks]
        return pd.DataFrame(rows)

    def tune_and_test(self, delta: Mapping[str, Tensor], tasks: Iterable[str] | None = None,
                      alphas: Sequence[float] | None = None, metric: str = "normalized_accuracy"
                      ) -> tuple[float, pd.DataFrame, pd.DataFrame]:
        """Method form of :func:`tune_and_test` (for drivers that dispatch on the suite)."""
        return tune_and_test(self, delta, tasks, alphas, metric)


# ---------------------------------------------------------------- functions on suites


def _tasks(suite: LanguageSuite, tasks: Iterable[str] | None) -> list[str]:
    tasks = suite.task_names if tasks is None else list(tasks)
    if not tasks:
        raise ValueError("need at least one task")
    return tasks


def evaluate_delta(suite: LanguageSuite, delta: Mapping[str, Tensor], alpha: float,
                   tasks: Iterable[str] | None = None, split: str = "test") -> pd.DataFrame:
    """Top-1 and normalised accuracy of θ0 + α·Δm on each task: columns ``task``, ``accuracy``,
    ``normalized_accuracy`` (fractions), as :func:`subboost.evaluate.evaluate`."""
    tasks = _tasks(suite, tasks)
    finetuned = {t: suite.finetuned_accuracy(t, split) for t in tasks}
    blocks, first = suite.load_blocks(delta, alpha)
    rows = []
    for t in tasks:
        labels = torch.tensor(suite.data(t, split).labels)
        acc = float((suite.predict(blocks, first, t, split) == labels).float().mean())
        ft = finetuned[t]
        rows.append(dict(task=t, accuracy=acc, normalized_accuracy=acc / ft if ft > 0 else float("nan")))
    df = pd.DataFrame(rows, columns=["task", "accuracy", "normalized_accuracy"])
    df.attrs.update(mean_accuracy=float(df.accuracy.mean()), mean_normalized_accuracy=float(df.normalized_accuracy.mean()),
                    split=split)
    return df


def alpha_sweep(suite: LanguageSuite, delta: Mapping[str, Tensor], tasks: Iterable[str] | None = None,
                alphas: Sequence[float] | None = None, split: str = "val") -> pd.DataFrame:
    """:func:`evaluate_delta` for each α (default 0.1 … 1.0); long format with an ``alpha`` column."""
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


def tune_and_test(suite: LanguageSuite, delta: Mapping[str, Tensor], tasks: Iterable[str] | None = None,
                  alphas: Sequence[float] | None = None,
                  metric: str = "normalized_accuracy") -> tuple[float, pd.DataFrame, pd.DataFrame]:
    """The papers' protocol: α with the best mean ``metric`` on validation (ties: smaller α), test once.

    Returns ``(alpha, test_df, sweep_df)`` exactly as :func:`subboost.evaluate.tune_and_test`.
    """
    tasks = _tasks(suite, tasks)
    sweep = alpha_sweep(suite, delta, tasks, alphas, split="val")
    alpha = best_alpha(sweep, metric)
    test = evaluate_delta(suite, delta, alpha, tasks, split="test")
    test.attrs["alpha"] = alpha
    return alpha, test, sweep
