"""Fine-tuning the language experts: the top encoder blocks of MiniLM, the zero-shot head frozen.

The blocks below the split point are frozen for every expert, so their output is computed once
per task (:func:`subboost.langzoo.model.hidden_at`) and training runs only the trained blocks
on it, with each batch cut to its longest sentence. Dropout is off (the blocks run in eval
mode) and batches come from a seeded generator, so a build is deterministic on one machine.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor

from subboost.langzoo.model import BLOCK_PREFIX, encode_from
from subboost.zoo_common import train_with_frozen_head


def block_state(blocks: torch.nn.ModuleList, first: int) -> dict[str, Tensor]:
    """State of ``blocks`` under full-model keys ``encoder.layer.{first + i}.…`` (CPU copies)."""
    out = {}
    for i, block in enumerate(blocks):
        for name, value in block.state_dict().items():
            out[f"{BLOCK_PREFIX}{first + i}.{name}"] = value.detach().cpu().clone()
    return out


def _batch_len(mask: Tensor) -> int:
    return max(1, int(mask.sum(1).max()))


def finetune(
    blocks: torch.nn.ModuleList,
    hidden: Tensor,
    mask: Tensor,
    labels: Tensor,
    head: Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.01,
    warmup: int = 10,
    seed: int = 0,
    device: str | torch.device = "cpu",
    progress: bool = True,
    desc: str = "finetune",
) -> tuple[torch.nn.ModuleList, list[float]]:
    """Fine-tune a copy of ``blocks`` on cached inputs ``hidden`` ``(N, T, D)`` with the head frozen.

    Loss: cross-entropy of ``head @ normalise(mean_pool(blocks(hidden)))``. AdamW with weight
    decay on the weight matrices only, linear warm-up and cosine decay. Returns the trained
    copy (on the CPU, eval mode) and the loss per step.
    """
    gen = torch.Generator().manual_seed(int(seed))
    trained = copy.deepcopy(blocks).to(device).eval()  # eval: no dropout
    for p in trained.parameters():
        p.requires_grad_(True)
    named = list(trained.named_parameters())
    groups = [{"params": [p for _, p in named if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for _, p in named if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr)
    w = head.to(device)

    def batch_loss(idx: Tensor) -> Tensor:
        m = mask[idx]
        length = _batch_len(m)
        feats = encode_from(trained, hidden[idx, :length].to(device), m[:, :length].to(device))
        return F.cross_entropy(feats @ w.T, labels[idx].to(device))

    losses = train_with_frozen_head(opt, batch_loss, n=labels.numel(), steps=steps, batch_size=batch_size, lr=lr,
                                    warmup=warmup, generator=gen, progress=progress, desc=desc, log_every=10)
    for p in trained.parameters():
        p.requires_grad_(False)
    return trained.to("cpu").eval(), losses


@torch.no_grad()
def predict(blocks: torch.nn.ModuleList, hidden: Tensor, mask: Tensor, head: Tensor, batch_size: int = 256,
            device: str | torch.device = "cpu") -> Tensor:
    """Predicted classes for cached inputs ``hidden`` with ``blocks`` and a head ``(C, D)``.

    Sentences are batched in order of length (each batch cut to its longest), which saves the
    padding; the predictions come back in the input order.
    """
    w = head.to(device)
    n = hidden.shape[0]
    order = torch.argsort(mask.sum(1), stable=True)
    preds = torch.zeros(n, dtype=torch.long)
    for i in range(0, n, batch_size):
        idx = order[i:i + batch_size]
        m = mask[idx]
        length = _batch_len(m)
        f = encode_from(blocks, hidden[idx, :length].to(device), m[:, :length].to(device))
        preds[idx] = (f @ w.T).argmax(dim=1).cpu()
    return preds
