"""The mini zoo's 20 image classification tasks and its pretraining captions.

Each task is procedurally generated from a seed (:func:`generate`) with train / val / test
splits, class names and caption templates (for the zero-shot heads). The fixed order mimics
the paper's benchmark list: the first 8 tasks, then 14, then 20. Every task has a stand-in
analogue in the paper's list (``TaskSpec.analogue``) with a similar role: some tasks are
close to what the base model saw in pretraining (high zero-shot), some are shifted in
domain or granularity (medium), and some use class names the base never read or concepts it
never saw (zero-shot near chance), as KMNIST or PCAM are for CLIP.

Shared structure: all tasks draw on the same colours, shapes, textures, sklearn's handwritten
digits and the same renderer (:mod:`subboost.zoo.render`); the digits appear in four tasks,
shapes in five.

Pretraining (:func:`pretraining_batch`) mixes two kinds of captioned images: images of the
kinds the tasks use, drawn from 18 of the tasks' train distributions but captioned in the
pretraining vocabulary, which often names things differently or more coarsely than the tasks'
class names (:func:`_caption_options`); and generic multi-object scenes whose captions describe
several attributes at once (:func:`world_batch`: shape or digit, colour, size, position,
count, background colour, texture, stripe direction, each mentioned with some probability).
HouseNumbers and Parity are left out of pretraining, so their experts learn from scratch.
Zero-shot accuracy therefore ranges from near chance (tasks whose class names the base never
read) to high (tasks named as in pretraining), while the base's features serve most tasks,
as CLIP's do: fine-tuning mostly maps known features onto each task's head, which is what
makes task vectors mergeable at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from subboost.zoo import render as R
from subboost.zoo.render import COLORS, DIGIT_WORDS, HUES, SHAPES, TEXTURES, Objects

Sampler = Callable[[Tensor, str, torch.Generator, int], Tensor]


@dataclass(frozen=True)
class TaskSpec:
    """One task: its name (used in file names, ``{name}Val``), class names, caption templates
    (``{}`` is replaced by the class name), a renderer ``sample(labels, split, gen, size)``
    returning float images in ``[0, 1]``, a one-line description and its paper analogue."""

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    sample: Sampler
    description: str
    analogue: str

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def prompts(self) -> list[list[str]]:
        """Per class, the filled templates."""
        return [[t.format(c) for t in self.templates] for c in self.classnames]


# ------------------------------------------------------------------ helpers

_ALL_COLOR_NAMES = tuple(COLORS)
_U = R.uniform


def _pick_colors(n: int, names: tuple[str, ...], gen: torch.Generator, jitter: float = 0.06) -> Tensor:
    table = R.color_table(names)
    return R.jitter_colors(table[R.randint(n, len(names), gen)], gen, jitter)


def _muted(c: Tensor, gen: torch.Generator) -> Tensor:
    """Dimmer, less saturated versions of colours (backgrounds that objects stand out on)."""
    w = _U(c.shape[0], 0.3, 0.5, gen).view(-1, 1)
    return (w * c + (1 - w) * 0.35).clamp(0, 1) * _U(c.shape[0], 0.6, 1.0, gen).view(-1, 1)


def _background(n: int, size: int, gen: torch.Generator, p_plain: float = 0.3, muted: bool = True,
                textures: tuple[int, ...] | None = None) -> Tensor:
    tex = torch.tensor(textures if textures is not None else range(1, len(TEXTURES)))
    texture = tex[R.randint(n, tex.numel(), gen)]
    texture = torch.where(torch.rand(n, generator=gen) < p_plain, torch.zeros_like(texture), texture)
    c1 = _pick_colors(n, _ALL_COLOR_NAMES, gen)
    c2 = _pick_colors(n, _ALL_COLOR_NAMES, gen)
    if muted:
        c1, c2 = _muted(c1, gen), _muted(c2, gen)
    return R.background(size, texture, c1, c2, _U(n, 0, math.pi, gen), _U(n, 2.5, 5.5, gen), gen)


def _bright(n: int, gen: torch.Generator, names: tuple[str, ...] = HUES + ("white",)) -> Tensor:
    return _pick_colors(n, names, gen)


def _zeros(n: int) -> Tensor:
    return torch.zeros(n)


# ------------------------------------------------------------------ the 20 tasks


def _shapes(labels: Tensor, split: str, gen: torch.Generator, size: int) -> Tensor:
    n = labels.numel()
    img = _background(n, size, gen)
    img = R.paint(img, Objects("shape", labels, _bright(n, gen), _U(n, -0.2, 0.2, gen), _U(n, -0.2, 0.2, gen),
                               _U(n, 0.55, 0.8, gen), _U(n, -0.12, 0.12, gen)))
    return R.post(img, gen, noise=_U(n, 0.0, 0.08, gen))


def _textures(labels: Tensor, split: str, gen: torch.Generator, size: int) -> Tensor:
    n = labels.numel()
    c1 = _pick_colors(n, _ALL_COLOR_NAMES, gen)
    c2 = _pick_colors(n, _ALL_COLOR_NAMES, gen)
    c2 = torch.where((c1 - c2).abs().sum(1, keepdim=True) < 0.5, 1 - c1, c2)
    img = R.background(size, labels, c1, c2, _U(n, 0, math.pi, gen), _U(n, 3.0, 6.0, gen), gen)
    present = torch.rand(n, generator=gen) < 0.6
    img = R.paint(img, Objects("shape", R.randint(n, len(SHAPES), gen), _bright(n, gen), _U(n, -0.6, 0.6, gen),
                               _U(n, -0.6, 0.6, gen), _U(n, 0.18, 0.3, gen), _U(n, 0, 6.3, gen), present))
    return R.post(img, gen, noise=_U(n, 0.0, 0.06, gen), contrast=_U(n, 0.6, 1.0, gen))


ORIENTATIONS = ("horizontal", "slightly rising", "rising", "steeply rising", "vertical", "steeply falling",
                "falling", "slightly falling")


def _stripe_angle(phi_deg: Tensor) -> Tensor:
    """Projection angle (image coordinates, y down) for stripes running at visual angle φ."""
    return -(phi_deg + 90.0) * math.pi / 180.0


def _orientation(labels: Tensor, split: str, gen: torch.Generator, size: int) -> Tensor:
    n = labels.numel()
    phi = labels.float() * 22.5 + _U(n, -4, 4, gen)
    c1 = _pick_colors(n, _ALL_COLOR_NAMES, gen)
    c2 = _pick_colors(n, _ALL_COLOR_NAMES, gen)
    c2 = torch.where((c1 - c2).abs().sum(1, keepdim=True) < 0.5, 1 - c1, c2)
    tex = torch.full((n,), TEXTURES.index("striped"))
    img = R.background(size, tex, c1, c2, _stripe_angle(phi), _U(n, 2.5, 4.5, gen), gen)
    present = torch.rand(n, generator=gen) < 0.5
    img = R.paint(img, Objects("shape", R.randint(n, len(SHAPES), gen), _bright(n, gen), _U(n, -0.5, 0.5, gen),
                               _U(n, -0.5, 0.5, gen), _U(n, 0.15, 0.3, gen), _U(n, 0, 6.3, gen), present))
    return R.post(img, gen, noise=_U(n, 0.0, 0.08, gen), contrast=_U(n, 0.5, 1.0, gen))


SIGN_COLORS = ("red", "blue", "yellow")


def _signs(labels: Tensor, split: str, gen: torch.Generator, size: int) -> Tensor:
    n = labels.numel()
    img = _background(n, size, gen)
    color = R.jitter_colors(R.color_table(SIGN_COLORS)[labels % 3], gen, 0.08)
    img = R.paint(img, Objects("sign", labels // 3, color, _U(n, -0.2, 0.2, gen), _U(n, -0.2, 0.2, gen),
                               _U(n, 0.55, 0.8, gen), _U(n, -0.15, 0.15, gen),
                               detail_color=R.jitter_colors(torch.full((n, 3), 0.95), gen, 0.04),
                               extra=R.randint(n, 3, gen)))
    return R.post(img, gen, noise=_U(n, 0.0, 0.06, gen), contrast=_U(n, 0.6, 1.0, gen))


def _digits(labels: Tensor, split: str, gen: torch.Generator, size: int) -> Tensor:
    n = labels.numel()
    img = torch.full((n, 3, size, size), 0.03) + 0.05 * torch.rand(n, 1, 1, 1, generator=gen)
    ink = (0.85 + 0.15 * torch.rand(n, 1, generator=gen)).expand(n, 3)
    img = R.paint(img, Objects("digit", labels, ink, _U(n, -0.08, 0.08, gen), _U(n, -0.08, 0.08, gen),
                               _U(n, 0.8, 0.95, gen), _U(n, -0.15, 0.15, gen), extra=R.sample_digits(labels, split, gen)))
    return R.post(img, gen, noise=_U(n, 0.0, 0.04, gen))


POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")


def _position(labels: Tensor, split: str, gen: torch.Generator, size: int) -> Tensor:
    n = labels.numel()
    img = _background(n, size, gen, p_plain=0.2)
    cx = (labels % 3 - 1).float() * 0.62 + _U(n, -0.08, 0.08, gen)
    cy = (labels // 3 - 1).float() * 0.62 + _U(n, -0.08, 0.08, gen)
    img = R.paint(img, Objects("shape", R.randint(n, len(SHAPES), gen), _bright(n, gen), cx, cy,
                               _U(n, 0.2, 0.3, gen), _U(n, 0, 6.3, gen)))
    return R.post(img, gen, noise=_U(n, 0.0, 0.08, gen))


def _house_numbers(labels: Tensor, split: str, gen: torch.Generator, size: int) -> Tensor:
    n = labels.numel()
    img = _background(n, size, gen, p_plain=0.5, muted=False)
    ink = _pick_colors(n, _ALL_COLOR_NAMES, gen)
    bgmean = img.mean(dim=(2, 3))
    ink = torch.where((ink - bgmean).abs().sum(1, keepdim=True) < 0.9, (bgmean.mean(1, keepdim=True) < 0.5).float()
                      .expand(n, 3) * 0.9 + 0.05, ink)
    r = _U(n, 0.7, 0.85, gen)
    for side in (-1.0, 1.0):  # neighbouring digits, cut by the image border
        present = torch.rand(n, generator=gen) < 0.7
        nb = R.randint(n, 10, gen)
        img = R.paint(img, Objects("digit", nb, ink, side * (r * 1.45 + _U(n, 0.0, 0.2, gen)), _U(n, -0.1, 0.1, gen), r,
                                   _zeros(n), present, extra=R.sample_digits(nb, split, gen)))
    img = R.paint(img, Objects("digit", labels, ink, _U(n, -0.06, 0.06, gen), _U(n, -0.08, 0.08, gen), r,
                               _U(n, -0.1, 0.1, gen), extra=R.sample_digits(labels, split, gen)))
    return R.post(img, gen, noise=_U(n, 0.02, 0.06, gen), contrast=_U(n, 0.7, 1.0, gen))


SCENES = ("beach", "forest", "night", "sea", "desert", "field", "snow", "city", "sunset", "lava")


def _scenes(labels: Tensor, split: str, gen: torch.Generator, size: int) -> Tensor:
    n = labels.numel()
    C = lambda name: R.jitter_colors(R.color_table((name,)).expand(n, 3), gen, 0.1)  # noqa: E731
    T = lambda name: torch.full((n,), TEXTURES.index(name))  # noqa: E731
    ang, fr = _U(n, 0, math.pi, gen), _U(n, 3, 6, gen)
    horiz = _stripe_angle(_U(n, -10, 10, gen))
    x, y = R.grid(size)
    split_line = (y.unsqueeze(0) > _U(n, -0.2, 0.3, gen).view(n, 1, 1)).unsqueeze(1).float()
    dark = lambda c, k: c * k  # noqa: E731
    out = torch.zeros(n, 3, size, size)
    # each scene: (texture, c1, c2, angle) or a two-part composition
    bg = {
        "forest": R.background(size, T("dotted"), dark(C("green"), 0.45), C("green"), ang, fr * 1.3, gen),
        "night": R.background(size, T("dotted"), C("black"), C("white") * 0.8, ang, fr * 1.6, gen),
        "sea": R.background(size, T("wavy"), C("blue"), C("cyan"), horiz, fr * 0.8, gen),
        "desert": R.background(size, T("wavy"), C("orange"), C("yellow"), horiz, fr * 0.6, gen),
        "field": R.background(size, T("striped"), C("green"), C("yellow") * 0.8, horiz + ang * 0.2, fr, gen),
        "snow": R.background(size, T("noisy"), C("white"), C("gray") * 1.5, ang, fr, gen),
        "city": R.background(size, T("checkered"), C("gray"), C("black") + 0.15, ang * 0 + math.pi / 2, fr, gen),
        "lava": R.background(size, T("noisy"), C("red"), C("orange"), ang, fr, gen),
    }
    beach = C("blue").view(n, 3, 1, 1) * (1 - split_line) + C("yellow").view(n, 3, 1, 1) * split_line
    sunset = C("orange").view(n, 3, 1, 1) * (1 - split_line) + C("purple").view(n, 3, 1, 1) * split_line
    sunset = R.paint(sunset, Objects("shape", torch.zeros(n, dtype=torch.long), C("yellow"), _U(n, -0.5, 0.5, gen),
                                     _U(n, -0.6, -0.1, gen), _U(n, 0.15, 0.3, gen), _zeros(n)))
    bg["beach"], bg["sunset"] = beach, sunset
    for i, name in enumerate(SCENES):
        m = (labels == i).view(n, 1, 1, 1)
        out = torch.where(m, bg[name], out)
    return R.post(out.clamp(0, 1), gen, noise=_U(n, 0.0, 0.08, gen), contrast=_U(n, 0.6, 1.0, gen))


def _colors(labels: Tensor, split: str, gen: torch.Generator, size: int) -> Tensor:
    n = labels.numel()
    base = R.color_table(("gray", "white", "black"))[R.randint(n, 3, gen)] * 0.6 + 0.2
    img = base.view(n, 3, 1, 1).expand(n, 3, size, size).clone()
    color = R.jitter_colors(R.color_table(HUES)[labels], gen, 0.08)
    img = R.paint(img, Objects("shape", R.randint(n, len(SHAPES), gen), color, _U(n, -0.2, 0.2, gen),
                               _U(n, -0.2, 0.2, gen), _U(n, 0.5, 0.8, gen), _U(n, 0, 6.3, gen)))
    return R.post(img, gen, noise=_U(n, 0.0, 0.05, gen))


SIZES = ("tiny", "small", "medium", "large")
_SIZE_BINS = ((0.14, 0.2), (0.28, 0.36), (0.46, 0.56), (0.72, 0.85))


def _sizes(labels: Tensor, split: str, gen: torch.Generator, size: int) -> Tensor:
    n = labels.numel()
    img = _background(n, size, gen, p_plain=0.5)
    lo = torch.tensor([b[0] for b in _SIZE_BINS])[labels]
    hi = torch.tensor([b[1] for b in _SIZE_BINS])[labels]
    r = lo + (hi - lo) * torch.rand(n, generator=gen)
    lim = (1 - r) * 0.8
    img = R.paint(img, Objects("shape", R.randint(n, len(SHAPES), gen), _bright(n, gen), lim * _U(n, -1, 1, gen),
                               lim * _U(n, -1, 1, gen), r, _U(n, 0, 6.3, gen)))
    return R.post(img, gen, noise=_U(n, 0.0, 0.06, gen))


COUNTS = ("one", "two", "three", "four", "five")


def _counting(labels: Tensor, split: str, gen: torch.Generator, size: int) -> Tensor:
    n = labels.numel()
    img = _background(n, size, gen, p_plain=0.7)
    # k distinct cells of a jittered 3x3 grid: objects never overlap
    cells = torch.argsort(torch.rand(n, 9, generator=gen), dim=1)
    color = _bright(n, gen)
    shape = R.randint(n, len(SHAPES), gen)
    for j in range(len(COUNTS)):
        cell = cells[:, j]
        present = labels >= j
        cx = (cell % 3 - 1).float() * 0.62 + _U(n, -0.07, 0.07, gen)
        cy = (cell // 3 - 1).float() * 0.62 + _U(n, -0.07, 0.07, gen)
        img = R.paint(img, Objects("shape", shape, color, cx, cy, _U(n, 0.2, 0.27, gen), _U(n, 0, 6.3, gen), present))
    return R.post(img, gen, noise=_U(n, 0.0, 0.06, gen))


COMBO_SHAPES = ("circle", "square", "triangle", "star")
COMBO_COLORS = ("red", "green", "blue", "yellow")
COMBOS = tuple(f"{c} {s}" for s in COMBO_SHAPES for c in COMBO_COLORS)


def _shape_colors(labels: Tensor, split: str, gen: torch.Generator, size: int) -> Tensor:
    n = labels.numel()
    img = _background(n, size, gen)
    shape = torch.tensor([SHAPES.index(s) for s in COMBO_SHAPES])[labels // 4]
    color = R.jitter_colors(R.color_table(COMBO_COLORS)[labels % 4], gen, 0.08)
    # a small distractor of a different shape and colour, in a corner
    d_shape = torch.tensor([SHAPES.index(s) for s in COMBO_SHAPES])[(labels // 4 + 1 + R.randint(n, 3, gen)) % 4]
    d_color = R.color_table(COMBO_COLORS)[(labels % 4 + 1 + R.randint(n, 3, gen)) % 4]
    sx, sy = torch.sign(_U(n, -1, 1, gen)), torch.sign(_U(n, -1, 1, gen))
    img = R.paint(img, Objects("shape", d_shape, d_color, sx * 0.72, sy * 0.72, _U(n, 0.15, 0.22, gen), _zeros(n),
                               torch.rand(n, generator=gen) < 0.7))
    img = R.paint(img, Objects("shape", shape, color, _U(n, -0.15, 0.15, gen), _U(n, -0.15, 0.15, gen),
                               _U(n, 0.45, 0.6, gen), _U(n, -0.2, 0.2, gen)))
    return R.post(img, gen, noise=_U(n, 0.0, 0.06, gen))


def _blob_harmonics(asymmetric: Tensor, gen: torch.Generator) -> Tensor:
    """Radial harmonics of blobs: mirror-symmetric (cosines only) where ``asymmetric`` is 0,
    with a strong sine (odd) component where it is 1."""
    n, k = asymmetric.numel(), 4
    harm = (torch.rand(n, k, 2, generator=gen) * 2 - 1) * torch.tensor([0.2, 0.18, 0.14, 0.1]).view(1, k, 1)
    odd = torch.sign(torch.rand(n, k, generator=gen) - 0.5) * _U(n * k, 0.08, 0.16, gen).view(n, k)
    harm[:, :, 1] = torch.where((asymmetric == 1).view(n, 1), odd, torch.zeros_like(odd))
    return harm


def _symmetry(labels: Tensor, split: str, gen: torch.Generator, size: int) -> Tensor:
    n = labels.numel()
    base = _pick_colors(n, ("gray", "black", "white"), gen) * 0.5 + 0.15
    img = base.view(n, 3, 1, 1).expand(n, 3, size, size).clone()
    img = R.paint(img, Objects("blob", labels, _bright(n, gen), _U(n, -0.1, 0.1, gen), _U(n, -0.1, 0.1, gen),
                               _U(n, 0.75, 0.95, gen), _zeros(n), extra=_blob_harmonics(labels, gen)))
    return R.post(img, gen, noise=_U(n, 0.0, 0.04, gen))


EXPRESSIONS = ("happy", "sad", "neutral", "surprised")


def _faces(labels: Tensor, split: str, gen: torch.Generator, size: int) -> Tensor:
    n = labels.numel()
    img = _background(n, size, gen)
    skin = _pick_colors(n, ("yellow", "orange", "pink", "white", "cyan"), gen)
    img = R.paint(img, Objects("face", labels, skin, _U(n, -0.1, 0.1, gen), _U(n, -0.1, 0.1, gen),
                               _U(n, 0.7, 0.92, gen), _U(n, -0.2, 0.2, gen)))
    return R.post(img, gen, noise=_U(n, 0.0, 0.06, gen))


DIRECTIONS = ("right", "down", "left", "up")


def _arrows(labels: Tensor, split: str, gen: torch.Generator, size: int) -> Tensor:
    n = labels.numel()
    img = _background(n, size, gen)
    angle = labels.float() * (math.pi / 2) + _U(n, -0.25, 0.25, gen)  # y down: +90° is "down"
    img = R.paint(img, Objects("arrow", labels, _bright(n, gen), _U(n, -0.15, 0.15, gen), _U(n, -0.15, 0.15, gen),
                               _U(n, 0.55, 0.85, gen), angle))
    return R.post(img, gen, noise=_U(n, 0.0, 0.06, gen))


PALETTE = ("red", "yellow", "green", "blue", "purple")
PAIRS = tuple((a, b) for i, a in enumerate(PALETTE) for b in PALETTE[i + 1:])
PAIR_NAMES = tuple(f"{a} and {b}" for a, b in PAIRS)


def _palettes(labels: Tensor, split: str, gen: torch.Generator, size: int) -> Tensor:
    n = labels.numel()
    table = R.color_table(PALETTE)
    ia = torch.tensor([PALETTE.index(a) for a, _ in PAIRS])[labels]
    ib = torch.tensor([PALETTE.index(b) for _, b in PAIRS])[labels]
    swap = torch.rand(n, generator=gen) < 0.5
    ia, ib = torch.where(swap, ib, ia), torch.where(swap, ia, ib)
    tex = torch.tensor([1, 2, 3, 5])[R.randint(n, 4, gen)]
    img = R.background(size, tex, R.jitter_colors(table[ia], gen, 0.08), R.jitter_colors(table[ib], gen, 0.08),
                       _U(n, 0, math.pi, gen), _U(n, 2.5, 5.0, gen), gen)
    return R.post(img, gen, noise=_U(n, 0.0, 0.06, gen), contrast=_U(n, 0.6, 1.0, gen))


def _silhouettes(labels: Tensor, split: str, gen: torch.Generator, size: int) -> Tensor:
    n = labels.numel()
    img = torch.full((n, 3, size, size), 0.05)
    ink = (0.75 + 0.25 * torch.rand(n, 1, generator=gen)).expand(n, 3)
    img = R.paint(img, Objects("shape", labels, ink, _U(n, -0.08, 0.08, gen), _U(n, -0.08, 0.08, gen),
                               _U(n, 0.7, 0.92, gen), _U(n, -0.3, 0.3, gen)))
    return R.post(img, gen, noise=_U(n, 0.03, 0.12, gen))


PARITY = ("even", "odd")


def _parity(labels: Tensor, split: str, gen: torch.Generator, size: int) -> Tensor:
    n = labels.numel()
    digit = 2 * R.randint(n, 5, gen) + labels
    img = _background(n, size, gen, p_plain=0.5)
    img = R.paint(img, Objects("digit", digit, _bright(n, gen), _U(n, -0.1, 0.1, gen), _U(n, -0.1, 0.1, gen),
                               _U(n, 0.7, 0.9, gen), _U(n, -0.15, 0.15, gen), extra=R.sample_digits(digit, split, gen)))
    return R.post(img, gen, noise=_U(n, 0.0, 0.06, gen))


def _rotated_digits(labels: Tensor, split: str, gen: torch.Generator, size: int) -> Tensor:
    n = labels.numel()
    bitmaps = R.sample_digits(labels, split, gen).transpose(1, 2)  # transposed, as EMNIST stores them
    img = _background(n, size, gen, p_plain=0.8)
    img = R.paint(img, Objects("digit", labels, _bright(n, gen), _U(n, -0.08, 0.08, gen), _U(n, -0.08, 0.08, gen),
                               _U(n, 0.8, 0.95, gen), _U(n, -0.12, 0.12, gen), extra=bitmaps))
    return R.post(img, gen, noise=_U(n, 0.0, 0.06, gen))


RUNES = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa")


def _runes(labels: Tensor, split: str, gen: torch.Generator, size: int) -> Tensor:
    n = labels.numel()
    protos = R.rune_prototypes(len(RUNES))
    strokes = protos[labels] + 0.07 * (2 * torch.rand(n, protos.shape[1], 4, generator=gen) - 1)
    img = _background(n, size, gen, p_plain=0.6)
    img = R.paint(img, Objects("rune", labels, _bright(n, gen), _U(n, -0.1, 0.1, gen), _U(n, -0.1, 0.1, gen),
                               _U(n, 0.8, 0.95, gen), _U(n, -0.2, 0.2, gen), extra=strokes))
    return R.post(img, gen, noise=_U(n, 0.0, 0.06, gen))


_T_PHOTO = ("a photo of a {}.", "an image of a {}.", "a picture of a {}.")

TASKS: tuple[TaskSpec, ...] = (
    TaskSpec("Shapes", SHAPES, _T_PHOTO + ("a {} shape.",), _shapes,
             "one of 8 shapes, any colour, on a textured background", "Cars"),
    TaskSpec("Textures", TEXTURES, ("a photo of a {} background.", "a {} pattern.", "a {} texture."), _textures,
             "background texture (6), low contrast, a distractor shape", "DTD"),
    TaskSpec("Orientation", ORIENTATIONS, ("{} stripes.", "a photo of {} stripes.", "a pattern of {} lines."),
             _orientation, "stripe orientation in 22.5° steps (pretraining knows only 4 directions)", "EuroSAT"),
    TaskSpec("Signs", tuple(f"{c} {s}" for s in R.SIGN_SHAPES for c in SIGN_COLORS),
             ("a photo of a {} sign.", "a {} traffic sign.", "a {} road sign."), _signs,
             "sign plates: 4 outlines × 3 colours, white border and symbol", "GTSRB"),
    TaskSpec("Digits", DIGIT_WORDS, ("a photo of the digit {}.", "the number {}.", "a handwritten {}."), _digits,
             "sklearn handwritten digits, white on black", "MNIST"),
    TaskSpec("Position", POSITIONS, ("a small object at the {}.", "a shape at the {}.", "a photo of an object at the {}."),
             _position, "position of a small shape on a 3×3 grid, cluttered background", "RESISC45"),
    TaskSpec("HouseNumbers", DIGIT_WORDS, ("a photo of the house number {}.", "the street number {}.", "the number {}."),
             _house_numbers, "coloured digit between two neighbours, low contrast", "SVHN"),
    TaskSpec("Scenes", SCENES, ("a photo of a {}.", "a {} scene.", "a view of a {}."), _scenes,
             "colour-texture compositions named by scene words never seen in pretraining", "SUN397"),
    TaskSpec("Colors", HUES, ("a photo of a {} object.", "a {} shape.", "something {}."), _colors,
             "colour of one large shape on a neutral background", "STL10"),
    TaskSpec("Sizes", SIZES, ("a {} object.", "a photo of a {} shape.", "a {} thing."), _sizes,
             "object size in 4 bins (pretraining knows small and large)", "OxfordIIITPet"),
    TaskSpec("Counting", COUNTS, ("{} objects.", "a photo of {} shapes.", "{} things."), _counting,
             "count of 1 to 5 identical small shapes", "Flowers102"),
    TaskSpec("ShapeColors", COMBOS, _T_PHOTO, _shape_colors,
             "4 shapes × 4 colours, with a small distractor", "CIFAR100"),
    TaskSpec("Symmetry", ("symmetric", "asymmetric"), ("a {} blob.", "a photo of a {} shape."), _symmetry,
             "is a random blob mirror-symmetric? (binary, unseen concept)", "PCAM"),
    TaskSpec("Faces", EXPRESSIONS, ("a {} face.", "a photo of a {} face.", "a drawing of a {} face."), _faces,
             "facial expression of a smiley (unseen concept)", "FER2013"),
    TaskSpec("Arrows", DIRECTIONS, ("an arrow pointing {}.", "a photo of an arrow pointing {}."), _arrows,
             "arrow direction (unseen object; direction words only seen as positions)", "CIFAR10"),
    TaskSpec("Palettes", PAIR_NAMES, ("a {} pattern.", "a photo of {} colors."), _palettes,
             "the two colours of a patterned image (pretraining names one)", "Food101"),
    TaskSpec("Silhouettes", SHAPES, ("a silhouette of a {}.", "a white {} on black.", "a photo of a {}."),
             _silhouettes, "white shape silhouettes on black, noisy", "FashionMNIST"),
    TaskSpec("Parity", PARITY, ("a photo of an {} number.", "an {} digit."), _parity,
             "is the digit even or odd? (binary, unseen concept)", "RenderedSST2"),
    TaskSpec("RotatedDigits", DIGIT_WORDS, ("a rotated digit {}.", "the number {} turned sideways."),
             _rotated_digits, "handwritten digits transposed, as EMNIST stores them", "EMNIST"),
    TaskSpec("Runes", RUNES, ("the rune {}.", "a photo of the glyph {}."), _runes,
             "a fixed alphabet of 10 stroke glyphs with names never seen in pretraining", "KMNIST"),
)

TASK_NAMES: tuple[str, ...] = tuple(t.name for t in TASKS)


def get_task(name: str) -> TaskSpec:
    """Look up a task by name; unknown names raise ``ValueError`` listing the known ones."""
    for t in TASKS:
        if t.name == name:
            return t
    raise ValueError(f"unknown zoo task '{name}'; known: {', '.join(TASK_NAMES)}")


def task_seed(seed: int, task: str, split: str) -> int:
    """Seed of one task split, derived from the zoo seed (stable across Python runs)."""
    return (int(seed) * 1_000_003 + TASK_NAMES.index(task) * 7919 + R.SPLIT_IDS[split] * 104_729) % (2**63 - 1)


def generate(task: str, n: int, split: str, seed: int, size: int = 32) -> tuple[Tensor, Tensor]:
    """``n`` images of ``task`` for ``split`` (train / val / test): uint8 ``(n, 3, S, S)`` and
    int64 labels, class-balanced (``n`` spread evenly over the classes, shuffled).

    Deterministic in ``(task, split, seed, size)``. Digit-based tasks draw their glyphs from
    disjoint pools of sklearn's digits per split.
    """
    if split not in R.SPLIT_IDS:
        raise ValueError(f"split must be one of {tuple(R.SPLIT_IDS)}, got '{split}'")
    spec = get_task(task)
    gen = torch.Generator().manual_seed(task_seed(seed, task, split))
    labels = (torch.arange(n) % spec.num_classes)[torch.randperm(n, generator=gen)]
    images = spec.sample(labels, split, gen, int(size))
    return (images * 255).round().to(torch.uint8), labels


# ------------------------------------------------------------------ pretraining captions

_POSITION_OF = POSITIONS


def _position_word(cx: float, cy: float) -> str:
    col = 0 if cx < -0.33 else (2 if cx > 0.33 else 1)
    row = 0 if cy < -0.33 else (2 if cy > 0.33 else 1)
    return _POSITION_OF[row * 3 + col]


def _orientation_word(phi_deg: float) -> str:
    phi = phi_deg % 180.0
    return ("horizontal", "rising", "vertical", "falling")[int(((phi + 22.5) % 180.0) // 45.0)]


_PRE_TEMPLATES = ("a photo of {}.", "an image of {}.", "a picture of {}.", "{}.")

#: probability that a pretraining caption mentions each attribute. The object's name is
#: always mentioned; colour rarely, so that colour alone cannot solve the contrastive task.
MENTION: dict[str, float] = {"size": 0.5, "color": 0.35, "position": 0.5, "count": 0.6, "bg_color": 0.3,
                             "texture": 0.5, "orientation": 0.6}

#: object families of the pretraining world and their probabilities. Several are named with
#: words that the tasks do not use (faces "with a smile", arrows "heading east", glyphs
#: "ka ... so", "lopsided" blobs, "plates"), so the base learns the visual concepts while
#: zero-shot prompts with the tasks' class names know nothing of them, as CLIP knows a concept
#: under other names than a benchmark's labels.
FAMILIES: dict[str, float] = {"shape": 0.4, "digit": 0.4, "face": 0.05, "arrow": 0.05, "rune": 0.05, "blob": 0.05}
SYLLABLES = ("ka", "ki", "ku", "ke", "ko", "sa", "shi", "su", "se", "so")
_FACE_PHRASES = ("with a smile", "with a frown", "with a flat mouth", "with an open mouth")
_HEADINGS = ("east", "south", "west", "north")
_BLOB_WORDS = ("balanced", "lopsided")
_FAMILY_SIZE = {"shape": len(SHAPES), "digit": 10, "face": 4, "arrow": 4, "rune": 10, "blob": 2, "sign": 4}


def _object_phrase(family: str, sub: int) -> str:
    if family == "shape":
        return SHAPES[sub]
    if family == "digit":
        return f"digit {DIGIT_WORDS[sub]}"
    if family == "face":
        return f"face {_FACE_PHRASES[sub]}"
    if family == "arrow":
        return f"arrow heading {_HEADINGS[sub]}"
    if family == "rune":
        return f"glyph {SYLLABLES[sub]}"
    if family == "blob":
        return f"{_BLOB_WORDS[sub]} blob"
    return f"{R.SIGN_SHAPES[sub]} plate"


def _family_objects(family: str, sub: Tensor, color: Tensor, cx: Tensor, cy: Tensor, r: Tensor, angle: Tensor,
                    gen: torch.Generator) -> Objects:
    n = sub.numel()
    if family == "digit":
        return Objects("digit", sub, color, cx, cy, r, angle, extra=R.sample_digits(sub, "train", gen))
    if family == "face":
        return Objects("face", sub, color, cx, cy, r, angle)
    if family == "arrow":
        return Objects("arrow", sub, color, cx, cy, r, sub.float() * (math.pi / 2) + angle)
    if family == "rune":
        protos = R.rune_prototypes(len(SYLLABLES))
        strokes = protos[sub] + 0.07 * (2 * torch.rand(n, protos.shape[1], 4, generator=gen) - 1)
        return Objects("rune", sub, color, cx, cy, r, angle, extra=strokes)
    if family == "blob":
        return Objects("blob", sub, color, cx, cy, r, _zeros(n), extra=_blob_harmonics(sub, gen))
    if family == "sign":
        return Objects("sign", sub, color, cx, cy, r, angle, detail_color=torch.full((n, 3), 0.95),
                       extra=R.randint(n, 3, gen))
    return Objects("shape", sub, color, cx, cy, r, angle)


def _rep(x: Tensor, g: int, n: int) -> Tensor:
    return x.repeat_interleave(g, dim=0)[:n]


def world_batch(n: int, gen: torch.Generator, size: int = 32, mention: dict[str, float] | None = None,
                group_size: int = 1) -> tuple[Tensor, list[str]]:
    """Random scenes and captions describing several attributes at once (the generic part of
    the pretraining data, see :func:`pretraining_batch`).

    Scenes hold 1-5 objects (shapes, sklearn digits from the train pool, faces, arrows,
    glyphs, blobs, sign plates: :data:`FAMILIES`) on a textured background. Each caption names
    every object and mentions the other attributes with the probabilities in ``mention``
    (default :data:`MENTION`): object colour, size (``small``/``large``), position (3×3 grid
    words), the count of objects, the background's main colour, its texture and stripe
    orientation (4 directions).

    With ``group_size`` > 1, images come in groups that share everything (background, object
    count, colours, sizes, positions, which attributes the caption mentions) except which
    objects they show: minimal pairs whose captions differ only in the object names (hard
    negatives by construction). Trials on 1000 steps did not show better features with
    groups of 4 than with independent scenes, so the zoo uses 1. Returns float images in
    ``[0, 1]`` and the captions.
    """
    p = dict(MENTION if mention is None else mention)
    g = max(1, int(group_size))
    m = -(-n // g)  # groups
    count = _rep(1 + torch.multinomial(torch.tensor([0.6, 0.2, 0.12, 0.05, 0.03]), m, replacement=True, generator=gen), g, n)
    texture = R.randint(m, len(TEXTURES), gen)
    texture = _rep(torch.where(torch.rand(m, generator=gen) < 0.3, torch.zeros_like(texture), texture), g, n)
    bg_names = _rep(torch.randint(0, len(_ALL_COLOR_NAMES), (m, 2), generator=gen), g, n)
    table = R.color_table(_ALL_COLOR_NAMES)
    c1 = _muted(R.jitter_colors(table[bg_names[:, 0]], gen), gen)
    c2 = _muted(R.jitter_colors(table[bg_names[:, 1]], gen), gen)
    phi = _rep(_U(m, 0, 180, gen), g, n)
    img = R.background(size, texture, c1, c2, _stripe_angle(phi), _rep(_U(m, 2.5, 5.5, gen), g, n), gen)
    descs: list[list[str]] = [[] for _ in range(n)]
    cells = _rep(torch.argsort(torch.rand(m, 9, generator=gen), dim=1), g, n)
    obj_colors = HUES + ("white",)
    fam_names = tuple(FAMILIES)
    fam_probs = torch.tensor([FAMILIES[f] for f in fam_names])
    for j in range(5):
        present = count > j
        single = count == 1
        color_idx = _rep(R.randint(m, len(obj_colors), gen), g, n)
        color = R.jitter_colors(R.color_table(obj_colors)[color_idx], gen)
        r = _rep(torch.where(single[::g][:m], _U(m, 0.3, 0.85, gen), _U(m, 0.18, 0.3, gen)), g, n)
        cell = cells[:, j]
        ux, uy = _rep(_U(m, -1, 1, gen), g, n), _rep(_U(m, -1, 1, gen), g, n)
        jx, jy = _rep(_U(m, -0.07, 0.07, gen), g, n), _rep(_U(m, -0.07, 0.07, gen), g, n)
        cx = torch.where(single, ux * (1 - r).clamp(min=0) * 0.9, (cell % 3 - 1).float() * 0.62 + jx)
        cy = torch.where(single, uy * (1 - r).clamp(min=0) * 0.9, (cell // 3 - 1).float() * 0.62 + jy)
        angle = _rep(_U(m, -0.25, 0.25, gen), g, n)
        family = torch.multinomial(fam_probs, n, replacement=True, generator=gen)
        sub = torch.zeros(n, dtype=torch.long)
        for f, name in enumerate(fam_names):
            idx = torch.nonzero((family == f) & present).flatten()
            if idx.numel() == 0:
                continue
            sub[idx] = R.randint(idx.numel(), _FAMILY_SIZE[name], gen)
            rr = r[idx] if name == "shape" else r[idx].clamp(min=0.28) * (1.1 if name in ("digit", "rune") else 1.0)
            obj = _family_objects(name, sub[idx], color[idx], cx[idx], cy[idx], rr, angle[idx], gen)
            img[idx] = R.paint(img[idx], obj)
        says = _rep(torch.rand(m, 3, generator=gen) < torch.tensor([p["size"], p["color"], p["position"]]), g, n)
        rows = zip(torch.nonzero(present).flatten().tolist(), r[present].tolist(), color_idx[present].tolist(),
                   family[present].tolist(), sub[present].tolist(), cx[present].tolist(), cy[present].tolist(),
                   says[present].tolist())
        for i, rv, ci, fam, sv, x, y, (s_size, s_color, s_pos) in rows:
            words = []
            if s_size and (rv < 0.3 or rv > 0.55):
                words.append("small" if rv < 0.3 else "large")
            if s_color:
                words.append(obj_colors[ci])
            words.append(_object_phrase(fam_names[fam], sv))
            if s_pos:
                words.append(f"at the {_position_word(x, y)}")
            descs[i].append(("an " if words[0][0] in "aeiou" else "a ") + " ".join(words))
    img = R.post(img, gen, noise=_rep(_U(m, 0.0, 0.05, gen), g, n))
    says = _rep(torch.rand(m, 4, generator=gen)
                < torch.tensor([p["bg_color"], p["texture"], p["orientation"], p["count"]]), g, n).tolist()
    order = _rep(torch.rand(m, generator=gen) < 0.5, g, n).tolist()
    tmpl = _rep(R.randint(m, len(_PRE_TEMPLATES), gen), g, n).tolist()
    captions = []
    for i in range(n):
        parts = list(descs[i])
        k = int(count[i])
        s_bg, s_tex, s_ori, s_count = says[i]
        if k > 1 and s_count:
            parts.insert(0, f"{DIGIT_WORDS[k]} objects:")
        tex = TEXTURES[int(texture[i])]
        bg = []
        if s_bg:
            bg.append(_ALL_COLOR_NAMES[int(bg_names[i, 0])])
        if s_tex and tex != "plain":
            bg.append(tex)
        if bg:
            phrase = "on a " + " ".join(bg) + " background"
            if tex == "striped" and s_ori:
                phrase += f" with {_orientation_word(float(phi[i]))} stripes"
            if order[i]:
                parts.append(phrase)
            else:
                parts.insert(0, phrase.removeprefix("on ") + " with")
        captions.append(_PRE_TEMPLATES[tmpl[i]].format(" ".join(parts)))
    return img, captions


# ------------------------------------------------------------------ task-like pretraining images

_TEXTURE_SYNONYMS = {"plain": "flat", "striped": "lined", "checkered": "grid", "dotted": "spotted",
                     "noisy": "grainy", "wavy": "wiggly"}
_SCENE_DESCRIPTIONS = {
    "beach": "blue above yellow", "forest": "dark green spotted", "night": "black spotted with white",
    "sea": "blue and cyan wiggly", "desert": "orange and yellow wiggly", "field": "green and yellow lined",
    "snow": "white grainy", "city": "gray grid", "sunset": "orange above purple with a yellow circle",
    "lava": "red and orange grainy",
}


def _caption_options(task: str, label: int) -> list[str]:
    """What a pretraining caption may say about an image of ``task`` with class ``label``:
    the concept, often in other words than the task's class names (synonyms for textures,
    descriptions for scenes, "smile"/"frown" for expressions, compass headings for arrows,
    syllables for glyphs, "balanced"/"lopsided" for symmetry) or coarser (4 stripe
    directions, counts above three as "many", sizes as small/large only)."""
    if task in ("Shapes", "Silhouettes"):
        return [f"a {SHAPES[label]}", f"a white {SHAPES[label]}" if task == "Silhouettes" else f"a {SHAPES[label]} shape"]
    if task == "Textures":
        return [f"a {_TEXTURE_SYNONYMS[TEXTURES[label]]} pattern"]
    if task == "Orientation":
        return [f"{_orientation_word(label * 22.5)} stripes"]
    if task == "Signs":
        return [f"a {SIGN_COLORS[label % 3]} {R.SIGN_SHAPES[label // 3]} plate"]
    if task in ("Digits", "RotatedDigits"):
        word = DIGIT_WORDS[label]
        return [f"digit {word}", f"a sideways digit {word}" if task == "RotatedDigits" else f"a white digit {word}"]
    if task == "Position":
        return [f"a small object at the {POSITIONS[label]}"]
    if task == "Scenes":
        return [f"a {_SCENE_DESCRIPTIONS[SCENES[label]]} pattern"]
    if task == "Colors":
        return [f"a {HUES[label]} object", f"something {HUES[label]}"]
    if task == "Sizes":
        return {0: ["a small object"], 1: ["an object"], 2: ["an object"], 3: ["a large object"]}[label]
    if task == "Counting":
        return [f"{DIGIT_WORDS[label + 1] if label < 3 else 'many'} objects"]
    if task == "ShapeColors":
        c, sh = COMBO_COLORS[label % 4], COMBO_SHAPES[label // 4]
        return [f"a {c} {sh}"]
    if task == "Symmetry":
        return [f"a {_BLOB_WORDS[label]} blob"]
    if task == "Faces":
        return [f"a face {_FACE_PHRASES[label]}"]
    if task == "Arrows":
        return [f"an arrow heading {_HEADINGS[label]}"]
    if task == "Palettes":
        a, b = PAIRS[label]
        return [f"a {a} pattern", f"a {b} pattern"]
    if task == "Runes":
        return [f"glyph {SYLLABLES[label]}"]
    raise ValueError(f"task '{task}' has no pretraining captions")


#: tasks whose kind of image appears in pretraining (with the captions above). Left out:
#: HouseNumbers (digits among neighbours, low contrast) and Parity (a property no caption
#: names), which their experts must learn from scratch, as CLIP must for SVHN or PCAM.
PRETRAIN_TASKS: tuple[str, ...] = tuple(t for t in (
    "Shapes", "Textures", "Orientation", "Signs", "Digits", "Position", "Scenes", "Colors", "Sizes", "Counting",
    "ShapeColors", "Symmetry", "Faces", "Arrows", "Palettes", "Silhouettes", "RotatedDigits", "Runes"))


def task_like_batch(n: int, gen: torch.Generator, size: int = 32) -> tuple[Tensor, list[str]]:
    """``n`` images drawn from the train distributions of :data:`PRETRAIN_TASKS` (task chosen
    uniformly per image) with captions from :func:`_caption_options`."""
    which = R.randint(n, len(PRETRAIN_TASKS), gen)
    images = torch.zeros(n, 3, size, size)
    captions = [""] * n
    for k, task in enumerate(PRETRAIN_TASKS):
        idx = torch.nonzero(which == k).flatten()
        if idx.numel() == 0:
            continue
        spec = get_task(task)
        labels = R.randint(idx.numel(), spec.num_classes, gen)
        images[idx] = spec.sample(labels, "train", gen, size)
        pick = torch.randint(0, 2, (idx.numel(),), generator=gen).tolist()
        tmpl = R.randint(idx.numel(), len(_PRE_TEMPLATES), gen).tolist()
        for i, lab, p_, t_ in zip(idx.tolist(), labels.tolist(), pick, tmpl):
            options = _caption_options(task, lab)
            captions[i] = _PRE_TEMPLATES[t_].format(options[p_ % len(options)])
    return images, captions


def pretraining_batch(n: int, gen: torch.Generator, size: int = 32, task_share: float = 0.7) -> tuple[Tensor, list[str]]:
    """One pretraining batch: a share ``task_share`` of task-like images (:func:`task_like_batch`)
    and the rest generic multi-object scenes (:func:`world_batch`), with their captions.

    The base thus sees the kinds of images the tasks use (as CLIP saw digits, textures and
    satellite images on the web) but named in its own caption vocabulary, which often differs
    from the tasks' class names: zero-shot accuracy depends on that naming, fine-tuning
    mostly maps known features onto the task's head, and two tasks are left for the experts
    to learn from scratch.
    """
    k = int(round(n * float(task_share)))
    img_a, cap_a = task_like_batch(k, gen, size) if k else (torch.zeros(0, 3, size, size), [])
    img_b, cap_b = world_batch(n - k, gen, size) if n - k else (torch.zeros(0, 3, size, size), [])
    return torch.cat([img_a, img_b]), cap_a + cap_b


def vocabulary() -> list[str]:
    """Every word of the task prompts and the pretraining captions, sorted (the zoo's
    tokenizer vocabulary; words of the tasks that pretraining never uses keep their random
    initial embeddings, as rare tokens do in a real CLIP)."""
    words: set[str] = set()
    texts: list[str] = []
    for t in TASKS:
        for prompts in t.prompts():
            texts.extend(prompts)
    texts += list(_PRE_TEMPLATES) + ["objects: on a background with stripes at the digit an small large"]
    texts += list(_ALL_COLOR_NAMES) + list(SHAPES) + list(TEXTURES) + list(DIGIT_WORDS) + list(POSITIONS)
    texts += ["horizontal rising vertical falling"] + [_object_phrase(f, i) for f in FAMILIES
                                                       for i in range(_FAMILY_SIZE[f])]
    texts += [o for t in PRETRAIN_TASKS for lab in range(get_task(t).num_classes) for o in _caption_options(t, lab)]
    from subboost.zoo.model import split_words

    for text in texts:
        words.update(split_words(text.replace("{}", "")))
    return sorted(words)
