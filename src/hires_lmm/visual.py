"""Visual modules: the rendered views of a batch of images → one LLM-space token sequence per image.

One class per method composes the parts (:mod:`hires_lmm.vision`, :mod:`hires_lmm.connect`). Every
module encodes the views of *all* images of a batch together — the ViT packs views of different
sizes into one token sequence, or makes one call per distinct view size (:meth:`ViT.encode_views`),
the connectors run once per group of equal shapes — so no Python loop over views touches the
encoder. Per-image Python work is limited to slicing and concatenating already-computed tokens.

Common signature::

    forward(plans, views, *, embed, separator_ids, text_embeds=None) -> list[(n_i, D)]

``plans[i]`` and ``views[i]`` (a list of (3, h, w) tensors) describe image i; ``embed`` is the
LLM's input embedding (for the spatial schema's separators), ``separator_ids`` maps "," and "\\n"
to token ids, ``text_embeds[i]`` is (t_i, D) text of image i's sample (SliME's selector).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .config import HiresConfig
from .connect.anyres import pack_anyres
from .connect.dem import INFConnector
from .connect.mlp import build_projector
from .connect.slime import GatedMixture, SlimeResampler, text_guided_select
from .connect.uhd import PerceiverResampler, SpatialResampler
from .plan import Plan
from .vision.vit import ViT


def _flat(views: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    return [v for vs in views for v in vs]


def _split(x: Tensor | Sequence[Tensor], counts: Sequence[int]) -> list[Any]:
    out, k = [], 0
    for c in counts:
        out.append(x[k:k + c])
        k += c
    return out


def _run_grouped(fn, items: Sequence[Tensor], key) -> list[Tensor]:  # noqa: ANN001
    """Apply ``fn`` to stacked groups of items sharing ``key(item)``; results in input order."""
    groups: dict[Any, list[int]] = {}
    for i, t in enumerate(items):
        groups.setdefault(key(i, t), []).append(i)
    out: list[Tensor | None] = [None] * len(items)
    for k, idx in groups.items():
        res = fn(torch.stack([items[i] for i in idx]), k)
        for j, i in enumerate(idx):
            out[i] = res[j]
    return out  # type: ignore[return-value]


class VisualModule(nn.Module):
    """Base: holds the ViT and the projector (vision width → LLM width)."""

    #: text tokens the module splices between views (their ids must be single tokens of the LLM's
    #: tokenizer); none for most methods, so any tokenizer works with them
    separators: tuple[str, ...] = ()

    def __init__(self, vit: ViT, d_llm: int, projector: str = "mlp2x_gelu") -> None:
        super().__init__()
        self.vit = vit
        self.mm_projector = build_projector(projector, vit.hidden_size, d_llm)

    def encode(self, views: Sequence[Sequence[Tensor]]) -> list[Tensor]:
        """Features (h·w, d) of every view of every image, in order (packed, or one ViT call per size)."""
        return self.vit.encode_views(_flat(views))


class Llava15Visual(VisualModule):
    """One padded 336 view → ViT layer −2 → mlp2x_gelu: 576 tokens."""

    def forward(self, plans: Sequence[Plan], views: Sequence[Sequence[Tensor]], **_: Any) -> list[Tensor]:
        feats = torch.stack(self.encode(views))
        return list(self.mm_projector(feats))


class NextVisual(VisualModule):
    """Base view + tiles → projector → tiles reassembled, unpadded, ``image_newline`` per row."""

    def __init__(self, vit: ViT, d_llm: int, projector: str = "mlp2x_gelu") -> None:
        super().__init__(vit, d_llm, projector)
        # LLaVA-NeXT's init: N(0, 1/√D)
        self.image_newline = nn.Parameter(torch.randn(d_llm) / d_llm ** 0.5)

    def forward(self, plans: Sequence[Plan], views: Sequence[Sequence[Tensor]], **_: Any) -> list[Tensor]:
        proj = self.mm_projector(torch.stack(self.encode(views)))  # all views are 336×336
        out = []
        for plan, toks in zip(plans, _split(proj, [len(v) for v in views])):
            out.append(pack_anyres(toks[0], toks[1:], plan.grid, plan.image_size, self.image_newline))
        return out


class UHDVisual(VisualModule):
    """Variable-sized slices and overview → ViT at native size → shared resampler (per size group)
    → spatial schema: each slice followed by "," (or "\\n" ending a row), overview last."""

    separators = (",", "\n")

    def __init__(self, vit: ViT, d_llm: int, resampler: str = "spatial", grid: int = 12, queries: int = 64,
                 heads: int | None = None) -> None:
        nn.Module.__init__(self)
        self.vit = vit
        heads = heads or max(1, d_llm // 128)
        if resampler == "spatial":
            self.mm_projector = SpatialResampler(grid, embed_dim=d_llm, num_heads=heads, kv_dim=vit.hidden_size)
        elif resampler == "perceiver":
            self.mm_projector = PerceiverResampler(queries, embed_dim=d_llm, num_heads=heads, kv_dim=vit.hidden_size)
        else:
            raise ValueError(f"unknown LLaVA-UHD resampler {resampler!r}")

    def forward(self, plans: Sequence[Plan], views: Sequence[Sequence[Tensor]], *, embed: nn.Embedding,
                separator_ids: dict[str, int], **_: Any) -> list[Tensor]:
        flat = _flat(views)
        feats = self.vit.encode_views(flat)
        p = self.vit.patch_size
        grids = [(v.shape[-2] // p, v.shape[-1] // p) for v in flat]
        tokens = _run_grouped(lambda x, g: self.mm_projector(x, tgt_size=g), feats, lambda i, _t: grids[i])
        ids = torch.tensor([separator_ids[","], separator_ids["\n"]], device=embed.weight.device)
        comma, newline = embed(ids)
        out = []
        for plan, toks in zip(plans, _split(tokens, [len(v) for v in views])):
            parts: list[Tensor] = []
            for t, sep in zip(toks[:-1], plan.separators):
                parts += [t, (newline if sep == "\n" else comma)[None].to(t.dtype)]
            parts.append(toks[-1])
            out.append(torch.cat(parts))
        return out


class HRVisual(nn.Module):
    """LLaVA-HR: ConvNeXt on the S×S view, ViT on the low-res view, MR-adapters, fusion, projector."""

    separators: tuple[str, ...] = ()

    def __init__(self, vit: ViT, convnext: nn.Module, d_llm: int, projector: str = "mlp2x_gelu",
                 gate: str = "scalar", adapters: bool = True) -> None:
        super().__init__()
        from .vision.mra import DualPathEncoder

        self.vision_tower = DualPathEncoder(vit, convnext, adapters=adapters, gate=gate)  # type: ignore[arg-type]
        self.mm_projector = build_projector(projector, vit.hidden_size, d_llm)

    @property
    def vit(self) -> ViT:
        return self.vision_tower.vit

    def forward(self, plans: Sequence[Plan], views: Sequence[Sequence[Tensor]], **_: Any) -> list[Tensor]:
        hi = torch.stack([v[0] for v in views])
        lo = torch.stack([v[1] for v in views])
        return list(self.mm_projector(self.vision_tower(hi, lo)))


class INFVisual(VisualModule):
    """INF-LLaVA: 9 local + 9 strided global crops + thumbnail → ViT → DEM, merged with the
    thumbnail → projector: 576 tokens."""

    def __init__(self, vit: ViT, d_llm: int, projector: str = "mlp2x_gelu", heads: int = 8, bottleneck: int = 64,
                 variant: str = "code", n: int = 3) -> None:
        super().__init__(vit, d_llm, projector)
        self.n = n
        self.spatial_embed = INFConnector(vit.hidden_size, heads, n, vit.native_grid, bottleneck, variant)  # type: ignore[arg-type]

    def forward(self, plans: Sequence[Plan], views: Sequence[Sequence[Tensor]], **_: Any) -> list[Tensor]:
        B, n2 = len(views), self.n ** 2
        feats = torch.stack(self.encode(views)).unflatten(0, (B, 2 * n2 + 1))  # (B, 19, 576, d)
        merged = self.spatial_embed(feats[:, :n2], feats[:, n2:2 * n2], feats[:, -1])
        return list(self.mm_projector(merged))


class SlimeVisual(VisualModule):
    """SliME: global view → gated mixture (mlp expert | resampler expert) → ","; local tiles →
    144-query compressor → shared projector → raster order → text-guided selector."""

    separators = (",",)

    def __init__(self, vit: ViT, d_llm: int, projector: str = "mlp2x_gelu", global_queries: int = 576,
                 local_queries: int = 144, heads: int = 8, selector_p: float = 0.95,
                 selector_variant: str = "spec") -> None:
        nn.Module.__init__(self)
        self.vit = vit
        d = vit.hidden_size
        proj = build_projector(projector, d, d_llm)
        self.mm_projector = GatedMixture(d, proj, SlimeResampler(global_queries, d, heads))
        self.sampler = SlimeResampler(local_queries, d, heads)  # the local compressor
        self.selector_p = selector_p
        self.selector_variant = selector_variant
        self.local_grid = int(local_queries ** 0.5)
        #: which views reach the LLM: "both", or "global"/"local" alone (training stages 1 and 2)
        self.mode = "both"

    def forward(self, plans: Sequence[Plan], views: Sequence[Sequence[Tensor]], *, embed: nn.Embedding,
                separator_ids: dict[str, int], text_embeds: Sequence[Tensor | None] | None = None,
                **_: Any) -> list[Tensor]:
        feats = torch.stack(self.encode(views))  # every view is 336×336: (ΣV, 576, d)
        counts = [len(v) for v in views]
        first = torch.tensor([sum(counts[:i]) for i in range(len(counts))], device=feats.device)
        is_local = torch.ones(feats.shape[0], dtype=torch.bool, device=feats.device)
        is_local[first] = False
        if self.mode == "global":
            return list(self.mm_projector(feats[first]))
        glob = self.mm_projector(feats[first]) if self.mode == "both" else None  # (B, 576, D)
        local = self.mm_projector.projection(self.sampler(feats[is_local]))  # (ΣN, 144, D)
        comma = embed(torch.tensor([separator_ids[","]], device=embed.weight.device))
        g = self.local_grid
        out = []
        for i, (plan, toks) in enumerate(zip(plans, _split(local, [c - 1 for c in counts]))):
            cols, rows = plan.grid
            # tiles (rows, cols, g, g, D) → raster order over the (g·rows)×(g·cols) map
            raster = toks.view(rows, cols, g, g, -1).permute(0, 2, 1, 3, 4).reshape(rows * g * cols * g, -1)
            text = text_embeds[i] if text_embeds is not None else None
            if text is not None and self.selector_p < 1.0 and text.shape[0] > 0:
                keep = text_guided_select(raster, text.to(raster.dtype), self.selector_p, training=self.training,
                                          variant=self.selector_variant)  # type: ignore[arg-type]
                raster = raster[keep]
            out.append(raster if glob is None else torch.cat([glob[i], comma.to(glob.dtype), raster]))
        return out


def build_visual(config: HiresConfig, d_llm: int, vit: ViT | None = None, convnext: nn.Module | None = None) -> nn.Module:
    """The visual module of ``config.method``; parts not given are built from the config."""
    if vit is None:
        vit = ViT.from_config(config.vit_config(), select_layer=config.select_layer)
    c = dict(config.connector)
    m = config.method
    if m == "llava-1.5":
        return Llava15Visual(vit, d_llm, c.get("projector", "mlp2x_gelu"))
    if m == "llava-next":
        return NextVisual(vit, d_llm, c.get("projector", "mlp2x_gelu"))
    if m in ("llava-uhd", "llava-uhd-arxiv"):
        return UHDVisual(vit, d_llm, c.get("resampler", "spatial"), c.get("grid", 12), c.get("queries", 64), c.get("heads"))
    if m == "llava-hr":
        if convnext is None:
            from .vision.convnext import ConvNeXt, ConvNeXtConfig

            if not config.convnext_config:
                raise ValueError("llava-hr needs a convnext_config")
            convnext = ConvNeXt(ConvNeXtConfig.from_dict(config.convnext_config))
        return HRVisual(vit, convnext, d_llm, c.get("projector", "mlp2x_gelu"), c.get("gate", "scalar"),
                        c.get("adapters", True))
    if m == "inf-llava":
        return INFVisual(vit, d_llm, c.get("projector", "mlp2x_gelu"), c.get("heads", 8), c.get("bottleneck", 64),
                         c.get("variant", "code"), config.plan_options.get("n", 3))
    if m == "slime":
        return SlimeVisual(vit, d_llm, c.get("projector", "mlp2x_gelu"), c.get("global_queries", 576),
                           c.get("local_queries", 144), c.get("heads", 8), c.get("selector_p", 0.95),
                           c.get("selector_variant", "spec"))
    raise ValueError(f"unknown method {m!r}")
