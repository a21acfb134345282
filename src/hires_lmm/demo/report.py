"""The demo's outputs: the printed table, ``results.json``, ``results.md``, ``accuracy.png``
(accuracy against visual tokens) and plan overlays of one held-out image."""

from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from ..image.overlay import _font

__all__ = ["format_table", "plot_accuracy", "write_report"]

_COLOURS = {"llava-1.5": (120, 120, 120), "llava-next": (31, 119, 180), "llava-uhd": (214, 39, 40),
            "llava-hr": (44, 160, 44), "inf-llava": (148, 103, 189), "slime": (255, 127, 14)}


def format_table(rows: list[dict[str, Any]], chance: float) -> str:
    """The paper-style table as Markdown."""
    lines = ["| method | visual tokens / image | vision GFLOPs / image (ViT-L) | training time | accuracy |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['visual_tokens']:.0f} | {r['vision_gflops']:.0f} | "
                     f"{r['train_s']:.0f} s | {100 * r['accuracy']:.1f} % |")
    lines.append(f"| *chance* | | | | {100 * chance:.1f} % |")
    return "\n".join(lines)


def plot_accuracy(rows: list[dict[str, Any]], chance: float, path: Path, size: tuple[int, int] = (900, 560)) -> None:
    """Accuracy (%) against visual tokens per image (log scale), one labelled point per method,
    chance as a dashed line. Drawn with PIL (no plotting dependency)."""
    W, H = size
    left, right, top, bottom = 80, 40, 50, 70
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    font, small = _font(16), _font(13)
    toks = [max(1.0, r["visual_tokens"]) for r in rows]
    lo = 10 ** math.floor(math.log10(min(toks)) - 0.05)
    hi = 10 ** math.ceil(math.log10(max(toks)) + 0.05)

    def px(t: float, acc: float) -> tuple[float, float]:
        x = left + (math.log10(t) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * (W - left - right)
        y = H - bottom - acc / 100 * (H - top - bottom)
        return x, y

    d.rectangle([left, top, W - right, H - bottom], outline=(0, 0, 0))
    for acc in range(0, 101, 20):
        _, y = px(lo, acc)
        d.line([left - 5, y, left, y], fill=(0, 0, 0))
        d.line([left, y, W - right, y], fill=(235, 235, 235))
        d.text((left - 10, y), f"{acc}", fill=(0, 0, 0), font=small, anchor="rm")
    t = lo
    while t <= hi * 1.001:
        for k in (1, 2, 5):
            v = t * k
            if lo <= v <= hi:
                x, _ = px(v, 0)
                d.line([x, H - bottom, x, H - bottom + 5], fill=(0, 0, 0))
                d.text((x, H - bottom + 8), f"{v:g}", fill=(0, 0, 0), font=small, anchor="mt")
        t *= 10
    _, yc = px(lo, 100 * chance)
    x = left
    while x < W - right:                                         # dashed chance line
        d.line([x, yc, min(x + 8, W - right), yc], fill=(150, 150, 150), width=2)
        x += 14
    d.text((W - right - 4, yc - 4), "chance", fill=(120, 120, 120), font=small, anchor="rb")
    placed: list[tuple[float, float]] = []
    for r, t in zip(rows, toks):
        x, y = px(t, 100 * r["accuracy"])
        c = _COLOURS.get(r["method"], (0, 0, 0))
        d.ellipse([x - 7, y - 7, x + 7, y + 7], fill=c, outline=(0, 0, 0))
        ly = y - 10
        while any(abs(ly - py) < 18 and abs(x - px_) < 120 for px_, py in placed):  # labels of close points stack
            ly += 18
        placed.append((x, ly))
        d.text((x + 10, ly), r["method"], fill=c, font=font, anchor="lb")
    d.text((W / 2, 12), "Held-out accuracy against visual tokens per image", fill=(0, 0, 0), font=font, anchor="mt")
    d.text((W / 2, H - 22), "visual tokens per image (log scale)", fill=(0, 0, 0), font=small, anchor="mt")
    d.text((left, top - 6), "accuracy (%)", fill=(0, 0, 0), font=small, anchor="lb")
    img.save(path)


def _machine() -> str:
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
    return f"{cpu}, {n} cores usable, torch {torch.__version__}, {torch.get_num_threads()} threads"


def _overlays(out: Path, methods: list[str]) -> list[str]:
    """Each method's plan drawn over the first held-out image."""
    from ..image import load_image
    from ..image.overlay import draw_plan
    from ..methods import PRESETS
    from ..plan import plan_image

    data = out / "data"
    q = json.loads((data / "test" / "questions.jsonl").read_text().splitlines()[0])
    img = load_image(data / "images" / q["image"])
    files = []
    for m in methods:
        name = f"plan-{m}.png"
        draw_plan(img, plan_image(m, img.size, **PRESETS[m].plan_options), width=900).save(out / name)
        files.append(name)
    return files


def write_report(out: Path, cfg: Any, meta: dict[str, Any], encoders: dict[str, Any], rows: list[dict[str, Any]],
                 *, pretrain_s: float, total_s: float) -> None:
    """Print the table and write ``results.json``, ``results.md``, ``accuracy.png`` and overlays."""
    from dataclasses import asdict

    chance = 1 / len(meta["answers"][cfg.tasks[0]])
    table = format_table(rows, chance)
    plot_accuracy(rows, chance, out / "accuracy.png")
    overlays = _overlays(out, list(cfg.methods))
    machine = _machine()
    base = next((r["accuracy"] for r in rows if r["method"] == "llava-1.5"), None)
    summary = {"config": asdict(cfg), "machine": machine, "chance": chance, "pretrain_s": pretrain_s,
               "total_s": total_s, "encoders": encoders, "rows": rows,
               "margin_over_llava15": {r["method"]: r["accuracy"] - base for r in rows
                                       if base is not None and r["method"] != "llava-1.5"}}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    n_train, n_test = meta["counts"]["train"], meta["counts"]["test"]
    md = [f"# Demo results\n",
          f"Synthetic fine-detail task ({', '.join(cfg.tasks)}): {n_train} training / {n_test} held-out images "
          f"of {', '.join(f'{w}x{h}' for w, h in cfg.sizes)} px. Every method: the same pretrained tiny "
          f"encoders (frozen), a fresh tiny LLM, {cfg.steps} steps of batch {cfg.batch_size} at lr {cfg.lr}.\n",
          table, "",
          f"Encoder pretraining (shared, once): {pretrain_s:.0f} s. Whole run: {total_s / 60:.1f} min on {machine}.",
          "", "![accuracy against visual tokens](accuracy.png)", ""]
    md += [f"![{f}]({f})" for f in overlays]
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n" + table + "\n")
    print(f"encoder pretraining {pretrain_s:.0f}s; whole demo {total_s / 60:.1f} min on {machine}")
    print(f"wrote {out}/results.md, results.json, accuracy.png and {len(overlays)} plan overlays")
