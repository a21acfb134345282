"""The conversion's user-facing error (torch-free, so the CLI can import it cheaply)."""

from __future__ import annotations

__all__ = ["ConversionError"]


class ConversionError(ValueError):
    """A checkpoint that cannot be converted faithfully: the message names every problem."""
