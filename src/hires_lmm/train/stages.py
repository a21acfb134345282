"""Each paper's stage recipe: what trains, at which learning rate, at which resolution.

A :class:`Stage` names parameter groups by prefix of ``HiresLMM.named_parameters()`` with their
learning rates; everything else is frozen. The vision encoder is frozen in every published recipe
except LLaVA-HR's stage 2; ``scratch`` (everything trains, one learning rate) is what tiny models
trained from random weights need — a frozen random ViT cannot learn to see.

A method's stages belong to its spec (:attr:`hires_lmm.parts.MethodSpec.train_stages`), written
in its method module next to its registration (``hires_lmm/parts/methods/``: a new method is one
file); a method file inherits its base's, or names a method's with ``recipes``. This module
looks them up through the spec (:func:`get_stage`, :data:`STAGES`), adds the generic stages and
applies a stage to a model (:func:`apply_stage`).

=============  ===========================================================================
method         stages (data: caption = stage-1 captions, instruct = question/answer)
=============  ===========================================================================
llava-1.5      1: projector @1e-3 (caption) · 2: projector + LLM @2e-5 (instruct)
llava-next     1: projector + newline @1e-3 · 2: + LLM @2e-5
llava-uhd(-arxiv) 1: resampler @1e-3 · 2: resampler + LLM @2e-5
llava-hr       1: S=384, projector + final fusion @1e-3 (adapters frozen = identity)
               2: S=1024, everything (both encoders, adapters, fusion, projector, LLM) @2e-5
inf-llava      1: projector + DEM @1e-3 · 2: LLM + projector + DEM @2e-5
slime          1a: global only, MLP expert @1e-3 · 1b: global only, resampler expert (MLP frozen)
               2: local only, compression resampler · 3: everything but CLIP @2e-5, gate and
               selector active
=============  ===========================================================================
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from ..parts.recipes import ALL, Stage

if TYPE_CHECKING:
    import torch.nn as nn

__all__ = ["ALL", "ENCODERS", "GENERIC_STAGES", "STAGES", "Stage", "apply_stage", "get_stage", "trainable_state_dict"]


class _Recipes(Mapping[str, Mapping[str, Stage]]):
    """Registered method name → its training stages, read from the specs
    (:meth:`hires_lmm.parts.MethodSpec.recipe`) each time: a method registered later appears,
    and nothing here can drift from the specs. Lists the methods that have stages."""

    def __getitem__(self, method: str) -> Mapping[str, Stage]:
        from ..parts import METHOD_SPECS

        spec = METHOD_SPECS.get(method) if isinstance(method, str) else None
        stages = spec.recipe() if spec is not None else {}
        if not stages:
            raise KeyError(method)
        return stages

    def __iter__(self) -> Iterator[str]:
        from ..parts import METHOD_SPECS

        return iter([name for name, spec in METHOD_SPECS.items() if spec.recipe()])

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __repr__(self) -> str:
        return f"STAGES({ {k: list(v) for k, v in self.items()} })"


#: method → stage name → :class:`Stage` (``STAGES["slime"]["1a"]``), looked up through the specs
STAGES: Mapping[str, Mapping[str, Stage]] = _Recipes()

#: the vision encoders' parameters (ViT; LLaVA-HR's ViT and ConvNeXt)
ENCODERS = ("visual.vit.", "visual.vision_tower.fast_vision_tower.", "visual.vision_tower.slow_vision_tower.")

#: stages every method has, for models trained from random weights
GENERIC_STAGES = ("scratch", "frozen-encoders")


def get_stage(method: Any, name: str, lr: float | None = None) -> Stage:
    """The stage ``name`` of ``method`` (a registered name, a method file, a method-file dict or a
    :class:`~hires_lmm.parts.MethodSpec`: its spec's recipe). Besides the papers' stages:
    ``"scratch"`` trains everything at ``lr`` (default 1e-3); ``"frozen-encoders"`` trains
    everything but the vision encoders (for tiny models whose encoders were pretrained on their
    own, as the papers keep CLIP frozen). ``lr`` given: one rate for every group of the stage."""
    if name == "scratch":
        return Stage("scratch", ((ALL, lr if lr is not None else 1e-3),), visual={})
    if name == "frozen-encoders":
        return Stage(name, tuple((e, None) for e in ENCODERS) + ((ALL, lr if lr is not None else 1e-3),), visual={})
    from ..parts import resolve_method

    spec = resolve_method(method)  # PartError (a ValueError) for an unknown method or a bad file
    recipe = spec.recipe()
    try:
        stage = recipe[name]
    except KeyError:
        known = ", ".join(list(recipe) + list(GENERIC_STAGES))
        raise ValueError(f"{spec.name} has no stage {name!r}; its stages: {known}") from None
    return stage.with_lr(lr) if lr is not None else stage


def apply_stage(model: nn.Module, stage: Stage) -> list[dict[str, Any]]:
    """Freeze the model but the stage's groups; set its visual options and resolution.

    Returns optimizer parameter groups ``[{"params", "lr", "name"}]``. Parameters created frozen
    (fixed position tables) stay frozen.
    """
    m: Any = model  # a HiresLMM: its visual module, config and the recorded frozen set
    fixed = getattr(m, "_fixed_params", None)
    if fixed is None:
        fixed = {n for n, p in m.named_parameters() if not p.requires_grad}
        m._fixed_params = fixed
    for key, value in stage.visual.items():
        target: Any = m.visual
        *path, attr = key.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, attr, value)
    if stage.plan_options:
        m.config.plan_options.update(stage.plan_options)
    groups: dict[str, dict[str, Any]] = {}
    for name, p in m.named_parameters():
        match = next(((pre, lr) for pre, lr in stage.groups if name.startswith(pre)), None)
        p.requires_grad_(match is not None and match[1] is not None and name not in fixed)
        if match is not None and p.requires_grad:
            g = groups.setdefault(match[0] or "all", {"params": [], "lr": match[1], "name": match[0] or "all"})
            g["params"].append(p)
    if not groups:
        raise ValueError(f"stage {stage.name} trains nothing in this model")
    return list(groups.values())


def trainable_state_dict(model: nn.Module) -> dict[str, Any]:
    """Only the parameters that require grad (what a stage-1 run saves)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k in names}
