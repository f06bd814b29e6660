"""What the two mini zoos share: the vision zoo (:mod:`subboost.zoo`) and the language zoo
(:mod:`subboost.langzoo`) are built, cached and trained with the pieces defined here, once.

- :class:`HashedConfig`: a frozen config dataclass whose JSON form is hashed to name its cache
  folder (``{DIR_PREFIX}{profile}-{hash}``); the hash covers every field, so a cached zoo is
  found again exactly when nothing that determines it has changed;
- :func:`default_root`: the cache root (``$SUBBOOST_ZOO_ROOT``, else ``zoo_cache/`` in the
  repository);
- :func:`write_json`: the build records, published atomically;
- :func:`torch_settings`: the thread count and deterministic algorithms of a build, restored after;
- :func:`cosine_lr`: the learning-rate schedule of the task-vector papers' fine-tuning;
- :func:`zoo_cli` and :func:`print_build_summary`: the ``python -m subboost.zoo`` /
  ``python -m subboost.langzoo`` command lines' shared ``build`` and ``path`` subcommands.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
from dataclasses import asdict
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Iterator

import torch

from subboost.io import atomic_path


class HashedConfig:
    """What the zoos' frozen config dataclasses share: their JSON form, its hash, and the cache
    folder it names (``{DIR_PREFIX}{profile}-{hash}``)."""

    DIR_PREFIX: ClassVar[str] = ""

    def to_json(self) -> dict:
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        return d

    def digest(self) -> str:
        """Short SHA-256 of the config (its JSON with sorted keys)."""
        text = json.dumps(self.to_json(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def dirname(self) -> str:
        return f"{self.DIR_PREFIX}{self.profile}-{self.digest()}"


def default_root() -> Path:
    """``$SUBBOOST_ZOO_ROOT`` if set; else ``zoo_cache/`` in the repository root (git-ignored)
    when the package runs from a checkout; else ``$XDG_CACHE_HOME/subboost/zoo`` (default
    ``~/.cache/subboost/zoo``) for an installed package, never a folder inside site-packages."""
    env = os.environ.get("SUBBOOST_ZOO_ROOT")
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "subboost").is_dir():
        return checkout / "zoo_cache"
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "subboost" / "zoo"


def write_json(path: Path, data: object) -> None:
    """Write ``data`` as indented JSON with sorted keys, published atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def torch_settings(threads: int | None = None, deterministic: bool = True) -> Iterator[None]:
    """Set torch's intra-op thread count and deterministic algorithms; restore on exit."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    old_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        if threads:
            torch.set_num_threads(int(threads))
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        torch.set_num_threads(old_threads)
        torch.use_deterministic_algorithms(old_det, warn_only=old_warn)


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    """Linear warm-up then cosine decay to zero (the schedule of the task-vector papers)."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base


def train_with_frozen_head(opt: torch.optim.Optimizer, batch_loss: Callable[[torch.Tensor], torch.Tensor], *,
                           n: int, steps: int, batch_size: int, lr: float, warmup: int, generator: torch.Generator,
                           progress: bool = True, desc: str = "finetune", log_every: int = 10) -> list[float]:
    """The experts' optimisation loop of both zoos: ``steps`` mini-batches of ``batch_size``
    indices into ``n`` examples, drawn from one permutation by ``generator`` (a new one when
    the current permutation runs out), the learning rate of :func:`cosine_lr` set before each
    step, and one optimiser step on ``batch_loss(indices)`` (the zoo's forward pass through the
    trained weights and the frozen head). Returns the loss per step."""
    from tqdm import tqdm  # plain text bar: the book kernels have no ipywidgets

    order, pos = torch.randperm(n, generator=generator), 0
    losses: list[float] = []
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=generator), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup)
        loss = batch_loss(idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if step % log_every == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses


def zoo_cli(prog: str, description: str, profiles: Iterable[str], threads_default: int | None,
            threads_help: str) -> tuple[argparse.ArgumentParser, argparse._SubParsersAction, argparse.ArgumentParser]:
    """The parser of a zoo's command line with its ``build`` and ``path`` subcommands
    (``--profile``, ``--root``, ``--device``, ``--threads``, ``--no-progress``); returns
    ``(parser, subparsers, build_parser)`` for the zoo to add its own options and subcommands."""
    choices = sorted(profiles)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build (or find) a zoo in the cache")
    b.add_argument("--profile", default="ci", choices=choices)
    b.add_argument("--root", default=None, help="cache root (default: $SUBBOOST_ZOO_ROOT or ./zoo_cache)")
    b.add_argument("--device", default="auto", help="auto | cpu | cuda")
    b.add_argument("--threads", type=int, default=threads_default, help=threads_help)
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    p = sub.add_parser("path", help="print the folder a profile builds into")
    p.add_argument("--profile", default="ci", choices=choices)
    p.add_argument("--root", default=None)
    return parser, sub, b


def print_build_summary(label: str, folder: Path, this_call_s: float) -> None:
    """The command line's last lines after a build: the folder, the mean zero-shot and
    fine-tuned test accuracy and the build time, from the zoo's ``build.json``."""
    summary = json.loads((Path(folder) / "build.json").read_text())
    print(f"{label}: {folder}")
    print(f"mean zero-shot {summary['mean_zeroshot_test']:.3f}, mean fine-tuned {summary['mean_finetuned_test']:.3f}; "
          f"build {summary['timings'].get('total_s', 0):.0f}s (this call {this_call_s:.0f}s)")
