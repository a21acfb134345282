"""LLaVA-1.5: pad to a square in the CLIP mean colour, resize to the encoder side (336)."""

from __future__ import annotations

from .budget import check_budget, fit_budget
from .common import check_size
from .types import Canvas, Plan, Size, TokenGroup, cut_view


def plan_llava15(size: Size, *, side: int = 336, patch: int = 14, max_visual_tokens: int | None = None) -> Plan:
    """One view: the padded square resized (PIL bicubic) to ``side``; (side/patch)² tokens.

    ``max_visual_tokens``: the count is fixed, so a budget is accepted when it holds it and
    refused (:class:`~hires_lmm.plan.budget.BudgetError`) otherwise.
    """
    size = check_size(size)
    if max_visual_tokens is not None:
        budget = check_budget(max_visual_tokens)
        return fit_budget("llava-1.5", size, budget, [({}, lambda: plan_llava15(size, side=side, patch=patch))])
    canvases = (Canvas(size=(side, side), resize=(side, side), pad_square=True, fill="mean"),)
    view = cut_view(canvases, 0, "image", (side, side), size)
    n = (side // patch) ** 2
    return Plan(method="llava-1.5", image_size=size, grid=None, canvases=canvases, views=(view,),
                separators=(), num_visual_tokens=n, tokens=(TokenGroup("image", n),), patch_size=patch)
