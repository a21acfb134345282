"""LLaVA-HR: the encoder ``convnext-vit`` (ConvNeXt on the high-resolution square, the ViT on its
low-resolution view, joined by MR-adapters and a final fusion): one feature map per image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
from torch import Tensor

from ...plan.types import Plan
from ..options import Options
from ..recipes import Stage
from ..registry import BuildContext, Units, UnitShape, register_method, register_part
from ..stages import EncoderPart
from .llava import preset


@dataclass(frozen=True)
class DualPathOptions(Options):
    #: the MR-adapters' gate: one scalar per adapter, or one per channel
    gate: Literal["scalar", "channel"] = "scalar"
    #: the three MR-adapters inside the ViT (False: only the final fusion)
    adapters: bool = True


@register_part
class DualPathEncoderPart(EncoderPart):
    """LLaVA-HR's dual path: ConvNeXt reads the S×S view, the ViT its low-resolution view, the
    MR-adapters mix them; one (L², d) map per image."""

    name = "convnext-vit"
    Options = DualPathOptions
    needs = {"structure": frozenset({"dual-res"})}
    gives = {"units": "per-image"}
    #: the visual module needs a ConvNeXt (built from ``convnext_config`` when none is given)
    needs_convnext = True

    def build(self, host: nn.Module, ctx: BuildContext) -> None:
        from ...vision.mra import DualPathEncoder

        host.vision_tower = DualPathEncoder(ctx.vit, ctx.convnext, adapters=self.options.adapters,
                                            gate=self.options.gate)

    def units(self, plan: Plan) -> list[UnitShape]:
        g = int(plan.extra["vit_grid"])
        return [UnitShape("image", (g, g))]

    def encode(self, host: nn.Module, plans: Sequence[Plan], views: Sequence[Sequence[Tensor]]) -> Units:
        hi = torch.stack([v[0] for v in views])
        lo = torch.stack([v[1] for v in views])
        tower: Any = host.vision_tower  # set by build() (the __getattr__ stub says Tensor | Module)
        feats = tower(hi, lo)  # (B, L², d), kept as one batch for the compressor
        g = int(round(feats.shape[1] ** 0.5))
        return Units(feats, [(g, g)] * len(views), ["image"] * len(views), [1] * len(views))


# --- the preset ---------------------------------------------------------------------------------
#: 1: S=384, projector + final fusion @1e-3 on captions (adapters frozen = identity) · 2: S=1024,
#: everything (both encoders, adapters, fusion, projector, LLM) @2e-5
LLAVA_HR_STAGES = {
    "1": Stage("1", (("visual.mm_projector.", 1e-3), ("visual.vision_tower.align_stages.", 1e-3)),
               data="caption", template="plain", plan_options={"S": 384}, save_trainable_only=True),
    "2": Stage("2", (("visual.", 2e-5), ("llm.", 2e-5)), plan_options={"S": 1024}),
}
LLAVA_HR = register_method(preset("llava-hr", "llava-hr", encoder="convnext-vit", views_options={"S": 1024},
                                  formats=("llava-hr",), train_stages=LLAVA_HR_STAGES))

__all__ = ["LLAVA_HR", "LLAVA_HR_STAGES", "DualPathEncoderPart", "DualPathOptions"]
