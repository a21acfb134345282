"""Stage 0 of the demo: tiny encoders pretrained from scratch on the synthetic task's cell labels.

Every method then starts from the same encoders, as every paper starts from the same CLIP. The
crops are taken at the scales the methods' own views see the image at (from their plans), so the
encoder learns the texture as the high-resolution views present it; views that shrink the image
(LLaVA-1.5's 336 view, every global/overview view) cannot show the texture and are left out,
since a label there could only be learned from the plate, which carries no answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data import synth
from ..image.render import CLIP_MEAN, CLIP_STD
from ..plan import plan_image
from ..plan.types import Plan, View
from ..train.dense import cell_labels

__all__ = ["SynthCrops", "view_scale", "viewing_scales"]


def view_scale(plan: Plan, view: View) -> float | None:
    """Encoder pixels per source pixel of ``view`` along the image's longer side (None for a
    strided view, which subsamples rather than resizes)."""
    if view.stride is not None:
        return None
    canvas = plan.canvases[view.canvas]
    axis = 0 if plan.image_size[0] >= plan.image_size[1] else 1
    s = canvas.resize[axis] / plan.image_size[axis]
    if view.crop is not None:
        s *= view.size[axis] / (view.crop[2 + axis] - view.crop[axis])
    else:
        s *= view.size[axis] / canvas.size[axis]
    return s


def viewing_scales(methods: Sequence[str], sizes: Sequence[tuple[int, int]], role: str | None = None,
                   min_scale: float = 0.95) -> list[float]:
    """The distinct scales (rounded to 0.01) at which ``methods`` show images of ``sizes`` to an
    encoder, keeping those ≥ ``min_scale`` (and only views of ``role`` when given)."""
    out = set()
    for m in methods:
        for size in sizes:
            plan = plan_image(m, size)
            for v in plan.views:
                if role is not None and v.role != role:
                    continue
                s = view_scale(plan, v)
                if s is not None and s >= min_scale:
                    out.add(round(s, 2))
    return sorted(out)


class SynthCrops:
    """A sampler for :func:`hires_lmm.train.dense.pretrain_dense` over a generated dataset.

    Each sample is a square crop of a training image at one of ``scales`` (encoder pixels per
    source pixel), resized to ``side`` (PIL-style antialiased bicubic), CLIP-normalised, with the
    label of each ``cell``-pixel cell: 1 + the answer's class index where the cell's centre is on
    the target, else 0. A crop holds the target with probability ``p_target``.
    """

    def __init__(self, root: str | Path, scales: Sequence[float], side: int, cell: int, *,
                 max_images: int = 300, p_target: float = 0.6) -> None:
        import json

        from PIL import Image

        root = Path(root)
        meta = json.loads((root / "meta.json").read_text())
        examples = synth.build_examples(meta["n"], seed=meta["seed"], tasks=meta["tasks"],
                                        test_fraction=meta["test_fraction"], sizes=[tuple(s) for s in meta["sizes"]],
                                        target_scale=meta.get("target_scale", 1.0),
                                        distractors=meta.get("distractors", True), classes=meta["answers"])
        self.examples = [e for e in examples if e.split == "train"][:max_images]
        if not self.examples:
            raise ValueError(f"{root}: no training images to pretrain on")
        folder = root / meta["image_folder"]
        self.images = [torch.from_numpy(np.array(Image.open(folder / e.file).convert("RGB"))).permute(2, 0, 1)
                       for e in self.examples]
        self.classes = {t: list(meta["answers"][t]) for t in meta["tasks"]}
        self.offsets = {}
        k = 0
        for t in meta["tasks"]:
            self.offsets[t] = k
            k += len(self.classes[t])
        self.num_classes = k
        self.scales = [float(s) for s in scales]
        if not self.scales:
            raise ValueError("no viewing scale to pretrain at")
        self.side, self.cell, self.p_target = side, cell, p_target
        self.mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
        self.std = torch.tensor(CLIP_STD).view(3, 1, 1)

    def label(self, ex: synth.Example) -> int:
        return 1 + self.offsets[ex.task] + self.classes[ex.task].index(ex.answer)

    def __call__(self, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` crops: pixels (n, 3, side, side) and labels (n, side/cell, side/cell)."""
        xs, ys = [], []
        g = self.side // self.cell
        for _ in range(n):
            i = int(rng.integers(len(self.examples)))
            ex, img = self.examples[i], self.images[i]
            H, W = img.shape[1:]
            s = self.scales[int(rng.integers(len(self.scales)))]
            c = min(int(round(self.side / s)), H, W)
            bx0, by0, bx1, by1 = ex.box
            if rng.random() < self.p_target:     # the target inside the crop, anywhere
                x0 = int(np.clip(rng.integers(min(bx1 - c, bx0), bx0 + 1), 0, W - c))
                y0 = int(np.clip(rng.integers(min(by1 - c, by0), by0 + 1), 0, H - c))
            else:
                x0, y0 = int(rng.integers(0, W - c + 1)), int(rng.integers(0, H - c + 1))
            crop = img[:, y0:y0 + c, x0:x0 + c].float()[None] / 255.0
            crop = F.interpolate(crop, size=(self.side, self.side), mode="bicubic", antialias=True,
                                 align_corners=False)[0].clamp(0, 1)
            xs.append((crop - self.mean) / self.std)
            k = self.side / c
            box = ((bx0 - x0) * k, (by0 - y0) * k, (bx1 - x0) * k, (by1 - y0) * k)
            ys.append(cell_labels(box, self.label(ex), (g, g), self.cell))
        return torch.stack(xs), torch.stack(ys)
