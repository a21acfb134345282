"""Training: each paper's stage recipes (:mod:`.stages`), the run's arguments (:mod:`.config`),
deterministic batches (:mod:`.batches`) and the loop with checkpoints and resumption
(:mod:`.trainer`).

:class:`TrainConfig` imports no torch (``hires`` builds the ``train`` flags from it at start-up);
the other names load their modules, and torch, when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import TrainConfig

if TYPE_CHECKING:
    from .stages import STAGES, Stage, apply_stage, get_stage
    from .trainer import TrainResult, train

__all__ = ["STAGES", "Stage", "TrainConfig", "TrainResult", "apply_stage", "get_stage", "train"]

#: the lazily imported names → their module
_LAZY = {"STAGES": "stages", "Stage": "stages", "apply_stage": "stages", "get_stage": "stages",
         "TrainResult": "trainer", "train": "trainer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
