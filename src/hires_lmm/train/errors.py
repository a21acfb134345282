"""The training errors a user can cause (bad arguments, files, checkpoints).

They subclass the package's :class:`~hires_lmm.errors.HiresError`, which the ``hires`` command
prints as one line (``hires train: error: ...``) with exit status 2; their messages are kept to
one line for that reason (:func:`one_line`).
"""

from __future__ import annotations

from ..errors import HiresError


class TrainingError(HiresError, RuntimeError):
    """A problem found before or during training, reported without a traceback by the CLI."""


class CheckpointError(TrainingError):
    """A checkpoint that cannot be resumed: unreadable, tampered, foreign, or from another setup."""


class ConfigMismatchError(TrainingError):
    """``--resume`` with arguments that differ from the run being resumed."""


def one_line(err: BaseException | str, limit: int = 300) -> str:
    """``err``'s message on one line (whitespace collapsed, cut at ``limit`` characters): library
    messages (safetensors, torch) can span lines, and the CLI prints one."""
    text = err if isinstance(err, str) else (str(err) or type(err).__name__)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"
