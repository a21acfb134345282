"""Each paper's stage recipe: what trains, at which learning rate, at which resolution.

A :class:`Stage` names parameter groups by prefix of ``HiresLMM.named_parameters()`` with their
learning rates; everything else is frozen. The vision encoder is frozen in every published recipe
except LLaVA-HR's stage 2; ``scratch`` (everything trains, one learning rate) is what tiny models
trained from random weights need — a frozen random ViT cannot learn to see.

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

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

ALL = ""  # prefix matching every parameter


@dataclass(frozen=True)
class Stage:
    """One training stage of a method.

    Attributes:
        name: "1", "2", "1a", ..., or "scratch".
        groups: (prefix, learning rate) pairs; a parameter trains with the lr of the first
            prefix it starts with; parameters matching none, or a prefix whose lr is None, are
            frozen.
        data: "caption" or "instruct", the kind of data the paper used.
        template: the chat template the paper used for this stage ("plain" for captions).
        plan_options: planner options for this stage (LLaVA-HR's resolution).
        visual: attributes set on the visual module (SliME's mode, gate, selector).
        save_trainable_only: a stage-1 run saves only what it trained; the next stage starts
            from it (``--init``).
    """

    name: str
    groups: tuple[tuple[str, float | None], ...]
    data: str = "instruct"
    template: str = "vicuna_v1"
    plan_options: dict[str, Any] = field(default_factory=dict)
    visual: dict[str, Any] = field(default_factory=dict)
    save_trainable_only: bool = False


def _two(projector: tuple[str, ...]) -> dict[str, Stage]:
    return {
        "1": Stage("1", tuple((p, 1e-3) for p in projector), data="caption", template="plain", save_trainable_only=True),
        "2": Stage("2", tuple((p, 2e-5) for p in projector) + (("llm.", 2e-5),)),
    }


STAGES: dict[str, dict[str, Stage]] = {
    "llava-1.5": _two(("visual.mm_projector.",)),
    "llava-next": _two(("visual.mm_projector.", "visual.image_newline")),
    "llava-uhd": _two(("visual.mm_projector.",)),
    "llava-uhd-arxiv": _two(("visual.mm_projector.",)),
    "llava-hr": {
        "1": Stage("1", (("visual.mm_projector.", 1e-3), ("visual.vision_tower.align_stages.", 1e-3)),
                   data="caption", template="plain", plan_options={"S": 384}, save_trainable_only=True),
        "2": Stage("2", (("visual.", 2e-5), ("llm.", 2e-5)), plan_options={"S": 1024}),
    },
    "inf-llava": _two(("visual.mm_projector.", "visual.spatial_embed.")),
    "slime": {
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
    },
}


#: the vision encoders' parameters (ViT; LLaVA-HR's ViT and ConvNeXt)
ENCODERS = ("visual.vit.", "visual.vision_tower.fast_vision_tower.", "visual.vision_tower.slow_vision_tower.")

#: stages every method has, for models trained from random weights
GENERIC_STAGES = ("scratch", "frozen-encoders")


def get_stage(method: str, name: str, lr: float | None = None) -> Stage:
    """The stage ``name`` of ``method``. Besides the papers' stages: ``"scratch"`` trains
    everything at ``lr`` (default 1e-3); ``"frozen-encoders"`` trains everything but the vision
    encoders (for tiny models whose encoders were pretrained on their own, as the papers keep
    CLIP frozen)."""
    if name == "scratch":
        return Stage("scratch", ((ALL, lr if lr is not None else 1e-3),), visual={})
    if name == "frozen-encoders":
        return Stage(name, tuple((e, None) for e in ENCODERS) + ((ALL, lr if lr is not None else 1e-3),), visual={})
    try:
        stage = STAGES[method][name]
    except KeyError:
        known = ", ".join(list(STAGES.get(method, {})) + list(GENERIC_STAGES))
        raise ValueError(f"{method} has no stage {name!r}; its stages: {known}") from None
    if lr is not None:  # one lr for every group of the stage
        stage = Stage(stage.name, tuple((p, lr) for p, _ in stage.groups), stage.data, stage.template,
                      stage.plan_options, stage.visual, stage.save_trainable_only)
    return stage


def apply_stage(model: nn.Module, stage: Stage) -> list[dict[str, Any]]:
    """Freeze the model but the stage's groups; set its visual options and resolution.

    Returns optimizer parameter groups ``[{"params", "lr", "name"}]``. Parameters created frozen
    (fixed position tables) stay frozen.
    """
    fixed = getattr(model, "_fixed_params", None)
    if fixed is None:
        fixed = {n for n, p in model.named_parameters() if not p.requires_grad}
        model._fixed_params = fixed  # type: ignore[attr-defined]
    for key, value in stage.visual.items():
        target: Any = model.visual
        *path, attr = key.split(".")
        for part in path:
            target = getattr(target, part)
        setattr(target, attr, value)
    if stage.plan_options:
        model.config.plan_options.update(stage.plan_options)
    groups: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        match = next(((pre, lr) for pre, lr in stage.groups if name.startswith(pre)), None)
        p.requires_grad_(match is not None and match[1] is not None and name not in fixed)
        if p.requires_grad:
            g = groups.setdefault(match[0] or "all", {"params": [], "lr": match[1], "name": match[0] or "all"})
            g["params"].append(p)
    if not groups:
        raise ValueError(f"stage {stage.name} trains nothing in this model")
    return list(groups.values())


def trainable_state_dict(model: nn.Module) -> dict[str, Any]:
    """Only the parameters that require grad (what a stage-1 run saves)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v.detach().cpu() for k, v in model.state_dict().items() if k in names}
