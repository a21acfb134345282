"""The conversion's user-facing error (torch-free, so the CLI can import it cheaply)."""

from __future__ import annotations

from ..errors import HiresError

__all__ = ["ConversionError"]


class ConversionError(HiresError, ValueError):
    """A checkpoint that cannot be converted faithfully: the message names every problem.

    A :class:`~hires_lmm.errors.HiresError`, so the ``hires`` command prints it without a
    traceback wherever it is raised."""
