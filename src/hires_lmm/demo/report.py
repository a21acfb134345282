"""The demo's additions to the comparison's outputs (:mod:`hires_lmm.compare.report`): the task
and encoder pretraining in ``results.json`` / ``results.md``, and each method's plan drawn over one
held-out image (``plan-<method>.png``)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..compare.report import FIGURE, format_table

__all__ = ["write_demo_report"]


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


def write_demo_report(out: Path, cfg: Any, meta: dict[str, Any], encoders: dict[str, Any], results: dict[str, Any],
                      *, pretrain_s: float, total_s: float) -> None:
    """Add the demo's settings, encoders and timings to ``results.json`` and write its
    ``results.md`` (task, the comparison's table and figure, plan overlays)."""
    overlays = _overlays(out, list(cfg.methods))
    results.update(demo={"config": asdict(cfg), "encoders": encoders, "pretrain_seconds": pretrain_s,
                         "total_seconds": total_s, "counts": meta["counts"]}, overlays=overlays)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    n_train, n_test = meta["counts"]["train"], meta["counts"]["test"]
    md = ["# Demo results\n",
          f"Synthetic fine-detail task ({', '.join(cfg.tasks)}): {n_train} training / {n_test} held-out images "
          f"of {', '.join(f'{w}x{h}' for w, h in cfg.sizes)} px. Every method: the same pretrained tiny "
          f"encoders (frozen), a fresh tiny LLM, {cfg.steps} steps of batch {cfg.batch_size} at lr {cfg.lr} "
          f"(seed {cfg.seed}).\n",
          format_table(results), "",
          "Visual tokens: the mean per training sample. TFLOPs per image: the cost model (`hires cost`) with "
          "full-size encoders (CLIP ViT-L/14, ConvNeXt-L) and a 7B LLM, for the same plans, averaged over the "
          "held-out images. * marks the Pareto front.", "",
          f"Encoder pretraining (shared, once): {pretrain_s:.0f} s. Whole run: {total_s / 60:.1f} min on "
          f"{results['machine']}.", ""]
    if results.get("figure"):
        md.append(f"![accuracy against TFLOPs per image]({FIGURE})")
    else:
        md.append("No figure: matplotlib is not installed (`pip install matplotlib`).")
    md += [""] + [f"![{f}]({f})" for f in overlays]
    (out / "results.md").write_text("\n".join(md) + "\n")
    print(f"encoder pretraining {pretrain_s:.0f}s; whole demo {total_s / 60:.1f} min on {results['machine']}")
    print(f"wrote {out}/results.md, results.json and {len(overlays)} plan overlays")
