"""SliME: the compressor ``slime`` (global view → gated mixture of an MLP and a resampler expert;
local tiles → a query compressor and the shared projector), the layout ``slime`` (global, ",",
the local tiles in raster order) and the selector ``text-guided`` (top-p of the local tokens by
their similarity to the sample's text; usable with any layout that has a selectable segment)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn as nn
from torch import Tensor

from ...plan.cost import attention, dense, mlp2x
from ...plan.types import Plan, TokenGroup
from ..options import Options, PartError
from ..recipes import Stage
from ..registry import BuildContext, TokenShape, Units, UnitShape, register_method, register_part
from ..stages import CompressorPart, LayoutPart, Select, SelectorPart
from .llava import preset


@dataclass(frozen=True)
class SlimeOptions(Options):
    TINY: ClassVar = {"heads": 4}
    projector: str = "mlp2x_gelu"
    #: queries of the global resampler expert (= the global view's patches, which the MLP expert keeps)
    global_queries: int = 576
    #: queries per local tile (a square: the tile's tokens form a √q×√q map)
    local_queries: int = 144
    heads: int = 8

    def __post_init__(self) -> None:
        if math.isqrt(self.local_queries) ** 2 != self.local_queries:
            raise PartError(f"compressor 'slime': local_queries={self.local_queries} is not a square")


@register_part
class SlimeCompressor(CompressorPart):
    """SliME's adapters: the global view through a gated mixture (MLP expert | resampler
    expert), each local tile through a ``local_queries`` compressor and the shared projector."""

    name = "slime"
    Options = SlimeOptions
    needs = {"structure": frozenset({"base+tiles"}), "units": frozenset({"per-view"})}
    gives = {"tokens": "grid"}
    cost_keys = ("global MLP expert", "global resampler expert", "gate", "local compressor", "local projector")

    def build(self, host: nn.Module, ctx: BuildContext) -> None:
        from ...connect.mlp import build_projector
        from ...connect.slime import GatedMixture, SlimeResampler

        o, d = self.options, ctx.vit.hidden_size
        proj = build_projector(o.projector, d, ctx.d_llm)
        host.mm_projector = GatedMixture(d, proj, SlimeResampler(o.global_queries, d, o.heads))
        host.sampler = SlimeResampler(o.local_queries, d, o.heads)  # the local compressor
        h: Any = host  # plain attributes: nn.Module's __setattr__ stub takes only Tensor | Module
        h.local_grid = math.isqrt(o.local_queries)
        #: which views reach the LLM: "both", or "global"/"local" alone (training stages 1 and 2)
        h.mode = "both"

    def tokens(self, units: list[UnitShape]) -> list[TokenShape]:
        g = math.isqrt(self.options.local_queries)
        return [TokenShape(self.options.global_queries)] + [TokenShape(g * g, (g, g)) for _ in units[1:]]

    def flops(self, units: list[UnitShape], d: int, D: int) -> dict[str, float]:
        G = units[0].grid[0] * units[0].grid[1]
        Q, q = self.options.global_queries, self.options.local_queries
        local = sum(dense(u.grid[0] * u.grid[1], d, 2 * d) + dense(q, d, 2 * d) + attention(q, u.grid[0] * u.grid[1], d)
                    for u in units[1:])
        return {"global MLP expert": mlp2x(G, d, D),
                "global resampler expert": dense(G, d, 4 * d) + attention(Q, G, d) + mlp2x(Q, d, D),
                "gate": dense(G, d, 2), "local compressor": local,
                "local projector": mlp2x(q * (len(units) - 1), d, D)}

    def compress(self, host: nn.Module, units: Units) -> list[Tensor | None]:
        feats = torch.stack(units.feats)  # every view is 336×336: (ΣV, 576, d)
        counts = units.counts
        first = torch.tensor([sum(counts[:i]) for i in range(len(counts))], device=feats.device)
        is_local = torch.ones(feats.shape[0], dtype=torch.bool, device=feats.device)
        is_local[first] = False
        out: list[Tensor | None] = [None] * feats.shape[0]
        h: Any = host  # its parts' attributes, set by build() (the __getattr__ stub says Tensor | Module)
        if h.mode != "local":
            for k, t in zip(first.tolist(), h.mm_projector(feats[first])):  # (B, 576, D)
                out[k] = t
        if h.mode != "global":
            local = h.mm_projector.projection(h.sampler(feats[is_local]))  # (ΣN, 144, D)
            for k, t in zip(is_local.nonzero().flatten().tolist(), local):
                out[k] = t
        return out


@register_part
class SlimeLayout(LayoutPart):
    """SliME's sequence: the global tokens, ",", then the local tiles' token maps in raster order
    over the whole (g·rows)×(g·cols) map (a selector chooses among the local tokens)."""

    name = "slime"
    separators = (",",)
    needs = {"structure": frozenset({"base+tiles"}), "units": frozenset({"per-view"}), "tokens": frozenset({"grid"})}
    gives = {"segment": "selectable"}

    def count(self, plan: Plan, tokens: list[TokenShape]) -> tuple[int, tuple[TokenGroup, ...]]:
        n_local = sum(t.count for t in tokens[1:])
        return tokens[0].count + 1 + n_local, (TokenGroup("global", tokens[0].count), TokenGroup("separator ','", 1),
                                                TokenGroup("local (before the selector)", n_local))

    def assemble(self, host: nn.Module, plans: Sequence[Plan], tokens: Sequence[Sequence[Tensor | None]], *,
                 select: Select | None, text_embeds: Sequence[Tensor | None] | None, embed: nn.Embedding,
                 separator_ids: Mapping[str, int]) -> list[Tensor]:
        mode = getattr(host, "mode", "both")
        if mode == "global":
            return [toks[0] for toks in tokens]  # type: ignore[misc]
        comma = embed(torch.tensor([separator_ids[","]], device=embed.weight.device))
        out = []
        for i, (plan, toks) in enumerate(zip(plans, tokens)):
            cols, rows = plan.grid  # type: ignore[misc]
            tiles = torch.stack(list(toks[1:]))  # type: ignore[arg-type]  # (rows·cols, g², D)
            g = math.isqrt(tiles.shape[1])
            # tiles (rows, cols, g, g, D) → raster order over the (g·rows)×(g·cols) map
            raster = tiles.view(rows, cols, g, g, -1).permute(0, 2, 1, 3, 4).reshape(rows * g * cols * g, -1)
            if select is not None:
                keep = select(raster, text_embeds[i] if text_embeds is not None else None)
                if keep is not None:
                    raster = raster[keep]
            glob = toks[0]
            out.append(raster if mode == "local" or glob is None else torch.cat([glob, comma.to(glob.dtype), raster]))
        return out


@dataclass(frozen=True)
class SelectorOptions(Options):
    #: cumulative probability of the kept tokens (1.0 keeps all: training stages 1-2)
    selector_p: float = 0.95
    #: "spec" (the code at HEAD) or "released" (the mid-2024 code's extra softmax)
    selector_variant: Literal["spec", "released"] = "spec"


@register_part
class TextGuidedSelector(SelectorPart):
    """SliME's text-guided selector (no weights): keeps the top-p of the selectable tokens by
    their cosine similarity to the sample's text embeddings."""

    name = "text-guided"
    Options = SelectorOptions
    needs = {"segment": frozenset({"selectable"})}
    needs_text = True
    bound = True

    def build(self, host: nn.Module, ctx: BuildContext) -> None:
        # attributes of the visual module, so training stages can set them (``selector_p``: 1.0)
        host.selector_p = self.options.selector_p
        host.selector_variant = self.options.selector_variant

    def select(self, host: nn.Module, tokens: Tensor, text: Tensor | None) -> Tensor | None:
        from ...connect.slime import text_guided_select

        h: Any = host  # plain attributes set by build() (the __getattr__ stub says Tensor | Module)
        if text is None or h.selector_p >= 1.0 or text.shape[0] == 0:
            return None
        return text_guided_select(tokens, text.to(tokens.dtype), h.selector_p, training=host.training,
                                  variant=h.selector_variant)


