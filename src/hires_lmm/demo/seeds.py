"""``hires demo --seeds 0,1,2``: the whole demo at each seed, and whether high resolution pays at
every one of them.

A demo seed is more than a training seed (``hires compare --seeds`` varies only that): it draws
new images, pretrains new encoders and trains new models. Seed ``S`` runs into ``OUT/seed-S``
(each cached and resumable as a single demo is), then ``OUT/seeds.json`` and ``OUT/seeds.md``
hold every method's accuracy per seed, its mean ± spread, and its margin over llava-1.5 at the
same seed; the claim checked is the one of docs/results.md: every high-resolution method at least
``margin`` points above llava-1.5 at every seed, with llava-1.5 at chance.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import HiresError
from .run import DemoConfig, run_demo

__all__ = ["BASELINE", "MARGIN", "SeedsError", "format_seeds_table", "run_demo_seeds", "summarize_seeds"]

#: the method every high-resolution method is measured against
BASELINE = "llava-1.5"
#: points above the baseline that count as "high resolution pays" (issue 18)
MARGIN = 30.0
#: how far from chance (points) the baseline may be and still count as "at chance": one held-out
#: answer of the demo's 240 is 0.4 points
CHANCE_TOLERANCE = 1.0


class SeedsError(HiresError, ValueError):
    """The seeds asked for cannot be run: none, or one twice."""


def summarize_seeds(per_seed: Mapping[int, Mapping[str, Any]], *, baseline: str = BASELINE,
                    margin: float = MARGIN) -> dict[str, Any]:
    """Each method over the demo seeds, from each seed's ``results.json`` (``per_seed``: seed →
    :func:`~hires_lmm.demo.run.run_demo`'s result).

    Returns ``{"seeds": [...], "methods": {name: {"accuracy_per_seed": {seed: %}, "accuracy": mean,
    "accuracy_spread": sample sd (0 for one seed), "accuracy_min", "margin_per_seed": {seed: points
    above the baseline}, "margin_min", "visual_tokens", "tflops"}}, "baseline", "margin", "chance",
    "baseline_at_chance", "holds": every other method ≥ baseline + margin at every seed (and the
    baseline at chance; None when the baseline was not run, so there is no claim to check),
    "weakest": (method, seed, margin) of the smallest margin}``.
    """
    if not per_seed:
        raise ValueError("no seeds to summarise")
    seeds = sorted(per_seed)
    names = list(per_seed[seeds[0]]["methods"])
    chance = per_seed[seeds[0]].get("chance")
    methods: dict[str, dict[str, Any]] = {}
    for name in names:
        accs = {str(s): float(per_seed[s]["methods"][name]["accuracy"]) for s in seeds}
        rows = [per_seed[s]["methods"][name] for s in seeds]
        methods[name] = {
            "accuracy_per_seed": accs, "accuracy": statistics.fmean(accs.values()),
            "accuracy_spread": statistics.stdev(accs.values()) if len(accs) > 1 else 0.0,
            "accuracy_min": min(accs.values()),
            "visual_tokens": statistics.fmean(float(r["visual_tokens"]) for r in rows),
            "tflops": statistics.fmean(float(r["tflops"]) for r in rows)}
    weakest: tuple[str, int, float] | None = None
    if baseline in methods:
        base = methods[baseline]["accuracy_per_seed"]
        for name, m in methods.items():
            if name == baseline:
                continue
            m["margin_per_seed"] = {s: acc - base[s] for s, acc in m["accuracy_per_seed"].items()}
            low = min(m["margin_per_seed"].items(), key=lambda kv: kv[1])
            m["margin_min"] = low[1]
            if weakest is None or low[1] < weakest[2]:
                weakest = (name, int(low[0]), low[1])
    at_chance = (baseline in methods and chance is not None
                 and all(abs(a - chance) <= CHANCE_TOLERANCE for a in methods[baseline]["accuracy_per_seed"].values()))
    holds = bool(at_chance and weakest is not None and weakest[2] >= margin) if baseline in methods else None
    return {"seeds": seeds, "methods": methods, "baseline": baseline, "margin": margin, "chance": chance,
            "baseline_at_chance": at_chance, "holds": holds,
            "weakest": None if weakest is None else {"method": weakest[0], "seed": weakest[1], "margin": weakest[2]}}


def format_seeds_table(summary: Mapping[str, Any]) -> str:
    """The summary as Markdown: one row per method, a column per seed, mean ± sd and the smallest
    margin over the baseline; then one line saying whether the claim holds."""
    seeds = summary["seeds"]
    head = ["method", "visual tokens / image", "TFLOPs / image", *(f"seed {s}" for s in seeds), "mean ± sd",
            f"min over {summary['baseline']}"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for name, m in summary["methods"].items():
        cells = [name, f"{m['visual_tokens']:.0f}", f"{m['tflops']:.2f}",
                 *(f"{m['accuracy_per_seed'][str(s)]:.1f} %" for s in seeds),
                 f"{m['accuracy']:.1f} ± {m['accuracy_spread']:.1f}",
                 f"{m['margin_min']:+.1f}" if "margin_min" in m else ""]
        lines.append("| " + " | ".join(cells) + " |")
    if summary.get("chance") is not None:
        chance = f"{summary['chance']:.1f} %"
        lines.append("| *chance* | | | " + " | ".join(chance for _ in seeds) + " | | |")
    w = summary.get("weakest")
    if summary["holds"] is None:
        lines += ["", f"{summary['baseline']} was not run: no margins to check."]
        return "\n".join(lines)
    verdict = "yes" if summary["holds"] else "no"
    lines += ["", f"Every method ≥ {summary['baseline']} + {summary['margin']:g} points at every seed, "
                  f"{summary['baseline']} at chance: **{verdict}**"
              + (f" (smallest margin: {w['method']} at seed {w['seed']}, {w['margin']:+.1f})" if w else "")
              + ("" if summary["baseline_at_chance"] else f"; {summary['baseline']} is not at chance") + "."]
    return "\n".join(lines)


def run_demo_seeds(out: str | Path, seeds: Sequence[int], config: DemoConfig | None = None, *, fresh: bool = False,
                   progress: bool = True) -> dict[str, Any]:
    """Run the demo at each of ``seeds`` into ``OUT/seed-S`` (data, encoders and models of its
    own; finished stages are reused unless ``fresh``), then write ``OUT/seeds.json`` and
    ``OUT/seeds.md`` (:func:`summarize_seeds`) and print the table; returns the summary.

    Raises :class:`SeedsError` (before running anything) when ``seeds`` is empty or repeats one."""
    if not seeds or len(set(seeds)) != len(seeds):
        raise SeedsError(f"seeds: each seed once and at least one, got {','.join(map(str, seeds)) or 'none'}")
    cfg = config or DemoConfig()
    out = Path(out)
    per_seed = {}
    for s in seeds:
        per_seed[s] = run_demo(out / f"seed-{s}", config=replace(cfg, seed=s), fresh=fresh, progress=progress)
    summary = summarize_seeds(per_seed)
    table = format_seeds_table(summary)
    out.mkdir(parents=True, exist_ok=True)
    (out / "seeds.json").write_text(json.dumps(summary, indent=1))
    (out / "seeds.md").write_text(
        f"# The demo at seeds {', '.join(map(str, seeds))}\n\nEach seed: new data, new encoders, new models "
        f"(`OUT/seed-S/results.md`); {cfg.steps} steps of batch {cfg.batch_size} per method.\n\n{table}\n")
    print(table)
    return summary
