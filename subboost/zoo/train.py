"""Training loops of the zoo: contrastive pretraining of the tiny CLIP, per-task fine-tuning of
the image tower with the zero-shot head frozen (as in the task-vector papers), accuracy.

All randomness comes from explicit, seeded generators; :func:`subboost.zoo_common.torch_settings` fixes the
thread count and turns on deterministic algorithms for the duration of a build and restores
the previous settings afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from subboost.zoo.model import normalize_images
from subboost.zoo.tasks import pretraining_batch
from subboost.zoo_common import cosine_lr, train_with_frozen_head


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    # Rendering is many small tensor ops: one thread is faster than two, and far faster
    # when other processes compete for the cores.
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _param_groups(params: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    decay = [p for n, p in params if p.ndim >= 2 and "embedding" not in n and p.requires_grad]
    rest = [p for n, p in params if not (p.ndim >= 2 and "embedding" not in n) and p.requires_grad]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def _as_is(batch):
    return batch


class _PretrainingStream(torch.utils.data.IterableDataset):
    """The pretraining batches of one seeded generator, in order (a DataLoader source)."""

    def __init__(self, steps: int, batch_size: int, seed: int, image_size: int) -> None:
        self.steps, self.batch_size, self.seed, self.image_size = steps, batch_size, seed, image_size

    def __iter__(self) -> Iterator[tuple[Tensor, list[str]]]:
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(self.steps):
            with _single_thread():
                yield pretraining_batch(self.batch_size, gen, size=self.image_size)


def pretraining_batches(steps: int, batch_size: int, seed: int, image_size: int,
                        workers: int = 0) -> Iterator[tuple[Tensor, list[str]]]:
    """The ``steps`` pretraining batches drawn from a generator seeded with ``seed``.

    With ``workers=1`` they are rendered ahead in a DataLoader worker process (one thread), so
    that on a machine with two cores rendering (about half of a CPU step) overlaps with
    training. The batches are the same either way: one generator makes the same calls in the
    same order.
    """
    stream = _PretrainingStream(steps, batch_size, seed, image_size)
    if workers <= 0:
        return iter(stream)
    loader = torch.utils.data.DataLoader(stream, batch_size=None, num_workers=1, prefetch_factor=4,
                                         collate_fn=_as_is)
    return iter(loader)


def pretrain(
    model: torch.nn.Module,
    tokenizer: Callable[[list[str]], Tensor],
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.1,
    warmup: int = 50,
    image_size: int = 32,
    seed: int = 0,
    init_logit_scale: float | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    data_workers: int = 0,
) -> list[float]:
    """Contrastive (CLIP) pretraining on :func:`~subboost.zoo.tasks.pretraining_batch` captions.

    Symmetric InfoNCE over image and text embeddings, learnable logit scale clamped at 100
    (CLIP's bound). ``init_logit_scale`` overrides open_clip's initial value 1/0.07: a real
    CLIP ends its long training at the bound, and the heads inherit the scale, so a short
    schedule starts where the real one ends. ``data_workers=1`` renders the batches in a
    second process (:func:`pretraining_batches`; same batches, same result). Returns the loss
    per step.
    """
    if init_logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(float(init_logit_scale)))
    model.to(device).train()
    opt = torch.optim.AdamW(_param_groups(list(model.named_parameters()), weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="pretrain", disable=not progress, leave=False)
    batches = pretraining_batches(steps, batch_size, int(seed) * 7 + 1, image_size, workers=data_workers)
    for step, (images, captions) in zip(bar, batches):
        with _single_thread():
            tokens = tokenizer(captions)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, warmup)
        x = normalize_images(images).to(device)
        img = model.encode_image(x, normalize=True)
        txt = model.encode_text(tokens.to(device), normalize=True)
        logits = model.logit_scale.exp() * img @ txt.T
        target = torch.arange(len(captions), device=device)
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def finetune(
    model: torch.nn.Module,
    head: Tensor,
    images: Tensor,
    labels: Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.1,
    warmup: int = 10,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "finetune",
) -> dict[str, Tensor]:
    """Fine-tune a copy of the image tower on one task with the head frozen.

    Returns the expert's full CLIP state dict (text tower unchanged, so its task vector is
    zero there, as in the public checkpoints).
    """
    gen = torch.Generator().manual_seed(int(seed))
    expert = copy.deepcopy(model).to(device)
    for p in expert.parameters():
        p.requires_grad_(False)
    visual = expert.visual
    for p in visual.parameters():
        p.requires_grad_(True)
    visual.train()
    opt = torch.optim.AdamW(_param_groups(list(visual.named_parameters()), weight_decay), lr=lr)
    w = head.to(device)

    def batch_loss(idx: Tensor) -> Tensor:
        feats = visual(normalize_images(images[idx]).to(device))
        feats = feats / feats.norm(dim=-1, keepdim=True)
        return F.cross_entropy(feats @ w.T, labels[idx].to(device))

    train_with_frozen_head(opt, batch_loss, n=labels.numel(), steps=steps, batch_size=batch_size, lr=lr,
                           warmup=warmup, generator=gen, progress=progress, desc=desc, log_every=20)
    expert.eval()
    return {k: v.detach().cpu().clone() for k, v in expert.state_dict().items()}


@torch.no_grad()
def predict(visual: torch.nn.Module, head: Tensor, images: Tensor, batch_size: int = 512,
            device: str | torch.device = "cpu") -> Tensor:
    """Predicted classes of uint8 (or normalised float) images with a zero-shot-style head."""
    visual.eval()
    w = head.to(device)
    out = []
    for i in range(0, images.shape[0], batch_size):
        chunk = images[i:i + batch_size]
        x = normalize_images(chunk) if chunk.dtype == torch.uint8 else chunk.float()
        f = visual(x.to(device))
        out.append((f @ w.T).argmax(dim=1).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)
