"""INF-LLaVA: the fusion ``dem`` (the dual-perspective enhancement module: n² contiguous and n²
strided crops cross-attend, merged with the thumbnail into one map)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn

from ...plan.types import Plan
from ..options import Options
from ..recipes import two_stage
from ..registry import BuildContext, Units, UnitShape, register_method, register_part
from ..stages import FusionPart
from .llava import preset


@dataclass(frozen=True)
class DEMOptions(Options):
    TINY: ClassVar = {"heads": 4, "bottleneck": 8}
    heads: int = 8
    #: hidden width of the code version's bottleneck MLPs (None: d // 16)
    bottleneck: int | None = 64
    #: "code" (released code) or "paper" (plain linear fusion)
    variant: Literal["code", "paper"] = "code"


@register_part
class DEMFusion(FusionPart):
    """INF-LLaVA's DEM: local and global crops enhance each other, merged with the thumbnail into
    one (G², d) map per image (G = the ViT's native grid)."""

    name = "dem"
    Options = DEMOptions
    needs = {"structure": frozenset({"inf-crops"}), "units": frozenset({"per-view"})}
    gives = {"units": "per-image"}

    def build(self, host: nn.Module, ctx: BuildContext) -> None:
        from ...connect.dem import INFConnector

        o = self.options
        h: Any = host  # a plain int attribute: nn.Module's __setattr__ stub takes only Tensor | Module
        h.n = n = int(ctx.views.option("n"))  # type: ignore[attr-defined]  # ctx.views is a ViewsPart
        host.spatial_embed = INFConnector(ctx.vit.hidden_size, o.heads, n, ctx.vit.native_grid, o.bottleneck, o.variant)

    def units(self, plan: Plan, units: list[UnitShape]) -> list[UnitShape]:
        return [UnitShape("image", units[-1].grid)]  # pooled to the thumbnail's grid

    def fuse(self, host: nn.Module, units: Units) -> Units:
        h: Any = host  # its attributes, set by build() (the __getattr__ stub says Tensor | Module)
        B, n2 = len(units.counts), h.n ** 2
        feats = torch.stack(units.feats).unflatten(0, (B, 2 * n2 + 1))  # (B, 2n²+1, G², d)
        merged = h.spatial_embed(feats[:, :n2], feats[:, n2:2 * n2], feats[:, -1])  # (B, G², d)
        return Units(merged, [units.grids[-1]] * B, ["image"] * B, [1] * B)


# --- the preset: 1: projector + DEM @1e-3 (captions) · 2: + LLM @2e-5 ----------------------------
INF_LLAVA = register_method(preset("inf-llava", "inf-llava", fusion="dem", formats=("inf-llava",),
                                   train_stages=two_stage(("visual.mm_projector.", "visual.spatial_embed."))))

__all__ = ["DEMFusion", "DEMOptions", "INF_LLAVA"]
