"""Planner tests: SPEC.md's worked examples, agreement with transformers, and properties."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from _budget_helpers import image_sizes
from hypothesis import given, settings
from hypothesis import strategies as st

from hires_lmm.plan import METHODS, plan_image
from hires_lmm.plan.anyres import NEXT_PINPOINTS, select_best_resolution, unpadded_grid
from hires_lmm.plan.slime import local_candidates
from hires_lmm.plan.uhd import best_grid, find_best_resize

# --- LLaVA-UHD: SPEC's worked examples -------------------------------------------------------

@pytest.mark.parametrize("size, grid, slice_size, overview", [
    ((672, 1088), (2, 3), (322, 336), (252, 420)),
    ((1024, 768), (3, 2), (308, 350), (378, 280)),
    ((1024, 256), (4, 1), (336, 336), (672, 168)),
])
def test_uhd_worked_examples(size, grid, slice_size, overview):
    p = plan_image("llava-uhd", size)
    assert p.grid == grid
    slices = p.views_with_role("slice")
    assert len(slices) == grid[0] * grid[1]
    assert {v.size for v in slices} == {slice_size}
    assert p.views[-1].role == "overview" and p.views[-1].size == overview
    n = len(slices)
    assert p.num_visual_tokens == 144 * (n + 1) + n


def test_uhd_500x375_is_two_columns():
    assert plan_image("llava-uhd", (500, 375)).grid == (2, 1)


def test_uhd_small_image_is_not_sliced_and_upscaled():
    p = plan_image("llava-uhd", (200, 100))
    assert p.grid is None and [v.role for v in p.views] == ["overview"]
    w, h = p.views[0].size
    # upscaled to about 336² area at aspect 2: h = int(336/√2) = 237 → 224, w = int(237·2) = 474 → 462
    assert (w, h) == (462, 224)
    assert p.num_visual_tokens == 144 and p.separators == ()


def test_uhd_spatial_schema_separators():
    p = plan_image("llava-uhd", (1024, 768))  # 3 columns × 2 rows
    assert p.separators == (",", ",", "\n", ",", ",", "\n")
    cells = [v.cell for v in p.views_with_role("slice")]
    assert cells == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]  # row-major


def test_uhd_at_most_seven_slices_and_arxiv_six():
    for size in [(4000, 3000), (3000, 4000), (8000, 1000), (2000, 2000)]:
        assert len(plan_image("llava-uhd", size).views_with_role("slice")) <= 7
        assert len(plan_image("llava-uhd-arxiv", size).views_with_role("slice")) <= 6


def test_uhd_arxiv_table1_resolution():
    p = plan_image("llava-uhd-arxiv", (672, 1008))
    assert p.grid == (2, 3)
    assert {v.size for v in p.views_with_role("slice")} == {(336, 336)}
    assert p.num_visual_tokens == 7 * 64 + 6  # 6 slices + overview at 64 queries, 6 separators


def test_uhd_grid_tie_first_minimum_wins():
    # a square image of 1-2 slice areas (multiple = 2): grids (1,2) and (2,1) tie exactly; (1,2) comes first
    assert best_grid((400, 400)) == (1, 2)


def test_uhd_find_best_resize_reference_arithmetic():
    # the reference comments: 672x448 → r=1.5, h=int(336/√1.5)=274, w=int(274·1.5)=411 → 406x266... floored
    assert find_best_resize((672, 448), 336, 14) == (406, 266)
    # no upscale unless allowed
    assert find_best_resize((100, 50), 336, 14) == (98, 42)


def test_uhd_prescale_option_reproduces_eval_loader():
    p = plan_image("llava-uhd", (672, 1088), prescale_long_side=1024)
    assert p.prescale == (632, 1024)
    q = plan_image("llava-uhd", (632, 1024))
    assert p.grid == q.grid and [v.size for v in p.views] == [v.size for v in q.views]
    assert p.views[-1].box == pytest.approx((0.0, 0.0, 672.0, 1088.0))  # boxes stay in original-image coordinates


# --- LLaVA-NeXT: agreement with transformers -------------------------------------------------

SIZES = [(1, 1), (10, 10), (336, 336), (500, 375), (375, 500), (640, 480), (1024, 768), (800, 1280),
         (1920, 1080), (4000, 3000), (3000, 4000), (1000, 200), (200, 1000), (1, 10000), (10000, 1),
         (337, 672), (672, 337), (1007, 335), (2048, 2048), (123, 4567)]


@pytest.mark.parametrize("size", SIZES)
def test_next_best_resolution_matches_transformers(size):
    from transformers.image_processing_utils import select_best_resolution as hf_select
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    w, h = size
    hf_pinpoints = LlavaNextImageProcessorPil.image_grid_pinpoints  # (h, w) pairs, its default order
    hf_h, hf_w = hf_select((h, w), hf_pinpoints)
    assert select_best_resolution(size, NEXT_PINPOINTS) == (hf_w, hf_h)


def test_next_tie_order_llava_option():
    from hires_lmm.plan.anyres import LLAVA_PINPOINTS

    assert plan_image("llava-next", (300, 200)).grid == (2, 1)  # transformers' order
    assert plan_image("llava-next", (300, 200), pinpoints=LLAVA_PINPOINTS).grid == (1, 2)  # LLaVA's


@pytest.mark.parametrize("size", SIZES)
def test_next_token_count_matches_transformers_processor(size):
    from transformers.image_processing_utils import select_best_resolution as hf_select
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    from transformers.models.llava_next.processing_llava_next import LlavaNextProcessor

    w, h = size
    hf_h, hf_w = hf_select((h, w), LlavaNextImageProcessorPil.image_grid_pinpoints)
    unpadded, newlines = LlavaNextProcessor._get_unpadded_features(None, h, w, 24, 24, hf_h // 336, hf_w // 336)
    p = plan_image("llava-next", size)
    assert p.num_visual_tokens == 576 + unpadded + newlines


@pytest.mark.parametrize("size", [(500, 375), (1000, 200), (123, 4567), (1920, 1080)])
def test_next_unpad_matches_transformers_model(size):
    import torch
    from transformers.models.llava_next.modeling_llava_next import unpad_image

    w, h = size
    p = plan_image("llava-next", size)
    cols, rows = p.grid
    feat = torch.zeros(1, rows * 24, cols * 24)
    out = unpad_image(feat, (h, w))
    assert tuple(p.extra["unpadded_grid"]) == (out.shape[2], out.shape[1])
    assert unpadded_grid(size, cols, rows) == (out.shape[2], out.shape[1])


def test_next_views_order_base_then_tiles_row_major():
    p = plan_image("llava-next", (1000, 700))
    assert [v.role for v in p.views] == ["base", "tile", "tile", "tile", "tile"]
    assert [v.cell for v in p.views[1:]] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert p.grid == (2, 2)


# --- LLaVA-HR, INF-LLaVA, SliME, LLaVA-1.5 -----------------------------------------------------

@pytest.mark.parametrize("S, tokens, lowres", [(384, 576, 336), (768, 576, 336), (1024, 1024, 448), (1536, 2304, 672)])
def test_hr_token_counts(S, tokens, lowres):
    p = plan_image("llava-hr", (800, 600), S=S)
    assert p.num_visual_tokens == tokens
    hi, lo = p.views
    assert (hi.role, hi.size) == ("highres", (S, S))
    assert (lo.role, lo.size, lo.resample) == ("lowres", (lowres, lowres), "torch_bilinear_ac")
    assert p.extra["convnext_grid"] == S // 32


def test_hr_rejects_side_not_multiple_of_32():
    with pytest.raises(ValueError, match="multiple of the ConvNeXt stride"):
        plan_image("llava-hr", (800, 600), S=1000)


def test_inf_views():
    p = plan_image("inf-llava", (1600, 1200))
    roles = [v.role for v in p.views]
    assert roles == ["local"] * 9 + ["global"] * 9 + ["thumbnail"]
    assert p.num_visual_tokens == 576 and p.grid == (3, 3)
    assert p.views[4].crop == (336, 336, 672, 672)  # tile i·3+j covers rows 336i, columns 336j
    # sub[h·3+w] = img[h::3, w::3]: stride (step, dx=w, dy=h)
    assert [v.stride for v in p.views[9:18]] == [(3, w, h) for h in range(3) for w in range(3)]
    assert all(v.box is None for v in p.views[9:18])
    assert p.canvases[0].size == (1008, 1008) and p.canvases[0].pad_square


def test_slime_local_grid_rule():
    # s = ceil(W·H/336²) clipped to [2, 6]; s ≤ 2 → factor pairs of {s, s+1}
    assert local_candidates((336, 336)) == [(336, 672), (672, 336), (336, 1008), (1008, 336)]
    assert local_candidates((4000, 3000))[:4] == [(336, 1680), (1680, 336), (336, 2016), (672, 1008)]
    p = plan_image("slime", (1000, 700))  # s = 7 → 6: {5, 6, 7}
    assert p.grid == (3, 2)
    assert p.num_visual_tokens == 576 + 1 + 144 * 6
    assert p.separators == (",",)
    assert [v.role for v in p.views] == ["global"] + ["local"] * 6


def test_llava15_pad_square_box():
    p = plan_image("llava-1.5", (1000, 500))
    (v,) = p.views
    assert v.size == (336, 336) and v.box == (0.0, 0.0, 1000.0, 500.0)
    assert p.num_visual_tokens == 576 and p.canvases[0].pad_square and p.canvases[0].fill == "mean"


def test_unknown_method_and_bad_sizes():
    with pytest.raises(ValueError, match="unknown method"):
        plan_image("llava-9", (10, 10))
    for bad in [(0, 10), (10, -1), (1.5, 10), ("a", 3), (10,)]:
        with pytest.raises(ValueError):
            plan_image("llava-uhd", bad)


def test_plan_does_not_import_torch():
    code = "import sys, hires_lmm.plan, hires_lmm.plan.cost; hires_lmm.plan.plan_image('slime', (99, 77)); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- properties over sizes from 1×1 to 20000×20000, aspect ratios up to 1:200 ---------------

def _tokens_from_views(p) -> int:
    """Count the visual tokens the views produce, independently of the planner's formula."""
    m = p.method
    if m == "llava-1.5":
        return sum((v.size[0] // 14) * (v.size[1] // 14) for v in p.views)
    if m in ("llava-uhd", "llava-uhd-arxiv"):
        return p.extra["queries_per_part"] * len(p.views) + len(p.separators)
    if m == "llava-next":
        cols, rows = p.extra["unpadded_grid"]
        return 576 + cols * rows + rows
    if m == "llava-hr":
        lo = p.views_with_role("lowres")[0]
        return (lo.size[0] // 14) * (lo.size[1] // 14)
    if m == "inf-llava":
        return (p.views_with_role("thumbnail")[0].size[0] // 14) ** 2
    if m == "slime":
        return 576 + len(p.separators) + 144 * len(p.views_with_role("local"))
    raise AssertionError(m)


@settings(max_examples=150, deadline=None)
@given(size=image_sizes(), method=st.sampled_from(METHODS))
def test_plan_properties(size, method):
    p = plan_image(method, size)
    W, H = size
    assert p.image_size == size and p.views
    for v in p.views:
        w, h = v.size
        assert w >= 1 and h >= 1
        if v.box is not None:
            x0, y0, x1, y1 = v.box
            assert -1e-6 <= x0 < x1 <= W + 1e-6 and -1e-6 <= y0 < y1 <= H + 1e-6
        canvas = p.canvases[v.canvas]
        if v.crop is not None:
            x0, y0, x1, y1 = v.crop
            assert 0 <= x0 < x1 <= canvas.size[0] and 0 <= y0 < y1 <= canvas.size[1]
            if v.resample is None:
                assert (x1 - x0, y1 - y0) == v.size
        if v.stride is not None:
            step, dx, dy = v.stride
            assert math.ceil((canvas.size[0] - dx) / step) == w and math.ceil((canvas.size[1] - dy) / step) == h
        if v.role == "highres":  # LLaVA-HR's ConvNeXt input: multiples of its stride 32
            assert w % 32 == 0 and h % 32 == 0
        else:  # every ViT input is a whole number of 14-px patches
            assert w % 14 == 0 and h % 14 == 0
    for c in p.canvases:
        ox, oy = c.offset
        assert ox + c.resize[0] <= c.size[0] and oy + c.resize[1] <= c.size[1]
    assert p.num_visual_tokens == _tokens_from_views(p)
    assert p.num_visual_tokens == sum(g.count for g in p.tokens)
    if p.grid is not None and method not in ("inf-llava",):
        cells = [v for v in p.views if v.cell is not None]
        assert len(cells) == p.grid[0] * p.grid[1]


@settings(max_examples=100, deadline=None)
@given(size=image_sizes())
def test_uhd_slices_tile_the_image(size):
    p = plan_image("llava-uhd", size)
    slices = p.views_with_role("slice")
    if not slices:
        assert p.grid is None
        return
    cols, rows = p.grid
    assert len(slices) <= 7 and cols * rows == len(slices)
    area = sum((v.box[2] - v.box[0]) * (v.box[3] - v.box[1]) for v in slices)
    assert area == pytest.approx(size[0] * size[1], rel=1e-9)
    # every slice of one size, a multiple of 14, and the canvas is exactly the grid of slices
    assert len({v.size for v in slices}) == 1
    sw, sh = slices[0].size
    assert p.canvases[slices[0].canvas].size == (sw * cols, sh * rows)
