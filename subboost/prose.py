"""Numbers into a chapter's Markdown: values glued for myst-nb's ``{glue:text}`` role."""

from __future__ import annotations

from typing import Any, Mapping


def glue_values(values: Mapping[str, Any] | None = None, /, **more: Any) -> None:
    """Glue every value (``values`` and keyword arguments) under its name for the chapter's
    ``{glue:text}`name:fmt``` roles, without displaying it. NumPy and torch scalars become
    plain Python numbers, so that format specs such as ``:.1f`` apply to them."""
    from myst_nb import glue

    for name, value in {**dict(values or {}), **more}.items():
        if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
            value = value.item()
        glue(name, value, display=False)
