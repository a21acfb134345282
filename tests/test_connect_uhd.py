"""Connectors: RoIAlign, LLaVA-UHD's resamplers, LLaVA-NeXT packing, LLaVA's projectors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hires_lmm.connect.anyres import pack_anyres, unpad_image
from hires_lmm.connect.mlp import MLP2xGelu, build_projector
from hires_lmm.connect.roi_align import grid_rois, roi_align, roi_align_grid
from hires_lmm.connect.uhd import (
    PerceiverResampler,
    SpatialResampler,
    best_pooling_size,
    get_2d_sincos_pos_embed,
    region_boxes,
)

f32 = np.float32


# ---------------------------------------------------------------------------------------------
# an independent, slow RoIAlign: torchvision's documented algorithm, one sample at a time, in
# numpy float32 scalars (the kernel's arithmetic for float input)


def _bilinear(fmap: np.ndarray, y, x) -> np.ndarray:
    _, H, W = fmap.shape
    if y < -1.0 or y > H or x < -1.0 or x > W:
        return np.zeros(fmap.shape[0], np.float32)
    y, x = (f32(0) if y <= 0 else y), (f32(0) if x <= 0 else x)
    y_low, x_low = int(y), int(x)
    if y_low >= H - 1:
        y_high = y_low = H - 1
        y = f32(y_low)
    else:
        y_high = y_low + 1
    if x_low >= W - 1:
        x_high = x_low = W - 1
        x = f32(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - f32(y_low), x - f32(x_low)
    hy, hx = f32(1) - ly, f32(1) - lx
    return (hy * hx * fmap[:, y_low, x_low] + hy * lx * fmap[:, y_low, x_high]
            + ly * hx * fmap[:, y_high, x_low] + ly * lx * fmap[:, y_high, x_high])


def slow_roi_align(feat, boxes, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False):
    feat = feat.detach().numpy().astype(np.float32)
    boxes = boxes.detach().numpy().astype(np.float32)
    ph, pw = output_size
    out = np.zeros((boxes.shape[0], feat.shape[1], ph, pw), np.float32)
    off = f32(0.5) if aligned else f32(0)
    for k, roi in enumerate(boxes):
        fmap = feat[int(roi[0])]
        sx, sy = roi[1] * f32(spatial_scale) - off, roi[2] * f32(spatial_scale) - off
        ex, ey = roi[3] * f32(spatial_scale) - off, roi[4] * f32(spatial_scale) - off
        rw, rh = ex - sx, ey - sy
        if not aligned:
            rw, rh = max(rw, f32(1)), max(rh, f32(1))
        bh, bw = rh / f32(ph), rw / f32(pw)
        gh = sampling_ratio if sampling_ratio > 0 else int(math.ceil(rh / f32(ph)))
        gw = sampling_ratio if sampling_ratio > 0 else int(math.ceil(rw / f32(pw)))
        count = f32(max(gh * gw, 1))
        for py in range(ph):
            for px in range(pw):
                acc = np.zeros(feat.shape[1], np.float32)
                for iy in range(gh):
                    y = sy + f32(py) * bh + f32(iy + 0.5) * bh / f32(gh)
                    for ix in range(gw):
                        x = sx + f32(px) * bw + f32(ix + 0.5) * bw / f32(gw)
                        acc += _bilinear(fmap, y, x)
                out[k, :, py, px] = acc / count
    return torch.from_numpy(out)


def random_boxes(n: int, batch: int, H: int, W: int, gen: torch.Generator) -> torch.Tensor:
    """Boxes inside, touching and crossing the borders, some tiny or flipped."""
    b = torch.randint(0, batch, (n,), generator=gen).float()
    x1 = torch.rand(n, generator=gen) * (W + 4) - 3
    y1 = torch.rand(n, generator=gen) * (H + 4) - 3
    w = torch.rand(n, generator=gen) * W * 0.9 + 0.05
    h = torch.rand(n, generator=gen) * H * 0.9 + 0.05
    boxes = torch.stack([b, x1, y1, x1 + w, y1 + h], 1)
    # exact border cases: the whole map, boxes ending on the last row/column, flipped boxes
    extra = torch.tensor([[0, 0, 0, W, H], [batch - 1, W - 2, H - 2, W, H], [0, -1, -1, 1.5, 0.5],
                          [batch - 1, 2.0, 1.0, 1.0, 0.5], [0, W - 0.5, H - 0.5, W + 3, H + 2.5]])
    return torch.cat([boxes, extra])


# ---------------------------------------------------------------------------------------------
# RoIAlign


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
@pytest.mark.parametrize("output_size", [(3, 3), (2, 4), (1, 1)])
def test_roi_align_matches_slow_reference_on_random_boxes(sampling_ratio, aligned, spatial_scale, output_size):
    gen = torch.Generator().manual_seed(hash((sampling_ratio, aligned, spatial_scale, output_size)) % 2**31)
    feat = torch.randn(2, 3, 9, 13, generator=gen)
    Hs, Ws = int(9 / spatial_scale), int(13 / spatial_scale)  # boxes live in input coordinates
    boxes = random_boxes(25, 2, Hs, Ws, gen)
    ours = roi_align(feat, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    ref = slow_roi_align(feat, boxes, output_size, spatial_scale, sampling_ratio, aligned)
    assert ours.shape == ref.shape == (boxes.shape[0], 3, *output_size)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)


def test_roi_align_border_rules():
    """Samples beyond [-1, H] count as zero (yet in the average); inside, edges are clamped."""
    feat = torch.arange(12.0).reshape(1, 1, 3, 4)
    # a 1x1 box (after the min-size clamp) fully outside: every sample is dropped → 0
    out = roi_align(feat, torch.tensor([[0, 10.0, 10.0, 10.5, 10.5]]), (1, 1))
    assert out.item() == 0.0
    # a box centred on the last pixel: the sample at (2.5, 3.5) is clamped to pixel (2, 3)
    out = roi_align(feat, torch.tensor([[0, 3.0, 2.0, 4.0, 3.0]]), (1, 1))
    assert out.item() == pytest.approx(11.0)
    # interior box: plain bilinear at the bin centre (1.5, 0.5) → mean of pixels (1,0),(1,1),(2,0),(2,1)
    out = roi_align(feat, torch.tensor([[0, 0.0, 1.0, 1.0, 2.0]]), (1, 1))
    assert out.item() == pytest.approx((4 + 5 + 8 + 9) / 4)


@pytest.mark.parametrize("hw", [(24, 24), (23, 25), (1, 339), (339, 1), (7, 5), (1, 1), (36, 48)])
def test_region_pooling_matches_slow_reference_and_grid_path(hw):
    H, W = hw
    gen = torch.Generator().manual_seed(H * 1000 + W)
    feat = torch.randn(2, 3, H, W, generator=gen)
    boxes = region_boxes(H, W)                                     # (144, 4) [x1, y1, x2, y2]
    out_size = best_pooling_size(W / H)
    rois = torch.cat([torch.cat([torch.full((144, 1), float(b)), boxes], 1) for b in range(2)])
    ours = roi_align(feat, rois, out_size)
    ref = slow_roi_align(feat, rois, out_size)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=1e-5)
    g = boxes.view(12, 12, 4)
    rows, cols = g[:, 0, [1, 3]], g[0, :, [0, 2]]
    assert torch.equal(grid_rois(2, rows, cols), rois)
    fast = roi_align_grid(feat, rows, cols, out_size)
    assert fast.shape == (2, 12, 12, 3, *out_size)
    torch.testing.assert_close(fast.flatten(0, 2), ref, atol=2e-5, rtol=1e-5)


def test_roi_align_grid_matches_general_path_with_options():
    gen = torch.Generator().manual_seed(3)
    feat = torch.randn(3, 4, 10, 7, generator=gen)
    rows = torch.tensor([[-1.5, 2.0], [0.0, 0.3], [4.2, 11.0], [8.0, 9.5]])
    cols = torch.tensor([[0.0, 7.0], [6.5, 8.0], [2.2, 3.1]])
    rois = grid_rois(3, rows, cols)
    for kw in [dict(), dict(sampling_ratio=3), dict(aligned=True), dict(spatial_scale=0.5, sampling_ratio=1)]:
        fast = roi_align_grid(feat, rows, cols, (2, 3), **kw).flatten(0, 2)
        torch.testing.assert_close(fast, slow_roi_align(feat, rois, (2, 3), **kw), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(fast, roi_align(feat, rois, (2, 3), **kw), atol=1e-5, rtol=1e-5)


def test_roi_align_is_differentiable():
    gen = torch.Generator().manual_seed(4)
    feat = torch.randn(2, 2, 5, 6, dtype=torch.float64, generator=gen, requires_grad=True)
    boxes = random_boxes(6, 2, 5, 6, gen).double()
    assert torch.autograd.gradcheck(lambda f: roi_align(f, boxes, (2, 3)), (feat,), fast_mode=True)
    rows = torch.tensor([[0.0, 2.5], [1.2, 5.0]], dtype=torch.float64)
    cols = torch.tensor([[0.5, 6.0], [-1.0, 2.0], [3.0, 3.2]], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: roi_align_grid(f, rows, cols, (3, 2)), (feat,), fast_mode=True)


def test_roi_align_empty_and_dtype():
    feat = torch.randn(1, 3, 4, 4)
    assert roi_align(feat, torch.zeros(0, 5), (2, 2)).shape == (0, 3, 2, 2)
    half = roi_align(feat.bfloat16(), torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]]), (2, 2))
    assert half.dtype == torch.bfloat16
    full = roi_align(feat, torch.tensor([[0, 0.0, 0.0, 4.0, 4.0]]), (2, 2))
    torch.testing.assert_close(half.float(), full, atol=5e-2, rtol=5e-2)


# ---------------------------------------------------------------------------------------------
# LLaVA-UHD: geometry helpers


def test_best_pooling_size_rule():
    assert best_pooling_size(1.0) == (3, 3)
    assert best_pooling_size(2.0) == (2, 4)          # candidates are (w, h); the result is (h, w)
    assert best_pooling_size(0.5) == (4, 2)
    assert best_pooling_size(1.5) == (2, 3)
    assert best_pooling_size(4 / 3) == (3, 4)
    assert best_pooling_size(339.0) == (2, 4) and best_pooling_size(1 / 339) == (4, 2)
    assert SpatialResampler.cal_best_pooling_size(1.0) == (3, 3)


def test_region_boxes_tile_the_map():
    b = region_boxes(24, 24).view(12, 12, 4)
    assert torch.equal(b[3, 5], torch.tensor([10.0, 6.0, 12.0, 8.0]))
    for H, W in [(23, 25), (1, 339), (339, 1), (1, 1), (30, 22)]:
        b = region_boxes(H, W).view(12, 12, 4)
        torch.testing.assert_close(b[-1, -1, 2:], torch.tensor([float(W), float(H)]), atol=1e-4, rtol=0)
        torch.testing.assert_close(b[..., 2] - b[..., 0], torch.full((12, 12), W / 12), atol=1e-4, rtol=0)
        torch.testing.assert_close(b[..., 3] - b[..., 1], torch.full((12, 12), H / 12), atol=1e-4, rtol=0)
        assert torch.equal(b[1:, :, 1], b[:-1, :, 3]) or torch.allclose(b[1:, :, 1], b[:-1, :, 3])


def test_sincos_embedding_layout():
    pe = get_2d_sincos_pos_embed(16, 5)
    assert pe.shape == (25, 16) and pe.dtype == torch.float32
    # first half encodes the column, second half the row; position 0 → sin 0, cos 1
    assert torch.equal(pe[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4))
    assert torch.allclose(pe[7, :8], pe[2, :8]) and torch.allclose(pe[7, 8:], pe[5, 8:])  # (row 1, col 2)
    assert pe[7, 0].item() == pytest.approx(math.sin(2.0), abs=1e-6)
    assert pe[7, 8].item() == pytest.approx(math.sin(1.0), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# LLaVA-UHD: the spatially constrained resampler


E, KV, HEADS = 32, 48, 2


def _spatial(seed=0, kv_dim=KV) -> SpatialResampler:
    torch.manual_seed(seed)
    m = SpatialResampler(12, embed_dim=E, num_heads=HEADS, kv_dim=kv_dim).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine parameters so nothing hides behind 1/0 init
        for ln in (m.ln_q, m.ln_kv, m.ln_post):
            ln.weight.normal_(1.0, 0.2)
            ln.bias.normal_(0.0, 0.2)
    return m


def test_state_dict_names_and_init():
    m = SpatialResampler(embed_dim=E, num_heads=HEADS, kv_dim=KV)
    sd = m.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "pos_embed": (144, E), "query": (144, E), "proj": (E, E), "kv_proj.weight": (E, KV),
        "attn.in_proj_weight": (3 * E, E), "attn.in_proj_bias": (3 * E,),
        "attn.out_proj.weight": (E, E), "attn.out_proj.bias": (E,),
        "ln_q.weight": (E,), "ln_q.bias": (E,), "ln_kv.weight": (E,), "ln_kv.bias": (E,),
        "ln_post.weight": (E,), "ln_post.bias": (E,),
    }
    assert isinstance(m.pos_embed, nn.Parameter) and not m.pos_embed.requires_grad
    assert torch.equal(m.pos_embed, get_2d_sincos_pos_embed(E, 12))
    assert 0.015 < m.query.std().item() < 0.025                # trunc_normal_(std=.02)
    assert torch.all(m.attn.out_proj.bias == 0) and torch.all(m.attn.in_proj_bias == 0)
    assert "kv_proj.weight" not in SpatialResampler(embed_dim=E, num_heads=HEADS, kv_dim=E).state_dict()
    p = PerceiverResampler(embed_dim=E, num_heads=HEADS, kv_dim=KV)
    assert set(p.state_dict()) == set(sd) and p.pos_embed.shape == (64, E)
    assert torch.equal(p.pos_embed, get_2d_sincos_pos_embed(E, 8))


def reference_spatial_forward(m: SpatialResampler, x: torch.Tensor, tgt_size) -> torch.Tensor:
    """The ECCV/v1 AdaptSpatialResampler.forward data flow, step by step: interpolated key
    positions, per-box RoIAlign of keys and values separately (general path), the query
    ``unfold`` layout (bs·144, 1, c) and the (L, bs·144, c) key layout."""
    bs = x.shape[0]
    h, w = tgt_size
    key_pos = F.interpolate(m.pos_embed.float().reshape(1, 12, 12, -1).permute(0, 3, 1, 2), size=(h, w),
                            mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)
    x = m.ln_kv(m.kv_proj(x))
    q = m.ln_q(m.query)
    query = q.unsqueeze(0).repeat(bs, 1, 1) + m.pos_embed[None]
    key, value = x + key_pos[None], x
    rois = torch.cat([torch.cat([torch.full((144, 1), float(b)), region_boxes(h, w)], 1) for b in range(bs)])
    out_size = best_pooling_size(w / h)

    def pool(t):
        t = t.permute(0, 2, 1).unflatten(-1, (h, w))
        return roi_align(t, rois, out_size).flatten(-2).permute(0, 2, 1)        # (bs·144, L, c)

    query = query.reshape(bs * 144, 1, -1)
    out, _ = m.attn(query.permute(1, 0, 2), pool(key).permute(1, 0, 2), pool(value).permute(1, 0, 2))
    return m.ln_post(out[0].unflatten(0, [bs, -1])) @ m.proj


GRIDS = [(24, 24), (23, 25), (1, 339), (339, 1), (1, 1), (12, 12), (5, 7), (2, 100), (30, 20), (22, 32)]


@pytest.mark.parametrize("hw", GRIDS)
def test_spatial_resampler_matches_reference_dataflow(hw):
    m = _spatial(1)
    x = torch.randn(2, hw[0] * hw[1], KV, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours, ref = m(x, hw), reference_spatial_forward(m, x, hw)
    assert ours.shape == (2, 144, E)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls,nq", [(SpatialResampler, 144), (PerceiverResampler, 64)])
@pytest.mark.parametrize("hw", GRIDS + [(7, 7), (3, 1), (1, 24)])
def test_shapes_and_batch_consistency(cls, nq, hw):
    torch.manual_seed(0)
    m = cls(embed_dim=E, num_heads=HEADS, kv_dim=KV).eval()
    x = torch.randn(3, hw[0] * hw[1], KV)
    with torch.no_grad():
        batched = m(x, hw)
        alone = torch.stack([m(x[i:i + 1], hw)[0] for i in range(3)])
    assert batched.shape == (3, nq, E) and torch.isfinite(batched).all()
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(batched[0], batched[1])      # the parts' contents matter


def test_wrong_token_count_is_rejected():
    m = SpatialResampler(embed_dim=E, num_heads=HEADS, kv_dim=KV)
    with pytest.raises(ValueError):
        m(torch.randn(1, 24 * 24, KV), (24, 23))


@pytest.mark.parametrize("hw,cell", [((24, 24), (2, 2)), ((36, 48), (3, 4))])
def test_regions_attend_only_within_themselves(hw, cell):
    """Perturb a patch that only one region samples (its interior: the row/column after a region's
    first one is never the bilinear neighbour of another region's samples): that region's query
    output changes, every other stays equal."""
    m = _spatial(2)
    H, W = hw
    ch, cw = cell
    x = torch.randn(1, H * W, KV, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        base = m(x, hw)[0]
        for i, j in [(0, 0), (3, 7), (11, 11), (6, 0), (11, 2)]:
            y = x.clone().view(1, H, W, KV)
            y[0, ch * i + 1, cw * j + 1] += 3.0 * torch.randn(KV, generator=torch.Generator().manual_seed(i * 12 + j))
            out = m(y.view(1, H * W, KV), hw)[0]
            diff = (out - base).abs().amax(-1)                                 # (144,)
            q = i * 12 + j
            assert diff[q] > 1e-3, (i, j)
            others = torch.cat([diff[:q], diff[q + 1:]])
            assert others.max() <= 1e-6, (i, j, int(others.argmax()))


@pytest.mark.parametrize("hw", [(23, 25), (7, 5), (1, 339), (30, 22)])
def test_query_depends_only_on_its_region(hw):
    """Gradient of query q's output: non-zero only on patches under region q's box (grown by the
    bilinear neighbour and the 1-patch minimum box size), and non-zero when the region is read."""
    m = _spatial(3)
    H, W = hw
    x = torch.randn(1, H * W, KV, generator=torch.Generator().manual_seed(7), requires_grad=True)
    out = m(x, hw)[0]
    boxes = region_boxes(H, W)
    for q in [0, 11, 12, 77, 100, 131, 143]:
        (g,) = torch.autograd.grad(out[q].pow(2).sum(), x, retain_graph=True)
        dep = g[0].abs().sum(-1).view(H, W) > 0
        x1, y1, x2, y2 = boxes[q].tolist()
        r0, r1 = math.floor(y1), min(math.ceil(y1 + max(y2 - y1, 1.0)), H - 1)
        c0, c1 = math.floor(x1), min(math.ceil(x1 + max(x2 - x1, 1.0)), W - 1)
        allowed = torch.zeros(H, W, dtype=torch.bool)
        allowed[r0:r1 + 1, c0:c1 + 1] = True
        # torchvision's rules drop samples beyond row H (or column W): on a 1-patch-high map the
        # last region rows (y1 ≥ 10/12, box grown to 1 patch) read nothing at all, so their query
        # sees all-zero keys/values, as in the reference; otherwise the region is read
        reads = roi_align(torch.ones(1, 1, H, W), torch.cat([torch.zeros(1), boxes[q]])[None],
                          best_pooling_size(W / H)).abs().sum() > 0
        assert bool(dep.any()) == bool(reads), q
        assert not (dep & ~allowed).any(), (q, torch.nonzero(dep & ~allowed)[:3].tolist())


def test_spatial_resampler_in_bfloat16():
    m = _spatial(4)
    x = torch.randn(2, 23 * 25, KV)
    with torch.no_grad():
        full = m(x, (23, 25))
        half = m.to(torch.bfloat16)(x.bfloat16(), (23, 25))
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() < 0.15 * full.abs().max()


def test_spatial_resampler_trains():
    m = _spatial(5)
    x = torch.randn(2, 23 * 25, KV)
    m(x, (23, 25)).square().mean().backward()
    for name, p in m.named_parameters():
        if name == "pos_embed":
            assert p.grad is None
        else:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------------------------------------
# LLaVA-UHD arXiv: the perceiver resampler


def reference_perceiver_forward(m: PerceiverResampler, x: torch.Tensor, tgt_size) -> torch.Tensor:
    """The March 2024 release's ``Resampler.forward``, step by step."""
    pos = F.interpolate(m.pos_embed.float().reshape(1, 8, 8, -1).permute(0, 3, 1, 2), size=tuple(tgt_size),
                        mode="bicubic", align_corners=False).permute(0, 2, 3, 1).flatten(0, 2)
    x = m.ln_kv(m.kv_proj(x)).permute(1, 0, 2)
    N = x.shape[1]
    q = m.ln_q(m.query)
    out = m.attn(q.unsqueeze(1).repeat(1, N, 1) + m.pos_embed.unsqueeze(1), x + pos.unsqueeze(1), x)[0]
    return m.ln_post(out.permute(1, 0, 2)) @ m.proj


@pytest.mark.parametrize("hw", [(24, 24), (23, 25), (1, 339), (339, 1), (1, 1), (10, 31)])
def test_perceiver_matches_reference_dataflow(hw):
    torch.manual_seed(6)
    m = PerceiverResampler(64, embed_dim=E, num_heads=HEADS, kv_dim=KV).eval()
    x = torch.randn(2, hw[0] * hw[1], KV)
    with torch.no_grad():
        ours, ref = m(x, hw), reference_perceiver_forward(m, x, hw)
    assert ours.shape == (2, 64, E)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_perceiver_attends_globally():
    torch.manual_seed(7)
    m = PerceiverResampler(embed_dim=E, num_heads=HEADS, kv_dim=KV).eval()
    x = torch.randn(1, 24 * 24, KV)
    y = x.clone()
    y[0, 0] += 3.0
    with torch.no_grad():
        diff = (m(y, (24, 24)) - m(x, (24, 24))).abs().amax(-1)[0]
    assert (diff > 1e-6).all()                                  # one corner patch reaches every query


# ---------------------------------------------------------------------------------------------
# LLaVA-NeXT packing vs transformers


@pytest.fixture(scope="module")
def tiny_llava_next():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig
    from transformers.models.llava_next.modeling_llava_next import LlavaNextModel

    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=336, patch_size=14)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=2, vocab_size=64)
    torch.manual_seed(0)
    return LlavaNextModel(LlavaNextConfig(vision_config=vision, text_config=text)).eval()


