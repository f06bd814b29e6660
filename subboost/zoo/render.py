"""Batched, seeded rendering of small synthetic images (torch, CPU).

Everything here is a pure function of its arguments and an explicit ``torch.Generator``, so
a task's data are reproducible from a seed. Images are float tensors ``(B, 3, S, S)`` in
``[0, 1]``; coordinates run over ``[-1, 1]`` with ``y`` pointing down (image rows).

Building blocks shared by the tasks and the pretraining captions (the "shared structure"):
named colours, eight shapes, textured backgrounds, sklearn's handwritten digits, stroke
glyphs ("runes"), faces, arrows, traffic-sign-like plates, and post effects (noise,
contrast).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.10),
    "orange": (1.00, 0.55, 0.05),
    "yellow": (0.95, 0.90, 0.10),
    "green": (0.10, 0.70, 0.20),
    "cyan": (0.10, 0.85, 0.90),
    "blue": (0.15, 0.25, 0.95),
    "purple": (0.55, 0.15, 0.80),
    "pink": (1.00, 0.50, 0.78),
    "white": (0.95, 0.95, 0.95),
    "gray": (0.50, 0.50, 0.50),
    "black": (0.05, 0.05, 0.05),
}
HUES = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
SHAPES = ("circle", "square", "triangle", "plus", "ring", "diamond", "star", "crescent")
TEXTURES = ("plain", "striped", "checkered", "dotted", "noisy", "wavy")
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def color_table(names: tuple[str, ...] | list[str]) -> Tensor:
    """``(len(names), 3)`` RGB table of named colours."""
    return torch.tensor([COLORS[n] for n in names], dtype=torch.float32)


def jitter_colors(base: Tensor, gen: torch.Generator, amount: float = 0.06) -> Tensor:
    """Per-sample colour jitter, clamped to ``[0, 1]``."""
    return (base + amount * (2 * torch.rand(base.shape, generator=gen) - 1)).clamp(0, 1)


def uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=gen)


def randint(n: int, high: int, gen: torch.Generator) -> Tensor:
    return torch.randint(0, high, (n,), generator=gen)


@lru_cache(maxsize=4)
def _grid(size: int) -> tuple[Tensor, Tensor]:
    c = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(c, c, indexing="ij")
    return xx, yy


def grid(size: int) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates ``(x, y)``, each ``(S, S)`` in ``[-1, 1]`` (cached, read-only use)."""
    return _grid(int(size))


# ------------------------------------------------------------------ backgrounds


