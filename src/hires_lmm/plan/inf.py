"""INF-LLaVA dual-perspective cropping (WeihuangLin/INF-LLaVA ``encode_images``).

Pad to square (mean colour), resize to n·336 = 1008; local crops are the n×n contiguous tiles,
global crops the n×n strided sub-images ``img[dy::n, dx::n]`` (each covers the whole image), and a
thumbnail is the canvas resized to 336 (torch bicubic). 2n²+1 ViT passes; the DEM output is
averaged with the thumbnail features, so the LLM gets (336/14)² = 576 tokens.
"""

from __future__ import annotations

from .budget import check_budget, fit_budget
from .common import check_size, grid_boxes
from .types import Canvas, Plan, Size, TokenGroup, cut_view


def plan_inf_llava(size: Size, *, n: int = 3, side: int = 336, patch: int = 14, path: str = "train",
                   max_visual_tokens: int | None = None) -> Plan:
    """``path="train"`` (default): the training loader's processor makes the 1008 canvas with PIL
    (pad, resize). ``path="eval"``: the evaluation loader's processor makes a 336 canvas and the
    model upsamples it bicubically (torch) to 1008; the thumbnail is then the 336 canvas itself.

    ``max_visual_tokens``: the DEM output is always pooled to the thumbnail's (side/patch)² grid,
    whatever ``n``, so the count is fixed: accepted when within the budget, refused otherwise.
    """
    size = check_size(size)
    if max_visual_tokens is not None:
        budget = check_budget(max_visual_tokens)
        return fit_budget("inf-llava", size, budget,
                          [({}, lambda: plan_inf_llava(size, n=n, side=side, patch=patch, path=path))])
    S = n * side
    if path == "train":
        canvases: tuple[Canvas, ...] = (Canvas(size=(S, S), resize=(S, S), pad_square=True, fill="mean"),)
        big = 0
    elif path == "eval":
        small = Canvas(size=(side, side), resize=(side, side), pad_square=True, fill="mean")
        canvases = (small, Canvas(size=(S, S), resize=(S, S), resample="torch_bicubic", source=0, parent=small))
        big = 1
    else:
        raise ValueError(f"path must be 'train' or 'eval', got {path!r}")
    views = [cut_view(canvases, big, "local", (side, side), size, crop=box, cell=cell)
             for cell, box in grid_boxes(n, n, (side, side))]
    views += [cut_view(canvases, big, "global", (side, side), size, stride=(n, dx, dy), cell=(dx, dy))
              for dy in range(n) for dx in range(n)]
    views.append(cut_view(canvases, big, "thumbnail", (side, side), size, resample="torch_bicubic"))
    g = (side // patch) ** 2
    return Plan(method="inf-llava", image_size=size, grid=(n, n), canvases=canvases, views=tuple(views),
                separators=(), num_visual_tokens=g, tokens=(TokenGroup("thumbnail + DEM", g),),
                patch_size=patch, extra={"n": n, "path": path})
