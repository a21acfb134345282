"""A method: one part per stage, their options, its training recipe and conversion formats.

:class:`MethodSpec` is what a preset is and what a method file becomes; it plans and costs an
image with exactly the token count the built model produces (:meth:`MethodSpec.plan`,
:meth:`MethodSpec.cost`), and turns into / out of a saved config (``method``, ``plan_options``,
``connector``, and ``method_spec`` for a composed method).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..plan.budget import check_budget, record_budget, refuse
from ..plan.hr import hr_budget_sides
from ..plan.slime import MIN_TILE_CAP
from ..plan.types import Plan
from .options import PartError
from .recipes import Stage
from .registry import METHOD_SPECS, PARTS, STAGES, Part, TokenShape, check_parts, get_part
from .stages import ViewsPart

__all__ = ["MODEL_KEYS", "MethodSpec"]

#: connector keys that belong to the model, not to a part (the separator ids a converted
#: checkpoint hard-codes, read by :class:`~hires_lmm.model.HiresLMM`): kept as they are
MODEL_KEYS: tuple[str, ...] = ("separator_ids",)
#: the order of the connector keys in config.json (the compressor's first, as it always was)
_CONNECTOR_ORDER = ("compressor", "encoder", "fusion", "layout", "selector")


@dataclass(frozen=True)
class MethodSpec:
    """A registered (or composed) method.

    Attributes:
        name: the method's name (a preset's is its :data:`~hires_lmm.plan.METHODS` name).
        parts: stage → part name, for every stage of :data:`~.registry.STAGES`.
        options: stage → the options given explicitly (the rest are the parts' defaults).
        recipes: the registered method whose training stages apply: a preset names itself, a
            method file its base's (or the one it names); None, with no ``train_stages``: only
            the generic ``scratch`` / ``frozen-encoders`` stages.
        formats: the ``hires convert`` formats (:data:`hires_lmm.convert.formats.FORMATS`) that
            produce this method.
        base: the preset a composed method started from (None for a preset).
        train_stages: the method's own training stages, stage name → :class:`~.recipes.Stage`
            in training order (the paper's recipe, defined in the method's module next to its
            registration); empty: those of ``recipes``. See :meth:`recipe`.
    """

    name: str
    parts: Mapping[str, str]
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    recipes: str | None = None
    formats: tuple[str, ...] = ()
    base: str | None = None
    train_stages: Mapping[str, Stage] = field(default_factory=dict)

    # --- training -------------------------------------------------------------------------------
    def recipe(self) -> dict[str, Stage]:
        """The training stages that apply to this method, in order: its own ``train_stages``,
        else those of the registered method ``recipes`` names, else none (only the generic
        stages of ``hires_lmm.train.stages.get_stage``)."""
        spec, seen = self, set[str]()
        while not spec.train_stages:
            if spec.recipes is None or spec.recipes in seen:  # none, or a method naming itself
                return {}
            seen.add(spec.recipes)
            owner = METHOD_SPECS.get(spec.recipes)
            if owner is None:
                raise PartError(f"{self.name}: recipes {spec.recipes!r} is not a registered method; "
                                f"choose from {', '.join(METHOD_SPECS)}")
            spec = owner
        return dict(spec.train_stages)

    def needs_convnext(self) -> bool:
        """Whether its encoder needs a ConvNeXt (LLaVA-HR's dual path): ``--convnext DIR``
        beyond tiny models."""
        return bool(getattr(get_part("encoder", self.parts["encoder"]), "needs_convnext", False))

    # --- validation, parts ----------------------------------------------------------------
    def part_classes(self) -> dict[str, type[Part]]:
        unknown = sorted(set(self.parts) - set(STAGES))
        if unknown:
            raise PartError(f"{self.name}: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(STAGES)}")
        return {s: get_part(s, self.parts[s]) for s in STAGES if s in self.parts}

    def check(self) -> None:
        """Parts exist, combine (shapes), and every explicit option is known."""
        classes = self.part_classes()
        check_parts(classes, self.name)
        for stage, values in self.options.items():
            if stage not in classes:
                raise PartError(f"{self.name}: options for unknown stage {stage!r}")
            classes[stage].parse(values)

    def build_parts(self, *, tiny: bool = False) -> dict[str, Part]:
        """The part objects with their options resolved: defaults < the part's tiny sizes (when
        ``tiny``) < the spec's options."""
        classes = self.part_classes()
        check_parts(classes, self.name)
        return {s: cls(cls.parse({**(cls.tiny() if tiny else {}), **self.options.get(s, {})}))
                for s, cls in classes.items()}

    def resolved(self, *, tiny: bool = False) -> MethodSpec:
        """The same method with every option written out (what a saved config records)."""
        parts = self.build_parts(tiny=tiny)
        return dataclasses.replace(self, options={s: p.serialize() for s, p in parts.items()})

    # --- composing --------------------------------------------------------------------------
    def with_options(self, overrides: Mapping[str, Any]) -> MethodSpec:
        """Flat ``connector``-style overrides routed to the stages whose part has that option.

        A part's tag (``resampler="perceiver"``) selects that part in its stage, as old config.json
        files do; :data:`MODEL_KEYS` are ignored (the caller keeps them). An option no part of
        this method has raises :class:`PartError`, listing the method's options.
        """
        parts = dict(self.parts)
        options = {s: dict(v) for s, v in self.options.items()}
        rest = {k: v for k, v in overrides.items() if k not in MODEL_KEYS}
        for key, value in list(rest.items()):  # tags first: they may change a stage's part
            for stage in STAGES[1:]:
                for name, cls in PARTS[stage].items():
                    if cls.tags().get(key, object()) == value:
                        if parts[stage] != name:
                            parts[stage], options[stage] = name, {}
                        rest.pop(key, None)
        for key, value in rest.items():
            stages = [s for s in STAGES[1:] if key in get_part(s, parts[s]).option_keys()]
            if not stages:
                known = sorted({k for s in STAGES[1:] for k in get_part(s, parts[s]).option_keys()})
                raise PartError(f"{self.name}: unknown option {key!r}; its options: {', '.join(known) or 'none'}")
            for s in stages:  # an option two parts share (``heads``) sets both
                options.setdefault(s, {})[key] = value
        spec = dataclasses.replace(self, parts=parts, options=options)
        spec.check()
        return spec

    def connector(self, *, tiny: bool = False) -> dict[str, Any]:
        """The config.json ``connector`` dict: every non-views part's options, flat."""
        out: dict[str, Any] = {}
        parts = self.build_parts(tiny=tiny)
        for stage in _CONNECTOR_ORDER:
            for k, v in parts[stage].serialize().items():
                out.setdefault(k, v)
        return out

    # --- method files -----------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The method-file form: ``{"name", "base", STAGE: PART, "<stage>_options": {...}}``."""
        out: dict[str, Any] = {"name": self.name, "base": self.base}
        out.update({s: self.parts[s] for s in STAGES})
        out.update({f"{s}_options": dict(self.options[s]) for s in STAGES if self.options.get(s)})
        recipes = self.recipes if self.recipes is not None else (self.name if self.train_stages else None)
        if recipes is not None:  # a name: stages are found again through the registry
            out["recipes"] = recipes
        return out

    # --- shapes: plan, count, cost ------------------------------------------------------------
    def token_shapes(self, plan: Plan, parts: Mapping[str, Part] | None = None) -> list[TokenShape]:
        parts = parts or self.build_parts()
        units = parts["fusion"].units(plan, parts["encoder"].units(plan))  # type: ignore[attr-defined]
        return parts["compressor"].tokens(units)  # type: ignore[attr-defined]

    def plan(self, size: tuple[int, int], **plan_options: Any) -> Plan:
        """The planner's plan with the token count (and composition) this method's parts make.

        A preset's plan is the planner's own, unchanged (its count is the parts' count:
        ``tests/test_parts.py`` checks it over many sizes); a composed method's plan carries its
        name as ``method`` and ``extra["planner"]`` (the views part).

        A budget (``max_visual_tokens``, here or in the views part's options) applies to the
        count this method's parts make, not to the planner's own: the views part's largest
        faithful configuration (:func:`_budget_configurations`: the knob its planner's own
        budget moves) whose composed count fits is planned, recorded as the planner records it
        (``extra["max_visual_tokens"]``, ``extra["budget_choice"]``); when none fits,
        :class:`~hires_lmm.plan.budget.BudgetError` names this method and its smallest count.
        A preset's budgeted plan is the planner's own, as without a budget.
        """
        parts = self.build_parts()
        views = parts["views"]
        budget = {**views.options, **plan_options}.get("max_visual_tokens")
        if budget is None or self.is_preset_parts():
            plan = views.plan(size, **plan_options)  # type: ignore[attr-defined]
            n, groups = parts["layout"].count(plan, self.token_shapes(plan, parts))  # type: ignore[attr-defined]
            if budget is None or n == plan.num_visual_tokens:
                return self._composed(plan, parts, n, groups)
        return self._plan_within(size, parts, check_budget(budget), plan_options)

    def _composed(self, plan: Plan, parts: Mapping[str, Part], n: int, groups: Any) -> Plan:
        """``plan`` with this method's count ``n`` and its ``groups`` (a preset's plan unchanged)."""
        if self.is_preset_parts() and n == plan.num_visual_tokens:
            return plan
        extra = {**plan.extra, "planner": plan.method}
        if parts["selector"].bound:  # type: ignore[attr-defined]
            extra["bound"] = True
        return dataclasses.replace(plan, method=self.name, num_visual_tokens=n, tokens=groups, extra=extra)

    def _plan_within(self, size: tuple[int, int], parts: Mapping[str, Part], budget: int,
                     plan_options: Mapping[str, Any]) -> Plan:
        """The plan of the views part's configuration with the most composed tokens within
        ``budget`` (the larger configuration at equal counts), else the refusal."""
        views = parts["views"]
        assert isinstance(views, ViewsPart)
        base = {**plan_options}
        if "max_visual_tokens" in views.option_keys():
            base["max_visual_tokens"] = None  # the planner plans each configuration unbudgeted
        options: dict[str, Any] = {**views.options, **plan_options}

        def composed(**kw: Any) -> Plan:
            plan = views.plan(size, **{**base, **kw})
            n, groups = parts["layout"].count(plan, self.token_shapes(plan, parts))  # type: ignore[attr-defined]
            return self._composed(plan, parts, n, groups)

        if views.name == "llava-next":  # the pinpoints whose composed count fits, then the usual choice
            pins = [(int(w), int(h)) for w, h in options.get("pinpoints", views.option("pinpoints"))]
            counts = [composed(pinpoints=[p]).num_visual_tokens for p in pins]
            fitting = [p for p, n in zip(pins, counts) if n <= budget]
            if not fitting:
                n, p = min(zip(counts, pins))
                raise refuse(self.name, size, budget, n, f"pinpoint {p[0]}x{p[1]}")
            plan = composed(pinpoints=pins if len(fitting) == len(pins) else fitting)
            return record_budget(plan, budget, {"pinpoints": [list(p) for p in fitting]})
        configs = [(choice, composed(**choice)) for choice in _budget_configurations(views, options)]
        fits = [(c, p) for c, p in configs if p.num_visual_tokens <= budget]
        if not fits:
            n, how = min((p.num_visual_tokens, ", ".join(f"{k}={v}" for k, v in c.items())) for c, p in configs)
            raise refuse(self.name, size, budget, n, how or "its only configuration")
        most = max(p.num_visual_tokens for _, p in fits)
        choice, plan = next((c, p) for c, p in fits if p.num_visual_tokens == most)
        return record_budget(plan, budget, choice)

    def is_preset_parts(self) -> bool:
        """Whether the parts are those of the preset named by the views part (options aside)."""
        preset = METHOD_SPECS.get(self.parts["views"])
        return preset is not None and dict(preset.parts) == dict(self.parts)

    def cost(self, size: tuple[int, int], *, plan_options: Mapping[str, Any] | None = None, **kw: Any) -> Any:
        """:func:`hires_lmm.plan.cost.plan_cost` of :meth:`plan` (see :meth:`cost_of`)."""
        return self.cost_of(self.plan(size, **(plan_options or {})), **kw)

    def cost_of(self, plan: Plan, **kw: Any) -> Any:
        """:func:`hires_lmm.plan.cost.plan_cost` of this method's ``plan`` (from :meth:`plan`): the
        vision FLOPs of its views, the LLM's of its token count, and the connector FLOPs of this
        method's compressor where it is not the one of the planner's preset."""
        from ..plan.cost import ViTShape, plan_cost

        planner = plan.extra.get("planner", plan.method)
        # the cost model's formulas are keyed by the planner's method
        rep = plan_cost(dataclasses.replace(plan, method=planner), **kw)
        rep.method = plan.method
        native = METHOD_SPECS.get(planner)
        if native is not None and all(native.parts[s] == self.parts[s] for s in ("encoder", "fusion", "compressor")):
            return rep
        parts = self.build_parts()
        if native is not None:
            drop = set(get_part("compressor", native.parts["compressor"]).cost_keys)  # type: ignore[attr-defined]
            rep.connector_parts = {k: v for k, v in rep.connector_parts.items() if k not in drop}
        units = parts["fusion"].units(plan, parts["encoder"].units(plan))  # type: ignore[attr-defined]
        vit = kw.get("vit") or ViTShape()
        rep.connector_parts.update(parts["compressor"].flops(units, vit.width, rep.llm_hidden))  # type: ignore[attr-defined]
        rep.connector_flops = sum(rep.connector_parts.values())
        return rep


def _budget_configurations(views: ViewsPart, options: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The configurations a budget chooses among for the views part (``options``: its resolved
    planner options), largest first: the knob its planner's own budget moves (docs/methods.md,
    "Visual-token budget"); one configuration (``{}``) for a planner with a fixed count. LLaVA-NeXT's
    pinpoints are handled by :meth:`MethodSpec._plan_within` itself."""
    name = views.name
    if name in ("llava-uhd", "llava-uhd-arxiv"):
        top = options.get("max_slices")
        if top is None:
            top = 6 if views.fixed.get("arxiv") else 7
        return [{"max_slices": k} for k in [top, *range(top - 1, 0, -1)]]
    if name == "slime":
        top = options.get("max_tiles", views.option("max_tiles"))
        return [{"max_tiles": t} for t in [top, *range(top - 1, MIN_TILE_CAP - 1, -1)]]
    if name == "llava-hr":
        return [{"S": s} for s in hr_budget_sides(options.get("S", views.option("S")))]
    return [{}]
