"""LLaVA-UHD (ECCV) and its arXiv variant.

Parts: compressors ``uhd-spatial`` (the spatially constrained 144-query resampler: a 12×12 token
map of any feature map) and ``perceiver`` (the arXiv version's 64 queries, no spatial order), and
the layout ``spatial`` (each slice followed by "," or "\\n" ending a row, the overview last).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch
import torch.nn as nn
from torch import Tensor

from ...plan.cost import attention, dense
from ...plan.types import Plan, TokenGroup
from ...plan.uhd import best_pooling_size
from ..batching import run_grouped
from ..options import Options, PartError
from ..recipes import two_stage
from ..registry import BuildContext, TokenShape, Units, UnitShape, register_method, register_part
from ..stages import CompressorPart, LayoutPart, Select
from .llava import preset


@dataclass(frozen=True)
class SpatialOptions(Options):
    TAGS: ClassVar = {"resampler": "spatial"}  # old config.json files pick the resampler by it
    #: the query grid: grid² tokens per feature map (12: 144)
    grid: int = 12
    #: attention heads; None: one per 128 LLM channels
    heads: int | None = None

    def __post_init__(self) -> None:
        if self.grid < 1:
            raise PartError(f"compressor 'uhd-spatial': grid must be at least 1, got {self.grid}")


@dataclass(frozen=True)
class PerceiverOptions(Options):
    TAGS: ClassVar = {"resampler": "perceiver"}
    #: learned queries (tokens) per feature map
    queries: int = 64
    heads: int | None = None


def _heads(heads: int | None, d_llm: int) -> int:
    return heads or max(1, d_llm // 128)


def _resampler_flops(units: list[UnitShape], d: int, D: int, q: int, spatial: bool) -> dict[str, float]:
    """The cost model's resampler terms (``hires_lmm.plan.cost``), per feature map."""
    kv = att = 0.0
    for u in units:
        gh, gw = u.grid
        kv += dense(gw * gh, d, D)
        if spatial:  # each query attends only to its region's pooled keys
            ph, pw = best_pooling_size(gw / gh)
            att += dense(q * ph * pw, D, 2 * D) + dense(q, D, D) + attention(q, ph * pw, D) + dense(q, D, 2 * D)
        else:
            att += dense(gw * gh, D, 2 * D) + dense(q, D, D) + attention(q, gw * gh, D) + dense(q, D, 2 * D)
    return {"resampler kv_proj": kv, "resampler attention": att}


class _Resampler(CompressorPart):
    cost_keys = ("resampler kv_proj", "resampler attention")

    def compress(self, host: nn.Module, units: Units) -> list[Tensor | None]:
        # one resampler call per group of equal feature-map sizes (UHD's slices of one image share one)
        proj: Any = host.mm_projector  # set by build() (the __getattr__ stub says Tensor | Module)
        return list(run_grouped(lambda x, g: proj(x, tgt_size=g), units.feats, lambda i, _t: units.grids[i]))


@register_part
class SpatialResamplerPart(_Resampler):
    """LLaVA-UHD's spatially constrained resampler: grid² queries, each attending to its region
    of the map: a grid×grid token map per view, whatever the view's size."""

    name = "uhd-spatial"
    Options = SpatialOptions
    gives = {"tokens": "grid"}

    def build(self, host: nn.Module, ctx: BuildContext) -> None:
        from ...connect.uhd import SpatialResampler

        host.mm_projector = SpatialResampler(self.options.grid, embed_dim=ctx.d_llm,
                                             num_heads=_heads(self.options.heads, ctx.d_llm),
                                             kv_dim=ctx.vit.hidden_size)

    def tokens(self, units: list[UnitShape]) -> list[TokenShape]:
        g = self.options.grid
        return [TokenShape(g * g, (g, g)) for _ in units]

    def flops(self, units: list[UnitShape], d: int, D: int) -> dict[str, float]:
        return _resampler_flops(units, d, D, self.options.grid ** 2, spatial=True)


