"""The registry of parts (one dict per stage, filled by ``@register_part``) and of methods.

A method is a pipeline of stages, each served by one registered part::

    views ─▶ encoder ─▶ fusion ─▶ compressor ─▶ layout (+ selector) ─▶ visual tokens
    planner   ViT /      DEM /      projector /    concatenation, unpad +
              ViT+ConvNeXt none     resamplers     newline, spatial schema…

A :class:`Part` subclass is registered under ``(stage, name)`` (as timm's ``@register_model``
fills ``_model_entrypoints``); it carries a typed options dataclass (:mod:`.options`), the shape
facts it needs and gives (``needs`` / ``gives``: what lets :func:`check_parts` refuse an impossible
combination before any weight exists, naming the stages that clash) and the code that builds its
modules on the visual module and runs them. The seven presets are :class:`~.spec.MethodSpec`
objects registered with :func:`register_method` (:mod:`hires_lmm.parts.methods`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from .options import NoOptions, Options, PartError, field_defaults

if TYPE_CHECKING:  # the registry itself stays torch-free
    from torch import Tensor, nn

    from .spec import MethodSpec

__all__ = ["BUILD_ORDER", "METHOD_SPECS", "PARTS", "STAGES", "BuildContext", "Part", "TokenShape", "UnitShape",
           "Units", "check_parts", "get_part", "register_method", "register_part"]

#: the stages of every method, in data order (the selector runs inside the layout, on the layout's
#: selectable segment, so it is checked after it)
STAGES: tuple[str, ...] = ("views", "encoder", "fusion", "compressor", "layout", "selector")
#: the order the parts build their modules on the visual module: the order the presets have
#: always drawn their random weights in (projector before INF's DEM and NeXT's image_newline), so
#: every preset's initial weights, and its golden outputs, stay bit-identical
BUILD_ORDER: tuple[str, ...] = ("encoder", "compressor", "fusion", "layout", "selector")

#: stage → part name → part class


class _Registry(dict):  # (a dict of any values; the annotations below say which)
    """A dict whose first read imports the preset modules (:mod:`hires_lmm.parts.methods`), which
    fill it through ``@register_part`` / :func:`register_method`.

    The preset modules define torch modules; importing them lazily keeps ``import hires_lmm.parts``
    (which the CLI does to register ``hires methods`` and to recognise method files) free of
    torch, so ``hires plan`` / ``hires cost`` of a preset start without it. Writes never load.
    """

    _loading = False
    _loaded = False

    @classmethod
    def _load(cls) -> None:
        if cls._loaded or cls._loading:
            return
        cls._loading = True
        try:
            import importlib

            importlib.import_module("hires_lmm.parts.methods")
            cls._loaded = True
        finally:
            cls._loading = False

    def __getitem__(self, key: Any) -> Any:
        self._load()
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        self._load()
        return super().__contains__(key)

    def __iter__(self) -> Any:
        self._load()
        return super().__iter__()

    def __len__(self) -> int:
        self._load()
        return super().__len__()

    def get(self, key: Any, default: Any = None) -> Any:
        self._load()
        return super().get(key, default)

    def keys(self) -> Any:
        self._load()
        return super().keys()

    def values(self) -> Any:
        self._load()
        return super().values()

    def items(self) -> Any:
        self._load()
        return super().items()

    def __repr__(self) -> str:
        self._load()
        return super().__repr__()


PARTS: dict[str, dict[str, type[Part]]] = _Registry({s: {} for s in STAGES})
#: method name → spec (the presets, and whatever a user registers)
METHOD_SPECS: dict[str, MethodSpec] = _Registry()


@dataclass(frozen=True)
class UnitShape:
    """One feature map reaching the compressor: its role and its ``(h, w)`` patch grid."""

    role: str
    grid: tuple[int, int]


@dataclass(frozen=True)
class TokenShape:
    """The tokens a compressor makes of one unit: how many, and their ``(h, w)`` map when they
    form one (a projector keeps the patch grid, UHD's resampler makes a 12×12 one; a perceiver's
    queries have no spatial order: ``grid=None``)."""

    count: int
    grid: tuple[int, int] | None = None


@dataclass
class Units:
    """Encoded features of a batch, flat over images: ``feats[k]`` (h·w, d) with its ``grids[k]``
    (h, w) and ``roles[k]``; image i owns ``counts[i]`` consecutive units."""

    feats: list[Tensor]
    grids: list[tuple[int, int]]
    roles: list[str]
    counts: list[int]


@dataclass
class BuildContext:
    """What parts build from: the encoders (already built or loaded), the LLM width and the
    views options (INF-LLaVA's DEM reads the crop count ``n`` the planner uses)."""

    vit: Any
    convnext: Any
    d_llm: int
    views: Part


class Part:
    """A registered part of one stage. Subclasses set ``stage``, ``name``, ``Options`` and their
    shape facts, and implement their stage's methods (see the stage base classes in
    :mod:`hires_lmm.parts.stages`)."""

    stage: ClassVar[str]
    name: ClassVar[str]
    Options: ClassVar[type[Options]] = NoOptions
    #: shape facts this part requires from earlier stages: trait → accepted values
    needs: ClassVar[Mapping[str, frozenset[str]]] = {}
    #: shape facts it establishes for later stages: trait → value
    gives: ClassVar[Mapping[str, str]] = {}

    def __init__(self, options: Any) -> None:
        self.options = options

    # --- options ---------------------------------------------------------------------------
    @classmethod
    def owner(cls) -> str:
        return f"{cls.stage} {cls.name!r}"

    @classmethod
    def parse(cls, values: Mapping[str, Any]) -> Any:
        """Validated options from a mapping (unknown keys raise :class:`PartError`)."""
        return cls.Options.from_dict(values, owner=cls.owner())

    @classmethod
    def option_keys(cls) -> tuple[str, ...]:
        return cls.Options.keys()

    @classmethod
    def tags(cls) -> Mapping[str, Any]:
        return cls.Options.TAGS

    @classmethod
    def tiny(cls) -> Mapping[str, Any]:
        return cls.Options.TINY

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return field_defaults(cls.Options)

    def serialize(self) -> dict[str, Any]:
        """The options as saved in config.json (``connector``) and in method files."""
        return self.options.to_dict()

    @classmethod
    def summary(cls) -> str:
        return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())

    # --- building ---------------------------------------------------------------------------
    def build(self, host: nn.Module, ctx: BuildContext) -> None:
        """Create this part's modules as attributes of ``host`` (the visual module), under the
        names saved checkpoints use. Parts without weights build nothing."""


