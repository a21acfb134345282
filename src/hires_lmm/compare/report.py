"""The comparison's outputs: ``results.json``, ``results.md`` (the table) and the figure."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

from .figure import plot_accuracy_tflops

__all__ = ["FIGURE", "format_table", "machine", "write_report"]

FIGURE = "accuracy-tflops.png"


def machine() -> str:
    """The CPU, cores usable, torch version and threads (what timings depend on)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ""
    return f"{cpu}, {n} cores usable{gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def format_table(results: dict[str, Any]) -> str:
    """The table as Markdown: one row per method and budget, accuracy as mean ± spread over seeds."""
    methods = results["methods"]
    n_seeds = max(len(m["seeds"]) for m in methods.values())
    margins = results.get("margin_over_llava15") or {}
    head = ["method", "visual tokens / image", "TFLOPs / image", "training time", "accuracy"]
    if n_seeds > 1:
        head[-1] = f"accuracy (mean ± sd, {n_seeds} seeds)"
        head.append("per seed")
    if margins:
        head.append("over llava-1.5 (mean / min)")
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    pareto = set(results.get("pareto", ()))
    for key, m in methods.items():
        acc = f"{m['accuracy']:.1f} %" + (f" ± {m['accuracy_spread']:.1f}" if n_seeds > 1 else "")
        cells = [key + (" *" if key in pareto else ""), f"{m['visual_tokens']:.0f}", f"{m['tflops']:.2f}",
                 f"{m['train_seconds']:.0f} s", acc]
        if n_seeds > 1:
            cells.append(", ".join(f"{a:.1f}" for a in m["accuracy_per_seed"].values()))
        if margins:
            d = margins.get(key)
            cells.append(f"{d['mean']:+.1f} / {d['min']:+.1f}" if d else "")
        lines.append("| " + " | ".join(cells) + " |")
    if results.get("chance") is not None:
        cells = ["*chance*", "", "", "", f"{results['chance']:.1f} %"] + [""] * (len(head) - 5)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(out: Path, results: dict[str, Any]) -> None:
    """Write ``results.json``, ``results.md`` and the figure into ``out``; print the table."""
    results.setdefault("machine", machine())
    drawn = plot_accuracy_tflops(results["methods"], results["pareto"], out / FIGURE, chance=results.get("chance"))
    results["figure"] = FIGURE if drawn else None
    (out / "results.json").write_text(json.dumps(results, indent=1))
    s = results["settings"]
    table = format_table(results)
    budget = f"{s['steps']} steps of batch {s['batch_size']}" + (f" at lr {s['lr']:g}" if s["lr"] else "")
    align = (f" after {s['align_steps']} steps of the method's first paper stage"
             + (f" on {s['align_data_path']}" if s["align_data_path"] else "") if s["align_steps"] else "")
    md = ["# Comparison\n",
          f"Data {s['data_path']} (images in {s['image_folder']}), scored with `{s['metric']}` on "
          f"{s['question_file']}. Every method: {'tiny models' if s['tiny'] else 'the given encoders and LLM'}, "
          f"stage `{s['stage']}`, {budget}{align}; seeds {', '.join(map(str, s['seeds']))}.\n",
          table, "",
          "Visual tokens: the mean per training sample, measured by the trainer. TFLOPs: the cost model "
          f"(`hires cost`) of each held-out image's plan, averaged ({s['cost_model']}). * marks the Pareto front.",
          f"Machine: {results['machine']}.", ""]
    if drawn:
        md.append(f"![accuracy against TFLOPs per image]({FIGURE})")
    else:
        md.append("No figure: matplotlib is not installed (`pip install matplotlib`).")
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n" + table + "\n")
    if not drawn:
        print("no figure: matplotlib is not installed (pip install matplotlib); results.json and results.md "
              "are written", file=sys.stderr)
    print(f"wrote {out}/results.json, results.md" + (f" and {FIGURE}" if drawn else ""))
