"""Render a plan's views from a decoded image into normalised tensors.

Each canvas is made once with PIL, the way the reference image processors make it (PIL bicubic on
uint8 pixels, padding pasted in the CLIP mean colour or black), then normalised with CLIP's
mean/std; views are cut from it by slicing (crops, INF-LLaVA's strided sub-images) and, where the
reference model resizes tensors itself, by ``torch.nn.functional.interpolate`` (INF-LLaVA's
thumbnail: bicubic; LLaVA-HR's low-resolution pathway: bilinear with ``align_corners=True``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..plan.types import FILL_RGB, Canvas, Plan, View

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def expand2square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's ``expand2square``: centre on a square of side max(w, h) filled with ``fill``."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def make_canvas(img: Image.Image, canvas: Canvas) -> Image.Image:
    """The canvas as an RGB PIL image (see :class:`~hires_lmm.plan.types.Canvas`)."""
    fill = FILL_RGB[canvas.fill]
    if canvas.pad_square:
        sq = expand2square(img, fill)
        return sq.resize(canvas.resize, Image.Resampling.BICUBIC)
    resized = img.resize(canvas.resize, Image.Resampling.BICUBIC)
    if canvas.size == canvas.resize:
        return resized
    out = Image.new("RGB", canvas.size, fill)
    out.paste(resized, canvas.offset)
    return out


def normalize(img: Image.Image, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> torch.Tensor:
    """uint8 RGB PIL image → float32 tensor (3, H, W), ``(x / 255 - mean) / std``."""
    a = np.asarray(img, dtype=np.float32) * np.float32(1 / 255)
    a = (a - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def denormalize(t: torch.Tensor, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> Image.Image:
    """Inverse of :func:`normalize`, for showing a view: (3, H, W) → uint8 RGB PIL image."""
    m = torch.tensor(mean).view(3, 1, 1)
    s = torch.tensor(std).view(3, 1, 1)
    a = ((t.float() * s + m) * 255).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(a.permute(1, 2, 0).numpy())


def cut(canvas: torch.Tensor, view: View) -> torch.Tensor:
    """Cut one view (3, h, w) out of a normalised canvas tensor (3, H, W)."""
    if view.stride is not None:
        step, dx, dy = view.stride
        t = canvas[:, dy::step, dx::step]
    elif view.crop is not None:
        x0, y0, x1, y1 = view.crop
        t = canvas[:, y0:y1, x0:x1]
    else:
        t = canvas
    w, h = view.size
    if view.resample is not None:
        t = resize_tensor(t, view.size, view.resample)
    elif t.shape[-2:] != (h, w):
        raise ValueError(f"view {view.role} is {tuple(t.shape[-2:])} on its canvas but planned {h}x{w}, "
                         "and it names no resampling")
    return t.contiguous()


def render(img: Image.Image, plan: Plan) -> list[torch.Tensor]:
    """Every view of ``plan`` as a normalised float32 tensor ``(3, h, w)``, in plan order.

    ``img`` must be the decoded RGB image the plan was made for (same size).
    """
    if img.size != tuple(plan.image_size):
        raise ValueError(f"image is {img.size[0]}x{img.size[1]} but the plan is for "
                         f"{plan.image_size[0]}x{plan.image_size[1]}")
    if img.mode != "RGB":
        raise ValueError(f"render needs an RGB image (use hires_lmm.image.load_image), got mode {img.mode}")
    src = img.resize(plan.prescale, Image.Resampling.BICUBIC) if plan.prescale else img
    canvases: list[torch.Tensor] = []
    for c in plan.canvases:
        if c.source is None:
            canvases.append(normalize(make_canvas(src, c)))
        else:  # derived in tensor space, as the reference model does
            canvases.append(resize_tensor(canvases[c.source], c.size, c.resample))
    return [cut(canvases[v.canvas], v) for v in plan.views]


def resize_tensor(t: torch.Tensor, size: tuple[int, int], resample: str | None) -> torch.Tensor:
    """Resize a (3, H, W) tensor to ``size = (w, h)`` with a torch resampling of the plan."""
    w, h = size
    if t.shape[-2:] == (h, w) and resample != "torch_bicubic":
        return t
    if resample == "torch_bicubic":
        return F.interpolate(t[None], size=(h, w), mode="bicubic", align_corners=False)[0]
    if resample == "torch_bilinear_ac":
        return F.interpolate(t[None], size=(h, w), mode="bilinear", align_corners=True)[0]
    raise ValueError(f"cannot resize a tensor with resampling {resample!r}")
