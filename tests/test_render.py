"""Rendering views to normalised tensors, checked against the reference processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hires_lmm.image.render import CLIP_MEAN, CLIP_STD, denormalize, expand2square, normalize, render
from hires_lmm.plan import plan_image
from hires_lmm.plan.uhd import slice_size


def noise_image(size, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    # smooth-ish content plus noise so resampling differences would show
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 / max(w - 1, 1)), (yy * 255 / max(h - 1, 1)), ((xx + yy) % 97) * 2.6], -1)
    a = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(a, "RGB")


@pytest.mark.parametrize("size", [(500, 375), (1024, 768), (300, 900), (1500, 400), (336, 336)])
def test_llava_next_matches_transformers_pil_processor(size):
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    img = noise_image(size, 1)
    hf = LlavaNextImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                    image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_pad=False)
    ref = np.asarray(hf.preprocess([img], return_tensors="np")["pixel_values"][0])
    ours = torch.stack(render(img, plan_image("llava-next", size))).numpy()
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-5


@pytest.mark.parametrize("size", [(500, 375), (300, 900), (336, 336)])
def test_llava15_matches_clip_processor_on_padded_square(size):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    img = noise_image(size, 2)
    hf = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                               image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    padded = expand2square(img, tuple(int(x * 255) for x in CLIP_MEAN))
    ref = np.asarray(hf.preprocess([padded], return_tensors="np")["pixel_values"][0])
    (ours,) = render(img, plan_image("llava-1.5", size))
    assert np.abs(ours.numpy() - ref).max() < 1e-5


@pytest.mark.parametrize("size", [(672, 1088), (1024, 768), (1024, 256), (200, 100)])
def test_uhd_matches_reference_slicing(size):
    """The reference resizes the whole image to the slice grid's size (PIL bicubic) and crops."""
    img = noise_image(size, 3)
    p = plan_image("llava-uhd", size)
    views = render(img, p)
    ov = p.views[-1]
    assert torch.equal(views[-1], normalize(img.resize(ov.size, Image.Resampling.BICUBIC)))
    if p.grid:
        m, n = p.grid
        sw, sh = slice_size(size, p.grid)
        refine = img.resize((sw * m, sh * n), Image.Resampling.BICUBIC)
        for k, (v, t) in enumerate(zip(p.views[:-1], views[:-1])):
            j, i = k % m, k // m
            crop = refine.crop((j * sw, i * sh, (j + 1) * sw, (i + 1) * sh))
            assert t.shape == (3, sh, sw)
            assert torch.equal(t, normalize(crop))


def test_inf_strided_global_crops_reassemble_to_the_canvas():
    img = noise_image((1300, 900), 4)
    p = plan_image("inf-llava", img.size)
    views = render(img, p)
    local, glob, thumb = views[:9], views[9:18], views[18]
    canvas_from_local = torch.cat([torch.cat(local[r * 3:(r + 1) * 3], dim=2) for r in range(3)], dim=1)
    canvas_from_global = torch.zeros_like(canvas_from_local)
    for k, g in enumerate(glob):
        h, w = divmod(k, 3)
        canvas_from_global[:, h::3, w::3] = g
    assert canvas_from_local.shape == (3, 1008, 1008)
    assert torch.equal(canvas_from_global, canvas_from_local)
    ref_thumb = F.interpolate(canvas_from_local[None], (336, 336), mode="bicubic", align_corners=False)[0]
    assert torch.equal(thumb, ref_thumb)
    # each strided view covers the whole image: it looks like a shrunk copy, close to the thumbnail
    assert (glob[0] - thumb).abs().mean() < (local[0] - thumb).abs().mean()


def test_hr_lowres_is_bilinear_align_corners_of_highres():
    img = noise_image((800, 600), 5)
    p = plan_image("llava-hr", img.size)
    hi, lo = render(img, p)
    assert hi.shape == (3, 1024, 1024) and lo.shape == (3, 448, 448)
    assert torch.equal(lo, F.interpolate(hi[None], (448, 448), mode="bilinear", align_corners=True)[0])
    # padding rows (top/bottom of a landscape image) carry the CLIP mean colour ≈ 0 after normalising
    assert hi[:, :10].abs().max() < 0.02


def test_slime_tiles_and_global():
    img = noise_image((1000, 700), 6)
    p = plan_image("slime", img.size)
    views = render(img, p)
    assert torch.equal(views[0], normalize(img.resize((336, 336), Image.Resampling.BICUBIC)))
    assert all(t.shape == (3, 336, 336) for t in views)
    c = p.canvases[1]
    resized = img.resize(c.resize, Image.Resampling.BICUBIC)
    canvas = Image.new("RGB", c.size, (0, 0, 0))
    canvas.paste(resized, c.offset)
    for v, t in zip(p.views[1:], views[1:]):
        assert torch.equal(t, normalize(canvas.crop(v.crop)))


def test_render_rejects_wrong_image():
    img = noise_image((100, 80))
    with pytest.raises(ValueError, match="plan is for 101x80"):
        render(img, plan_image("llava-1.5", (101, 80)))
    with pytest.raises(ValueError, match="RGB"):
        render(img.convert("L"), plan_image("llava-1.5", (100, 80)))


def test_normalize_roundtrip():
    img = noise_image((37, 23), 7)
    assert np.array_equal(np.asarray(denormalize(normalize(img))), np.asarray(img))


@pytest.mark.parametrize("size", [(1, 1), (1, 500), (700, 1), (3, 2000)])
def test_render_extreme_sizes_every_method(size):
    from hires_lmm.plan import METHODS

    img = noise_image(size, 8)
    for m in METHODS:
        p = plan_image(m, size)
        for v, t in zip(p.views, render(img, p)):
            assert t.shape == (3, v.size[1], v.size[0]) and torch.isfinite(t).all()


def test_inf_eval_path_upsamples_the_336_tensor():
    """INF-LLaVA's evaluation loader gives the model a 336 tensor that it upsamples to 1008."""
    from hires_lmm.image.render import make_canvas

    img = noise_image((900, 600), 9)
    p = plan_image("inf-llava", img.size, path="eval")
    small = normalize(make_canvas(img, p.canvases[0]))
    big = F.interpolate(small[None], (1008, 1008), mode="bicubic", align_corners=False)[0]
    views = render(img, p)
    assert torch.equal(views[0], big[:, :336, :336])
    assert torch.equal(views[9 + 5], big[:, 1::3, 2::3])  # sub[h·3+w] with h=1, w=2
    assert torch.allclose(views[18], small, atol=1e-5)  # thumbnail: 336 → 336
    assert p.views[0].box == pytest.approx(plan_image("inf-llava", img.size).views[0].box)
    with pytest.raises(ValueError, match="path"):
        plan_image("inf-llava", img.size, path="test")
