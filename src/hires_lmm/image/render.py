"""Render a plan's views from a decoded image into normalised tensors.

Each canvas is made once with PIL, the way the reference image processors make it (PIL bicubic on
uint8 pixels, padding pasted in the CLIP mean colour or black), then normalised with CLIP's
mean/std; views are cut from it by slicing (crops, INF-LLaVA's strided sub-images) and, where the
reference model resizes tensors itself, by ``torch.nn.functional.interpolate`` (INF-LLaVA's
thumbnail: bicubic; LLaVA-HR's low-resolution pathway: bilinear with ``align_corners=True``).

:func:`load_and_render` is the fast path from a file to views: it plans from the header alone and
decodes no more pixels than the plan needs (a 4000x3000 JPEG for LLaVA-NeXT's 672x505 canvas is
decoded at half size by libjpeg's DCT scaling), then renders as above. The result differs from
``render(load_image(src), plan)`` by a few grey levels at most; ``fast=False`` makes it identical.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..plan.types import FILL_RGB, BoxF, Canvas, Plan, View
from .load import (  # same package
    DEFAULT_MAX_PIXELS,
    ImageSource,
    _check_pixels,
    _describe,
    _open,
    _orientation,
    _release,
    decode_data_url,
    load_image,
)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: how each EXIF orientation is undone (as ``PIL.ImageOps.exif_transpose``)
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def expand2square(img: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """LLaVA's ``expand2square``: centre on a square of side max(w, h) filled with ``fill``."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    out = Image.new(img.mode, (side, side), fill)
    out.paste(img, ((side - w) // 2, (side - h) // 2))
    return out


def make_canvas(img: Image.Image, canvas: Canvas, box: BoxF | None = None,
                size: tuple[int, int] | None = None) -> Image.Image:
    """The canvas as an RGB PIL image (see :class:`~hires_lmm.plan.types.Canvas`).

    ``box`` (with ``size``, the ``(w, h)`` the canvas was planned for): the region of ``img`` that
    shows that image, in fractional pixels, when ``img`` is a reduced copy of it (see
    :func:`load_and_render`); the resampling then follows the planned geometry exactly.
    """
    fill = FILL_RGB[canvas.fill]
    if box is None:
        if canvas.pad_square:
            sq = expand2square(img, fill)
            return sq.resize(canvas.resize, Image.Resampling.BICUBIC)
        resized = img.resize(canvas.resize, Image.Resampling.BICUBIC)
    elif canvas.pad_square:
        if size is None:
            raise ValueError("make_canvas with a box needs the planned image size")
        resized = _pad_square_from_box(img, canvas, box, size, fill)
        return resized
    else:
        resized = img.resize(canvas.resize, Image.Resampling.BICUBIC, box=box)
    if canvas.size == canvas.resize:
        return resized
    out = Image.new("RGB", canvas.size, fill)
    out.paste(resized, canvas.offset)
    return out


def _pad_square_from_box(img: Image.Image, canvas: Canvas, box: BoxF, size: tuple[int, int],
                         fill: tuple[int, int, int]) -> Image.Image:
    """`expand2square` then resize, from a reduced copy: the square's box on ``img`` is fractional,
    so ``img`` is padded (only on the sides the square extends past it) and resized from that box.

    A reduced copy's last pixel may cover the image only in part (``ceil(n / factor)`` pixels);
    where padding follows, that pixel is mixed with the fill by the part it covers, as reducing
    the padded square would have made it."""
    w, h = size
    side = max(w, h)
    ox, oy = (side - w) // 2, (side - h) // 2  # where expand2square pastes the image
    kx, ky = (box[2] - box[0]) / w, (box[3] - box[1]) / h
    sq = [box[0] - ox * kx, box[1] - oy * ky, box[0] + (side - ox) * kx, box[1] + (side - oy) * ky]
    left, top = math.ceil(max(0.0, -sq[0])), math.ceil(max(0.0, -sq[1]))
    right, bottom = math.ceil(max(0.0, sq[2] - img.width)), math.ceil(max(0.0, sq[3] - img.height))
    # partial pixels next to padding: (axis, index on img, part of it the image covers)
    partial = []
    for axis, (lo, hi, sq_lo, sq_hi) in enumerate(((box[0], box[2], sq[0], sq[2]), (box[1], box[3], sq[1], sq[3]))):
        if sq_lo < lo and lo % 1:
            partial.append((axis, math.floor(lo), math.ceil(lo) - lo))
        if sq_hi > hi and hi % 1 and math.floor(hi) < img.size[axis]:
            partial.append((axis, math.floor(hi), hi - math.floor(hi)))
    if left or top or right or bottom or partial:
        padded = Image.new(img.mode, (img.width + left + right, img.height + top + bottom), fill)
        padded.paste(img, (left, top))
        for axis, index, part in partial:
            x0, y0 = (index + left, top) if axis == 0 else (left, index + top)
            strip = (x0, y0, x0 + 1, y0 + img.height) if axis == 0 else (x0, y0, x0 + img.width, y0 + 1)
            line = padded.crop(strip)
            padded.paste(Image.blend(Image.new(img.mode, line.size, fill), line, part), strip[:2])
        img = padded
    sq = [sq[0] + left, sq[1] + top, sq[2] + left, sq[3] + top]
    sq = [max(0.0, sq[0]), max(0.0, sq[1]), min(float(img.width), sq[2]), min(float(img.height), sq[3])]
    return img.resize(canvas.resize, Image.Resampling.BICUBIC, box=(sq[0], sq[1], sq[2], sq[3]))


def normalize(img: Image.Image, mean: tuple[float, ...] = CLIP_MEAN, std: tuple[float, ...] = CLIP_STD) -> torch.Tensor:
    """uint8 RGB PIL image → float32 tensor (3, H, W), ``(x / 255 - mean) / std``.

    Transposed while still uint8, then scaled in place in float32 (the same float32 operations,
    in the same order, as the reference processors' rescale and normalise)."""
    t = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).contiguous().to(torch.float32)
    m = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return t.mul_(float(np.float32(1 / 255))).sub_(m).div_(s)


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
    return _render(img, plan)


def _render(img: Image.Image, plan: Plan, box: BoxF | None = None) -> list[torch.Tensor]:
    """`render` from ``img``, or from a reduced copy whose region ``box`` shows the planned image."""
    if img.mode != "RGB":
        raise ValueError(f"render needs an RGB image (use hires_lmm.image.load_image), got mode {img.mode}")
    src = img
    if plan.prescale:
        src = img.resize(plan.prescale, Image.Resampling.BICUBIC, box=box)
        box = None
    canvases: list[torch.Tensor] = []
    for c in plan.canvases:
        if c.source is None:
            canvases.append(normalize(make_canvas(src, c, box, plan.image_size)))
        else:  # derived in tensor space, as the reference model does
            canvases.append(resize_tensor(canvases[c.source], c.size, c.resample))
    return [cut(canvases[v.canvas], v) for v in plan.views]


def needed_size(plan: Plan) -> tuple[float, float]:
    """The largest ``(w, h)`` the original image is resampled to by ``plan``'s canvases: decoding
    more pixels than this (times some oversampling) only feeds the resampling filter."""
    if plan.prescale:
        return float(plan.prescale[0]), float(plan.prescale[1])
    w, h = plan.image_size
    nx = ny = 1.0
    for c in plan.canvases:
        if c.source is not None:
            continue
        if c.pad_square:  # the image is pasted on a max(w, h) square, then resized
            side = max(w, h)
            nx, ny = max(nx, w * c.resize[0] / side), max(ny, h * c.resize[1] / side)
        else:
            nx, ny = max(nx, float(c.resize[0])), max(ny, float(c.resize[1]))
    return nx, ny


def load_and_render(src: ImageSource, method: str, plan_options: dict[str, Any] | None = None, *,
                    max_pixels: int | None = DEFAULT_MAX_PIXELS, fast: bool = True,
                    oversample: float = 2.0) -> tuple[Plan, list[torch.Tensor]]:
    """Decode (safely, as :func:`~hires_lmm.image.load_image`), plan and render one image.

    With ``fast`` the image is planned from its header, then decoded and resampled from a copy
    reduced by an integer factor while it keeps at least ``oversample`` times the pixels the
    largest canvas needs (per axis): JPEGs are decoded reduced (libjpeg's DCT scaling by 1/2, 1/4
    or 1/8, which also skips most of the decoding work), any image is then box-reduced
    (``Image.reduce``) by what is left of the factor; the canvases are resampled from the planned
    image's exact (fractional) region of that copy. The views keep their planned sizes and differ
    from the exact path by a few grey levels: on average well under one, at most 0.05 to 0.15
    after normalisation (3 to 10 levels) at hard edges. ``fast=False`` gives
    ``render(load_image(src), plan)``; nothing is reduced when the plan needs the full resolution.

    Returns:
        the plan (for the original, EXIF-oriented size) and its views, as :func:`render`.
    """
    from ..plan import (
        plan_image,  # the planner imports nothing from here; keep import order free
    )

    opts = plan_options or {}
    if not fast:
        img = load_image(src, max_pixels=max_pixels)
        plan = plan_image(method, img.size, **opts)
        return plan, render(img, plan)
    if isinstance(src, str) and src.startswith("data:"):
        src = decode_data_url(src)
    if isinstance(src, Image.Image):
        img = src if src.mode == "RGB" else load_image(src, max_pixels=max_pixels)
        _check_pixels(img.size, max_pixels, "image")
        plan = plan_image(method, img.size, **opts)
        small, box = _reduced(img, None, plan, oversample)
        return plan, _render(small, plan, box)
    what = _describe(src)
    opened = _open(src, what)
    try:
        _check_pixels(opened.size, max_pixels, what)  # on the stored size, before any reduction
        try:
            orientation = _orientation(opened)
        except Exception:  # a broken EXIF block: the stored orientation, as load_image keeps it
            orientation = 1
        size = opened.size[::-1] if orientation in (5, 6, 7, 8) else opened.size
        plan = plan_image(method, size, **opts)
        nx, ny = needed_size(plan)
        scale = 1
        if opened.format == "JPEG" and getattr(opened, "n_frames", 1) == 1:
            want = (nx * oversample, ny * oversample)
            if orientation in (5, 6, 7, 8):  # stored axes are swapped
                want = want[::-1]
            stored_w = opened.size[0]
            res = opened.draft(opened.mode, (max(1, int(want[0])), max(1, int(want[1]))))
            if res is not None:  # (mode, (0, 0, stored w / scale, stored h / scale))
                scale = round(stored_w / res[1][2])
        img = load_image(opened, max_pixels=None)  # pixels checked above; draft shrank .size
    finally:
        _release(opened)
    box = _content_box(img.size, size, scale, orientation)
    img, box = _reduced(img, box, plan, oversample)
    return plan, _render(img, plan, box)


def _content_box(reduced: tuple[int, int], size: tuple[int, int], scale: int, orientation: int) -> BoxF | None:
    """Where the image of ``size`` lies on its copy decoded at 1/``scale`` (then EXIF-oriented).

    A reduced decode has ``ceil(n / scale)`` pixels per axis, the last one covering less; once
    the orientation is applied that partial pixel is at the start of a reversed axis.
    """
    if scale == 1:
        return None
    flips = _orientation_flips(orientation)
    box = []
    for axis in (0, 1):
        length = size[axis] / scale
        start = reduced[axis] - length if flips[axis] else 0.0
        box.append((start, start + length))
    return (box[0][0], box[1][0], box[0][1], box[1][1])


def _orientation_flips(orientation: int) -> tuple[bool, bool]:
    """Whether the x and y axes of the EXIF-oriented image run against the stored axes they come from."""
    method = _EXIF_TRANSPOSE.get(orientation)
    if method is None:
        return False, False
    probe = Image.new("L", (2, 2))
    probe.putpixel((0, 0), 255)  # the stored origin
    t = probe.transpose(method)
    x, y = next((x, y) for x in (0, 1) for y in (0, 1) if t.getpixel((x, y)) == 255)
    return x == 1, y == 1


def _reduced(img: Image.Image, box: BoxF | None, plan: Plan, oversample: float) -> tuple[Image.Image, BoxF | None]:
    """``img`` box-reduced by the largest integer factor that keeps ``oversample`` times the
    pixels `needed_size` asks for, and the planned image's region on the result."""
    nx, ny = needed_size(plan)
    bw, bh = (img.width, img.height) if box is None else (box[2] - box[0], box[3] - box[1])
    factor = int(min(bw / (nx * oversample), bh / (ny * oversample)))
    if factor < 2:
        return img, box
    x0, y0, x1, y1 = box if box is not None else (0.0, 0.0, float(img.width), float(img.height))
    return img.reduce(factor), (x0 / factor, y0 / factor, x1 / factor, y1 / factor)


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
