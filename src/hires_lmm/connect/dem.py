"""INF-LLaVA's Dual-perspective Enhancement Module (DEM) and the connector around it.

Follows the released code (WeihuangLin/INF-LLaVA, ``INF_llava/model/llava_arch.py``: ``SpatialEmbed``,
``MultiHeadedAttention``, ``combine_crop_features_N``, ``combine_stride_features_N``,
``crop_pixels_N``, ``extract_pixels_N``, ``encode_images``). With ``n`` the crop factor (3) and
``G`` the per-view patch grid (24):

* ``local``  — features of the n² contiguous tiles, tile ``i·n+j`` covering rows ``iG…``, columns ``jG…``
  of the (nG)×(nG) map (``combine_crop_features_N``);
* ``glob``   — features of the n² strided sub-images, sub-image ``h·n+w`` being ``img[h::n, w::n]``, so
  its features are placed with stride: ``map[h::n, w::n] = feat[h·n+w]`` (``combine_stride_features_N``).

Both maps then align pixel-wise. Two cross-attentions, both reading the *original* maps and sharing
one attention module, exchange information:

* global-as-query over the n×n **contiguous** windows (Q = global window, K = V = local window),
  results written back contiguously (the reference's ``local_enhanced_global_feats`` →
  ``scale_stride_img_feat`` → ``ffn_stride``);
* local-as-query over the n×n **strided** sub-grids ``[h::n, w::n]`` (Q = local sub-grid, K = V = global
  sub-grid), written back strided (``global_enhanced_local_feats`` → ``scale_crop_img_feat`` →
  ``ffn_crop``).

Windows and sub-grids are a batch dimension here (the reference loops over them in Python).

Module and parameter names mirror the reference state dict (``model.spatial_embed.*``):
``attention.linears.{0,1,2,3}`` (q, k, v, out), ``attention.ln``, ``ffn_crop.{0,2}``,
``ffn_stride.{0,2}``, ``ln_fuse``; :class:`INFConnector` holds the DEM as ``spatial_embed``.

Paper variants (options, not the released code; the paper describes the DEM and its merge only in
prose, so these are its described alternatives rather than a transcription of released code):

* ``fusion="linear"`` (``DEM(variant="paper")``): the two enhanced maps are concatenated and fused by a
  plain ``Linear(2d → d)`` (``fuse_linear``) instead of the bottleneck MLPs + residual LayerNorm;
* ``downsample="avgpool"``: (nG)² → G² by n×n average pooling instead of bilinear interpolation;
* ``merge="add"``: thumbnail and DEM features are added element-wise instead of averaged.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DEM",
    "DEMAttention",
    "INFConnector",
    "inf_merge",
    "map_to_strided",
    "map_to_tiles",
    "strided_to_map",
    "tiles_to_map",
]

# --------------------------------------------------------------------------- layouts
# All four helpers are pure reshapes/permutes, so split → merge is exact (no arithmetic).


def tiles_to_map(tiles: Tensor, n: int) -> Tensor:
    """Contiguous tiling (``combine_crop_features_N``).

    tiles: (B, n², G, G, d), tile ``k = i·n + j`` → map rows ``i·G:(i+1)·G``, cols ``j·G:(j+1)·G``.
    Returns (B, nG, nG, d).
    """
    B, nn_, G, G2, d = tiles.shape
    assert nn_ == n * n and G == G2, tiles.shape
    return tiles.view(B, n, n, G, G, d).permute(0, 1, 3, 2, 4, 5).reshape(B, n * G, n * G, d)


def map_to_tiles(m: Tensor, n: int) -> Tensor:
    """Inverse of :func:`tiles_to_map` (``crop_pixels_N``): (B, nG, nG, d) → (B, n², G, G, d)."""
    B, H, W, d = m.shape
    assert H == W and H % n == 0, m.shape
    G = H // n
    return m.view(B, n, G, n, G, d).permute(0, 1, 3, 2, 4, 5).reshape(B, n * n, G, G, d)


def strided_to_map(subs: Tensor, n: int) -> Tensor:
    """Stride placement (``combine_stride_features_N``): ``map[:, h::n, w::n] = subs[:, h·n+w]``.

    subs: (B, n², G, G, d) → (B, nG, nG, d); sub-image ``h·n+w`` at (y, x) lands at (y·n+h, x·n+w).
    """
    B, nn_, G, G2, d = subs.shape
    assert nn_ == n * n and G == G2, subs.shape
    # (B, h, w, y, x, d) → (B, y, h, x, w, d): row index y·n+h, column x·n+w.
    return subs.view(B, n, n, G, G, d).permute(0, 3, 1, 4, 2, 5).reshape(B, n * G, n * G, d)


def map_to_strided(m: Tensor, n: int) -> Tensor:
    """Inverse of :func:`strided_to_map` (``extract_pixels_N``): (B, nG, nG, d) → (B, n², G, G, d),
    entry ``h·n+w`` being ``m[:, h::n, w::n]``."""
    B, H, W, d = m.shape
    assert H == W and H % n == 0, m.shape
    G = H // n
    return m.view(B, G, n, G, n, d).permute(0, 2, 4, 1, 3, 5).reshape(B, n * n, G, G, d)


# --------------------------------------------------------------------------- attention


class DEMAttention(nn.Module):
    """The reference's ``MultiHeadedAttention``: biased q/k/v/out projections, scaled dot-product
    attention per head (scale 1/√(d/h)), then ``LayerNorm(W_o·attn + q)`` with the *unprojected*
    query as residual.

    ``linears`` = [q, k, v, out] keeps the reference's state-dict names.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        assert dim % num_heads == 0, (dim, num_heads)
        self.num_heads = num_heads
        self.linears = nn.ModuleList([nn.Linear(dim, dim) for _ in range(4)])
        self.ln = nn.LayerNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q: (N, Lq, d); k, v: (N, Lk, d) → (N, Lq, d)."""
        N, Lq, d = q.shape
        h = self.num_heads

        def heads(x: Tensor, lin: nn.Module) -> Tensor:
            return lin(x).view(N, -1, h, d // h).transpose(1, 2)  # (N, h, L, d/h)

        att = F.scaled_dot_product_attention(heads(q, self.linears[0]), heads(k, self.linears[1]),
                                             heads(v, self.linears[2]))
        att = att.transpose(1, 2).reshape(N, Lq, d)
        return self.ln(self.linears[3](att) + q)


def _bottleneck(dim: int, hidden: int) -> nn.Sequential:
    # d → hidden → d/2: indices 0 and 2 match the reference's ``ffn_crop`` / ``ffn_stride``.
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim // 2))


# --------------------------------------------------------------------------- DEM


class DEM(nn.Module):
    """Dual-perspective Enhancement Module (the reference's ``SpatialEmbed``).

    Args:
        dim: feature width d (1024 for CLIP ViT-L).
        num_heads: heads of the shared attention (8 in the reference, hard-coded there).
        n: crop factor; n² local tiles and n² strided sub-images.
        grid: per-view patch grid G (24 for 336 px / patch 14); inputs must have G² tokens per view.
        bottleneck: hidden width of the two branch MLPs. The reference writes ``channel // 16``
            (= 64 at d = 1024); ``None`` uses ``dim // 16``.
        variant: ``"code"`` (released code: bottleneck MLPs, concat, residual LayerNorm) or
            ``"paper"`` (plain linear fusion of the concatenated enhanced maps).
    """

    def __init__(self, dim: int = 1024, num_heads: int = 8, n: int = 3, grid: int = 24,
                 bottleneck: int | None = 64, variant: Literal["code", "paper"] = "code") -> None:
        super().__init__()
        if variant not in ("code", "paper"):
            raise ValueError(f"variant must be 'code' or 'paper', not {variant!r}")
        assert dim % 2 == 0, dim
        self.dim, self.n, self.grid, self.variant = dim, n, grid, variant
        self.attention = DEMAttention(dim, num_heads)
        if variant == "code":
            hidden = dim // 16 if bottleneck is None else bottleneck
            self.ffn_crop = _bottleneck(dim, hidden)    # local-as-query branch
            self.ffn_stride = _bottleneck(dim, hidden)  # global-as-query branch
            self.ln_fuse = nn.LayerNorm(dim)
        else:
            self.fuse_linear = nn.Linear(2 * dim, dim)

    def enhance(self, local: Tensor, glob: Tensor) -> tuple[Tensor, Tensor]:
        """The two cross-attentions, before fusion.

        local, glob: (B, n², G², d). Returns ``(global_query_map, local_query_map)``, each
        (B, nG, nG, d): the global-as-query result written back contiguously and the
        local-as-query result written back strided.
        """
        n = self.n
        B, nn_, L, d = local.shape
        G = int(round(L ** 0.5))
        if nn_ != n * n or G * G != L or G != self.grid or glob.shape != local.shape:
            raise ValueError(f"expected local and glob of shape (B, {n * n}, {self.grid ** 2}, d); "
                             f"got {tuple(local.shape)} and {tuple(glob.shape)}")
        loc_map = tiles_to_map(local.reshape(B, nn_, G, G, d), n)   # F_loc, (B, nG, nG, d)
        glo_map = strided_to_map(glob.reshape(B, nn_, G, G, d), n)  # F_glo, aligned with F_loc

        def windows(x: Tensor) -> Tensor:  # (B, n², G, G, d) → (B·n², G², d): windows as batch
            return x.reshape(B * nn_, L, d)

        # Global as query over contiguous windows: Q = F_glo window, K = V = F_loc window (= local tile).
        kv = windows(map_to_tiles(loc_map, n))
        gq = self.attention(windows(map_to_tiles(glo_map, n)), kv, kv)
        gq_map = tiles_to_map(gq.view(B, nn_, G, G, d), n)
        # Local as query over strided sub-grids: Q = F_loc[h::n, w::n], K = V = F_glo[h::n, w::n] (= glob).
        kv = windows(map_to_strided(glo_map, n))
        lq = self.attention(windows(map_to_strided(loc_map, n)), kv, kv)
        lq_map = strided_to_map(lq.view(B, nn_, G, G, d), n)
        return gq_map, lq_map

    def forward(self, local: Tensor, glob: Tensor) -> Tensor:
        """local, glob: (B, n², G², d) → fused map (B, (nG)², d), row-major over the (nG)×(nG) grid."""
        gq_map, lq_map = self.enhance(local, glob)
        if self.variant == "code":
            # Reference order: concat[ffn_crop(local-query map), ffn_stride(global-query map)],
            # then LayerNorm(concat + global-query map + local-query map).
            cat = torch.cat([self.ffn_crop(lq_map), self.ffn_stride(gq_map)], dim=-1)
            fused = self.ln_fuse(cat + gq_map + lq_map)
        else:
            fused = self.fuse_linear(torch.cat([lq_map, gq_map], dim=-1))
        return fused.flatten(1, 2)


# --------------------------------------------------------------------------- merge with thumbnail


def inf_merge(fused: Tensor, thumb: Tensor, *, downsample: Literal["bilinear", "avgpool"] = "bilinear",
              merge: Literal["mean", "add"] = "mean") -> Tensor:
    """Bring the DEM map to the thumbnail's grid and merge (``encode_images`` after ``spatial_embed``).

    fused: (B, (nG)², d); thumb: (B, G², d) → (B, G², d), still in vision width (the projector
    follows). The reference interpolates bilinearly (``align_corners=False``) in float32 and casts
    back, then takes ``mean(stack([thumb, dem]))``.
    """
    B, Lf, d = fused.shape
    G = int(round(thumb.shape[1] ** 0.5))
    S = int(round(Lf ** 0.5))
    if G * G != thumb.shape[1] or S * S != Lf or S % G:
        raise ValueError(f"fused {tuple(fused.shape)} and thumbnail {tuple(thumb.shape)} grids do not match")
    x = fused.view(B, S, S, d).permute(0, 3, 1, 2).float()  # (B, d, nG, nG)
    if downsample == "bilinear":
        x = F.interpolate(x, size=(G, G), mode="bilinear", align_corners=False)
    elif downsample == "avgpool":
        x = F.avg_pool2d(x, kernel_size=S // G)
    else:
        raise ValueError(f"downsample must be 'bilinear' or 'avgpool', not {downsample!r}")
    x = x.to(fused.dtype).permute(0, 2, 3, 1).reshape(B, G * G, d)
    if merge == "mean":
        return torch.stack([thumb, x], dim=-1).mean(dim=-1)
    if merge == "add":
        return thumb + x
    raise ValueError(f"merge must be 'mean' or 'add', not {merge!r}")


class INFConnector(nn.Module):
    """INF-LLaVA's features → pre-projector tokens: DEM over local + global crops, downsampled to the
    thumbnail grid and merged with the thumbnail features.

    ``variant="code"`` is the released code (bottleneck fusion, bilinear, mean); ``variant="paper"``
    switches all three to the paper's alternatives; ``downsample`` / ``merge`` override one at a time.
    The projector (mlp2x_gelu) is applied by the caller.
    """

    def __init__(self, dim: int = 1024, num_heads: int = 8, n: int = 3, grid: int = 24,
                 bottleneck: int | None = 64, variant: Literal["code", "paper"] = "code",
                 downsample: Literal["bilinear", "avgpool"] | None = None,
                 merge: Literal["mean", "add"] | None = None) -> None:
        super().__init__()
        paper = variant == "paper"
        self.spatial_embed = DEM(dim, num_heads, n, grid, bottleneck, variant)  # reference name
        self.downsample = downsample or ("avgpool" if paper else "bilinear")
        self.merge = merge or ("add" if paper else "mean")

    def forward(self, local: Tensor, glob: Tensor, thumb: Tensor) -> Tensor:
        """local, glob: (B, n², G², d); thumb: (B, G², d) → (B, G², d)."""
        return inf_merge(self.spatial_embed(local, glob), thumb, downsample=self.downsample, merge=self.merge)