def background(
    size: int,
    texture: Tensor,
    c1: Tensor,
    c2: Tensor,
    angle: Tensor,
    freq: Tensor,
    gen: torch.Generator,
) -> Tensor:
    """Textured backgrounds mixing ``c1`` and ``c2`` (``(B, 3)``).

    ``texture`` indexes :data:`TEXTURES`; ``angle`` (radians) orients stripes, checks and
    waves; ``freq`` is the number of periods across the image.
    """
    n = texture.numel()
    x, y = grid(size)
    x, y = x.expand(n, size, size), y.expand(n, size, size)
    ca, sa = torch.cos(angle).view(n, 1, 1), torch.sin(angle).view(n, 1, 1)
    xr = x * ca + y * sa
    yr = -x * sa + y * ca
    f = (freq * math.pi / 2).view(n, 1, 1)
    phase = (2 * math.pi * torch.rand(n, generator=gen)).view(n, 1, 1)
    sharp = 4.0
    t = torch.zeros(n, size, size)
    kinds = {name: texture == i for i, name in enumerate(TEXTURES)}
    stripes = torch.sigmoid(sharp * torch.sin(f * xr + phase))
    checks = torch.sigmoid(sharp * torch.sin(f * xr + phase) * torch.sin(f * yr + phase))
    fx = torch.frac((xr + 1) * freq.view(n, 1, 1) / 2 + phase / 6) - 0.5
    fy = torch.frac((yr + 1) * freq.view(n, 1, 1) / 2 + phase / 6) - 0.5
    dots = torch.sigmoid(12.0 * (0.28 - torch.sqrt(fx**2 + fy**2)))
    coarse = torch.rand(n, 1, max(2, size // 4), max(2, size // 4), generator=gen)
    noisy = F.interpolate(coarse, size=(size, size), mode="nearest")[:, 0]
    waves = torch.sigmoid(sharp * torch.sin(f * xr + 1.2 * torch.sin(f * yr) + phase))
    for name, tex in (("striped", stripes), ("checkered", checks), ("dotted", dots), ("noisy", noisy), ("wavy", waves)):
        m = kinds[name].view(n, 1, 1)
        t = torch.where(m, tex, t)
    t = t.unsqueeze(1)
    return c1.view(n, 3, 1, 1) * (1 - t) + c2.view(n, 3, 1, 1) * t


# ------------------------------------------------------------------ objects


@dataclass
class Objects:
    """One object slot for a batch of images.

    ``family`` is one of ``shape``, ``digit``, ``rune``, ``face``, ``arrow``, ``sign``,
    ``blob``; ``sub`` picks the member (shape index, digit bitmap row, rune id, expression,
    sign shape, ...). ``cx, cy`` are centres in ``[-1, 1]``, ``radius`` in half-image units,
    ``angle`` in radians; ``present`` masks out samples without this object.
    """

    family: str
    sub: Tensor
    color: Tensor
    cx: Tensor
    cy: Tensor
    radius: Tensor
    angle: Tensor
    present: Tensor | None = None
    detail_color: Tensor | None = None
    extra: Tensor | None = None  # digit bitmaps (B, 8, 8), rune jitter, blob harmonics


def _local(size: int, o: Objects) -> tuple[Tensor, Tensor, Tensor]:
    n = o.sub.numel()
    x, y = grid(size)
    dx = x.expand(n, size, size) - o.cx.view(n, 1, 1)
    dy = y.expand(n, size, size) - o.cy.view(n, 1, 1)
    ca, sa = torch.cos(o.angle).view(n, 1, 1), torch.sin(o.angle).view(n, 1, 1)
    r = o.radius.view(n, 1, 1)
    u = (ca * dx + sa * dy) / r
    v = (-sa * dx + ca * dy) / r
    px = r * size / 2  # pixels per local unit
    return u, v, px


def _soft(sd: Tensor, px: Tensor) -> Tensor:
    """Anti-aliased mask from a signed distance (local units, positive inside)."""
    return (sd * px + 0.5).clamp(0, 1)


def _rect(u: Tensor, v: Tensor, a: float, b: float) -> Tensor:
    return torch.minimum(a - u.abs(), b - v.abs())


def shape_sdf(index: int, u: Tensor, v: Tensor) -> Tensor:
    """Approximate signed distance (positive inside) of shape ``SHAPES[index]`` of unit size."""
    name = SHAPES[index]
    r = torch.sqrt(u**2 + v**2)
    if name == "circle":
        return 0.95 - r
    if name == "square":
        return 0.78 - torch.maximum(u.abs(), v.abs())
    if name == "triangle":  # pointing up (negative v)
        sds = []
        for k in range(3):
            th = -math.pi / 2 + 2 * math.pi * k / 3
            sds.append(0.5 - (u * math.cos(th) + v * math.sin(th)))
        return torch.minimum(torch.minimum(sds[0], sds[1]), sds[2]) * 1.3
    if name == "plus":
        return torch.maximum(_rect(u, v, 0.3, 0.95), _rect(u, v, 0.95, 0.3))
    if name == "ring":
        return torch.minimum(r - 0.5, 0.95 - r)
    if name == "diamond":
        return (1.0 - (u.abs() + v.abs())) / math.sqrt(2)
    if name == "star":
        th = torch.atan2(v, u) + math.pi / 2
        rad = 0.62 + 0.38 * torch.cos(5 * th)
        return (rad - r) * 0.6
    if name == "crescent":
        return torch.minimum(0.95 - r, torch.sqrt((u - 0.45) ** 2 + (v + 0.1) ** 2) - 0.72)
    raise ValueError(name)


def _segments_sdf(u: Tensor, v: Tensor, seg: Tensor, width: float) -> Tensor:
    """Signed distance of a union of capsules; ``seg`` is ``(B, K, 4)`` (x0, y0, x1, y1)."""
    best = None
    for k in range(seg.shape[1]):
        x0, y0, x1, y1 = (seg[:, k, i].view(-1, 1, 1) for i in range(4))
        dx, dy = x1 - x0, y1 - y0
        t = (((u - x0) * dx + (v - y0) * dy) / (dx**2 + dy**2 + 1e-6)).clamp(0, 1)
        d = torch.sqrt((u - x0 - t * dx) ** 2 + (v - y0 - t * dy) ** 2)
        sd = width - d
        best = sd if best is None else torch.maximum(best, sd)
    return best


def _bitmap_mask(u: Tensor, v: Tensor, bitmaps: Tensor) -> Tensor:
    """Sample ``(B, h, w)`` bitmaps (values in [0, 1]) at local coordinates in ``[-1, 1]``."""
    g = torch.stack([u, v], dim=-1)
    val = F.grid_sample(bitmaps.unsqueeze(1), g, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]
    return ((val - 0.3) / 0.3).clamp(0, 1)


def _face_masks(u: Tensor, v: Tensor, expr: Tensor, px: Tensor) -> tuple[Tensor, Tensor]:
    r = torch.sqrt(u**2 + v**2)
    fill = _soft(0.95 - r, px)
    eyes = torch.maximum(0.14 - torch.sqrt((u - 0.35) ** 2 + (v + 0.28) ** 2),
                         0.14 - torch.sqrt((u + 0.35) ** 2 + (v + 0.28) ** 2))
    e = expr.view(-1, 1, 1)
    # mouth centre-line v = m0 + c u^2 over |u| < 0.5; expressions: happy, sad, neutral, surprised
    c = torch.where(e == 0, -0.9, torch.where(e == 1, 0.9, torch.zeros_like(u[:, :1, :1])))
    m0 = torch.where(e == 0, 0.5, torch.where(e == 1, 0.3, torch.full_like(u[:, :1, :1], 0.4)))
    mouth = torch.minimum(0.1 - (v - (m0 + c * u**2)).abs(), 0.5 - u.abs())
    o_mouth = torch.minimum(torch.sqrt(u**2 + (v - 0.42) ** 2) - 0.1, 0.24 - torch.sqrt(u**2 + (v - 0.42) ** 2))
    mouth = torch.where(e == 3, o_mouth, mouth)
    detail = _soft(torch.maximum(eyes, mouth), px) * fill
    return fill, detail


def _arrow_sdf(u: Tensor, v: Tensor) -> Tensor:
    shaft = _rect(u + 0.3, v, 0.55, 0.16)
    head = torch.minimum(torch.minimum(u + 0.05, 0.95 - u - 1.6 * v.abs() * 0.8), 0.6 - v.abs())
    return torch.maximum(shaft, head)


SIGN_SHAPES = ("circle", "triangle", "diamond", "octagon")


def _sign_masks(u: Tensor, v: Tensor, kind: Tensor, symbol: Tensor, px: Tensor) -> tuple[Tensor, Tensor]:
    k = kind.view(-1, 1, 1)
    r = torch.sqrt(u**2 + v**2)
    circle = 0.95 - r
    tri = shape_sdf(SHAPES.index("triangle"), u, v * 0.95 - 0.05)
    diamond = (1.0 - (u.abs() + v.abs())) / math.sqrt(2)
    octagon = 0.88 - torch.maximum(torch.maximum(u.abs(), v.abs()), (u.abs() + v.abs()) / math.sqrt(2))
    sd = torch.where(k == 0, circle, torch.where(k == 1, tri, torch.where(k == 2, diamond, octagon)))
    fill = _soft(sd, px)
    border = _soft(torch.minimum(sd, 0.14 - sd), px)
    s = symbol.view(-1, 1, 1)
    bar = _rect(u, v, 0.38, 0.1)
    dot = 0.2 - torch.sqrt(u**2 + (v - 0.05) ** 2)
    vbar = _rect(u, v - 0.05, 0.1, 0.3)
    sym = torch.where(s == 0, bar, torch.where(s == 1, dot, vbar))
    detail = torch.maximum(border, _soft(sym, px)) * fill
    return fill, detail


def _blob_sdf(u: Tensor, v: Tensor, harmonics: Tensor) -> Tensor:
    """Star-shaped blob, radius 0.65 + Σ a_k cos(kθ) + b_k sin(kθ); ``harmonics`` is (B, K, 2)."""
    th = torch.atan2(u, -v)  # 0 at the top, mirror symmetric in u when only cosines
    r = torch.sqrt(u**2 + v**2)
    rad = torch.full_like(r, 0.65)
    for k in range(harmonics.shape[1]):
        a = harmonics[:, k, 0].view(-1, 1, 1)
        b = harmonics[:, k, 1].view(-1, 1, 1)
        rad = rad + a * torch.cos((k + 1) * th) + b * torch.sin((k + 1) * th)
    return (rad - r) * 0.7


def object_masks(size: int, o: Objects) -> tuple[Tensor, Tensor | None]:
    """Fill mask ``(B, S, S)`` and optional detail mask of an object slot."""
    u, v, px = _local(size, o)
    detail = None
    if o.family == "shape":
        fill = torch.zeros_like(u)
        for i in range(len(SHAPES)):
            idx = torch.nonzero(o.sub == i).flatten()
            if idx.numel():
                fill[idx] = _soft(shape_sdf(i, u[idx], v[idx]), px[idx])
    elif o.family in ("digit", "glyph"):
        fill = _bitmap_mask(u, v, o.extra)
    elif o.family == "rune":
        fill = _soft(_segments_sdf(u, v, o.extra, 0.13), px)
    elif o.family == "face":
        fill, detail = _face_masks(u, v, o.sub, px)
    elif o.family == "arrow":
        fill = _soft(_arrow_sdf(u, v), px)
    elif o.family == "sign":
        fill, detail = _sign_masks(u, v, o.sub, o.extra, px)
    elif o.family == "blob":
        fill = _soft(_blob_sdf(u, v, o.extra), px)
    else:
        raise ValueError(f"unknown object family '{o.family}'")
    if o.present is not None:
        p = o.present.view(-1, 1, 1).to(fill.dtype)
        fill = fill * p
        detail = None if detail is None else detail * p
    return fill, detail


def paint(img: Tensor, o: Objects) -> Tensor:
    """Alpha-composite an object slot onto ``img`` (``(B, 3, S, S)``)."""
    fill, detail = object_masks(img.shape[-1], o)
    n = img.shape[0]
    img = img * (1 - fill.unsqueeze(1)) + o.color.view(n, 3, 1, 1) * fill.unsqueeze(1)
    if detail is not None:
        dc = o.detail_color if o.detail_color is not None else torch.full((n, 3), 0.05)
        img = img * (1 - detail.unsqueeze(1)) + dc.view(n, 3, 1, 1) * detail.unsqueeze(1)
    return img


def post(img: Tensor, gen: torch.Generator, noise: Tensor | float = 0.0, contrast: Tensor | float = 1.0) -> Tensor:
    """Contrast around the per-image mean, additive Gaussian noise, clamp to ``[0, 1]``."""
    n = img.shape[0]
    if not isinstance(contrast, Tensor):
        contrast = torch.full((n,), float(contrast))
    if not isinstance(noise, Tensor):
        noise = torch.full((n,), float(noise))
    mean = img.mean(dim=(1, 2, 3), keepdim=True)
    img = mean + (img - mean) * contrast.view(n, 1, 1, 1)
    img = img + noise.view(n, 1, 1, 1) * torch.randn(img.shape, generator=gen)
    return img.clamp(0, 1)


# ------------------------------------------------------------------ glyph sources


@lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = torch.tensor(d.images, dtype=torch.float32) / 16.0
    return images, torch.tensor(d.target, dtype=torch.long)


SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def digit_pool(split: str) -> tuple[Tensor, Tensor]:
    """sklearn's 1797 handwritten 8×8 digits, partitioned by writer-agnostic index:
    index % 5 == 0 → test, == 1 → val, else train. Returns (bitmaps, labels)."""
    images, labels = _sklearn_digits()
    idx = torch.arange(labels.numel())
    sel = {"test": idx % 5 == 0, "val": idx % 5 == 1, "train": idx % 5 >= 2}[split]
    return images[sel], labels[sel]


def sample_digits(digits: Tensor, split: str, gen: torch.Generator) -> Tensor:
    """One bitmap ``(B, 8, 8)`` per requested digit, drawn from the split's pool."""
    images, labels = digit_pool(split)
    out = torch.empty(digits.numel(), 8, 8)
    for d in range(10):
        want = torch.nonzero(digits == d).flatten()
        if want.numel() == 0:
            continue
        pool = torch.nonzero(labels == d).flatten()
        pick = pool[torch.randint(0, pool.numel(), (want.numel(),), generator=gen)]
        out[want] = images[pick]
    return out


@lru_cache(maxsize=4)
def rune_prototypes(count: int = 10, strokes: int = 3, seed: int = 20250607) -> Tensor:
    """``(count, strokes, 4)`` stroke endpoints of a fixed alphabet of glyphs unseen in pretraining.

    The alphabet has its own seed, so the task is the same for every zoo seed. Prototypes are
    kept visually distinct by rejection: rendered at 24 px, every pair overlaps with IoU < 0.45.
    """
    g = torch.Generator().manual_seed(seed)
    protos: list[Tensor] = []
    masks: list[Tensor] = []
    x, y = grid(24)
    while len(protos) < count:
        p = torch.rand(strokes, 4, generator=g) * 1.5 - 0.75
        lengths = torch.sqrt((p[:, 2] - p[:, 0]) ** 2 + (p[:, 3] - p[:, 1]) ** 2)
        if bool((lengths < 0.7).any()):
            continue
        m = (_segments_sdf(x.unsqueeze(0), y.unsqueeze(0), p.unsqueeze(0), 0.13) > 0)[0]
        if all(float((m & q).sum()) / float((m | q).sum()) < 0.45 for q in masks):
            protos.append(p)
            masks.append(m)
    return torch.stack(protos)
