"""Benchmark 1: preprocessing of large photos for LLaVA-NeXT, ours against transformers.

Both sides start from the same JPEG files and end with normalised float32 pixels of the same
views (base view, then the pinpoint's tiles):

* transformers: PIL decode + ``LlavaNextImageProcessor`` (the torchvision backend when
  torchvision is installed, else the PIL backend it falls back to), with LLaVA-NeXT's settings;
* ours: :func:`hires_lmm.image.render.load_and_render` (plan from the header, reduced decode,
  render), and the same with ``fast=False`` (full decode, bit-for-bit the reference pixels).

The photos are synthetic (gradients, shapes, texture and sensor-like noise), written as JPEGs.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from ..image.render import CLIP_MEAN, CLIP_STD, load_and_render
from ..plan import NEXT_PINPOINTS
from .common import interleaved, ratio

TARGET_SPEEDUP = 3.0


def synth_photo(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A photo-like RGB image: a smooth gradient sky/ground, soft shapes, fine texture, noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    # low-resolution smooth field, upsampled: large-scale colour variation as in a photo
    low = rng.uniform(30, 225, size=(6, 8, 3)).astype(np.uint8)
    img = Image.fromarray(low).resize((w, h), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = int(rng.uniform(0, w)), int(rng.uniform(0, h))
        rw, rh = int(rng.uniform(0.03, 0.3) * w), int(rng.uniform(0.03, 0.3) * h)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        box = (x0, y0, x0 + rw, y0 + rh)
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(radius=max(1.0, w / 2000)))
    a = np.asarray(img, dtype=np.int16)
    yy, xx = np.mgrid[0:h, 0:w]
    texture = (12 * np.sin(xx / (7 + 5 * seed % 3)) * np.cos(yy / 11)).astype(np.int16)[..., None]
    noise = rng.normal(0, 6, size=a.shape).astype(np.int16)
    return Image.fromarray(np.clip(a + texture + noise, 0, 255).astype(np.uint8), "RGB")


def make_photos(directory: str | Path, n: int, size: tuple[int, int], seed: int = 0) -> list[Path]:
    """Write ``n`` synthetic photos as JPEGs (quality 90, 4:2:0 like a camera) into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        p = directory / f"photo-{size[0]}x{size[1]}-{seed + k}.jpg"
        if not p.exists():
            synth_photo(size, seed + k).save(p, quality=90)
        paths.append(p)
    return paths


def hf_processor() -> tuple[Any, str]:
    """transformers' LLaVA-NeXT processor with LLaVA-NeXT's settings, and its class name."""
    cls: type[Any]
    if importlib.util.find_spec("torchvision") is not None:
        from transformers import LlavaNextImageProcessor

        cls = LlavaNextImageProcessor
    else:  # what LlavaNextImageProcessor falls back to without torchvision (minus the warning)
        from transformers.models.llava_next.image_processing_pil_llava_next import (
            LlavaNextImageProcessorPil,
        )

        cls = LlavaNextImageProcessorPil
    proc = cls(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
               image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_pad=False,
               image_grid_pinpoints=[[h, w] for w, h in NEXT_PINPOINTS])
    return proc, cls.__name__


def hf_preprocess(proc: Any, path: str | Path) -> np.ndarray:
    """Decode with PIL and preprocess with transformers: (views, 3, 336, 336) float32."""
    with Image.open(path) as im:
        img = im.convert("RGB")
    return np.asarray(proc.preprocess([img], return_tensors="np")["pixel_values"][0])


def ours_preprocess(path: str | Path, fast: bool = True) -> list[torch.Tensor]:
    """Decode, plan and render for llava-next with the library's path."""
    return load_and_render(path, "llava-next", fast=fast)[1]


def bench_preprocess(*, n_images: int = 4, size: tuple[int, int] = (4000, 3000), repeat: int = 5,
                     workdir: str | Path | None = None, seed: int = 0) -> dict[str, Any]:
    """Time the three pipelines on the same photos; compare their pixels."""
    with tempfile.TemporaryDirectory(prefix="hires-bench-") as tmp:
        paths = make_photos(workdir or tmp, n_images, size, seed)
        proc, proc_name = hf_processor()
        max_diff = exact_diff = mean_diff = 0.0
        views = 0
        for p in paths:
            ref = hf_preprocess(proc, p)
            fast = torch.stack(ours_preprocess(p, fast=True)).numpy()
            exact = torch.stack(ours_preprocess(p, fast=False)).numpy()
            if fast.shape != ref.shape or exact.shape != ref.shape:
                raise AssertionError(f"{p.name}: views {fast.shape} / {exact.shape} vs transformers {ref.shape}")
            views = ref.shape[0]
            max_diff = max(max_diff, float(np.abs(fast - ref).max()))
            exact_diff = max(exact_diff, float(np.abs(exact - ref).max()))
            mean_diff = max(mean_diff, float(np.abs(fast - ref).mean()))
        t = interleaved({
            "hf": lambda: [hf_preprocess(proc, p) for p in paths],
            "ours": lambda: [ours_preprocess(p, fast=True) for p in paths],
            "ours_exact": lambda: [ours_preprocess(p, fast=False) for p in paths],
        }, repeat=repeat)
    per = {k: v / len(paths) for k, v in t.items()}
    return {
        "images": len(paths), "size": list(size), "views_per_image": views, "processor": proc_name,
        "hf_s_per_image": per["hf"], "ours_s_per_image": per["ours"], "ours_exact_s_per_image": per["ours_exact"],
        "hf_images_per_s": ratio(1.0, per["hf"]), "ours_images_per_s": ratio(1.0, per["ours"]),
        "speedup_vs_hf": ratio(per["hf"], per["ours"]), "exact_speedup_vs_hf": ratio(per["hf"], per["ours_exact"]),
        "max_abs_diff": max_diff, "mean_abs_diff": mean_diff, "exact_max_abs_diff": exact_diff,
        "target_speedup": TARGET_SPEEDUP, "repeat": repeat,
    }
