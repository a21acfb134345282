"""LLaVA-UHD image modularization (thunlp/LLaVA-UHD ``slice_process.py``, ECCV/v1 branch).

Variable-sized slices: a grid chosen by aspect ratio among factorisations of N−1, N, N+1 slices
(N = ceil(W·H / 336²), at most 7), every slice rescaled to about 336² area with sides multiples
of 14, plus an overview of the whole image. ``arxiv=True`` gives the arXiv v1 paper's variant:
at most 6 slices, its score written as −|log(W·n / (H·m))|, 64 queries per part.
"""

from __future__ import annotations

import math
from functools import partial

from .budget import check_budget, fit_budget
from .common import check_size, grid_boxes
from .types import Canvas, Plan, Size, TokenGroup, cut_view


def ensure_divide(length: float, patch: int) -> int:
    """Floor ``length`` to a multiple of ``patch``, at least ``patch``."""
    return max(math.floor(length / patch) * patch, patch)


def find_best_resize(size: tuple[float, float], scale: int = 336, patch: int = 14,
                     allow_upscale: bool = False) -> Size:
    """Rescale to about ``scale``² area at the same aspect ratio (only down unless allowed),
    sides floored to multiples of ``patch``."""
    w, h = size
    if w * h > scale * scale or allow_upscale:
        r = w / h
        h = int(scale / math.sqrt(r))
        w = int(h * r)
    return ensure_divide(w, patch), ensure_divide(h, patch)