SIZES = [(500, 375), (1024, 768), (300, 900), (1500, 400), (336, 336), (100, 1000), (672, 336), (337, 1000),
         (1000, 333), (640, 481), (2000, 2000), (13, 7)]


@pytest.mark.parametrize("size", SIZES)
def test_pack_anyres_matches_transformers(tiny_llava_next, size):
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    from hires_lmm.plan.anyres import NEXT_PINPOINTS, select_best_resolution, unpadded_grid

    model = tiny_llava_next
    w, h = size
    rows, cols = get_anyres_image_grid_shape((h, w), model.config.image_grid_pinpoints, 336)
    pw, ph = select_best_resolution(size, NEXT_PINPOINTS)          # the project's planner agrees
    assert (cols, rows) == (pw // 336, ph // 336)
    D = model.config.text_config.hidden_size
    feats = torch.randn(1 + rows * cols, 576, D, generator=torch.Generator().manual_seed(w * 7 + h))
    with torch.no_grad():
        ref, lens = model.pack_image_features([feats], torch.tensor([[h, w]]), "default", model.image_newline)
    ours = pack_anyres(feats[0], feats[1:], (cols, rows), size, model.image_newline.detach())
    assert torch.equal(ours, ref[0])
    ucols, urows = unpadded_grid(size, cols, rows)
    assert ours.shape[0] == int(lens[0]) == 576 + urows * (ucols + 1)


def test_pack_anyres_without_tiles_and_without_newline(tiny_llava_next):
    model = tiny_llava_next
    feats = torch.randn(1, 576, 32)
    with torch.no_grad():
        ref, _ = model.pack_image_features([feats], torch.tensor([[336, 336]]), "default", model.image_newline)
    assert torch.equal(pack_anyres(feats[0], None, (1, 1), (336, 336), model.image_newline.detach()), ref[0])
    tiles = torch.randn(2, 576, 32)
    out = pack_anyres(feats[0], tiles, (2, 1), (672, 336), None)
    assert out.shape == (576 * 3, 32)
    assert torch.equal(out[576:576 + 24], tiles[0, :24]) and torch.equal(out[576 + 24:576 + 48], tiles[1, :24])


@pytest.mark.parametrize("shape,orig", [((3, 48, 24), (100, 1000)), ((3, 24, 48), (1000, 333)),
                                        ((2, 48, 48), (640, 481)), ((2, 24, 72), (1500, 400)),
                                        ((2, 72, 24), (300, 900)), ((1, 48, 48), (481, 640))])
def test_unpad_image_matches_transformers(shape, orig):
    from transformers.models.llava_next.modeling_llava_next import unpad_image as hf_unpad

    t = torch.randn(*shape)
    assert torch.equal(unpad_image(t, orig), hf_unpad(t, (orig[1], orig[0])))


# ---------------------------------------------------------------------------------------------
# projectors


def test_projectors():
    mlp = MLP2xGelu(6, 10)
    assert list(mlp.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    x = torch.randn(4, 6)
    torch.testing.assert_close(mlp(x), mlp[2](F.gelu(mlp[0](x))))
    assert isinstance(build_projector("mlp2x_gelu", 6, 10), MLP2xGelu)
    lin = build_projector("linear", 6, 10)
    assert isinstance(lin, nn.Linear) and lin.weight.shape == (10, 6)
    deep = build_projector("mlp3x_gelu", 6, 10)
    assert [k for k in deep.state_dict() if k.endswith("weight")] == ["0.weight", "2.weight", "4.weight"]
    assert deep(x).shape == (4, 10)
    assert isinstance(build_projector("mlp1x_gelu", 6, 10)[0], nn.Linear)
    with pytest.raises(ValueError):
        build_projector("resampler", 6, 10)
