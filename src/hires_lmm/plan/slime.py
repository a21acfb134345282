"""SliME (yfzhang114/SliME ``mm_utils.select_best_resolution_uhd``): global view + local tiles.

Global: the image squashed to 336 → 576 tokens through the gated mixture of adapters, then the
embedding of ",". Local: s = ceil(W·H/336²) clipped to [2, 6]; candidate grids are the factor
pairs of {s, s+1} (s ≤ 2) or {s−1, s, s+1}; chosen as LLaVA-NeXT chooses pinpoints; tiles of 336,
each compressed to 144 tokens, then filtered by the text-guided selector. The token count is
therefore a bound: 576 + 1 + 144·tiles.
"""

from __future__ import annotations

import math
from functools import partial

from .anyres import padded_canvas, select_best_resolution
from .budget import check_budget, fit_budget
from .common import check_size, grid_boxes
from .types import Canvas, Plan, Size, TokenGroup, cut_view


def local_candidates(size: Size, side: int = 336, max_tiles: int = 6) -> list[Size]:
    """Candidate local grids as pixel sizes ``(cols·side, rows·side)``, in the reference order."""
    W, H = size
    s = math.ceil(W * H / (side * side))
    s = min(max(s, 2), max_tiles)
    counts = (s, s + 1) if s <= 2 else (s - 1, s, s + 1)
    return [(i * side, (k // i) * side) for k in counts for i in range(1, k + 1) if k % i == 0]


#: SliME's local view never plans fewer than s = 2 (the reference bumps s = 1 to 2), so a budget
#: lowers the tile cap no further than this
MIN_TILE_CAP = 2


def plan_slime(size: Size, *, side: int = 336, patch: int = 14, local_queries: int = 144,
               max_tiles: int = 6, max_visual_tokens: int | None = None) -> Plan:
    """The global view, then the local tiles of the grid chosen as anyres chooses pinpoints.

    Planned tokens = (side/patch)² + 1 + ``local_queries``·tiles, an upper bound (the text-guided
    selector keeps fewer); a budget applies to this bound, the count known before encoding.

    ``max_visual_tokens``: the reference's tile cap (the 6 of ``select_best_resolution_uhd``,
    here ``max_tiles``) is lowered one by one, down to 2, until the plan fits; the cap limits s,
    and the grid may hold s+1 tiles, so the search checks each plan's own count.
    """
    size = check_size(size)
    if max_visual_tokens is not None:
        budget = check_budget(max_visual_tokens)
        caps = [max_tiles, *range(max_tiles - 1, MIN_TILE_CAP - 1, -1)]
        return fit_budget("slime", size, budget,
                          [({"max_tiles": t}, partial(plan_slime, size, side=side, patch=patch,
                                                          local_queries=local_queries, max_tiles=t))
                           for t in caps])
    best = select_best_resolution(size, local_candidates(size, side, max_tiles))
    cols, rows = best[0] // side, best[1] // side
    canvases: tuple[Canvas, ...] = (Canvas(size=(side, side), resize=(side, side)),
                                    padded_canvas(size, best, "black"))
    views = [cut_view(canvases, 0, "global", (side, side), size)]
    views += [cut_view(canvases, 1, "local", (side, side), size, crop=box, cell=cell)
              for cell, box in grid_boxes(cols, rows, (side, side))]
    g = (side // patch) ** 2
    n_local = local_queries * cols * rows
    return Plan(method="slime", image_size=size, grid=(cols, rows), canvases=canvases, views=tuple(views),
                separators=(",",), num_visual_tokens=g + 1 + n_local,
                tokens=(TokenGroup("global (mixture of adapters)", g), TokenGroup("separator ','", 1),
                        TokenGroup("local (before the selector)", n_local)),
                patch_size=patch, extra={"best_resolution": list(best), "bound": True})
