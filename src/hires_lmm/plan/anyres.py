"""LLaVA-NeXT "anyres" (as transformers' ``LlavaNextImageProcessor`` does it) and its geometry.

The grid-resolution choice and the resize-and-pad step are shared with SliME's local view.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .budget import check_budget, record_budget, refuse
from .common import check_size, grid_boxes
from .types import Canvas, Plan, Size, TokenGroup, cut_view

#: LLaVA-NeXT's grid pinpoints as (w, h), in the order transformers tries them: the checkpoints'
#: config lists [[336, 672], [672, 336], ...] and transformers reads each pair as (h, w).
NEXT_PINPOINTS: tuple[Size, ...] = ((672, 336), (336, 672), (672, 672), (336, 1008), (1008, 336))
#: The same set in haotian-liu/LLaVA's order, which reads each pair as (w, h). The set is symmetric,
#: so the two orders differ only on exact ties (small images, where every pinpoint holds the whole
#: image): LLaVA then picks 336x672 (portrait), transformers 672x336 (landscape).
LLAVA_PINPOINTS: tuple[Size, ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


def select_best_resolution(size: Size, candidates: Sequence[Size]) -> Size:
    """The candidate ``(w, h)`` that maximises the effective resolution, then least waste.

    Effective resolution = min(int(W·s)·int(H·s), W·H) with s = min(w/W, h/H); ties are broken
    by the smallest wasted area w·h − effective, and the first candidate wins exact ties.
    """
    W, H = size
    best: Size | None = None
    max_eff, min_waste = 0, float("inf")
    for w, h in candidates:
        scale = min(w / W, h / H)
        eff = min(int(W * scale) * int(H * scale), W * H)
        waste = w * h - eff
        if eff > max_eff or (eff == max_eff and waste < min_waste):
            max_eff, min_waste, best = eff, waste, (w, h)
    if best is None:
        raise ValueError("no candidate resolutions")
    return best


def fit_inside(size: Size, target: Size) -> Size:
    """Aspect-preserving resize of ``size`` to fit ``target`` (ceil on the free side, clamped)."""
    W, H = size
    tw, th = target
    sw, sh = tw / W, th / H
    if sw < sh:
        return tw, min(math.ceil(H * sw), th)
    return min(math.ceil(W * sh), tw), th


def padded_canvas(size: Size, target: Size, fill: str = "black") -> Canvas:
    """Resize keeping aspect ratio to fit ``target`` and centre it on a ``fill`` canvas."""
    nw, nh = fit_inside(size, target)
    return Canvas(size=target, resize=(nw, nh), offset=((target[0] - nw) // 2, (target[1] - nh) // 2),
                  fill=fill)  # type: ignore[arg-type]


def unpadded_grid(size: Size, grid_cols: int, grid_rows: int, tile_patches: int = 24) -> tuple[int, int]:
    """Rows and columns of the tile feature map left after removing padding ("unpad").

    Same arithmetic as transformers' ``LlavaNextProcessor._get_unpadded_features`` and the
    model's ``unpad_image``: returns ``(cols, rows)`` of the unpadded map.
    """
    W, H = size
    cur_h, cur_w = tile_patches * grid_rows, tile_patches * grid_cols
    if W / H > cur_w / cur_h:
        new_h = int(round(H * (cur_w / W), 7))
        pad = (cur_h - new_h) // 2
        cur_h -= 2 * pad
    else:
        new_w = int(round(W * (cur_h / H), 7))
        pad = (cur_w - new_w) // 2
        cur_w -= 2 * pad
    return cur_w, cur_h


def pinpoint_tokens(size: Size, pinpoint: Size, side: int = 336, patch: int = 14) -> int:
    """Visual tokens of ``size`` planned on ``pinpoint``: base + unpadded tile map + newlines.

    The unpadded map depends on the image's aspect ratio, so the count of a pinpoint does too.
    """
    g = side // patch
    ucols, urows = unpadded_grid(size, pinpoint[0] // side, pinpoint[1] // side, g)
    return g * g + ucols * urows + urows


def plan_llava_next(size: Size, *, side: int = 336, patch: int = 14,
                    pinpoints: Sequence[Size] = NEXT_PINPOINTS, max_visual_tokens: int | None = None) -> Plan:
    """Base view (image squashed to ``side``) then the pinpoint's tiles, row-major.

    Tokens: (side/patch)² base + unpadded tile map + one ``image_newline`` per unpadded row.

    ``max_visual_tokens``: the grid pinpoints are restricted to those whose count for this image
    fits (their order kept), then the usual best-resolution choice runs among them; no fitting
    pinpoint is a refusal. With every pinpoint fitting, the plan is the unbudgeted one.
    """
    size = check_size(size)
    if max_visual_tokens is not None:
        budget = check_budget(max_visual_tokens)
        pins = [(int(w), int(h)) for w, h in pinpoints]
        counts = [pinpoint_tokens(size, p, side, patch) for p in pins]
        fitting = [p for p, n in zip(pins, counts) if n <= budget]
        if not fitting and pins:  # (no pinpoints at all: the planner's own error below)
            n, p = min(zip(counts, pins))
            raise refuse("llava-next", size, budget, n, f"pinpoint {p[0]}x{p[1]}")
        plan = plan_llava_next(size, side=side, patch=patch, pinpoints=pinpoints if len(fitting) == len(pins) else fitting)
        return record_budget(plan, budget, {"pinpoints": [list(p) for p in fitting]})
    best = select_best_resolution(size, pinpoints)
    cols, rows = best[0] // side, best[1] // side
    canvases = (Canvas(size=(side, side), resize=(side, side)), padded_canvas(size, best, "black"))
    views = [cut_view(canvases, 0, "base", (side, side), size)]
    for cell, box in grid_boxes(cols, rows, (side, side)):
        views.append(cut_view(canvases, 1, "tile", (side, side), size, crop=box, cell=cell))
    g = side // patch
    ucols, urows = unpadded_grid(size, cols, rows, g)
    n = g * g + ucols * urows + urows
    tokens = (TokenGroup("base", g * g), TokenGroup("tiles (unpadded)", ucols * urows),
              TokenGroup("image_newline", urows))
    return Plan(method="llava-next", image_size=size, grid=(cols, rows), canvases=canvases,
                views=tuple(views), separators=(), num_visual_tokens=n, tokens=tokens, patch_size=patch,
                extra={"best_resolution": list(best), "unpadded_grid": [ucols, urows]})
