"""View planning: pure geometry saying how each method looks at an image of a given size.

>>> from hires_lmm.plan import plan_image
>>> p = plan_image("llava-uhd", (672, 1088))
>>> p.grid, p.views[0].size, p.views[-1].size, p.num_visual_tokens
((2, 3), (322, 336), (252, 420), 1014)

No torch is imported here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .anyres import NEXT_PINPOINTS, plan_llava_next, select_best_resolution
from .budget import BudgetError
from .common import check_size, parse_size
from .hr import plan_llava_hr
from .inf import plan_inf_llava
from .llava15 import plan_llava15
from .slime import plan_slime
from .types import Canvas, Plan, Size, TokenGroup, View
from .uhd import plan_llava_uhd


def _uhd_arxiv(size: Size, **kw: Any) -> Plan:
    return plan_llava_uhd(size, arxiv=True, **kw)


#: method name → planner(size, **options)
PLANNERS: dict[str, Callable[..., Plan]] = {
    "llava-1.5": plan_llava15,
    "llava-next": plan_llava_next,
    "llava-uhd": plan_llava_uhd,
    "llava-uhd-arxiv": _uhd_arxiv,
    "llava-hr": plan_llava_hr,
    "inf-llava": plan_inf_llava,
    "slime": plan_slime,
}

METHODS: tuple[str, ...] = tuple(PLANNERS)


def plan_image(method: str, size: Size, **options: Any) -> Plan:
    """Plan how ``method`` looks at an image of ``size = (w, h)``.

    ``options`` are the planner's keyword arguments (e.g. ``S=1536`` for LLaVA-HR,
    ``prescale_long_side=1024`` for LLaVA-UHD). Every planner takes ``max_visual_tokens=B``: the
    largest faithful configuration planning at most B visual tokens, or a :class:`BudgetError`
    naming the method, the budget and the smallest count possible (see ``plan/budget.py``).

    >>> plan_image("llava-hr", (800, 600), max_visual_tokens=1000).extra["budget_choice"]
    {'S': 768}
    """
    try:
        planner = PLANNERS[method]
    except KeyError:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}") from None
    return planner(size, **options)


__all__ = ["METHODS", "BudgetError", "NEXT_PINPOINTS", "PLANNERS", "Canvas", "Plan", "Size", "TokenGroup", "View",
           "check_size", "parse_size", "plan_image", "select_best_resolution"]
