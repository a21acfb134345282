"""Visual modules: the rendered views of a batch of images → one LLM-space token sequence per image.

A visual module is a method's parts (:mod:`hires_lmm.parts`) run in order over the whole batch::

    encoder (views → feature maps) → fusion → compressor (per map, one call per group of equal
    shapes) → layout (per image: concatenation, separators, newlines; the selector inside it)

Every module encodes the views of *all* images of a batch together — the ViT packs views of
different sizes into one token sequence, or makes one call per distinct view size
(:meth:`ViT.encode_views`), the connectors run once per group of equal shapes — so no Python loop
over views touches the encoder. Per-image Python work is limited to slicing and concatenating
already-computed tokens.

Common signature::

    forward(plans, views, *, embed, separator_ids, text_embeds=None) -> list[(n_i, D)]

``plans[i]`` and ``views[i]`` (a list of (3, h, w) tensors) describe image i; ``embed`` is the
LLM's input embedding (for the separators), ``separator_ids`` maps "," and "\\n" to token ids,
``text_embeds[i]`` is (t_i, D) text of image i's sample (for a text-guided selector; the model
passes it when the module's ``needs_text`` is true).

The presets keep their class names (``Llava15Visual`` … ``SlimeVisual``: the model's
``_no_split_modules`` names them) and their parameter names; a composed method is a
:class:`ComposedVisual` (or :class:`DualPathVisual` with LLaVA-HR's encoder).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, cast

import torch.nn as nn
from torch import Tensor

from .config import HiresConfig
from .parts import BUILD_ORDER, MethodSpec, Part, spec_from_config
from .parts.batching import flat as _flat
from .parts.batching import run_grouped as _run_grouped
from .parts.batching import split as _split
from .parts.registry import BuildContext
from .plan import Plan
from .vision.vit import ViT

__all__ = ["ComposedVisual", "DualPathVisual", "HRVisual", "INFVisual", "Llava15Visual", "NextVisual", "SlimeVisual",
           "UHDVisual", "VisualModule", "build_visual"]
_ = (_flat, _run_grouped)  # re-exported for older imports


class ComposedVisual(nn.Module):
    """A method's visual module: its parts build their modules on it (under the names saved
    checkpoints use: ``vit``, ``mm_projector``, ``image_newline``, ``sampler``, …) and run in order.

    Args:
        parts: stage → part object (options resolved), as :meth:`MethodSpec.build_parts` makes.
        ctx: the encoders and the LLM width.
    """

    #: text tokens the layout splices between views (their ids must be single tokens of the LLM's
    #: tokenizer); none for most methods, so any tokenizer works with them
    separators: tuple[str, ...] = ()

    def __init__(self, parts: Mapping[str, Part], ctx: BuildContext) -> None:
        super().__init__()
        for stage in BUILD_ORDER:  # the presets' order of random initialisation
            parts[stage].build(self, ctx)
        self.parts = dict(parts)  # plain objects (their modules live on self), not submodules
        self.separators = tuple(parts["layout"].separators)  # type: ignore[attr-defined]
        #: whether the model must pass each image's sample text (a text-guided selector)
        self.needs_text = bool(parts["selector"].needs_text)  # type: ignore[attr-defined]

    def forward(self, plans: Sequence[Plan], views: Sequence[Sequence[Tensor]], *, embed: nn.Embedding,
                separator_ids: dict[str, int], text_embeds: Sequence[Tensor | None] | None = None,
                **_: Any) -> list[Tensor]:
        p = self.parts
        units = p["fusion"].fuse(self, p["encoder"].encode(self, plans, views))  # type: ignore[attr-defined]
        tokens = p["compressor"].compress(self, units)  # type: ignore[attr-defined]
        select = functools.partial(p["selector"].select, self) if self.needs_text else None  # type: ignore[attr-defined]
        return p["layout"].assemble(self, plans, _split(tokens, units.counts), select=select,  # type: ignore[attr-defined]
                                    text_embeds=text_embeds, embed=embed, separator_ids=separator_ids)


class DualPathVisual(ComposedVisual):
    """A composed module whose encoder is LLaVA-HR's dual path (the ViT lives inside it)."""

    @property
    def vit(self) -> ViT:
        tower: Any = self.vision_tower  # a DualPathEncoder, set by the encoder part's build()
        return cast(ViT, tower.vit)


#: the presets' classes (same behaviour; the names are what device maps and older code know)
class Llava15Visual(ComposedVisual):
    """LLaVA-1.5: one padded 336 view → ViT layer −2 → mlp2x_gelu: 576 tokens."""


class NextVisual(ComposedVisual):
    """LLaVA-NeXT: base view + tiles → projector → tiles reassembled, unpadded, ``image_newline`` per row."""


class UHDVisual(ComposedVisual):
    """LLaVA-UHD: slices and overview at native size → shared resampler (per size group) → spatial schema."""

    separators = (",", "\n")


class HRVisual(DualPathVisual):
    """LLaVA-HR: ConvNeXt on the S×S view, ViT on the low-res view, MR-adapters, fusion, projector."""


class INFVisual(ComposedVisual):
    """INF-LLaVA: 9 local + 9 strided global crops + thumbnail → ViT → DEM → projector: 576 tokens."""


class SlimeVisual(ComposedVisual):
    """SliME: global view → gated mixture → ","; local tiles → 144-query compressor → shared
    projector → raster order → text-guided selector."""

    separators = (",",)


#: kept for older imports
VisualModule = ComposedVisual

_PRESET_CLASSES: dict[str, type[ComposedVisual]] = {
    "llava-1.5": Llava15Visual, "llava-next": NextVisual, "llava-uhd": UHDVisual, "llava-uhd-arxiv": UHDVisual,
    "llava-hr": HRVisual, "inf-llava": INFVisual, "slime": SlimeVisual}


def visual_class(spec: MethodSpec) -> type[ComposedVisual]:
    """The preset's class when ``spec`` has a preset's parts, else the composed one."""
    from .parts import METHOD_SPECS

    preset = METHOD_SPECS.get(spec.parts["views"])
    if preset is not None and dict(preset.parts) == dict(spec.parts) and preset.name in _PRESET_CLASSES:
        return _PRESET_CLASSES[preset.name]
    return DualPathVisual if spec.parts["encoder"] == "convnext-vit" else ComposedVisual


def build_visual(config: HiresConfig, d_llm: int, vit: ViT | None = None, convnext: nn.Module | None = None) -> nn.Module:
    """The visual module the config describes (its method spec); parts not given are built from
    the config. An impossible combination of parts is refused before any weight is built."""
    spec = spec_from_config(config)
    parts = spec.build_parts()  # checks shapes and options first
    if vit is None:
        vit = ViT.from_config(config.vit_config(), select_layer=config.select_layer)
    if getattr(parts["encoder"], "needs_convnext", False) and convnext is None:
        from .vision.convnext import ConvNeXt, ConvNeXtConfig

        if not config.convnext_config:
            raise ValueError(f"{spec.name} needs a convnext_config")
        convnext = ConvNeXt(ConvNeXtConfig.from_dict(config.convnext_config))
    return visual_class(spec)(parts, BuildContext(vit=vit, convnext=convnext, d_llm=d_llm, views=parts["views"]))
