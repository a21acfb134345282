"""The comparison's figure: accuracy against TFLOPs per image (log scale), drawn with matplotlib.

One point per method and budget (with the spread over seeds as an error bar), a method at two or
more budgets as a curve, the Pareto front (no other point is cheaper and at least as accurate) as a
dashed step line, and chance as a dotted line when known. matplotlib is an optional extra: without
it :func:`plot_accuracy_tflops` says so and draws nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["COLOURS", "colour_of", "figure_series", "have_matplotlib", "plot_accuracy_tflops"]

#: one colour per method, the same in every figure (matplotlib's tab10)
COLOURS = {"llava-1.5": "#7f7f7f", "llava-next": "#1f77b4", "llava-uhd": "#d62728", "llava-uhd-arxiv": "#e377c2",
           "llava-hr": "#2ca02c", "inf-llava": "#9467bd", "slime": "#ff7f0e"}
#: colours of the other methods (method files), in order of appearance (tab10's rest, then tab20's)
_MORE = ("#8c564b", "#bcbd22", "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173")


def colour_of(method: str, others: Sequence[str] = ()) -> str:
    """A preset's colour, or the ``others.index(method)``-th spare one (black beyond them)."""
    if method in COLOURS:
        return COLOURS[method]
    i = list(others).index(method) if method in others else -1
    return _MORE[i] if 0 <= i < len(_MORE) else "#000000"


def figure_series(methods: dict[str, dict[str, Any]]) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """The figure's data: method → its points ``(results key, entry)`` ordered by TFLOPs; a method
    at two or more budgets has as many points (drawn as a curve)."""
    by_method: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for key, m in methods.items():
        by_method.setdefault(m["method"], []).append((key, m))
    for entries in by_method.values():
        entries.sort(key=lambda e: e[1]["tflops"])
    return by_method


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_accuracy_tflops(methods: dict[str, dict[str, Any]], pareto: Sequence[str], path: str | Path, *,
                         chance: float | None = None, title: str | None = None) -> bool:
    """Draw ``methods`` (``results.json``'s entries) into ``path``; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display on a server
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    by_method = figure_series(methods)
    others = [m for m in by_method if m not in COLOURS]
    for method, entries in by_method.items():
        c = colour_of(method, others)
        xs = [m["tflops"] for _, m in entries]
        ys = [m["accuracy"] for _, m in entries]
        err = [m.get("accuracy_spread", 0.0) for _, m in entries]
        ax.errorbar(xs, ys, yerr=err if any(err) else None, fmt="-o" if len(entries) > 1 else "o", color=c,
                    markersize=8, markeredgecolor="black", capsize=4, label=method, zorder=3)
        for key, m in entries:
            text = key if len(entries) == 1 else f"≤{m['max_visual_tokens']}"
            ax.annotate(text, (m["tflops"], m["accuracy"]), textcoords="offset points", xytext=(7, 6), color=c,
                        fontsize=9)
    front = [methods[k] for k in pareto if k in methods]
    if len(front) > 1:
        ax.step([m["tflops"] for m in front], [m["accuracy"] for m in front], where="post", linestyle="--",
                color="black", linewidth=1, label="Pareto front", zorder=2)
    elif front:
        ax.plot([front[0]["tflops"]], [front[0]["accuracy"]], "s", mfc="none", mec="black", markersize=14,
                label="Pareto front", zorder=2)
    if chance is not None:
        ax.axhline(chance, linestyle=":", color="#888888", label=f"chance ({chance:.1f} %)")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, NullFormatter

    xs_all = [m["tflops"] for m in methods.values()]
    ax.set_xlim(min(xs_all) / 1.25, max(xs_all) * 1.25)  # room for the labels at both ends
    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 8.5, not 8.5x10^0
    ax.xaxis.set_major_formatter(plain)
    # within one decade the minor ticks are the only ones: label them too
    ax.xaxis.set_minor_formatter(plain if max(xs_all) / min(xs_all) < 20 else NullFormatter())
    ax.set_xlabel("TFLOPs per image (cost model)")
    ax.set_ylabel("accuracy (%)")
    lo = min(0.0, min(m["accuracy"] - m.get("accuracy_spread", 0.0) for m in methods.values()))
    ax.set_ylim(lo, 105)
    ax.grid(True, which="both", alpha=0.3)
    ax.set_title(title or "Held-out accuracy against compute per image")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True