def candidate_grids(size: Size, max_slices: int, scale: int = 336) -> tuple[int, list[tuple[int, int]]]:
    """``multiple`` = min(ceil(W·H/scale²), max_slices) and the candidate (cols, rows) grids:
    factorisations of multiple−1, multiple, multiple+1 (1 and > max_slices excluded), cols ascending."""
    W, H = size
    multiple = min(math.ceil(W * H / (scale * scale)), max_slices)
    grids: list[tuple[int, int]] = []
    for n in (multiple - 1, multiple, multiple + 1):
        if n == 1 or n > max_slices or n < 1:
            continue
        grids += [(m, n // m) for m in range(1, n + 1) if n % m == 0]
    return multiple, grids


def best_grid(size: Size, max_slices: int = 7, scale: int = 336, arxiv: bool = False) -> tuple[int, int] | None:
    """The slice grid ``(cols, rows)``, or None when the image is not sliced."""
    W, H = size
    multiple, grids = candidate_grids(size, max_slices, scale)
    if multiple <= 1:
        return None
    best, min_err = (1, 1), float("inf")
    log_ratio = math.log(W / H)
    for m, n in grids:
        # the two scores are equal algebraically; each variant keeps its own float arithmetic
        err = abs(math.log(W * n / (H * m)) - math.log(1)) if arxiv else abs(log_ratio - math.log(m / n))
        if err < min_err:
            best, min_err = (m, n), err
    return best


def slice_size(size: Size, grid: tuple[int, int], scale: int = 336, patch: int = 14) -> Size:
    """Size of every slice: floor W, H to multiples of the grid, rescale the cell to ~scale²."""
    W, H = size
    m, n = grid
    cell = (ensure_divide(W, m) / m, ensure_divide(H, n) / n)
    return find_best_resize(cell, scale, patch, allow_upscale=True)


def prescale_size(size: Size, long_side: int) -> Size:
    """The eval loader's ``resize_image_keep_ratio``: long side to ``long_side`` (int() on the other)."""
    W, H = size
    if W > H:
        return long_side, max(1, int(long_side / W * H))
    return max(1, int(long_side / H * W)), long_side


def plan_llava_uhd(size: Size, *, arxiv: bool = False, max_slices: int | None = None,
                   side: int = 336, patch: int = 14, queries: int | None = None,
                   prescale_long_side: int | None = None, max_visual_tokens: int | None = None) -> Plan:
    """Slices (row-major, each followed by "," or "\\n" at a row end) then the overview.

    Tokens: ``queries``·(N+1) + N when sliced into N slices, ``queries`` otherwise
    (144 queries for the ECCV/v1 resampler, 64 for the arXiv perceiver).

    ``prescale_long_side=1024`` reproduces the v1 eval loader, which first resizes every image
    to a long side of 1024 (bicubic) before slicing; off by default, as in training.

    ``max_visual_tokens``: the reference's own knob, ``max_slice_nums``, is lowered from
    ``max_slices`` one by one until the plan fits (its slice count never grows as the limit
    drops); at 1 the image is not sliced (the overview alone, ``queries`` tokens), below that
    the budget is refused.
    """
    size = check_size(size)
    if max_slices is None:
        max_slices = 6 if arxiv else 7
    if queries is None:
        queries = 64 if arxiv else 144
    if max_visual_tokens is not None:
        budget = check_budget(max_visual_tokens)
        limits = [max_slices, *range(max_slices - 1, 0, -1)]
        return fit_budget("llava-uhd-arxiv" if arxiv else "llava-uhd", size, budget,
                          [({"max_slices": k}, partial(
                              plan_llava_uhd, size, arxiv=arxiv, max_slices=k, side=side, patch=patch,
                              queries=queries, prescale_long_side=prescale_long_side)) for k in limits])
    src = prescale_size(size, prescale_long_side) if prescale_long_side else size
    grid = best_grid(src, max_slices, side, arxiv)
    method = "llava-uhd-arxiv" if arxiv else "llava-uhd"
    canvases: list[Canvas] = []
    views = []
    seps: list[str] = []
    tokens: list[TokenGroup] = []
    if grid is None:
        ov = find_best_resize(src, side, patch, allow_upscale=True)
    else:
        ov = find_best_resize(src, side, patch)
        sw, sh = slice_size(src, grid, side, patch)
        m, n = grid
        canvases.append(Canvas(size=(sw * m, sh * n), resize=(sw * m, sh * n)))
        for cell, box in grid_boxes(m, n, (sw, sh)):
            views.append(cut_view(canvases, 0, "slice", (sw, sh), src, image_size=size, crop=box, cell=cell))
            sep = "\n" if cell[0] == m - 1 else ","
            seps.append(sep)
            tokens += [TokenGroup(f"slice {cell[0]},{cell[1]}", queries), TokenGroup(f"separator {sep!r}", 1)]
    canvases.append(Canvas(size=ov, resize=ov))
    views.append(cut_view(canvases, len(canvases) - 1, "overview", ov, src, image_size=size))
    tokens.append(TokenGroup("overview", queries))
    n_slices = len(views) - 1
    return Plan(method=method, image_size=size, grid=grid, canvases=tuple(canvases), views=tuple(views),
                separators=tuple(seps), num_visual_tokens=queries * (n_slices + 1) + n_slices,
                tokens=tuple(tokens), patch_size=patch, prescale=src if src != size else None,
                extra={"queries_per_part": queries, "max_slices": max_slices})


#: LLaVA-UHD v1 resampler: candidate pooled shapes (w, h) of one region, in the reference's order
POOLING_CANDIDATES: tuple[tuple[int, int], ...] = ((4, 2), (3, 2), (4, 3), (3, 3), (2, 4), (2, 3), (3, 4))


def best_pooling_size(wh_ratio: float) -> tuple[int, int]:
    """Pooled shape ``(h, w)`` of a region for a map with aspect ratio ``wh_ratio = W/H``.

    ``cal_best_pooling_size``: the candidate (w, h) minimising |log(W/H) − log(w/h)|, strict ``<``
    so the first minimum wins (square maps → 3×3), returned as (h, w) for RoIAlign.
    """
    log_ratio = math.log(wh_ratio)
    best, min_err = (3, 3), float("inf")
    for w, h in POOLING_CANDIDATES:
        err = abs(log_ratio - math.log(w / h))
        if err < min_err:
            best, min_err = (h, w), err
    return best
