"""The embedded default data: a generated fine-detail dataset in LLaVA format.

Every image holds one small *target* whose answer (a colour, a shape, a count of dots or a digit)
cannot be read from a 336-px view of the whole image (LLaVA-1.5: pad to a square, PIL bicubic to
336) but is plain at high resolution (the padded square at 1008 px: the scale of a 336 tile that
covers a third of the longer side, INF-LLaVA's canvas; LLaVA-HR's 1024 and LLaVA-UHD's slices at
2.4-2.8x see it as well, LLaVA-NeXT's 672 grid only faintly). Everything else in the image (a
smooth background, coarse texture patches, large distractor shapes, the grey plate the target
sits on, its position and the canvas size) is independent of the answer, so guessing from the
336 view stays at chance.

Construction: why the 336 view cannot see it
--------------------------------------------
Every canvas's longer side is ``L = 336·f`` with an integer ``f`` (2-6; 3-6 by default), so the 336 view is a PIL
bicubic downscale by exactly ``f`` on both axes (the padding only shifts the grid). Output pixel
``i`` weighs source pixel ``j`` by ``K((j + ½ − c_i)/f)`` (normalised), ``c_i = (i + ½)·f``, where
``K`` is the Keys cubic with a = −½ (PIL's BICUBIC), which reproduces polynomials of degree ≤ 2:
``Σ_m K(t − m)·(m − t)^p`` is 1, 0, 0 for p = 0, 1, 2 and every ``t`` (its Fourier transform
vanishes to third order at every non-zero integer frequency). So in every output pixel, whatever
the phase, each residue class ``j mod f`` of source pixels gets the same total weight ``1/f``
and zero first and second moments: a pattern with period ``f`` (one 336-pixel) contributes only
its mean over a period, and a smooth envelope ``e`` times such a pattern only a third-order term
(``∝ e'''``).

The target is ``plate + e(x, y)·T[x mod f, y mod f]·s`` on a flat grey plate (128): ``T`` is an
``f × f`` integer tile of diagonal bands at +120 on a field at −60 … −120 (:func:`_tile`) whose
every row and every column sums to exactly zero, so both passes of PIL's separable resize cancel
it (balanced rows also keep PIL's rounding of its intermediate image from leaving an
answer-dependent residue); ``e`` is the answer's mask (square, circle, triangle, cross, 7-segment
digit, dots) blurred with a Gaussian of σ = ½ 336-pixel, which keeps the third-order term ≲ 1
grey level; ``s`` is (1, 1, 1) for shape/count/digit (a grey-level texture) and the colour's
direction for ``color`` (the bands are plate + 120·s: red (248, 128, 128) on a field of (8, 128, 128),
green, blue, yellow, purple, cyan, white; each textures a different set of channels, so the
per-channel texture energy tells them apart, and no class is another's complement, whose bands
would be the same texture shifted).
The product is rounded with a dither that is the same for every answer, so rounding adds unbiased
noise rather than an answer-dependent offset. At 1008 px the tile is a texture of period 3 px and
±60-120 grey levels filling the shape; in the 336 view the plate looks empty.

:func:`generate` checks this for every image it writes (:func:`check_example`): it renders the
plate's neighbourhood with every answer of the task and with none (all else equal) and requires
that in the 336 view every answer is within :data:`LOWRES_MAX_DIFF` grey levels of the empty
plate, and that at 1008 px every two answers differ by an RMS of at least
:data:`HIGHRES_MIN_RMS` where their masks differ. The statistics go to ``meta.json``.

Files
-----
``generate(out_dir, n)`` writes ``images/<id>.png``, ``stage1.json`` (captions), ``stage2.json``
(questions and short answers) from the training split, ``test/questions.jsonl`` and
``test/answers.jsonl`` (ground truth) from the held-out split, and ``meta.json``; image paths in
all of them are relative to ``meta["image_folder"]`` (``images``, relative to ``out_dir``).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
import warnings
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

__all__ = ["ANSWERS", "CAPTIONS", "Example", "HIGHRES_MIN_RMS", "HIGH_SIDE", "LOWRES_MAX_DIFF", "LOW_SIDE",
           "QUESTIONS", "SIZES", "TASKS", "build_examples", "check_example", "generate", "render",
           "target_boxes"]

#: the answer classes of each task, in a fixed order (evaluation compares answers with these)
ANSWERS: dict[str, list[str]] = {
    "color": ["red", "green", "blue", "yellow", "purple", "cyan", "white"],
    "shape": ["circle", "square", "triangle", "cross"],
    "count": ["1", "2", "3", "4", "5"],
    "digit": [str(d) for d in range(10)],
}
TASKS: tuple[str, ...] = tuple(ANSWERS)

QUESTIONS: dict[str, str] = {
    "color": "What color is the small square?",
    "shape": "What shape is the small marker?",
    "count": "How many small dots are there?",
    "digit": "What digit is printed in the small box?",
}

#: stage-1 caption templates ({a} is the answer)
CAPTIONS: dict[str, str] = {
    "color": "a small {a} square on a grey plate",
    "shape": "a small {a} marker on a grey plate",
    "count": "{a} small dots on a grey plate",
    "digit": "the digit {a} in a small box",
}

#: default canvas sizes (w, h): the longer side is always 336·f with f in 3..6
SIZES: tuple[tuple[int, int], ...] = (
    (1008, 1008), (1344, 1008), (1008, 1344), (1680, 672), (672, 1680),
    (1344, 896), (896, 1344), (1680, 1008), (2016, 1008),
)

LOW_SIDE = 336     #: the whole-image view that must not resolve the target (LLaVA-1.5)
HIGH_SIDE = 1008   #: the high-resolution scale at which it must be plain (3 × 336)
LOWRES_MAX_DIFF = 3.0    #: max |336 view with any answer − 336 view of the empty plate|, grey levels
HIGHRES_MIN_RMS = 25.0   #: min RMS difference at 1008 px between two answers where their masks differ

PLATE = 128                 #: the neutral plate's grey level (all channels)
BORDER_RGB = (48, 48, 48)   #: the plate's outline
SIGMA_U = 0.5               #: envelope blur, in 336-pixels (units of f source pixels)
PLATE_MARGIN_U = 3          #: plate beyond the target's box (the blurred envelope needs < 2)
CHECK_MARGIN_U = 3          #: check window beyond the plate (the bicubic support is 2)

#: each colour's direction from the plate's grey (the bands are plate + 120·s): every colour
#: textures a different set of channels, in phase, so the per-channel texture energy alone tells
#: the classes apart (no channel correlations to learn), and no class is another's complement
#: (whose texture would be the same bands shifted)
_COLOR_SIGNS = {"red": (1, 0, 0), "green": (0, 1, 0), "blue": (0, 0, 1), "yellow": (1, 1, 0),
                "purple": (1, 0, 1), "cyan": (0, 1, 1), "white": (1, 1, 1)}

# 7-segment digits: segments a (top), b (top right), c (bottom right), d (bottom), e (bottom left),
# f (top left), g (middle)
_SEGMENTS = {"0": "abcdef", "1": "bc", "2": "abged", "3": "abgcd", "4": "fgbc", "5": "afgcd",
             "6": "afgedc", "7": "abc", "8": "abcdefg", "9": "abcdfg"}

_ID_RE = re.compile(r"^(?:{})-\d{{6}}\.png$".format("|".join(TASKS)))


# --- geometry of one example ---------------------------------------------------------------------

@dataclass(frozen=True)
class Example:
    """One generated sample, fully determined by ``(seed, index)``; nothing is drawn yet.

    Attributes:
        id: ``<task>-<index:06d>``; the image is ``<id>.png``.
        index: position in the dataset (with ``seed``, the example's random stream).
        task, answer, split: ``split`` is ``"train"`` or ``"test"``.
        size: ``(w, h)`` of the image; its longer side is ``336·f``.
        f: source pixels per 336-view pixel (2..6).
        plate: ``(x0, y0, x1, y1)`` of the grey plate, outline included (exclusive ends).
        box: ``(x0, y0, x1, y1)`` of the target's extent (its mask before blurring).
        dots: for ``count``: the five dot centres relative to ``box`` (the first ``answer`` are
            drawn), else empty.
        scale: the target's size (and its strokes and dots) relative to the default; the
            texture's period stays ``f``.
        distractors: draw the coarse texture patches and large shapes around the plate (else
            only the smooth background field).
    """

    id: str
    index: int
    seed: int
    task: str
    answer: str
    split: str
    size: tuple[int, int]
    f: int
    plate: tuple[int, int, int, int]
    box: tuple[int, int, int, int]
    dots: tuple[tuple[int, int], ...] = ()
    scale: float = 1.0
    distractors: bool = True

    @property
    def file(self) -> str:
        return f"{self.id}.png"

    @property
    def question(self) -> str:
        return QUESTIONS[self.task]

    @property
    def caption(self) -> str:
        return CAPTIONS[self.task].format(a=self.answer)


def _scale(size: tuple[int, int]) -> int:
    L = max(size)
    if L % LOW_SIDE or L // LOW_SIDE < 2:
        raise ValueError(f"image size {size}: the longer side must be 336·f with an integer f >= 2 "
                         "(so the 336 view is an exact integer downscale)")
    return L // LOW_SIDE


def _target_extent(task: str, f: int, scale: float = 1.0) -> tuple[int, int]:
    """(w, h) of the target's box in source pixels (``scale`` enlarges the target, not its texture)."""
    u = f * scale
    if task == "color":
        return round(8 * u), round(8 * u)
    if task == "shape":
        return round(9 * u), round(9 * u)
    if task == "count":
        s = round(13.5 * u)
        return s, s
    if task == "digit":
        return round(7 * u), round(11 * u)
    raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")


def _check_sizes(sizes: Sequence[tuple[int, int]], scale: float = 1.0,
                 tasks: Sequence[str] = TASKS) -> tuple[tuple[int, int], ...]:
    out = []
    for s in sizes:
        w, h = (int(v) for v in s)
        f = _scale((w, h))
        need = 2 * (max(max(_target_extent(t, f, scale)) for t in tasks) + 2 * (PLATE_MARGIN_U + CHECK_MARGIN_U + 2) * f)
        if min(w, h) < need:
            raise ValueError(f"image size {(w, h)}: the shorter side must be at least {need} px")
        out.append((w, h))
    if not out:
        raise ValueError("sizes is empty")
    return tuple(out)


def _example(seed: int, index: int, task: str, answer: str, split: str, size: tuple[int, int],
             scale: float = 1.0, distractors: bool = True) -> Example:
    rng = np.random.default_rng([seed, 1, index])
    w, h = size
    f = _scale(size)
    tw, th = _target_extent(task, f, scale)
    pm = PLATE_MARGIN_U * f + f           # plate margin + its outline (1 unit)
    edge = (CHECK_MARGIN_U + 2) * f       # keep the check window (and the kernel) inside the image
    x0 = int(rng.integers(edge + pm, w - edge - pm - tw + 1))
    y0 = int(rng.integers(edge + pm, h - edge - pm - th + 1))
    dots: tuple[tuple[int, int], ...] = ()
    if task == "count":
        cell = tw / 3
        cells = rng.permutation(9)[:5]
        jit = rng.integers(-int(f * scale // 2), int(f * scale // 2) + 1, size=(5, 2))
        dots = tuple((int(round((c % 3 + 0.5) * cell)) + int(jx), int(round((c // 3 + 0.5) * cell)) + int(jy))
                     for c, (jx, jy) in zip(cells, jit))
    return Example(id=f"{task}-{index:06d}", index=index, seed=seed, task=task, answer=answer, split=split,
                   size=(w, h), f=f, plate=(x0 - pm, y0 - pm, x0 + tw + pm, y0 + th + pm),
                   box=(x0, y0, x0 + tw, y0 + th), dots=dots, scale=scale, distractors=distractors)


def task_classes(tasks: Sequence[str], classes: Mapping[str, Sequence[str]] | None = None) -> dict[str, list[str]]:
    """Each task's answer classes: :data:`ANSWERS`, or the subset ``classes`` names (in its order)."""
    classes = dict(classes or {})
    out = {}
    for t in tasks:
        if t not in ANSWERS:
            raise ValueError(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
        sub = list(classes.pop(t, ANSWERS[t]))
        bad = [a for a in sub if a not in ANSWERS[t]]
        if bad or len(sub) < 2 or len(set(sub)) != len(sub):
            raise ValueError(f"classes of {t!r} must be at least 2 distinct answers of {ANSWERS[t]}, got {sub}")
        out[t] = sub
    if classes:
        raise ValueError(f"classes given for tasks not generated: {sorted(classes)}")
    return out


def build_examples(n: int, *, seed: int = 0, tasks: Sequence[str] = TASKS, test_fraction: float = 0.2,
                   sizes: Sequence[tuple[int, int]] | None = None, target_scale: float = 1.0,
                   distractors: bool = True, classes: Mapping[str, Sequence[str]] | None = None) -> list[Example]:
    """The ``n`` examples of a dataset (cheap: geometry only, nothing is drawn).

    Tasks take turns (example ``k`` has task ``tasks[k % len(tasks)]``). Within a task the answers
    are a round-robin over its classes, and the held-out split is a prefix of that round-robin, so
    each task's answers are balanced within ±1 in each split and overall; answers, splits and sizes
    are then shuffled (independently of each other's order) with ``seed``. ``target_scale``
    enlarges every target (its texture's period stays one 336-pixel); ``distractors=False``
    leaves only the smooth background field around the plate. ``classes`` restricts a task's
    answers to a subset of :data:`ANSWERS` (e.g. ``{"color": ["red", "green", "blue"]}``).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    tasks = tuple(tasks)
    if not tasks:
        raise ValueError("tasks is empty")
    for t in tasks:
        if t not in ANSWERS:
            raise ValueError(f"unknown task {t!r}; choose from {', '.join(TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"repeated task in {tasks}")
    if not 0.5 <= target_scale <= 16:
        raise ValueError(f"target_scale must be in [0.5, 16], got {target_scale}")
    sizes = _check_sizes(SIZES if sizes is None else sizes, target_scale, tasks)
    used = task_classes(tasks, classes)
    rng = np.random.default_rng([seed, 0])
    T = len(tasks)
    slots: dict[str, list[tuple[str, str, tuple[int, int]]]] = {}
    for ti, task in enumerate(tasks):
        nt = n // T + (ti < n % T)
        names = used[task]
        n_test = int(round(nt * test_fraction))
        pairs = [(names[i % len(names)], "test" if i < n_test else "train") for i in range(nt)]
        order = rng.permutation(nt)
        sz = [sizes[i % len(sizes)] for i in range(nt)]
        sz_order = rng.permutation(nt)
        slots[task] = [(*pairs[order[i]], sz[sz_order[i]]) for i in range(nt)]
    out = []
    for k in range(n):
        task = tasks[k % T]
        answer, split, size = slots[task][k // T]
        out.append(_example(seed, k, task, answer, split, size, target_scale, distractors))
    return out


# --- drawing ---------------------------------------------------------------------------------------

def _tile(f: int) -> np.ndarray:
    """The ``f × f`` integer tile ``T``: ``w = f // 2`` diagonal bands (``(x + y) mod f < w``) at
    ``+120`` on a field at ``−120·w/(f − w)`` (−120 for even ``f``, −60 for 3, −80 for 5), so that
    every row and every column sums to exactly zero."""
    w = f // 2
    m = 120 // (f - w)
    x, y = np.meshgrid(np.arange(f), np.arange(f))
    t = np.where((x + y) % f < w, (f - w) * m, -w * m).astype(np.int32)
    assert not t.sum(0).any() and not t.sum(1).any()
    return t


def _mask(ex: Example, answer: str) -> Image.Image:
    """The target's binary mask ('L', 0/255) on the box grown by 2 units each side."""
    f = ex.f
    pad = 2 * f
    tw, th = ex.box[2] - ex.box[0], ex.box[3] - ex.box[1]
    im = Image.new("L", (tw + 2 * pad, th + 2 * pad), 0)
    d = ImageDraw.Draw(im)
    a, b = pad, pad + tw - 1     # inclusive ends, x
    c, e = pad, pad + th - 1     # inclusive ends, y
    task = ex.task
    if task == "color" or (task == "shape" and answer == "square"):
        d.rectangle([a, c, b, e], fill=255)
    elif task == "shape":
        if answer == "circle":
            d.ellipse([a, c, b, e], fill=255)
        elif answer == "triangle":
            d.polygon([(a, e), (b, e), ((a + b) / 2, c)], fill=255)
        elif answer == "cross":
            t = tw // 3
            d.rectangle([a, c + t, b, e - t], fill=255)
            d.rectangle([a + t, c, b - t, e], fill=255)
        else:
            raise ValueError(f"unknown shape {answer!r}")
    elif task == "count":
        r = 1.5 * f * ex.scale
        for (cx, cy) in ex.dots[: int(answer)]:
            d.ellipse([pad + cx - r, pad + cy - r, pad + cx + r - 1, pad + cy + r - 1], fill=255)
    elif task == "digit":
        s = round(2 * f * ex.scale)    # stroke
        hm = th // 2
        seg = {"a": (0, 0, tw, s), "b": (tw - s, 0, tw, hm + s // 2), "c": (tw - s, hm - s // 2, tw, th),
               "d": (0, th - s, tw, th), "e": (0, hm - s // 2, s, th), "f": (0, 0, s, hm + s // 2),
               "g": (0, hm - s // 2, tw, hm - s // 2 + s)}
        for name in _SEGMENTS[answer]:
            x0, y0, x1, y1 = seg[name]
            d.rectangle([a + x0, c + y0, a + x1 - 1, c + y1 - 1], fill=255)
    else:
        raise ValueError(f"unknown task {task!r}")
    return im


def _delta(ex: Example, answer: str | None) -> np.ndarray:
    """The target's additive change to the plate, int16 (h, w, 3), on the box grown by 2 units;
    zeros for ``answer=None`` (the empty plate)."""
    f = ex.f
    pad = 2 * f
    tw, th = ex.box[2] - ex.box[0], ex.box[3] - ex.box[1]
    if answer is None:
        return np.zeros((th + 2 * pad, tw + 2 * pad, 3), np.int16)
    env = np.asarray(_mask(ex, answer).filter(ImageFilter.GaussianBlur(SIGMA_U * f)), np.float32) / 255.0
    colour = ex.task == "color"
    tile = _tile(f).astype(np.float32)
    # the tile is anchored at the target box's corner (its phase does not matter for the 336 view)
    reps = (math.ceil(env.shape[0] / f), math.ceil(env.shape[1] / f))
    car = np.tile(tile, reps)[: env.shape[0], : env.shape[1]]
    sign = np.asarray(_COLOR_SIGNS[answer] if colour else (1, 1, 1), np.float32)
    v = (env * car)[..., None] * sign
    # dithered rounding, with a dither that is the same for every answer: the rounding error is
    # then unbiased noise, not a fixed function of the answer's edge profile (which would leave
    # a small answer-dependent mean in the 336 view)
    u = np.random.default_rng([ex.seed, 3, ex.index]).random(v.shape, dtype=np.float32)
    return np.floor(v + u).astype(np.int16)


def _background(ex: Example) -> np.ndarray:
    """Everything but the target: a smooth colour field, coarse texture patches, large distractor
    shapes and the empty plate with its outline. uint8 (h, w, 3)."""
    rng = np.random.default_rng([ex.seed, 2, ex.index])
    w, h = ex.size
    L = max(w, h)
    gw, gh = (int(v) for v in rng.integers(2, 6, size=2))
    coarse = rng.integers(70, 190, size=(gh, gw, 3)).astype(np.uint8)
    img = Image.fromarray(coarse, "RGB").resize((w, h), Image.Resampling.BICUBIC)
    d = ImageDraw.Draw(img)

    def colour() -> tuple[int, int, int]:
        return tuple(int(v) for v in rng.integers(0, 256, size=3))  # type: ignore[return-value]

    # coarse texture patches: stripes or checks with a period of 3-7 % of L (plain at 336)
    for _ in range(int(rng.integers(2, 5)) if ex.distractors else 0):
        pw, ph = (int(v) for v in rng.integers(L // 8, L // 3, size=2))
        px, py = int(rng.integers(-pw // 2, w - pw // 2)), int(rng.integers(-ph // 2, h - ph // 2))
        period = int(rng.integers(L // 30, L // 14))
        c1 = colour()
        kind = int(rng.integers(3))
        if kind == 0:       # vertical stripes
            for x in range(px, px + pw, period):
                d.rectangle([x, py, x + period // 2 - 1, py + ph - 1], fill=c1)
        elif kind == 1:     # horizontal stripes
            for y in range(py, py + ph, period):
                d.rectangle([px, y, px + pw - 1, y + period // 2 - 1], fill=c1)
        else:               # checks
            for i, y in enumerate(range(py, py + ph, period)):
                for j, x in enumerate(range(px, px + pw, period)):
                    if (i + j) % 2 == 0:
                        d.rectangle([x, y, x + period - 1, y + period - 1], fill=c1)

    # large distractor shapes (visible in every view, unrelated to the answer)
    for _ in range(int(rng.integers(3, 7)) if ex.distractors else 0):
        s = int(rng.integers(L // 8, L // 3))
        x, y = int(rng.integers(-s // 3, w - 2 * s // 3)), int(rng.integers(-s // 3, h - 2 * s // 3))
        c1 = colour()
        kind = int(rng.integers(6))
        if kind == 0:
            d.ellipse([x, y, x + s, y + s], fill=c1)
        elif kind == 1:
            d.rectangle([x, y, x + s, y + s], fill=c1)
        elif kind == 2:
            d.polygon([(x, y + s), (x + s, y + s), (x + s // 2, y)], fill=c1)
        elif kind == 3:
            t = s // 3
            d.rectangle([x, y + t, x + s, y + s - t], fill=c1)
            d.rectangle([x + t, y, x + s - t, y + s], fill=c1)
        elif kind == 4:
            d.ellipse([x, y, x + s, y + s], outline=c1, width=max(2, s // 10))
        else:               # a large 7-segment digit
            dw, dh, st = s * 7 // 11, s, max(2, s // 6)
            hm = dh // 2
            seg = {"a": (0, 0, dw, st), "b": (dw - st, 0, dw, hm), "c": (dw - st, hm, dw, dh),
                   "d": (0, dh - st, dw, dh), "e": (0, hm, st, dh), "f": (0, 0, st, hm),
                   "g": (0, hm - st // 2, dw, hm - st // 2 + st)}
            for name in _SEGMENTS[str(int(rng.integers(10)))]:
                x0, y0, x1, y1 = seg[name]
                d.rectangle([x + x0, y + y0, x + x1 - 1, y + y1 - 1], fill=c1)

    # the plate: outline of one unit, then the flat grey inside
    px0, py0, px1, py1 = ex.plate
    f = ex.f
    d.rectangle([px0, py0, px1 - 1, py1 - 1], fill=BORDER_RGB)
    d.rectangle([px0 + f, py0 + f, px1 - f - 1, py1 - f - 1], fill=(PLATE, PLATE, PLATE))
    return np.asarray(img, np.uint8).copy()


def _apply(base: np.ndarray, ex: Example, delta: np.ndarray, origin: tuple[int, int] = (0, 0)) -> np.ndarray:
    """``base`` (an image, or a window of it whose top-left is ``origin``) with ``delta`` added."""
    pad = 2 * ex.f
    x0, y0 = ex.box[0] - pad - origin[0], ex.box[1] - pad - origin[1]
    out = base.copy()
    region = out[y0: y0 + delta.shape[0], x0: x0 + delta.shape[1]].astype(np.int16) + delta
    if region.min() < 0 or region.max() > 255:
        raise AssertionError(f"{ex.id}: the target clips ({region.min()}..{region.max()})")
    out[y0: y0 + delta.shape[0], x0: x0 + delta.shape[1]] = region.astype(np.uint8)
    return out


def render(ex: Example, answer: str | None | bool = True) -> Image.Image:
    """The example's image. ``answer``: True for its own answer, a class of its task for the same
    image with that answer instead (a counterfactual), None for the empty plate."""
    if answer is True:
        answer = ex.answer
    if answer is not None and answer not in ANSWERS[ex.task]:
        raise ValueError(f"{answer!r} is not an answer of task {ex.task!r}")
    base = _background(ex)
    return Image.fromarray(_apply(base, ex, _delta(ex, answer)), "RGB")


# --- the check --------------------------------------------------------------------------------------

def _pad_offset(ex: Example) -> tuple[int, int]:
    """Where LLaVA's expand2square pastes the image on the square of side L."""
    w, h = ex.size
    L = max(w, h)
    return (L - w) // 2, (L - h) // 2


def target_boxes(ex: Example, side: int) -> tuple[tuple[float, float, float, float], tuple[float, float, float, float]]:
    """``(box, plate)`` mapped onto the padded square resized to ``side`` (e.g. 336 or 1008)."""
    s = side / max(ex.size)
    ox, oy = _pad_offset(ex)

    def m(b: tuple[int, int, int, int]) -> tuple[float, float, float, float]:
        return ((b[0] + ox) * s, (b[1] + oy) * s, (b[2] + ox) * s, (b[3] + oy) * s)

    return m(ex.box), m(ex.plate)


def _window(ex: Example) -> tuple[int, int, int, int]:
    """The check window: the plate plus a margin, with edges on the 336 view's pixel grid."""
    f = ex.f
    ox, oy = _pad_offset(ex)
    mg = CHECK_MARGIN_U * f
    x0 = ((ex.plate[0] - mg + ox) // f) * f - ox
    y0 = ((ex.plate[1] - mg + oy) // f) * f - oy
    x1 = -((-(ex.plate[2] + mg + ox)) // f) * f - ox
    y1 = -((-(ex.plate[3] + mg + oy)) // f) * f - oy
    w, h = ex.size
    if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
        raise AssertionError(f"{ex.id}: check window {(x0, y0, x1, y1)} leaves the image {ex.size}")
    return x0, y0, x1, y1


def _resize_window(arr: np.ndarray, k: float) -> np.ndarray:
    h, w = arr.shape[:2]
    size = (round(w * k), round(h * k))
    if size == (w, h):
        return arr.astype(np.float32)
    return np.asarray(Image.fromarray(arr, "RGB").resize(size, Image.Resampling.BICUBIC), np.float32)


def check_example(ex: Example, base: np.ndarray | None = None) -> dict[str, float]:
    """Render the plate region with every answer of the task and with none, and measure:

    * ``low_max``: max |336 view with an answer − 336 view of the empty plate| over the plate,
      over all answers (grey levels; the 336 view is the padded square scaled to 336 with PIL
      bicubic, restricted to a grid-aligned window, which equals the full view there);
    * ``low_mean``: the mean of that absolute difference;
    * ``high_min``: the smallest RMS difference between two answers at 1008 px (the padded
      square scaled to 1008 the same way), over the pixels where their masks differ (for
      ``color``, where all masks are the same square: over the square);
    * ``high_empty``: the smallest such difference between an answer and the empty plate.

    Raises AssertionError when ``low_max > LOWRES_MAX_DIFF`` or ``high_min < HIGHRES_MIN_RMS``.
    """
    if base is None:
        base = _background(ex)
    f = ex.f
    wx0, wy0, wx1, wy1 = _window(ex)
    win = base[wy0:wy1, wx0:wx1]
    # plate and box inside the window, on the 336 grid (exact: the window is grid-aligned) and 1008
    p = ((ex.plate[0] - wx0) / f, (ex.plate[1] - wy0) / f, (ex.plate[2] - wx0) / f, (ex.plate[3] - wy0) / f)
    lo_sl = (slice(math.floor(p[1]), math.ceil(p[3])), slice(math.floor(p[0]), math.ceil(p[2])))
    k = 3 / f
    b = ((ex.box[0] - wx0) * k, (ex.box[1] - wy0) * k, (ex.box[2] - wx0) * k, (ex.box[3] - wy0) * k)
    hi_sl = (slice(math.floor(b[1]), math.ceil(b[3])), slice(math.floor(b[0]), math.ceil(b[2])))
    lows, highs, masks = [], [], []
    ww, wh = wx1 - wx0, wy1 - wy0
    pad = 2 * f
    for a in [None, *ANSWERS[ex.task]]:
        img = _apply(win, ex, _delta(ex, a), origin=(wx0, wy0))
        lows.append(_resize_window(img, 1 / f)[lo_sl])
        highs.append(_resize_window(img, k)[hi_sl])
        m = Image.new("L", (ww, wh), 0)
        if a is not None:
            m.paste(_mask(ex, a), (ex.box[0] - pad - wx0, ex.box[1] - pad - wy0))
        hm = m.resize((round(ww * k), round(wh * k)), Image.Resampling.BOX)
        masks.append(np.asarray(hm, np.uint8)[hi_sl] >= 128)
    diffs = [np.abs(x - lows[0]) for x in lows[1:]]
    low_max = float(max(d.max() for d in diffs))
    low_mean = float(np.mean([d.mean() for d in diffs]))

    def rms(i: int, j: int) -> float:
        """RMS difference of answers i and j at 1008 px where their masks differ."""
        where = masks[i] ^ masks[j]
        if not where.any():          # the same mask (color): compare over it
            where = masks[i]
        return float(np.sqrt(np.mean((highs[i] - highs[j])[where] ** 2)))

    n = len(highs)
    high_min = min(rms(i, j) for i in range(1, n) for j in range(i + 1, n))
    high_empty = min(rms(0, i) for i in range(1, n))
    stats = {"low_max": low_max, "low_mean": low_mean, "high_min": high_min, "high_empty": high_empty}
    if low_max > LOWRES_MAX_DIFF:
        raise AssertionError(f"{ex.id}: the target shows in the 336 view ({low_max} grey levels > {LOWRES_MAX_DIFF})")
    if high_min < HIGHRES_MIN_RMS:
        raise AssertionError(f"{ex.id}: two answers look alike at {HIGH_SIDE} px "
                             f"(RMS {high_min:.1f} < {HIGHRES_MIN_RMS})")
    return stats


# --- writing ------------------------------------------------------------------------------------------

def _png(arr: np.ndarray, level: int = 3) -> bytes:
    """A lossless 8-bit RGB PNG of ``arr`` (h, w, 3): every row "Up"-filtered, zlib ``level``.

    Written here rather than with PIL's encoder (whose per-row adaptive filtering is most of the
    cost of a 1-2 MP image); the bytes depend only on the pixels (and zlib)."""
    h, w, c = arr.shape
    a = np.ascontiguousarray(arr, np.uint8)
    rows = np.empty((h, 1 + w * c), np.uint8)
    rows[:, 0] = 2                                   # filter type 2: Up
    rows[0, 1:] = a[0].reshape(-1)
    rows[1:, 1:] = (a[1:] - a[:-1]).reshape(h - 1, -1)   # uint8 arithmetic wraps mod 256

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), level)) + chunk(b"IEND", b""))


def _work(job: tuple[Example, str]) -> dict[str, float]:
    ex, image_dir = job
    base = _background(ex)
    stats = check_example(ex, base)
    path = Path(image_dir) / ex.file
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(_png(_apply(base, ex, _delta(ex, ex.answer))))
    os.replace(tmp, path)
    return stats


def _write_json(path: Path, obj: Any, *, lines: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        if lines:
            for row in obj:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
        else:
            json.dump(obj, fh, ensure_ascii=False, indent=1)
            fh.write("\n")
    os.replace(tmp, path)


def _summary(values: Iterable[float], worst: str) -> dict[str, float]:
    v = np.asarray(list(values), np.float64)
    if v.size == 0:
        return {}
    return {"mean": round(float(v.mean()), 3), worst: round(float(v.max() if worst == "max" else v.min()), 3)}


def generate(out_dir: str | os.PathLike, n: int, *, seed: int = 0, tasks: Sequence[str] = TASKS,
             test_fraction: float = 0.2, sizes: Sequence[tuple[int, int]] | None = None,
             target_scale: float = 1.0, distractors: bool = True,
             classes: Mapping[str, Sequence[str]] | None = None, workers: int = 1,
             progress: bool = True) -> dict[str, Any]:
    """Write the dataset (see the module docstring) to ``out_dir`` and return its ``meta.json``.

    Deterministic: the same arguments (``workers`` and ``progress`` aside) give byte-identical
    files. ``workers > 1`` draws the images in a process pool. Stale images of an earlier dataset
    (files named like ``<task>-<6 digits>.png`` in ``images/``) are removed; nothing else is.
    """
    examples = build_examples(n, seed=seed, tasks=tasks, test_fraction=test_fraction, sizes=sizes,
                              target_scale=target_scale, distractors=distractors, classes=classes)
    sizes_used = _check_sizes(SIZES if sizes is None else sizes, target_scale, tasks)
    used = task_classes(tasks, classes)
    out = Path(out_dir)
    image_dir = out / "images"
    (out / "test").mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    keep = {ex.file for ex in examples}
    for p in image_dir.iterdir():
        if _ID_RE.match(p.name) and p.name not in keep:
            p.unlink()

    jobs = [(ex, str(image_dir)) for ex in examples]
    stats: list[dict[str, float]] = []
    step = max(1, n // 10)

    def report(i: int) -> None:
        if progress and (i % step == 0 or i == n):
            print(f"synth: {i}/{n} images", file=sys.stderr, flush=True)

    if workers > 1 and n > 1:
        import multiprocessing as mp
        # fork where there is one: the workers need the parent's imports, not a fresh interpreter
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)   # fork() in a threaded process
            with ctx.Pool(min(workers, n)) as pool:
                chunk = max(1, min(16, n // (4 * workers)))
                for i, s in enumerate(pool.imap(_work, jobs, chunksize=chunk), 1):
                    stats.append(s)
                    report(i)
    else:
        for i, job in enumerate(jobs, 1):
            stats.append(_work(job))
            report(i)

    train = [ex for ex in examples if ex.split == "train"]
    test = [ex for ex in examples if ex.split == "test"]
    stage1 = [{"id": ex.id, "image": ex.file,
               "conversations": [{"from": "human", "value": "<image>\n"},
                                 {"from": "gpt", "value": ex.caption}]} for ex in train]
    stage2 = [{"id": ex.id, "image": ex.file,
               "conversations": [{"from": "human", "value": "<image>\n" + ex.question},
                                 {"from": "gpt", "value": ex.answer}]} for ex in train]
    questions = [{"question_id": ex.id, "image": ex.file, "text": ex.question, "category": ex.task} for ex in test]
    answers = [{"question_id": ex.id, "text": ex.answer} for ex in test]
    _write_json(out / "stage1.json", stage1)
    _write_json(out / "stage2.json", stage2)
    _write_json(out / "test" / "questions.jsonl", questions, lines=True)
    _write_json(out / "test" / "answers.jsonl", answers, lines=True)

    tasks = tuple(tasks)
    counts: dict[str, Any] = {}
    separability: dict[str, Any] = {}
    for task in tasks:
        exs = [(ex, s) for ex, s in zip(examples, stats) if ex.task == task]
        counts[task] = {
            split: {"images": sum(ex.split == split for ex, _ in exs),
                    "answers": {a: sum(ex.split == split and ex.answer == a for ex, _ in exs) for a in used[task]}}
            for split in ("train", "test")}
        separability[task] = {
            "lowres_max_abs_diff": _summary((s["low_max"] for _, s in exs), "max"),
            "lowres_mean_abs_diff": _summary((s["low_mean"] for _, s in exs), "max"),
            "highres_min_pairwise_rms": _summary((s["high_min"] for _, s in exs), "min"),
            "highres_min_rms_vs_empty": _summary((s["high_empty"] for _, s in exs), "min"),
        }
    meta: dict[str, Any] = {
        "generator": "hires_lmm.data.synth",
        "version": 2,
        "seed": seed,
        "n": n,
        "tasks": list(tasks),
        "test_fraction": test_fraction,
        "sizes": [list(s) for s in sizes_used],
        "target_scale": target_scale,
        "distractors": distractors,
        "image_folder": "images",
        "files": {"stage1": "stage1.json", "stage2": "stage2.json", "questions": "test/questions.jsonl",
                  "answers": "test/answers.jsonl"},
        "counts": {"train": len(train), "test": len(test), "per_task": counts},
        "answers": {t: list(used[t]) for t in tasks},
        "questions": {t: QUESTIONS[t] for t in tasks},
        "check": {
            "lowres": f"padded square -> {LOW_SIDE} px, PIL bicubic: every answer within {LOWRES_MAX_DIFF} grey "
                      "levels of the empty plate over the plate",
            "highres": f"padded square -> {HIGH_SIDE} px, PIL bicubic: every two answers differ by RMS >= "
                       f"{HIGHRES_MIN_RMS} over the target box",
            "lowres_max_diff": LOWRES_MAX_DIFF,
            "highres_min_rms": HIGHRES_MIN_RMS,
        },
        "separability": separability,
    }
    _write_json(out / "meta.json", meta)
    return meta
