"""Helpers shared by the planners: size validation and grid cutting."""

from __future__ import annotations

from .types import Box, Size


def check_size(size: Size) -> Size:
    """Validate an image size ``(w, h)``: two positive integers."""
    try:
        w, h = size
    except (TypeError, ValueError):
        raise ValueError(f"image size must be (width, height), got {size!r}") from None
    if isinstance(w, bool) or isinstance(h, bool) or int(w) != w or int(h) != h:
        raise ValueError(f"image size must be integers, got {size!r}")
    if w < 1 or h < 1:
        raise ValueError(f"image size must be positive, got {w}x{h}")
    return int(w), int(h)


def grid_boxes(cols: int, rows: int, cell: Size, origin: tuple[int, int] = (0, 0)) -> list[tuple[tuple[int, int], Box]]:
    """Row-major ``((col, row), box)`` of an even grid of ``cell``-sized boxes."""
    cw, ch = cell
    ox, oy = origin
    return [((c, r), (ox + c * cw, oy + r * ch, ox + (c + 1) * cw, oy + (r + 1) * ch))
            for r in range(rows) for c in range(cols)]


def parse_size(text: str) -> Size:
    """Parse ``"WxH"`` (or a single ``"S"`` for a square) into ``(w, h)``."""
    t = text.lower().strip()
    try:
        if "x" in t:
            w, h = t.split("x", 1)
            return check_size((int(w), int(h)))
        s = int(t)
        return check_size((s, s))
    except ValueError as e:
        raise ValueError(f"bad size {text!r}: expected WxH with positive integers ({e})") from None
