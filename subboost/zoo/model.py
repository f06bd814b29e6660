"""The zoo's tiny open_clip CLIP: its registered model config, a word-level tokenizer, and
zero-shot heads built the way the public ones are.

Tokenizer (a decision, documented): open_clip's default ``SimpleTokenizer`` does load offline
(its BPE vocabulary ships inside the package), but its 49,408-token vocabulary would make
the token embedding (49,408 × width) several times larger than the whole image tower of the
tiny model, and every checkpoint file with it. The zoo's captions come from a closed
vocabulary of a few hundred words, so the zoo uses :class:`WordTokenizer`: lower-case words,
ids ``0`` = padding, ``1`` = unknown, then the sorted vocabulary, then start- and
end-of-text as the two largest ids (open_clip's text tower pools at the argmax token, the
end-of-text token, exactly as with the BPE tokenizer). The model's ``vocab_size`` matches.

Model: an open_clip ``CLIP`` registered under a config name (``open_clip.add_model_config``),
so ``open_clip.create_model(name)`` builds it and its state-dict keys are those of ViT-B-32
(``visual.transformer.resblocks.{l}.attn.in_proj_weight``, ``visual.proj``, ...).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from subboost.evaluate import CLIP_MEAN, CLIP_STD  # one definition for the zoo and real releases

_WORD_RE = re.compile(r"[a-z0-9]+")


def split_words(text: str) -> list[str]:
    """Lower-case alphanumeric words of ``text`` (punctuation dropped)."""
    return _WORD_RE.findall(text.lower())


@dataclass(frozen=True)
class WordTokenizer:
    """Word-level tokenizer with open_clip's calling convention: ``tok(texts) -> (N, L)`` ids."""

    vocab: tuple[str, ...]
    context_length: int = 24

    PAD = 0
    UNK = 1

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 4

    @property
    def sot(self) -> int:
        return self.vocab_size - 2

    @property
    def eot(self) -> int:
        return self.vocab_size - 1

    def encode(self, text: str) -> list[int]:
        index = {w: i + 2 for i, w in enumerate(self.vocab)}
        return [index.get(w, self.UNK) for w in split_words(text)]

    def __call__(self, texts: str | Sequence[str]) -> Tensor:
        if isinstance(texts, str):
            texts = [texts]
        index = {w: i + 2 for i, w in enumerate(self.vocab)}
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot] + [index.get(w, self.UNK) for w in split_words(text)]
            ids = ids[: self.context_length - 1] + [self.eot]
            out[row, : len(ids)] = torch.tensor(ids)
        return out

    def to_json(self) -> dict:
        return {"type": "WordTokenizer", "context_length": self.context_length, "vocab": list(self.vocab)}

    @classmethod
    def from_json(cls, data: dict) -> "WordTokenizer":
        return cls(tuple(data["vocab"]), int(data["context_length"]))


def model_config(
    *,
    vocab_size: int,
    image_size: int = 32,
    patch_size: int = 8,
    width: int = 128,
    layers: int = 4,
    head_width: int = 32,
    embed_dim: int = 128,
    text_width: int = 128,
    text_layers: int = 3,
    text_heads: int = 4,
    context_length: int = 24,
) -> dict:
    """An open_clip model config (the JSON format of ``open_clip/model_configs``)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": layers, "width": width, "patch_size": patch_size,
                       "head_width": head_width},
        "text_cfg": {"context_length": context_length, "vocab_size": vocab_size, "width": text_width,
                     "heads": text_heads, "layers": text_layers},
    }


def register_model_config(name: str, config: dict, directory: str | Path) -> Path:
    """Write ``{directory}/{name}.json`` and register it with open_clip (idempotent).

    Raises ``ValueError`` if open_clip already knows ``name`` with a different config.
    """
    import open_clip

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.json"
    text = json.dumps(config, indent=2, sort_keys=True)
    if not path.is_file() or path.read_text() != text:
        from subboost.io import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(text)
    known = open_clip.get_model_config(name)
    if known is None:
        open_clip.add_model_config(path)
    elif json.dumps(known, sort_keys=True) != json.dumps(config, sort_keys=True):
        raise ValueError(f"open_clip already has a model config '{name}' that differs from the zoo's")
    return path


def create_model(name: str, config: dict, config_dir: str | Path, seed: int | None = None) -> torch.nn.Module:
    """Register ``config`` as ``name`` and build a randomly initialised open_clip CLIP from it."""
    import open_clip

    from subboost.release import quiet_open_clip

    register_model_config(name, config, config_dir)
    with quiet_open_clip():
        if seed is None:
            return open_clip.create_model(name, pretrained=None)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return open_clip.create_model(name, pretrained=None)


def normalize_images(images: Tensor) -> Tensor:
    """uint8 ``(N, 3, H, W)`` (or float in [0, 1]) → float32 normalised with CLIP's mean and std."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@torch.no_grad()
def build_head(model: torch.nn.Module, tokenizer, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
    """Zero-shot head ``(C, D)`` as in the public releases: per class, embed every template
    with the text tower, normalise, average, renormalise; then multiply by ``logit_scale.exp()``.
    Image features are normalised at use and there is no bias."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rows = []
    for c in classnames:
        tokens = tokenizer([t.format(c) for t in templates]).to(device)
        emb = model.encode_text(tokens)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        emb = emb.mean(dim=0)
        rows.append(emb / emb.norm())
    model.train(was_training)
    return (torch.stack(rows) * model.logit_scale.exp()).detach().float().cpu()