@register_part
class PerceiverPart(_Resampler):
    """The arXiv LLaVA-UHD's perceiver resampler: ``queries`` learned queries over the whole map
    (no spatial order among them)."""

    name = "perceiver"
    Options = PerceiverOptions
    gives = {"tokens": "flat"}

    def build(self, host: nn.Module, ctx: BuildContext) -> None:
        from ...connect.uhd import PerceiverResampler

        host.mm_projector = PerceiverResampler(self.options.queries, embed_dim=ctx.d_llm,
                                               num_heads=_heads(self.options.heads, ctx.d_llm),
                                               kv_dim=ctx.vit.hidden_size)

    def tokens(self, units: list[UnitShape]) -> list[TokenShape]:
        return [TokenShape(self.options.queries) for _ in units]

    def flops(self, units: list[UnitShape], d: int, D: int) -> dict[str, float]:
        return _resampler_flops(units, d, D, self.options.queries, spatial=False)


def _keep_per_slice(slices: list[Tensor], keep: Tensor) -> list[Tensor]:
    """The tokens of each slice that ``keep`` (indices into their concatenation) retains."""
    mask = torch.zeros(sum(s.shape[0] for s in slices), dtype=torch.bool, device=keep.device)
    mask[keep] = True
    return [s[m] for s, m in zip(slices, mask.split([s.shape[0] for s in slices]))]


@register_part
class SpatialSchema(LayoutPart):
    """LLaVA-UHD's spatial schema: each slice's tokens followed by "," (or "\\n" ending a row of
    slices), the overview last. A selector chooses among the slices' tokens (each slice keeps its
    separator; the overview is kept whole)."""

    name = "spatial"
    separators = (",", "\n")
    needs = {"structure": frozenset({"slices+overview"}), "units": frozenset({"per-view"})}
    gives = {"segment": "selectable"}

    def count(self, plan: Plan, tokens: list[TokenShape]) -> tuple[int, tuple[TokenGroup, ...]]:
        groups: list[TokenGroup] = []
        for v, t, sep in zip(plan.views, tokens, plan.separators):
            groups += [TokenGroup(f"slice {v.cell[0]},{v.cell[1]}" if v.cell else "slice", t.count),
                       TokenGroup(f"separator {sep!r}", 1)]
        groups.append(TokenGroup("overview", tokens[-1].count))
        return sum(t.count for t in tokens) + len(plan.separators), tuple(groups)

    def assemble(self, host: nn.Module, plans: Sequence[Plan], tokens: Sequence[Sequence[Tensor | None]], *,
                 select: Select | None, text_embeds: Sequence[Tensor | None] | None, embed: nn.Embedding,
                 separator_ids: Mapping[str, int]) -> list[Tensor]:
        ids = torch.tensor([separator_ids[","], separator_ids["\n"]], device=embed.weight.device)
        comma, newline = embed(ids)
        out = []
        for i, (plan, toks) in enumerate(zip(plans, tokens)):
            # every unit has tokens here (only SliME's global/local modes leave some None)
            present = cast("list[Tensor]", list(toks))
            slices = present[:-1]
            if select is not None and slices:
                keep = select(torch.cat(slices), text_embeds[i] if text_embeds is not None else None)
                if keep is not None:
                    slices = _keep_per_slice(slices, keep)
            parts: list[Tensor] = []
            for t, sep in zip(slices, plan.separators):
                parts += [t, (newline if sep == "\n" else comma)[None].to(t.dtype)]
            parts.append(present[-1])
            out.append(torch.cat(parts))
        return out


# --- the presets: 1: resampler @1e-3 (captions) · 2: resampler + LLM @2e-5 ----------------------
LLAVA_UHD = register_method(preset("llava-uhd", "llava-uhd", compressor="uhd-spatial", layout="spatial",
                                   formats=("llava-uhd",), train_stages=two_stage(("visual.mm_projector.",))))
LLAVA_UHD_ARXIV = register_method(preset("llava-uhd-arxiv", "llava-uhd-arxiv", compressor="perceiver",
                                         layout="spatial", train_stages=two_stage(("visual.mm_projector.",))))

__all__ = ["LLAVA_UHD", "LLAVA_UHD_ARXIV", "PerceiverOptions", "PerceiverPart", "SpatialOptions",
           "SpatialResamplerPart", "SpatialSchema"]
