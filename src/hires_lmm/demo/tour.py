"""``hires demo --tour``: how every method looks at one large image.

Plans the bundled 1600×1200 image (small print a 336-px view cannot read) for every method, prints
the plans and their cost, and draws each plan to ``OUT/plan-<method>.png``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from ..plan import METHODS, plan_image

ASSET = Path(__file__).parent.parent / "assets" / "demo.png"


def make_demo_image(size: tuple[int, int] = (1600, 1200), seed: int = 0) -> Image.Image:
    """A deterministic 'poster': large shapes and a headline, plus small print (8-12 px text)
    that disappears when the image is shrunk to 336 px."""
    rng = random.Random(seed)
    W, H = size
    img = Image.new("RGB", size, (238, 232, 220))
    d = ImageDraw.Draw(img)
    for y in range(H):  # soft vertical gradient
        c = int(238 - 40 * y / H)
        d.line([(0, y), (W, y)], fill=(c, c - 4, c - 16))
    for _ in range(12):
        x, y, r = rng.randrange(W), rng.randrange(H), rng.randrange(40, 160)
        d.ellipse((x - r, y - r, x + r, y + r), fill=tuple(rng.randrange(60, 220) for _ in range(3)))
    big = ImageFont.load_default(size=96)
    d.text((80, 60), "FINE DETAIL", fill=(20, 20, 40), font=big)
    for size_px, (x0, y0) in ((12, (90, 900)), (10, (900, 960)), (8, (1250, 300))):
        font = ImageFont.load_default(size=size_px)
        d.rectangle((x0 - 8, y0 - 8, x0 + 300, y0 + 8 * size_px + 8), fill=(255, 255, 255))
        for i in range(6):
            code = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(6))
            d.text((x0, y0 + i * (size_px + 3)), f"item {i + 1}: code {code}  qty {rng.randrange(1, 99)}",
                   fill=(0, 0, 0), font=font)
    return img


def run_tour(out: Path, quick: bool = False) -> None:
    from ..image import load_image
    from ..image.overlay import draw_plan
    from ..plan.cost import plan_cost
    from ..plan.format import format_plan

    out.mkdir(parents=True, exist_ok=True)
    img = load_image(ASSET) if ASSET.exists() else make_demo_image()
    print(f"Bundled image {ASSET.name}: {img.size[0]}x{img.size[1]}; its small print is 8-12 px tall.\n")
    rows = []
    for m in METHODS:
        plan = plan_image(m, img.size)
        print(format_plan(plan) + "\n")
        rep = plan_cost(plan, llm_params=7e9)
        rows.append((m, len(plan.views), plan.num_visual_tokens, rep.vision_flops / 1e12, rep.total_flops / 1e12))
        if not quick or m in ("llava-uhd", "inf-llava"):
            draw_plan(img, plan).save(out / f"plan-{m}.png")
    print(f"{'method':<16} {'views':>5} {'visual tokens':>14} {'vision TFLOPs':>14} {'total TFLOPs (7B)':>18}")
    for m, nv, nt, vf, tf in rows:
        print(f"{m:<16} {nv:>5} {nt:>14} {vf:>14.2f} {tf:>18.2f}")
    (out / "plans.json").write_text(json.dumps([plan_image(m, img.size).to_json() for m in METHODS], indent=1))
    print(f"\nPictures of each plan: {out}/plan-<method>.png; plans as JSON: {out}/plans.json")
