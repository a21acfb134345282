"""Rendering views to normalised tensors, checked against the reference processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import noise_image
from PIL import Image

from hires_lmm.image.render import CLIP_MEAN, CLIP_STD, denormalize, expand2square, normalize, render
from hires_lmm.plan import plan_image
from hires_lmm.plan.uhd import slice_size


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
        for k, t in enumerate(views[:-1]):
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


# ----------------------------------------------------------------------------- load_and_render
def photo_file(tmp_path, size, fmt="JPEG", seed=11, exif_orientation=None):
    """A photo-like file (smooth content, shapes, noise) of ``size``."""
    from hires_lmm.bench.preprocess import synth_photo

    img = synth_photo(size, seed)
    path = tmp_path / f"photo-{size[0]}x{size[1]}.{'jpg' if fmt == 'JPEG' else 'png'}"
    kw = {"quality": 90} if fmt == "JPEG" else {}
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        kw["exif"] = exif.tobytes()
    img.save(path, fmt, **kw)
    return path


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_load_and_render_fast_is_close_and_exact_is_identical(tmp_path, fmt):
    from hires_lmm.image import load_image
    from hires_lmm.image.render import load_and_render
    from hires_lmm.plan import METHODS

    path = photo_file(tmp_path, (2400, 1600), fmt)
    full = load_image(path)
    for m in METHODS:
        ref = render(full, plan_image(m, full.size))
        plan, views = load_and_render(path, m)
        assert plan == plan_image(m, (2400, 1600))
        assert [tuple(t.shape) for t in views] == [tuple(t.shape) for t in ref]
        diff = torch.cat([(a - b).abs().flatten() for a, b in zip(views, ref)])
        assert diff.max() < 0.2 and diff.mean() < 0.005, m  # a few grey levels at edges, ~0 on average
        if m in ("llava-1.5", "llava-next"):  # (the exact path is render(load_image(...)) for every method)
            _, exact = load_and_render(path, m, fast=False)
            assert all(torch.equal(a, b) for a, b in zip(exact, ref))


def test_load_and_render_reduces_the_decode_of_large_jpegs(tmp_path, monkeypatch):
    from hires_lmm.image import render as render_mod
    from hires_lmm.image.render import load_and_render

    seen = []
    real = render_mod._render
    monkeypatch.setattr(render_mod, "_render", lambda img, plan, box=None: seen.append(img.size) or real(img, plan, box))
    path = photo_file(tmp_path, (2688, 2016))
    plan, views = load_and_render(path, "llava-next")  # largest canvas 672x504: decoded at 1/2
    assert seen == [(1344, 1008)] and len(views) == 5
    seen.clear()
    load_and_render(path, "llava-uhd")  # slices need the full resolution: nothing reduced
    assert seen == [(2688, 2016)]


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_load_and_render_exif_orientation_odd_sizes(tmp_path, orientation):
    """Odd sizes: the reduced decode's last pixel covers the image in part, at the start of an axis
    the orientation reverses; LLaVA-1.5's padding follows it."""
    from hires_lmm.image import load_image
    from hires_lmm.image.render import load_and_render

    path = photo_file(tmp_path, (2403, 1601), exif_orientation=orientation)
    full = load_image(path)
    assert full.size == ((1601, 2403) if orientation in (6, 8) else (2403, 1601))
    plan, views = load_and_render(path, "llava-1.5")
    assert plan.image_size == full.size
    (ref,) = render(full, plan_image("llava-1.5", full.size))
    assert float((views[0] - ref).abs().max()) < 0.1


def test_load_and_render_pixel_limit_and_sources(tmp_path):
    import base64

    from hires_lmm.image import ImageTooLargeError, load_image
    from hires_lmm.image.render import load_and_render

    path = photo_file(tmp_path, (2400, 1800), exif_orientation=6)  # stored landscape, shown portrait
    with pytest.raises(ImageTooLargeError):
        load_and_render(path, "llava-next", max_pixels=1000 * 1000)  # checked before the reduced decode
    full = load_image(path)
    _, from_file = load_and_render(path, "llava-1.5")
    _, from_pil = load_and_render(full, "llava-1.5")
    _, from_bytes = load_and_render(path.read_bytes(), "llava-1.5")
    url = "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()
    _, from_url = load_and_render(url, "llava-1.5")
    assert torch.equal(from_file[0], from_bytes[0]) and torch.equal(from_file[0], from_url[0])
    assert float((from_pil[0] - from_file[0]).abs().max()) < 0.2  # reduced by PIL, not by libjpeg
