"""Training: each paper's stage recipes (:mod:`.stages`), deterministic batches (:mod:`.batches`)
and the loop with checkpoints and resumption (:mod:`.trainer`)."""

from .stages import STAGES, Stage, apply_stage, get_stage
from .trainer import TrainConfig, TrainResult, train

__all__ = ["STAGES", "Stage", "TrainConfig", "TrainResult", "apply_stage", "get_stage", "train"]
