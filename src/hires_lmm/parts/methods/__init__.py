"""The seven presets, one module per method family; importing this package registers their parts
and specs (the order fixes the order of ``hires methods`` and of :data:`METHOD_SPECS`)."""

from __future__ import annotations

# the order is the presets' order in hires_lmm.plan.METHODS
# isort: off
from . import llava, uhd, hr, inf, slime  # noqa: F401
# isort: on
