"""Plain data types of a view plan: canvases, views and the plan itself.

A plan says, from the image size alone, exactly how a method will look at an image:

* a **canvas** is the whole image brought to one resolution (resized, possibly padded), the
  way the reference code prepares it before cutting views;
* a **view** is what one vision-encoder pass receives: a crop of a canvas, a strided
  sub-sampling of a canvas (INF-LLaVA's global crops), or the whole canvas, possibly resized
  again (INF-LLaVA's thumbnail, LLaVA-HR's low-resolution pathway);
* the plan adds the grid, the text separators of the spatial schema and the number of visual
  tokens the method hands to the LLM.

Sizes are ``(width, height)``; boxes are ``(x0, y0, x1, y1)`` with exclusive ends. Nothing here
imports torch: planning is cheap enough to call a million times.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Size = tuple[int, int]
Box = tuple[int, int, int, int]
BoxF = tuple[float, float, float, float]

#: How pixels are resampled. ``pil_bicubic`` is PIL's BICUBIC filter on uint8 pixels (what the
#: CLIP/LLaVA image processors use); ``torch_bicubic`` and ``torch_bilinear_ac`` are
#: ``torch.nn.functional.interpolate`` on normalised tensors (``align_corners=False`` and ``True``),
#: used inside the reference models of INF-LLaVA and LLaVA-HR.
Resample = Literal["pil_bicubic", "torch_bicubic", "torch_bilinear_ac"]

#: Padding colours: ``mean`` is CLIP's mean colour as the LLaVA code computes it,
#: ``tuple(int(x * 255) for x in image_mean)`` = (122, 116, 104); ``black`` is zero.
Fill = Literal["mean", "black"]

FILL_RGB: dict[str, tuple[int, int, int]] = {"mean": (122, 116, 104), "black": (0, 0, 0)}


@dataclass(frozen=True)
class Canvas:
    """The whole image brought to one resolution.

    Two recipes, as in the references:

    * ``pad_square=True`` (LLaVA "pad"): paste the image centred on a square of side max(W, H)
      filled with ``fill``, at native resolution, then resize that square to ``size``.
    * ``pad_square=False``: resize the image to ``resize`` and paste it at ``offset`` on a
      ``size`` canvas filled with ``fill`` (when ``resize == size`` this is a plain resize).
    * ``source=k``: not made from the image but from canvas ``k``'s normalised tensor, resized to
      ``size`` with ``resample`` (a torch resampling: INF-LLaVA's evaluation path upsamples the
      336 tensor to 1008 inside the model).
    """

    size: Size
    resize: Size
    offset: tuple[int, int] = (0, 0)
    pad_square: bool = False
    fill: Fill = "black"
    resample: Resample = "pil_bicubic"
    source: int | None = None
    #: for a derived canvas (``source`` set): the canvas it is made from, to map points back
    parent: Canvas | None = None

    def to_image(self, x: float, y: float, image_size: Size) -> tuple[float, float]:
        """Map a point on this canvas to original-image coordinates."""
        w, h = image_size
        if self.parent is not None:
            px, py = self.parent.size
            return self.parent.to_image(x * px / self.size[0], y * py / self.size[1], image_size)
        if self.pad_square:
            side = max(w, h)
            # expand2square pastes at ((side - w) // 2, (side - h) // 2)
            px, py = (side - w) // 2, (side - h) // 2
            return x * side / self.resize[0] - px, y * side / self.resize[1] - py
        return (x - self.offset[0]) * w / self.resize[0], (y - self.offset[1]) * h / self.resize[1]

    def image_box(self, box: Box, image_size: Size) -> BoxF | None:
        """The part of the original image a canvas box shows, clipped; None when only padding."""
        w, h = image_size
        x0, y0 = self.to_image(box[0], box[1], image_size)
        x1, y1 = self.to_image(box[2], box[3], image_size)
        x0, y0, x1, y1 = max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1)
        if x1 <= x0 or y1 <= y0:
            return None
        return (x0, y0, x1, y1)


@dataclass(frozen=True)
class View:
    """One vision-encoder input.

    Attributes:
        role: what the view is for (``slice``, ``overview``, ``base``, ``tile``, ``local``,
            ``global``, ``thumbnail``, ``highres``, ``lowres``, ``image``).
        size: ``(w, h)`` of the pixels the encoder receives.
        canvas: index into :attr:`Plan.canvases` the view is cut from.
        crop: integer box on the canvas, or None for the whole canvas.
        stride: ``(step, dx, dy)`` for a strided view: ``canvas[dy::step, dx::step]``.
        resample: how the crop is resized to ``size`` when their sizes differ (else None).
        cell: ``(col, row)`` of the view in the plan's grid, when it has one.
        box: the region of the original image the view shows (derived; None for strided views,
            which sample the whole image, and for views of padding only).
    """

    role: str
    size: Size
    canvas: int
    crop: Box | None = None
    stride: tuple[int, int, int] | None = None
    resample: Resample | None = None
    cell: tuple[int, int] | None = None
    box: BoxF | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "role": self.role,
            "size": list(self.size),
            "box": None if self.box is None else [round(v, 2) for v in self.box],
            "stride": None if self.stride is None else list(self.stride),
        }


@dataclass(frozen=True)
class TokenGroup:
    """A run of visual tokens in the LLM sequence, in order: what produces it and how many."""

    source: str  # e.g. "slice 0", "overview", "newline", "separator ','"
    count: int


@dataclass(frozen=True)
class Plan:
    """How a method looks at one image. See the module docstring."""

    method: str
    image_size: Size
    grid: tuple[int, int] | None  # (cols, rows)
    canvases: tuple[Canvas, ...]
    views: tuple[View, ...]
    separators: tuple[str, ...]
    num_visual_tokens: int
    tokens: tuple[TokenGroup, ...] = ()
    patch_size: int = 14
    #: the image is first resized to this size (LLaVA-UHD's optional long-side pre-resize);
    #: canvases refer to the prescaled image
    prescale: Size | None = None
    #: method-specific facts (e.g. LLaVA-NeXT's unpadded feature grid), all JSON-able
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def source_size(self) -> Size:
        """Size of the image the canvases are made from (after the optional prescale)."""
        return self.prescale or self.image_size

    def to_json(self) -> dict[str, Any]:
        """The ``hires plan --json`` object (with the budget and its choice when planned under one)."""
        out: dict[str, Any] = {
            "method": self.method,
            "image_size": list(self.image_size),
            "grid": None if self.grid is None else list(self.grid),
            "views": [v.to_json() for v in self.views],
            "separators": list(self.separators),
            "num_visual_tokens": self.num_visual_tokens,
        }
        # only under a budget: the JSON of an unbudgeted plan stays exactly as it was
        for key in ("max_visual_tokens", "budget_choice"):
            if key in self.extra:
                out[key] = self.extra[key]
        return out

    def views_with_role(self, role: str) -> list[View]:
        return [v for v in self.views if v.role == role]


def cut_view(
    canvases: tuple[Canvas, ...] | list[Canvas],
    index: int,
    role: str,
    size: Size,
    source_size: Size,
    *,
    image_size: Size | None = None,
    crop: Box | None = None,
    stride: tuple[int, int, int] | None = None,
    resample: Resample | None = None,
    cell: tuple[int, int] | None = None,
) -> View:
    """Build a :class:`View`, deriving its original-image box from the canvas it is cut from.

    ``source_size`` is the size of the image the canvases are made from; ``image_size`` the
    original size when the two differ (LLaVA-UHD's optional pre-resize).
    """
    canvas = canvases[index]
    box: BoxF | None = None
    if stride is None:
        region = crop if crop is not None else (0, 0, canvas.size[0], canvas.size[1])
        b = canvas.image_box(region, source_size)
        if b is not None and image_size is not None and image_size != source_size:
            sx, sy = image_size[0] / source_size[0], image_size[1] / source_size[1]
            b = (b[0] * sx, b[1] * sy, min(b[2] * sx, image_size[0]), min(b[3] * sy, image_size[1]))
        box = b
    return View(role=role, size=size, canvas=index, crop=crop, stride=stride,
                resample=resample, cell=cell, box=box)
