"""The interface of each stage: one base class per stage, what a part of it must implement.

Every stage has two faces, used at different times:

* **shapes** (no torch): what the part makes of a plan — feature maps (:class:`UnitShape`), then
  tokens (:class:`TokenShape`), then the visual-token count — so ``hires plan`` / ``hires cost``
  count exactly what the model will produce, for any combination of parts;
* **runtime**: the modules it builds on the visual module (``build``) and what it computes
  (``encode`` / ``fuse`` / ``compress`` / ``assemble`` / ``select``), batched over all images.

The views stage is the planner of :mod:`hires_lmm.plan` (options = the planner's keyword
arguments, validated against its signature); see :mod:`hires_lmm.parts.views`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from ..plan.types import TokenGroup
from .options import PartError
from .registry import Part, TokenShape, Units, UnitShape

if TYPE_CHECKING:
    from torch import Tensor, nn

    from ..plan import Plan

__all__ = ["CompressorPart", "EncoderPart", "FusionPart", "LayoutPart", "SelectorPart", "ViewsPart"]

#: ``select(tokens (n, D), text (t, D) | None) -> kept indices (k,) ascending, or None (keep all)``
Select = Callable[["Tensor", "Tensor | None"], "Tensor | None"]


class ViewsPart(Part):
    """Base of the planners: options are the planner's keyword arguments."""

    stage = "views"
    #: the planner function and the options it takes (keyword-only parameters of its signature)
    planner: ClassVar[Callable[..., Plan]]
    signature: ClassVar[Callable[..., Any]]
    fixed: ClassVar[Mapping[str, Any]] = {}

    @classmethod
    def _params(cls) -> dict[str, inspect.Parameter]:
        return {n: p for n, p in inspect.signature(cls.signature).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in cls.fixed}

    @classmethod
    def option_keys(cls) -> tuple[str, ...]:
        return tuple(cls._params())

    @classmethod
    def tags(cls) -> Mapping[str, Any]:
        return {}

    @classmethod
    def tiny(cls) -> Mapping[str, Any]:
        return {}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {n: p.default for n, p in cls._params().items()}

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> dict[str, Any]:
        if not isinstance(values, Mapping):
            raise PartError(f"{cls.owner()}: options must be a mapping, not {type(values).__name__}")
        known = cls.option_keys()
        for k in values:
            if k not in known:
                raise PartError(f"{cls.owner()}: unknown option {k!r}; its options: {', '.join(known)}")
        return dict(values)

    def serialize(self) -> dict[str, Any]:
        return dict(self.options)

    def option(self, key: str) -> Any:
        """The value the planner uses for ``key`` (given, else the planner's default)."""
        return self.options.get(key, self.defaults()[key])

    def plan(self, size: tuple[int, int], **extra: Any) -> Plan:
        """The planner's plan of an image of ``size`` (``extra``: more planner options)."""
        return type(self).planner(size, **{**self.options, **extra})


class EncoderPart(Part):
    """Views → feature maps ("units"): one per view (a ViT), or one per image (a dual path)."""

    stage = "encoder"

    def units(self, plan: Plan) -> list[UnitShape]:
        raise NotImplementedError

    def encode(self, host: nn.Module, plans: Sequence[Plan], views: Sequence[Sequence[Tensor]]) -> Units:
        raise NotImplementedError


class FusionPart(Part):
    """Units of one image → fewer units (INF-LLaVA's DEM merges 19 crops into one map)."""

    stage = "fusion"

    def units(self, plan: Plan, units: list[UnitShape]) -> list[UnitShape]:
        return units

    def fuse(self, host: nn.Module, units: Units) -> Units:
        return units


class CompressorPart(Part):
    """Each unit's features (h·w, d) → LLM-space tokens (n, D), batched over equal shapes."""

    stage = "compressor"
    #: the entries of :func:`hires_lmm.plan.cost.plan_cost`'s ``connector_parts`` this part
    #: accounts for in the presets that use it (a composed method replaces them by :meth:`flops`)
    cost_keys: ClassVar[tuple[str, ...]] = ()

    def tokens(self, units: list[UnitShape]) -> list[TokenShape]:
        raise NotImplementedError

    def flops(self, units: list[UnitShape], d: int, D: int) -> dict[str, float]:
        """FLOPs of this compressor on one image's units (vision width d, LLM width D)."""
        raise NotImplementedError

    def compress(self, host: nn.Module, units: Units) -> list[Tensor | None]:
        raise NotImplementedError


class SelectorPart(Part):
    """Which tokens of the layout's selectable segment reach the LLM."""

    stage = "selector"
    #: whether the model must hand the sample's text embeddings to the visual module
    needs_text: ClassVar[bool] = False
    #: whether the planned count is then an upper bound (the kept number depends on the text)
    bound: ClassVar[bool] = False

    def select(self, host: nn.Module, tokens: Tensor, text: Tensor | None) -> Tensor | None:
        return None


class LayoutPart(Part):
    """Per image: the compressed tokens of its units (+ separators, newlines) → one sequence."""

    stage = "layout"
    #: text tokens spliced between views (their ids must be single tokens of the tokenizer)
    separators: ClassVar[tuple[str, ...]] = ()

    def count(self, plan: Plan, tokens: list[TokenShape]) -> tuple[int, tuple[TokenGroup, ...]]:
        """Visual tokens of one image (before any selection) and their composition."""
        raise NotImplementedError

    def assemble(self, host: nn.Module, plans: Sequence[Plan], tokens: Sequence[Sequence[Tensor | None]], *,
                 select: Select, text_embeds: Sequence[Tensor | None] | None, embed: nn.Embedding,
                 separator_ids: Mapping[str, int]) -> list[Tensor]:
        raise NotImplementedError
