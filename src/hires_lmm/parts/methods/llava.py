"""LLaVA-1.5 and LLaVA-NeXT, and the basic parts every family reuses.

Parts: encoder ``vit``, fusion ``none``, compressor ``mlp`` (LLaVA's projector), layouts
``flat`` (concatenation) and ``anyres`` (NeXT's unpad + ``image_newline``, for any square token
grid per tile: 24×24 projected patches or UHD's 12×12 resampled ones), selector ``none``.

Recipes (:func:`~hires_lmm.parts.recipes.two_stage`): 1: projector (LLaVA-NeXT: + ``image_newline``)
@1e-3 on captions · 2: the same + LLM @2e-5 on instructions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn as nn
from torch import Tensor

from ...plan.anyres import unpadded_grid
from ...plan.cost import mlp2x
from ...plan.types import Plan, TokenGroup
from ..batching import flat, run_grouped
from ..options import Options, PartError
from ..recipes import Stage, two_stage
from ..registry import BuildContext, TokenShape, Units, UnitShape, register_method, register_part
from ..spec import MethodSpec
from ..stages import CompressorPart, EncoderPart, FusionPart, LayoutPart, Select, SelectorPart
from ..views import STRUCTURES

#: every structure a planner gives, and "other" for planners added later
ANY_STRUCTURE = frozenset(STRUCTURES.values()) | {"other"}


def preset(name: str, views: str, *, encoder: str = "vit", fusion: str = "none", compressor: str = "mlp",
           layout: str = "flat", selector: str = "none", views_options: Mapping[str, Any] | None = None,
           formats: tuple[str, ...] = (), train_stages: Mapping[str, Stage]) -> MethodSpec:
    """A preset's spec with its paper's training stages (``recipes`` names the preset itself, so
    a method file based on it inherits them)."""
    parts = {"views": views, "encoder": encoder, "fusion": fusion, "compressor": compressor,
             "layout": layout, "selector": selector}
    return MethodSpec(name, parts, {"views": dict(views_options)} if views_options else {}, recipes=name,
                      formats=formats, train_stages=dict(train_stages))


def _groups(pairs: Sequence[tuple[str, int]]) -> tuple[TokenGroup, ...]:
    """Token groups, consecutive equal sources merged."""
    out: list[TokenGroup] = []
    for source, n in pairs:
        if out and out[-1].source == source:
            out[-1] = TokenGroup(source, out[-1].count + n)
        else:
            out.append(TokenGroup(source, n))
    return tuple(out)


# --- encoder -----------------------------------------------------------------------------------
@register_part
class VitEncoder(EncoderPart):
    """The ViT (CLIP/SigLIP at ``select_layer``) on every view at its own size, packed: one
    feature map per view."""

    name = "vit"
    needs = {"structure": ANY_STRUCTURE - {"dual-res"}}  # LLaVA-HR's 1024 view is ConvNeXt's
    gives = {"units": "per-view"}

    def build(self, host: nn.Module, ctx: BuildContext) -> None:
        host.vit = ctx.vit

    def units(self, plan: Plan) -> list[UnitShape]:
        p = plan.patch_size
        return [UnitShape(v.role, (v.size[1] // p, v.size[0] // p)) for v in plan.views]

    def encode(self, host: nn.Module, plans: Sequence[Plan], views: Sequence[Sequence[Tensor]]) -> Units:
        vit: Any = host.vit  # set by build(); nn.Module's __getattr__ stub says Tensor | Module
        views_flat = flat(views)
        feats = vit.encode_views(views_flat)  # [(h·w, d)], packed or one call per size
        p: int = vit.patch_size
        grids = [(v.shape[-2] // p, v.shape[-1] // p) for v in views_flat]
        return Units(feats, grids, [v.role for plan in plans for v in plan.views], [len(v) for v in views])


# --- fusion ------------------------------------------------------------------------------------
@register_part
class NoFusion(FusionPart):
    """Nothing: every view's features reach the compressor."""

    name = "none"


# --- compressor --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProjectorOptions(Options):
    #: LLaVA's ``mm_projector_type``: ``linear`` or ``mlp{N}x_gelu``
    projector: str = "mlp2x_gelu"


@register_part
class MLPCompressor(CompressorPart):
    """LLaVA's projector on every patch: the patch grid is kept (h·w tokens per map)."""

    name = "mlp"
    Options = ProjectorOptions
    gives = {"tokens": "grid"}
    cost_keys = ("projector",)

    def build(self, host: nn.Module, ctx: BuildContext) -> None:
        from ...connect.mlp import build_projector

        host.mm_projector = build_projector(self.options.projector, ctx.vit.hidden_size, ctx.d_llm)

    def tokens(self, units: list[UnitShape]) -> list[TokenShape]:
        return [TokenShape(u.grid[0] * u.grid[1], u.grid) for u in units]

    def flops(self, units: list[UnitShape], d: int, D: int) -> dict[str, float]:
        return {"projector": sum(mlp2x(u.grid[0] * u.grid[1], d, D) for u in units)}

    def compress(self, host: nn.Module, units: Units) -> list[Tensor | None]:
        proj: Any = host.mm_projector  # set by build() (the __getattr__ stub says Tensor | Module)
        if isinstance(units.feats, Tensor):  # one batch already (a dual path, a fusion): one call on it
            return list(proj(units.feats))
        return list(run_grouped(lambda x, _g: proj(x), units.feats, lambda i, _t: units.grids[i]))


