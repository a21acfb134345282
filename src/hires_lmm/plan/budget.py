"""One visual-token budget for every planner: ``max_visual_tokens``.

Each planner takes ``max_visual_tokens=B`` and picks its largest *faithful* configuration whose
planned token count is at most ``B`` (the knob the reference code itself has: LLaVA-UHD's slice
limit, LLaVA-NeXT's grid pinpoints, SliME's tile cap, LLaVA-HR's input side S; LLaVA-1.5 and
INF-LLaVA have one fixed count). When no configuration fits, it raises :class:`BudgetError`,
whose one-line message names the method, the budget and the smallest count it could plan.

The budget only ever lowers a configuration, never raises it: with ``B`` at least the unbudgeted
count the plan is the unbudgeted one, bit for bit, plus two keys in ``extra`` recording the budget
(``max_visual_tokens``) and what it chose (``budget_choice``). Without a budget (``None``) nothing
at all changes. See docs/methods.md, "Visual-token budget".

No torch is imported here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import HiresError
from .types import Plan, Size

__all__ = ["BUDGET_KEYS", "BudgetError", "check_budget", "fit_budget", "parse_budget", "record_budget", "refuse"]

#: the keys a budget adds to :attr:`Plan.extra` (and to ``Plan.to_json()``)
BUDGET_KEYS: tuple[str, ...] = ("max_visual_tokens", "budget_choice")


class BudgetError(HiresError, ValueError):
    """No faithful plan of a method fits the visual-token budget, or the budget is not a positive
    integer. The message is one line; for a refusal it names the method, the budget and the
    smallest count the method can plan for that image."""


def check_budget(budget: object) -> int:
    """``budget`` as a positive ``int``; a :class:`BudgetError` otherwise (bools are refused:
    ``True`` is an int to Python but never a meant token count)."""
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise BudgetError(f"max_visual_tokens must be a positive integer, got {budget!r}")
    return int(budget)


def parse_budget(text: str) -> int:
    """``--max-visual-tokens B`` of every command (an argparse ``type``): a positive integer, or
    ``argparse.ArgumentTypeError``, which argparse prints as one usage line."""
    import argparse

    try:
        return check_budget(int(text))
    except (ValueError, BudgetError):
        raise argparse.ArgumentTypeError(f"must be a positive integer (a visual-token count), got {text!r}") from None


def record_budget(plan: Plan, budget: int, choice: dict[str, Any]) -> Plan:
    """``plan`` with the budget and the configuration it led to recorded in ``extra``."""
    return dataclasses.replace(plan, extra={**plan.extra, "max_visual_tokens": budget, "budget_choice": dict(choice)})


def refuse(method: str, size: Size, budget: int, smallest: int, how: str) -> BudgetError:
    """The refusal: ``how`` says which configuration gives ``smallest`` tokens (e.g. ``"S=384"``)."""
    w, h = size
    return BudgetError(f"{method} cannot plan a {w}x{h} image within max_visual_tokens={budget}: "
                       f"its smallest plan has {smallest} visual tokens ({how})")


def fit_budget(method: str, size: Size, budget: int,
               options: Iterable[tuple[dict[str, Any], Callable[[], Plan]]]) -> Plan:
    """The first plan of ``options`` (ordered from the largest configuration down) whose token
    count is within ``budget``, recorded with its choice; else the refusal naming the smallest.

    Each option is ``(choice, make_plan)``; plans are made lazily so the search stops at the
    first fit (the common case, a budget above the unbudgeted count, costs one plan).
    """
    smallest: tuple[int, dict[str, Any]] | None = None
    for choice, make in options:
        plan = make()
        if plan.num_visual_tokens <= budget:
            return record_budget(plan, budget, choice)
        if smallest is None or plan.num_visual_tokens < smallest[0]:
            smallest = (plan.num_visual_tokens, choice)
    if smallest is None:  # pragma: no cover - every planner offers at least one configuration
        raise BudgetError(f"{method}: no configuration to plan within max_visual_tokens={budget}")
    how = ", ".join(f"{k}={v}" for k, v in smallest[1].items()) or "its only configuration"
    raise refuse(method, size, budget, smallest[0], how)