def register_part(cls: type[Part]) -> type[Part]:
    """Class decorator: register ``cls`` under ``(cls.stage, cls.name)``."""
    if cls.stage not in PARTS:
        raise PartError(f"part {cls.name!r}: unknown stage {cls.stage!r}; stages: {', '.join(STAGES)}")
    if cls.name in PARTS[cls.stage]:
        raise PartError(f"{cls.owner()} is registered twice")
    PARTS[cls.stage][cls.name] = cls
    return cls


def get_part(stage: str, name: str) -> type[Part]:
    """The part class registered as ``name`` in ``stage``."""
    if stage not in PARTS:
        raise PartError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    try:
        return PARTS[stage][name]
    except KeyError:
        raise PartError(f"unknown {stage} part {name!r}; {stage} parts: {', '.join(PARTS[stage])}") from None


def check_parts(parts: Mapping[str, type[Part]], method: str = "method") -> None:
    """Refuse an impossible combination, naming the two stages that clash (shapes only: runs
    before any weight is built)."""
    missing = [s for s in STAGES if s not in parts]
    if missing:
        raise PartError(f"{method}: no part for stage(s) {', '.join(missing)}")
    given: dict[str, tuple[str, str, str]] = {}  # trait → (value, stage, part)
    for stage in STAGES:
        cls = parts[stage]
        for trait, allowed in cls.needs.items():
            got = given.get(trait)
            if got is None:
                raise PartError(f"{method}: {stage} {cls.name!r} needs {trait} {' or '.join(sorted(allowed))}, "
                                "which no earlier stage gives")
            if got[0] not in allowed:
                raise PartError(f"{method}: stages {got[1]} and {stage} clash: {stage} {cls.name!r} needs {trait} "
                                f"{' or '.join(sorted(allowed))}, but {got[1]} {got[2]!r} gives {got[0]}")
        for trait, value in cls.gives.items():
            given[trait] = (value, stage, cls.name)


def register_method(spec: MethodSpec) -> MethodSpec:
    """Register a method spec (checked now: a broken spec fails at import, not at build)."""
    if spec.name in METHOD_SPECS:
        raise PartError(f"method {spec.name!r} is registered twice")
    spec.check()
    METHOD_SPECS[spec.name] = spec
    return spec