# --- the preset ---------------------------------------------------------------------------------
#: 1a: global view only, the MLP expert @1e-3 · 1b: global only, the resampler expert (MLP frozen) ·
#: 2: local tiles only, the compression resampler (all three on captions, selector off) ·
#: 3: everything but CLIP @2e-5 on instructions, gate and selector active
SLIME_STAGES = {
    "1a": Stage("1a", (("visual.mm_projector.projection.", 1e-3),), data="caption", template="plain",
                visual={"mode": "global", "mm_projector.fixed_expert": 0, "selector_p": 1.0},
                save_trainable_only=True),
    "1b": Stage("1b", (("visual.mm_projector.attn.", 1e-3),), data="caption", template="plain",
                visual={"mode": "global", "mm_projector.fixed_expert": 1, "selector_p": 1.0},
                save_trainable_only=True),
    "2": Stage("2", (("visual.sampler.", 1e-3),), data="caption", template="plain",
               visual={"mode": "local", "selector_p": 1.0}, save_trainable_only=True),
    "3": Stage("3", (("visual.mm_projector.", 2e-5), ("visual.sampler.", 2e-5), ("llm.", 2e-5)),
               visual={"mode": "both", "mm_projector.fixed_expert": None, "selector_p": 0.95}),
}
SLIME = register_method(preset("slime", "slime", compressor="slime", layout="slime", selector="text-guided",
                               formats=("slime",), train_stages=SLIME_STAGES))

__all__ = ["SLIME", "SLIME_STAGES", "SelectorOptions", "SlimeCompressor", "SlimeLayout", "SlimeOptions", "TextGuidedSelector"]
