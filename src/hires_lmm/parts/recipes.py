"""Training stages: what a stage of a method's recipe trains, at which learning rate, on which
data, at which resolution.

A method's recipe (stage name → :class:`Stage`) is part of its spec
(:attr:`~.spec.MethodSpec.train_stages`), written in its method module next to its registration
(``hires_lmm/parts/methods/``): a new method is one file. :func:`two_stage` is the recipe most
LLaVA-family papers share. ``hires_lmm.train.stages`` looks recipes up through the spec
(``get_stage``, ``STAGES``) and applies them to a model (``apply_stage``).

This module imports no torch (a spec is read by ``hires plan`` / ``hires cost``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

__all__ = ["ALL", "Stage", "two_stage"]

ALL = ""  # prefix matching every parameter


@dataclass(frozen=True)
class Stage:
    """One training stage of a method.

    A :class:`Stage` names parameter groups by prefix of ``HiresLMM.named_parameters()`` with their
    learning rates; everything else is frozen.

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

    def with_lr(self, lr: float) -> Stage:
        """The same stage with one learning rate for every group (frozen groups train too, as
        they always did under ``--lr``)."""
        return replace(self, groups=tuple((p, lr) for p, _ in self.groups))


def two_stage(connector: tuple[str, ...]) -> dict[str, Stage]:
    """LLaVA's recipe: stage 1 aligns the ``connector`` prefixes on captions at 1e-3 (plain
    template, saving only what it trained); stage 2 trains them and the LLM at 2e-5 on
    instructions."""
    return {
        "1": Stage("1", tuple((p, 1e-3) for p in connector), data="caption", template="plain", save_trainable_only=True),
        "2": Stage("2", tuple((p, 2e-5) for p in connector) + (("llm.", 2e-5),)),
    }
