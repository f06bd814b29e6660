"""Shared matplotlib / seaborn helpers for the book's chapters.

One look for every figure (:func:`book_style`, :func:`colors`), axes that always carry a
label and a unit (:func:`label_axes`), and saving beside the executed notebook
(:func:`save_figure`, :func:`show`). Each chapter's own figures live in its module under
:mod:`subboost.chapters`.

Nothing here changes global state on import; :func:`apply_book_style` changes matplotlib's
rcParams when a notebook calls it (once, at the top).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

#: Colour-blind-safe palette (seaborn "colorblind"), in a fixed order.
PALETTE = "colorblind"


def book_style() -> dict[str, Any]:
    """The rcParams of every figure in the book (a fresh dict on every call)."""
    return {
        "figure.dpi": 110,
        "savefig.dpi": 150,
        "savefig.bbox": "tight",
        "figure.figsize": (7.0, 4.2),
        "figure.constrained_layout.use": True,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.titlesize": 11,
        "axes.labelsize": 10,
        "legend.fontsize": 9,
        "legend.frameon": False,
        "xtick.labelsize": 9,
        "ytick.labelsize": 9,
        "font.family": "DejaVu Sans",
        "mathtext.fontset": "dejavusans",
    }


def apply_book_style() -> None:
    """Apply :func:`book_style` and the seaborn palette to matplotlib (call once per notebook)."""
    import matplotlib as mpl
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE)
    mpl.rcParams.update(book_style())


def colors(n: int) -> list[tuple[float, float, float]]:
    """``n`` colours of the book palette."""
    import seaborn as sns

    return list(sns.color_palette(PALETTE, n))


def label_axes(ax: Any, xlabel: str, ylabel: str, title: str | None = None) -> Any:
    """Set both axis labels (required: write the unit in brackets, or "[dimensionless]").

    Raises ``ValueError`` for an empty label so no figure leaves the book unlabelled.
    """
    if not xlabel.strip() or not ylabel.strip():
        raise ValueError("both axis labels are required (with units)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    return ax


def save_figure(fig: Any, output_dir: str | Path | None, name: str, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Save ``fig`` as ``output_dir/name.{fmt}`` (folders created); nothing if ``output_dir``
    is ``None``. Returns the written paths."""
    if output_dir is None:
        return []
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = out / f"{name}.{fmt}"
        fig.savefig(path)
        paths.append(path)
    return paths


def show(fig: Any, output_dir: str | Path | None, name: str) -> None:
    """Save ``fig`` (:func:`save_figure`), display it in the notebook and close it. Returns
    ``None`` so that a notebook cell ending with it shows only the figure."""
    import matplotlib.pyplot as plt

    save_figure(fig, output_dir, name)
    plt.show()
    plt.close(fig)
