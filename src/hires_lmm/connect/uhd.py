"""LLaVA-UHD's compression modules (thunlp/LLaVA-UHD).

* :class:`SpatialResampler`: the ECCV/v1 code's ``AdaptSpatialResampler`` (branch
  ``LLaVA-UHD-v1``, ``multimodal_projector/adapt_spatial_resampler.py``): 144 learnable queries
  (12×12, 2-D sin-cos positions); the part's feature map is cut into 12×12 regions
  (``slice_process.slice_image_feature_minicpm``), each region pooled by RoIAlign to a small
  shape chosen from the map's aspect ratio, and query *i* cross-attends only to its own region.
* :class:`PerceiverResampler`: the arXiv v1 paper's resampler (the March 2024 release's
  ``resampler.py``, MiniCPM-V/Qwen-VL style): 64 queries (8×8) with one global cross-attention.

Both are shared by all slices and the overview of an image and take one part's patch features
``(B, h·w, kv_dim)`` (a batch of same-sized parts) with its patch grid ``tgt_size = (h, w)``.
Parameter names and initialisation follow the reference, so a released ``mm_projector`` state
dict loads unchanged: ``query``, ``pos_embed`` (frozen), ``kv_proj.weight`` (absent when
``kv_dim == embed_dim``), ``attn.{in_proj_weight,in_proj_bias,out_proj.weight,out_proj.bias}``,
``ln_q``, ``ln_kv``, ``ln_post``, ``proj``.
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

from ..plan.uhd import POOLING_CANDIDATES, best_pooling_size  # pure geometry, shared with the cost model
from .roi_align import roi_align_grid

__all__ = [
    "get_2d_sincos_pos_embed",
    "get_abs_pos",
    "region_boxes",
    "POOLING_CANDIDATES",
    "best_pooling_size",
    "SpatialResampler",
    "PerceiverResampler",
]

# --------------------------------------------------------------------------------------------
# positions


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions → (M, dim): [sin(pos·ω), cos(pos·ω)], ω_k = 10000^(−k/(dim/2)) (MAE)."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding width must be even, got {dim}")
    omega = np.arange(dim // 2, dtype=np.float32)
    omega /= dim / 2.0
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def get_2d_sincos_pos_embed(dim: int, grid: int) -> Tensor:
    """MAE's 2-D sin-cos table for a ``grid×grid`` map: (grid², dim) float32, row-major.

    As the reference (computed in numpy float32): the first half of the channels encodes the
    column (x), the second half the row (y) — MAE's ``meshgrid(w, h)`` puts w first.
    """
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding width must be a multiple of 4, got {dim}")
    gh = np.arange(grid, dtype=np.float32)
    gw = np.arange(grid, dtype=np.float32)
    mesh = np.stack(np.meshgrid(gw, gh), axis=0).reshape(2, 1, grid, grid)
    emb = np.concatenate([_sincos_1d(dim // 2, mesh[0]), _sincos_1d(dim // 2, mesh[1])], axis=1)
    return torch.from_numpy(emb).float()


def get_abs_pos(abs_pos: Tensor, tgt_size: tuple[int, int]) -> Tensor:
    """Resize a square (L, C) position table bicubically (align_corners=False) to ``tgt_size =
    (h, w)`` → (h·w, C), computed in float32 and returned in ``abs_pos.dtype`` (reference)."""
    src = math.isqrt(abs_pos.shape[0])
    grid = abs_pos.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid, size=(int(tgt_size[0]), int(tgt_size[1])), mode="bicubic", align_corners=False)
    return out.permute(0, 2, 3, 1).flatten(0, 2).to(abs_pos.dtype)


# --------------------------------------------------------------------------------------------
# regions


def region_boxes(height: int, width: int, num_windows: int = 144) -> Tensor:
    """The regions of an ``height×width`` patch map: (num_windows, 4) float32 ``[x1, y1, x2, y2]``,
    row-major.

    ``slice_image_feature_minicpm`` + ``generate_subimage_coordinates`` arithmetic, in Python
    floats then float32: region height ``sqrt((H·W/n) / (W/H))`` (= H/√n), width that times W/H,
    ``round(H / h) × round(W / w)`` regions (√n × √n), box (j·w, i·h, j·w + w, i·h + h).
    The boxes are fractional for maps not divisible by √n (e.g. 23/12 patches).
    """
    if height < 1 or width < 1:
        raise ValueError(f"feature map must be at least 1x1, got {height}x{width}")
    ratio = height * width / num_windows
    crop_h = math.sqrt(ratio / (width / height))
    crop_w = crop_h * (width / height)
    rows, cols = int(round(height / crop_h)), int(round(width / crop_w))
    if rows * cols != num_windows:
        raise ValueError(f"{height}x{width} map does not split into {num_windows} regions ({rows}x{cols})")
    coords = []
    for i in range(rows):
        for j in range(cols):
            x1, y1 = j * crop_w, i * crop_h
            coords.append([x1, y1, x1 + crop_w, y1 + crop_h])
    return torch.tensor(coords, dtype=torch.float32)


# --------------------------------------------------------------------------------------------
# modules


class _ResamplerBase(nn.Module):
    """Parameters shared by both resamplers, named and initialised as the reference."""

    def __init__(self, grid_size: int, embed_dim: int, num_heads: int, kv_dim: int | None) -> None:
        super().__init__()
        self.grid_size = grid_size
        self.num_queries = grid_size**2
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        # a frozen Parameter (not a buffer), so it is in the state dict under the reference's name
        self.pos_embed = nn.Parameter(get_2d_sincos_pos_embed(embed_dim, grid_size)).requires_grad_(False)
        self.query = nn.Parameter(torch.zeros(self.num_queries, embed_dim))
        trunc_normal_(self.query, std=0.02)
        if kv_dim is not None and kv_dim != embed_dim:
            self.kv_proj: nn.Module = nn.Linear(kv_dim, embed_dim, bias=False)
        else:
            self.kv_proj = nn.Identity()
        self.attn = nn.MultiheadAttention(embed_dim, num_heads)
        self.ln_q = norm_layer(embed_dim)
        self.ln_kv = norm_layer(embed_dim)
        self.ln_post = norm_layer(embed_dim)
        self.proj = nn.Parameter((embed_dim**-0.5) * torch.randn(embed_dim, embed_dim))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # only nn.Linear modules (kv_proj, attn.out_proj): the MHA in_proj keeps its xavier init
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    @staticmethod
    def _check(x: Tensor, tgt_size: tuple[int, int]) -> tuple[int, int]:
        h, w = int(tgt_size[0]), int(tgt_size[1])
        if x.dim() != 3 or x.shape[1] != h * w:
            raise ValueError(f"expected features (B, {h}*{w}, kv_dim) for tgt_size {(h, w)}, got {tuple(x.shape)}")
        return h, w


class SpatialResampler(_ResamplerBase):
    """LLaVA-UHD's spatially constrained resampler (ECCV/v1 ``AdaptSpatialResampler``).

    ``grid_size²`` queries; query *i* (raster order over the grid_size×grid_size query grid)
    attends only to the RoIAlign-pooled keys/values of region *i* of the part's feature map.
    The reference builds it with ``grid_size=12``, ``embed_dim`` = LLM width,
    ``num_heads = embed_dim // 128`` and ``kv_dim`` = vision width.
    """

    def __init__(self, grid_size: int = 12, *, embed_dim: int, num_heads: int, kv_dim: int | None = None) -> None:
        super().__init__(grid_size, embed_dim, num_heads, kv_dim)

    cal_best_pooling_size = staticmethod(best_pooling_size)

    def region_pooling(self, key: Tensor, value: Tensor, tgt_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """Pool keys and values per region.

        ``key``, ``value``: (B, h·w, E) → each (L, B·n, E) with ``n = grid_size²`` regions
        (index ``b·n + i``) and ``L = ph·pw`` pooled positions, as the reference's
        ``adapt_unflod`` + ``permute(1, 0, 2)``.
        """
        B, _, E = key.shape
        h, w = tgt_size
        ph, pw = best_pooling_size(w / h)
        n = self.num_queries
        g = self.grid_size
        # the reference casts the float32 boxes to the features' dtype before RoIAlign (bf16
        # training rounds them); reproduce that, then pool in float32 as it does
        boxes = region_boxes(h, w, n).to(key.dtype).float().view(g, g, 4)
        rows, cols = boxes[:, 0, [1, 3]], boxes[0, :, [0, 2]]   # grid rows share y's, columns x's
        kv = torch.cat([key, value], dim=-1).transpose(1, 2).unflatten(-1, (h, w))      # (B, 2E, h, w)
        pooled = roi_align_grid(kv.float(), rows.to(kv.device), cols.to(kv.device), (ph, pw))
        pooled = pooled.to(key.dtype).reshape(B * n, 2 * E, ph * pw).permute(2, 0, 1)  # (L, B·n, 2E)
        return pooled[..., :E], pooled[..., E:]

    def forward(self, x: Tensor, tgt_size: tuple[int, int] = (24, 24)) -> Tensor:
        """``x``: (B, h·w, kv_dim) patch features of B same-sized parts, ``tgt_size = (h, w)``
        → (B, grid_size², embed_dim)."""
        h, w = self._check(x, tgt_size)
        dtype = x.dtype
        B = x.shape[0]
        key_pos = get_abs_pos(self.pos_embed, (h, w))                                   # (h·w, E)
        x = self.ln_kv(self.kv_proj(x))                                                  # (B, h·w, E)
        q = self.ln_q(self.query)                                                        # (n, E)
        query = q[None].expand(B, -1, -1) + self.pos_embed[None].to(dtype)               # (B, n, E)
        key = x + key_pos[None].to(dtype)                                                # values: no positions
        key, value = self.region_pooling(key, x, (h, w))                                 # (L, B·n, E)
        # one query per region: a length-1 query sequence over a batch of B·n regions
        out, _ = self.attn(query.reshape(1, B * self.num_queries, -1), key, value, need_weights=False)
        out = self.ln_post(out[0].unflatten(0, (B, self.num_queries)))
        return out @ self.proj


class PerceiverResampler(_ResamplerBase):
    """The arXiv v1 resampler: ``num_queries`` (a square, 64 = 8×8) queries with 2-D sin-cos
    positions and one global cross-attention over all of a part's patches.

    The paper's release builds it with 64 queries, ``embed_dim`` = LLM width (5120 for 13B),
    8 heads and ``kv_dim`` = 1024.
    """

    def __init__(self, num_queries: int = 64, *, embed_dim: int, num_heads: int, kv_dim: int | None = None) -> None:
        grid = math.isqrt(num_queries)
        if grid * grid != num_queries:
            raise ValueError(f"num_queries must be a square, got {num_queries}")
        super().__init__(grid, embed_dim, num_heads, kv_dim)

    def forward(self, x: Tensor, tgt_size: tuple[int, int] = (24, 24)) -> Tensor:
        """``x``: (B, h·w, kv_dim), ``tgt_size = (h, w)`` → (B, num_queries, embed_dim)."""
        h, w = self._check(x, tgt_size)
        dtype = x.dtype
        key_pos = get_abs_pos(self.pos_embed, (h, w)).to(dtype)                          # (h·w, E)
        x = self.ln_kv(self.kv_proj(x)).permute(1, 0, 2)                                  # (h·w, B, E)
        B = x.shape[1]
        q = self.ln_q(self.query)
        query = q[:, None].expand(-1, B, -1) + self.pos_embed[:, None].to(dtype)          # (n, B, E)
        out, _ = self.attn(query, x + key_pos[:, None], x, need_weights=False)
        out = self.ln_post(out.permute(1, 0, 2))
        return out @ self.proj
