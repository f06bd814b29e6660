"""Task vectors and the classification of state-dict keys.

Notation (paper Sec. 3): base weights θ0, expert weights θi, task vector Δi = θi − θ0,
merged weights θm = θ0 + α·Δm.

Only the 2-D weight matrices of the residual (transformer) blocks are decomposed by the
spectral methods ("block matrices"); everything else is merged element-wise by the base
method. Three naming schemes are recognised:

- open_clip / OpenAI CLIP: ``...resblocks.{l}.attn.in_proj_weight``, ``attn.out_proj.weight``,
  ``mlp.c_fc.weight``, ``mlp.c_proj.weight``;
- transformers BERT-like encoders: ``encoder.layer.{l}.attention.self.{query,key,value}.weight``,
  ``attention.output.dense.weight``, ``intermediate.dense.weight``, ``output.dense.weight``;
- transformers T5: ``{encoder,decoder}.block.{l}.layer.{j}.{SelfAttention,EncDecAttention}.{q,k,v,o}.weight``,
  ``DenseReluDense.{wi,wi_0,wi_1,wo}.weight``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import Tensor

StateDict = dict[str, Tensor]

ATTN = "attn"
MLP = "mlp"
PROJ = "proj"
LAYER_TYPES = (ATTN, MLP)


@dataclass(frozen=True)
class BlockKey:
    """What a block-matrix key is: its stack (key prefix, e.g. ``visual.transformer.resblocks``),
    layer index and sublayer."""

    stack: str
    layer: int
    sublayer: str  # e.g. "attn.in_proj", "mlp.c_fc", "attn.q"
    layer_type: str  # ATTN or MLP


_CLIP_RE = re.compile(
    r"^(?P<stack>.*?)(?:\.)?(?:transformer\.)?resblocks\.(?P<layer>\d+)\."
    r"(?P<sub>attn\.in_proj_weight|attn\.out_proj\.weight|mlp\.c_fc\.weight|mlp\.c_proj\.weight)$"
)
_BERT_RE = re.compile(
    r"^(?P<stack>.*?)(?:\.)?encoder\.layer\.(?P<layer>\d+)\."
    r"(?P<sub>attention\.self\.(?:query|key|value)\.weight|attention\.output\.dense\.weight"
    r"|intermediate\.dense\.weight|output\.dense\.weight)$"
)
_T5_RE = re.compile(
    r"^(?P<stack>(?:.*\.)?(?:encoder|decoder))\.block\.(?P<layer>\d+)\.layer\.\d+\."
    r"(?P<sub>(?:SelfAttention|EncDecAttention)\.[qkvo]\.weight"
    r"|DenseReluDense\.(?:wi|wi_0|wi_1|wo)\.weight)$"
)
_CLIP_SUB = {
    "attn.in_proj_weight": ("attn.in_proj", ATTN),
    "attn.out_proj.weight": ("attn.out_proj", ATTN),
    "mlp.c_fc.weight": ("mlp.c_fc", MLP),
    "mlp.c_proj.weight": ("mlp.c_proj", MLP),
}
_LAYER_PREFIX_RE = re.compile(r"^(?P<stack>(?:.*?\.)?(?:resblocks|layer|block))\.(?P<layer>\d+)\.")


def layer_index(key: str) -> tuple[str, int] | None:
    """Residual-block ``(stack, index)`` that any parameter ``key`` belongs to, if any.

    The stack is the key prefix before the index (``visual.transformer.resblocks``,
    ``transformer.resblocks`` for CLIP's text tower, ``encoder.layer``, ``decoder.block``), so
    that LiNeS counts the depth L of each stack separately. LiNeS scales everything inside
    block ``l`` (biases and norms too).
    """
    m = _LAYER_PREFIX_RE.match(key)
    if not m:
        return None
    return m.group("stack"), int(m.group("layer"))


def parse_block_key(key: str) -> BlockKey | None:
    """Classify ``key`` as a block matrix, or return ``None`` if it is anything else."""
    info = layer_index(key)
    if info is None:
        return None
    stack, layer = info
    m = _CLIP_RE.match(key)
    if m:
        sub, ltype = _CLIP_SUB[m.group("sub")]
        return BlockKey(stack, layer, sub, ltype)
    m = _BERT_RE.match(key)
    if m:
        sub = m.group("sub").removesuffix(".weight")
        return BlockKey(stack, layer, sub, ATTN if sub.startswith("attention") else MLP)
    m = _T5_RE.match(key)
    if m:
        sub = m.group("sub").removesuffix(".weight")
        return BlockKey(stack, layer, sub, MLP if sub.startswith("DenseReluDense") else ATTN)
    return None


def is_projection_matrix(key: str) -> bool:
    """The CLIP visual projection ``visual.proj`` (optional target of the spectral methods)."""
    return key == "visual.proj" or key.endswith(".visual.proj")


def select_block_keys(
    state: Mapping[str, Tensor],
    layer_types: Iterable[str] = LAYER_TYPES,
    include_proj: bool = False,
) -> list[str]:
    """Keys of ``state`` that the spectral methods decompose.

    ``layer_types`` picks attention (``"attn"``), MLP (``"mlp"``) matrices or both (paper
    Table 3b); ``include_proj`` adds the visual projection.
    """
    types = set(layer_types)
    unknown = types - set(LAYER_TYPES)
    if unknown:
        raise ValueError(f"layer_types: unknown type(s) {sorted(unknown)}; use 'attn' and/or 'mlp'")
    keys = []
    for key, value in state.items():
        info = parse_block_key(key)
        if info is not None and info.layer_type in types and value.ndim == 2:
            keys.append(key)
        elif include_proj and is_projection_matrix(key) and value.ndim == 2:
            keys.append(key)
    return keys


def work_dtype(t: Tensor) -> torch.dtype:
    """The precision merges compute in: float64 for float64 inputs, else float32 (half
    precision is never accumulated in)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def all_finite(t: Tensor) -> bool:
    """True when every entry of ``t`` is finite. Fast path: a NaN or ±Inf entry makes the sum
    NaN or ±Inf whatever the summation order, so a finite sum proves every entry finite (one
    reduction, no boolean copy); only a non-finite sum (a bad entry, or overflow) is checked
    entry by entry."""
    if not t.is_floating_point() and not t.is_complex():
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


def task_vector(base: Mapping[str, Tensor], expert: Mapping[str, Tensor], name: str = "expert") -> StateDict:
    """Δ = θ_expert − θ_base over the floating-point tensors (paper Sec. 3).

    Raises ``ValueError`` naming the key when the key sets differ, a shape differs, or a value
    is not finite. Integer buffers (e.g. position ids) are not part of a task vector.
    """
    missing = [k for k in base if k not in expert]
    extra = [k for k in expert if k not in base]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing in {name}: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"not in base: {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        raise ValueError(f"key mismatch between base and {name}; " + "; ".join(parts))
    delta: StateDict = {}
    for key, b in base.items():
        e = expert[key]
        if tuple(b.shape) != tuple(e.shape):
            raise ValueError(
                f"shape mismatch for key '{key}': base {tuple(b.shape)} vs {name} {tuple(e.shape)}"
            )
        if not b.is_floating_point():
            continue
        if not all_finite(e):
            raise ValueError(f"{name}: key '{key}' contains NaN or Inf values")
        if not all_finite(b):
            raise ValueError(f"base: key '{key}' contains NaN or Inf values")
        delta[key] = e.detach() - b.detach()
    return delta


def task_vectors(base: Mapping[str, Tensor], experts: Mapping[str, Mapping[str, Tensor]]) -> dict[str, StateDict]:
    """Task vectors of several named experts against one base."""
    return {name: task_vector(base, sd, name=name) for name, sd in experts.items()}


def check_same_structure(vectors: list[Mapping[str, Tensor]], names: list[str] | None = None) -> list[str]:
    """Check that task vectors share keys and shapes; return the common key order."""
    if not vectors:
        raise ValueError("need at least one task vector")
    names = names or [f"task vector {i}" for i in range(len(vectors))]
    ref = vectors[0]
    for name, tv in zip(names[1:], vectors[1:]):
        if set(tv) != set(ref):
            diff = sorted(set(tv) ^ set(ref))
            raise ValueError(f"{name}: keys differ from {names[0]}: {diff[:5]}")
        for key in ref:
            if tuple(tv[key].shape) != tuple(ref[key].shape):
                raise ValueError(
                    f"{name}: shape mismatch for key '{key}': {tuple(tv[key].shape)} vs {tuple(ref[key].shape)}"
                )
    return list(ref)


def is_zero(matrix: Tensor) -> bool:
    """True when every entry is exactly zero (e.g. CLIP's frozen text tower in a task vector)."""
    return not bool(matrix.any())


def apply_task_vector(base: Mapping[str, Tensor], delta: Mapping[str, Tensor], alpha: float = 1.0) -> StateDict:
    """θm = θ0 + α·Δm; keys absent from ``delta`` are copied from the base, dtypes kept."""
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    unknown = [k for k in delta if k not in base]
    if unknown:
        raise ValueError(f"merged update has keys not in the base: {unknown[:5]}")
    out: StateDict = {}
    for key, b in base.items():
        if key in delta:
            d = delta[key]
            if tuple(d.shape) != tuple(b.shape):
                raise ValueError(f"shape mismatch for key '{key}': base {tuple(b.shape)} vs update {tuple(d.shape)}")
            out[key] = (b.to(torch.float32) + alpha * d.to(b.device, torch.float32)).to(b.dtype)
        else:
            out[key] = b.clone()
    return out
