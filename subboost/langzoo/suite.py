"""The language zoo as an :class:`subboost.evaluate.EvaluationSuite`.

:class:`LanguageSuite` offers what the experiment drivers and the evaluation protocol ask for
(``task_names``, ``base_state``, ``task_vectors``, ``finetuned_accuracy``,
``zeroshot_accuracy``, ``load_merged``, ``predict``, ``labels``), so that
:func:`subboost.evaluate.evaluate_delta`, :func:`~subboost.evaluate.alpha_sweep` and
:func:`~subboost.evaluate.tune_and_test` (α chosen on validation by the best mean normalised
accuracy, ties to the smaller α, then one test evaluation) run on it as on the vision suites.

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
from typing import Mapping, NamedTuple, Sequence

import pandas as pd
import torch
from torch import Tensor

from subboost.evaluate import SuiteBase, check_split, resolve_device
from subboost.io import load_state_dict
from subboost.langzoo import tasks as T
from subboost.langzoo.build import LangZooConfig, load_expert_tensors, split_inputs
from subboost.langzoo.model import block_of, load_base
from subboost.langzoo.train import predict
from subboost.taskvector import StateDict, is_zero, task_vector



class LoadedBlocks(NamedTuple):
    """The encoder blocks ``first..`` of a merged model, loaded by :meth:`LanguageSuite.load_blocks`."""

    blocks: torch.nn.ModuleList
    first: int


class LanguageSuite(SuiteBase):
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

    def data(self, task: str, split: str = "test") -> T.TextSplit:
        """A split (``val`` or ``test``) of a task: sentences, labels, class names."""
        self._check_task(task)
        check_split(split)
        if (task, split) not in self._data:
            saved = json.loads((self.folder / "data" / f"{task}.json").read_text())
            for s in ("val", "test"):
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
                    ) -> LoadedBlocks:
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
        return LoadedBlocks(self._work[first:], first)

    def load_merged(self, delta: Mapping[str, Tensor], alpha: float) -> LoadedBlocks:
        """θ0 + α·Δ: the blocks from the lowest one Δ changes up (:meth:`load_blocks`)."""
        return self.load_blocks(delta, alpha)

    @torch.no_grad()
    def predict(self, model: LoadedBlocks, task: str, split: str = "test") -> Tensor:
        """Predicted labels of a split with blocks loaded by :meth:`load_merged`."""
        hidden, mask = self.hidden(task, split, model.first)
        return predict(model.blocks, hidden, mask, self.head(task), batch_size=self.batch_size, device=self.device)

    def labels(self, task: str, split: str = "test") -> Tensor:
        """The true labels of a split (int64)."""
        return torch.tensor(self.data(task, split).labels)

    def accuracy_of_update(self, update: Mapping[str, Tensor], task: str, split: str = "test",
                           alpha: float = 1.0) -> float:
        """Top-1 accuracy of θ0 + α·update on one task split."""
        model = self.load_blocks(update, alpha)
        return float((self.predict(model, task, split) == self.labels(task, split)).float().mean())

    def _measure_reference(self, kind: str, task: str, split: str) -> float:
        update = self.task_vectors([task])[task] if kind == "finetuned" else {}
        return self.accuracy_of_update(update, task, split)

    def reference(self, tasks: Sequence[str] | None = None, split: str = "test") -> pd.DataFrame:
        """Per task: classes, chance, zero-shot and fine-tuned accuracy, what decides the class."""
        tasks = self.task_names if tasks is None else list(tasks)
        df = super().reference(tasks, split)
        df["classes"] = [", ".join(T.get_task(t).classnames) for t in tasks]
        df["summary"] = [T.get_task(t).summary for t in tasks]
        return df
