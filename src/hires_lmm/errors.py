"""The package's user-facing error classes, in a leaf module.

This module imports nothing from the package, so every copy of a module that raises or catches
these errors sees the *same* classes. That matters for ``python -m hires_lmm.cli``: there the CLI
module is loaded twice (once as ``__main__``, once as ``hires_lmm.cli`` by the subcommand modules
that import it), and a class defined in it would exist twice, so an error raised by one copy was
not caught by the other and ended in a traceback.

Every error meant for the user (bad input, a broken file) subclasses :class:`HiresError`; the
``hires`` command prints any of them as one line ``hires CMD: error: MESSAGE`` and exits with 2.
"""

from __future__ import annotations

__all__ = ["CLIError", "HiresError", "ModelLoadError", "ModelNotFoundError", "one_line"]


class HiresError(Exception):
    """Base of every user-facing error: the ``hires`` command prints it without a traceback
    (exit status 2). Subclass it (together with ValueError, OSError, ... as fits) for errors
    whose message alone tells the user what to fix."""


class CLIError(HiresError):
    """A user-facing error of the command line: printed without a traceback, exit status 2."""


class ModelLoadError(HiresError, ValueError):
    """A model directory that cannot be loaded; the message names the file and the problem."""


class ModelNotFoundError(ModelLoadError, FileNotFoundError):
    """A model directory (or its config.json) that does not exist."""


def one_line(message: object) -> str:
    """``message`` as one line: its lines joined with "; " (blank lines dropped), so a
    multi-line message from a library still prints as one error line."""
    parts = [p.strip() for p in str(message).splitlines() if p.strip()]
    return "; ".join(parts) if parts else type(message).__name__ if isinstance(message, BaseException) else ""