# --- selector ----------------------------------------------------------------------------------
@register_part
class NoSelector(SelectorPart):
    """Every token reaches the LLM."""

    name = "none"


# --- layouts -----------------------------------------------------------------------------------
@register_part
class FlatLayout(LayoutPart):
    """The tokens of an image's maps concatenated in view order (a selector may drop any)."""

    name = "flat"
    gives = {"segment": "selectable"}

    def count(self, plan: Plan, tokens: list[TokenShape]) -> tuple[int, tuple[TokenGroup, ...]]:
        roles = [v.role for v in plan.views] if len(tokens) == len(plan.views) else ["image"] * len(tokens)
        return sum(t.count for t in tokens), _groups(list(zip(roles, (t.count for t in tokens))))

    def assemble(self, host: nn.Module, plans: Sequence[Plan], tokens: Sequence[Sequence[Tensor | None]], *,
                 select: Select | None, text_embeds: Sequence[Tensor | None] | None, embed: nn.Embedding,
                 separator_ids: Mapping[str, int]) -> list[Tensor]:
        out = []
        for i, toks in enumerate(tokens):
            # every unit has tokens here (only SliME's global/local modes leave some None, in its own layout)
            present = cast("list[Tensor]", list(toks))
            x = present[0] if len(present) == 1 else torch.cat(present)
            keep = select(x, text_embeds[i] if text_embeds is not None else None) if select else None
            out.append(x if keep is None else x[keep])
        return out


@register_part
class AnyresLayout(LayoutPart):
    """LLaVA-NeXT: the base view's tokens, then the tiles' token maps reassembled into one map,
    the rows/columns of padding cut away ("unpad") and ``image_newline`` after every row."""

    name = "anyres"
    needs = {"structure": frozenset({"base+tiles"}), "units": frozenset({"per-view"}),
             "tokens": frozenset({"grid"})}
    gives = {"segment": "fixed"}  # the newline grid needs every token of the map

    def build(self, host: nn.Module, ctx: BuildContext) -> None:
        # LLaVA-NeXT's init: N(0, 1/√D)
        host.image_newline = nn.Parameter(torch.randn(ctx.d_llm) / ctx.d_llm ** 0.5)

    def count(self, plan: Plan, tokens: list[TokenShape]) -> tuple[int, tuple[TokenGroup, ...]]:
        base = tokens[0].count
        if len(tokens) == 1:
            return base + 1, (TokenGroup("base", base), TokenGroup("image_newline", 1))
        grid = tokens[1].grid
        if grid is None or grid[0] != grid[1] or any(t.grid != grid for t in tokens[1:]):
            raise PartError(f"layout 'anyres' needs square, equal token maps per tile, got {[t.grid for t in tokens[1:]]}")
        cols, rows = plan.grid  # type: ignore[misc]
        ucols, urows = unpadded_grid(plan.image_size, cols, rows, grid[0])
        return base + ucols * urows + urows, (TokenGroup("base", base), TokenGroup("tiles (unpadded)", ucols * urows),
                                              TokenGroup("image_newline", urows))

    def assemble(self, host: nn.Module, plans: Sequence[Plan], tokens: Sequence[Sequence[Tensor | None]], *,
                 select: Select | None, text_embeds: Sequence[Tensor | None] | None, embed: nn.Embedding,
                 separator_ids: Mapping[str, int]) -> list[Tensor]:
        from ...connect.anyres import pack_anyres

        out = []
        for plan, toks in zip(plans, tokens):
            present = cast("list[Tensor]", list(toks))  # every unit has tokens (see FlatLayout)
            tiles = torch.stack(present[1:]) if len(present) > 1 else None  # (cols·rows, g², D)
            newline = cast(Tensor, host.image_newline)  # the Parameter build() made
            grid = cast("tuple[int, int]", plan.grid)  # a tiled plan has one (unused without tiles)
            out.append(pack_anyres(present[0], tiles, grid, plan.image_size, newline))
        return out


# --- the presets --------------------------------------------------------------------------------
LLAVA15 = register_method(preset("llava-1.5", "llava-1.5", formats=("hf-llava", "llava"),
                                 train_stages=two_stage(("visual.mm_projector.",))))
LLAVA_NEXT = register_method(preset("llava-next", "llava-next", layout="anyres", formats=("hf-llava-next", "llava"),
                                    train_stages=two_stage(("visual.mm_projector.", "visual.image_newline"))))

__all__ = ["ANY_STRUCTURE", "AnyresLayout", "FlatLayout", "LLAVA15", "LLAVA_NEXT", "MLPCompressor", "NoFusion",
           "NoSelector", "ProjectorOptions", "VitEncoder", "preset"]
