"""LLaVA-HR (mixture-of-resolution adaptation): one padded square at S, seen twice.

High-resolution pathway: ConvNeXt on the S×S image (stage-4 map, stride 32). Low-resolution
pathway: the ViT on the same tensor resized bilinearly (align_corners=True) to
L = max(int(S/32·14), 336), CLS dropped. Visual tokens = (L/14)², the ViT grid.
"""

from __future__ import annotations

from functools import partial

from .budget import check_budget, fit_budget
from .common import check_size
from .types import Canvas, Plan, Size, TokenGroup, cut_view

#: the input sides the paper and the released code use (stage 1 at 384; LLaVA-HR at 768 and 1024;
#: LLaVA-HR-X at 1536): 576, 576, 1024 and 2304 visual tokens. A budget picks among these.
HR_SIDES: tuple[int, ...] = (384, 768, 1024, 1536)


def lowres_side(S: int, patch: int = 14, min_side: int = 336) -> int:
    """Side of the ViT input: ``max(int(S / 32 * 14), 336)`` as the reference computes it."""
    return max(int(S / 32 * patch), min_side)


def hr_budget_sides(S: int) -> list[int]:
    """The sides a budget may choose from under a configured ``S``, largest first: ``S`` itself and
    every supported side below it (a budget never raises the resolution above the configured one)."""
    return sorted({S, *(s for s in HR_SIDES if s < S)}, reverse=True)


def plan_llava_hr(size: Size, *, S: int = 1024, patch: int = 14, conv_stride: int = 32,
                  max_visual_tokens: int | None = None) -> Plan:
    """The padded square at S for ConvNeXt and at L = max(int(S/32·14), 336) for the ViT.

    ``max_visual_tokens``: the largest side among ``S`` and the supported sides below it
    (:data:`HR_SIDES`) whose (L/14)² tokens fit; equal counts go to the larger side (768 before
    384: the same 576 tokens, but the ConvNeXt sees twice the resolution).
    """
    size = check_size(size)
    if max_visual_tokens is not None:
        budget = check_budget(max_visual_tokens)
        return fit_budget("llava-hr", size, budget,
                          [({"S": s}, partial(plan_llava_hr, size, S=s, patch=patch, conv_stride=conv_stride))
                           for s in hr_budget_sides(S)])
    if S % conv_stride:
        raise ValueError(f"LLaVA-HR input side S={S} must be a multiple of the ConvNeXt stride {conv_stride}")
    L = lowres_side(S, patch)
    canvases = (Canvas(size=(S, S), resize=(S, S), pad_square=True, fill="mean"),)
    views = (cut_view(canvases, 0, "highres", (S, S), size),
             cut_view(canvases, 0, "lowres", (L, L), size, resample="torch_bilinear_ac"))
    g = L // patch
    return Plan(method="llava-hr", image_size=size, grid=None, canvases=canvases, views=views,
                separators=(), num_visual_tokens=g * g, tokens=(TokenGroup("fused low/high-res", g * g),),
                patch_size=patch, extra={"S": S, "vit_grid": g, "convnext_grid": S // conv_stride})
