"""The readable table of a plan (``hires plan`` and ``hires demo --tour``): pure text, no torch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .types import Plan, TokenGroup


def _fmt_box(box: Sequence[float] | None) -> str:
    if box is None:
        return "-"
    return "[" + ", ".join(f"{v:g}" if float(v).is_integer() else f"{v:.1f}" for v in box) + "]"


def format_plan(plan: Plan) -> str:
    """A readable table of a plan."""
    grid = "x".join(map(str, plan.grid)) if plan.grid else "-"
    seps = " ".join(repr(s)[1:-1] for s in plan.separators) or "-"
    w, h = plan.image_size
    lines = [f"{plan.method}  image {w}x{h}  grid {grid}  views {len(plan.views)}  "
             f"visual tokens {plan.num_visual_tokens}" + (" (upper bound)" if plan.extra.get("bound") else "")
             + format_budget(plan.extra),
             f"  separators: {seps}",
             f"  {'#':>3}  {'role':<10} {'size':<11} {'cell':<6} source box / stride"]
    for i, v in enumerate(plan.views):
        cell = f"{v.cell[0]},{v.cell[1]}" if v.cell else "-"
        where = (f"rows {v.stride[2]}::{v.stride[0]}, cols {v.stride[1]}::{v.stride[0]} of the {plan.canvases[v.canvas].size[0]}"
                 f"x{plan.canvases[v.canvas].size[1]} canvas") if v.stride else _fmt_box(v.box)
        lines.append(f"  {i:>3}  {v.role:<10} {v.size[0]}x{v.size[1]:<{10 - len(str(v.size[0]))}} {cell:<6} {where}")
    lines.append("  tokens: " + " + ".join(f"{g.count} {g.source}" for g in _merge_groups(plan)))
    return "\n".join(lines)


def format_budget(extra: dict[str, Any]) -> str:
    """``  budget B (choice)`` for a plan made under a budget, else nothing."""
    if "max_visual_tokens" not in extra:
        return ""
    choice = ", ".join(f"{k}={'; '.join('x'.join(map(str, p)) for p in v) if k == 'pinpoints' else v}"
                       for k, v in extra.get("budget_choice", {}).items())
    return f"  budget {extra['max_visual_tokens']}" + (f" ({choice})" if choice else "")


def _merge_groups(plan: Plan) -> list[TokenGroup]:
    merged: dict[str, int] = {}
    for g in plan.tokens:
        key = g.source.split(" ")[0] if g.source.startswith(("slice", "separator")) else g.source
        merged[key] = merged.get(key, 0) + g.count
    return [TokenGroup(k, v) for k, v in merged.items()]
