"""The views stage: every planner of :data:`hires_lmm.plan.PLANNERS` is a views part.

Options are the planner's keyword arguments (checked against its signature, so a planner option
added in :mod:`hires_lmm.plan` — a budget, a resolution — is an option here at once; defaults stay
written once, in the planner). The part also says which *structure* of views the planner makes,
the fact later stages check (a newline layout needs a base view and a tile grid, …).
"""

from __future__ import annotations

from ..plan import PLANNERS
from ..plan.uhd import plan_llava_uhd
from .registry import register_part
from .stages import ViewsPart

#: planner → structure of its views (a planner added later and not listed is "other": only the
#: flat layout, which concatenates whatever it gets, accepts it)
STRUCTURES: dict[str, str] = {
    "llava-1.5": "single",            # one padded square
    "llava-next": "base+tiles",       # whole-image view, then a grid of 336 tiles (row-major)
    "slime": "base+tiles",            # the same structure: global view, then local tiles
    "llava-uhd": "slices+overview",   # variable-sized slices (with separators), overview last
    "llava-uhd-arxiv": "slices+overview",
    "llava-hr": "dual-res",           # a high-resolution square for ConvNeXt + its low-res view
    "inf-llava": "inf-crops",         # n² contiguous + n² strided crops + thumbnail
}

#: planners that are wrappers fixing an argument of another one (their options are the rest)
_SIGNATURES = {"llava-uhd-arxiv": (plan_llava_uhd, {"arxiv": True})}


def _register(name: str) -> None:
    sig, fixed = _SIGNATURES.get(name, (PLANNERS[name], {}))
    cls = type(f"Views[{name}]", (ViewsPart,), {
        "__doc__": f"The {name} planner ({PLANNERS[name].__module__}).",
        "name": name, "planner": staticmethod(PLANNERS[name]), "signature": staticmethod(sig), "fixed": fixed,
        "gives": {"structure": STRUCTURES.get(name, "other")}})
    register_part(cls)


for _name in PLANNERS:
    _register(_name)
