"""LLaVA-HR (mixture-of-resolution adaptation): one padded square at S, seen twice.

High-resolution pathway: ConvNeXt on the S×S image (stage-4 map, stride 32). Low-resolution
pathway: the ViT on the same tensor resized bilinearly (align_corners=True) to
L = max(int(S/32·14), 336), CLS dropped. Visual tokens = (L/14)², the ViT grid.
"""

from __future__ import annotations

from .common import check_size
from .types import Canvas, Plan, Size, TokenGroup, cut_view


def lowres_side(S: int, patch: int = 14, min_side: int = 336) -> int:
    """Side of the ViT input: ``max(int(S / 32 * 14), 336)`` as the reference computes it."""
    return max(int(S / 32 * patch), min_side)


def plan_llava_hr(size: Size, *, S: int = 1024, patch: int = 14, conv_stride: int = 32) -> Plan:
    size = check_size(size)
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
