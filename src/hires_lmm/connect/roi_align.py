"""RoIAlign in pure torch, with ``torchvision.ops.roi_align``'s semantics.

LLaVA-UHD's spatially constrained resampler pools every region of a feature map with
``torchvision.ops.roi_align`` (average pooling of bilinear samples, ``aligned=False``,
``sampling_ratio=-1``). The project does not depend on torchvision, so this module re-implements
the operator from its documented algorithm (the CPU/CUDA kernels):

* a box ``[b, x1, y1, x2, y2]`` is scaled by ``spatial_scale`` (and shifted by −0.5 when
  ``aligned``); without ``aligned`` its width and height are clamped to at least 1;
* each of the ``h×w`` bins holds ``gh×gw`` samples, ``gh = sampling_ratio`` or, when
  ``sampling_ratio <= 0``, ``ceil(roi_h / h)`` (likewise ``gw``), at
  ``y = y1 + ph·bin_h + (iy + .5)·bin_h / gh``;
* a sample outside ``[-1, H] × [-1, W]`` counts as zero; otherwise coordinates below 0 are
  clamped to 0 and those at or past the last row/column are clamped to it, then bilinear;
* the bin value is the sum of its samples divided by ``max(gh·gw, 1)``.

The bilinear weight of a sample is a product of a row weight and a column weight, and a bin's
samples form a tensor grid, so the whole operator is separable: ``out[k] = Aᵧ[k] · F[b_k] · Aₓ[k]ᵀ``
with ``Aᵧ[k]`` (h×H) and ``Aₓ[k]`` (w×W) the summed sample weights of box k. That is what makes a
loop-free implementation cheap: no per-sample gathers of C-channel vectors, and when the boxes
form a grid (LLaVA-UHD's 12×12 regions) the whole map is pooled by two matrix products
(:func:`roi_align_grid`). Gradients flow to the features (not to the boxes, as in torchvision).
Arithmetic is float32 (float64 for float64 input), in the kernel's order of operations; results
agree with torchvision up to float rounding of the sums.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["roi_align", "roi_align_grid", "grid_rois"]


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # torchvision computes in the input's type; the UHD reference feeds float32 (``.float()``),
    # so reduced precision inputs are pooled in float32 and cast back.
    return torch.float64 if dtype == torch.float64 else torch.float32


def _axis_weights(start: Tensor, end: Tensor, pooled: int, size: int, sampling_ratio: int,
                  aligned: bool) -> tuple[Tensor, Tensor]:
    """Summed bilinear sample weights along one axis.

    ``start``, ``end``: (N,) scaled (and offset) box edges. Returns ``weights`` (N, pooled, size):
    ``weights[n, p, r]`` = Σ over the bin's samples of the weight of feature row ``r`` (out-of-range
    samples contribute nothing), and ``grid`` (N,) long: the samples per bin along this axis.
    """
    n, dt, dev = start.shape[0], start.dtype, start.device
    length = end - start
    if not aligned:
        length = length.clamp(min=1.0)  # "force malformed RoIs to be 1x1"
    bin_size = length / pooled
    if sampling_ratio > 0:
        grid = torch.full((n,), sampling_ratio, dtype=torch.long, device=dev)
    else:
        # ceil(roi / pooled) in the kernel's float type; negative/NaN (aligned, flipped boxes) → no samples
        grid = torch.nan_to_num(torch.ceil(bin_size), nan=0.0).clamp(min=0).long()
    gmax = max(int(grid.max()), 1) if n else 1

    p = torch.arange(pooled, dtype=dt, device=dev)
    i = torch.arange(gmax, dtype=dt, device=dev) + 0.5
    g = grid.clamp(min=1).to(dt)
    # same association as the kernel: (start + p·bin) + ((i + .5)·bin) / grid
    pos = (start[:, None, None] + p[None, :, None] * bin_size[:, None, None]) \
        + (i[None, None, :] * bin_size[:, None, None]) / g[:, None, None]          # (N, P, G)
    used = torch.arange(gmax, device=dev)[None, None, :] < grid[:, None, None]    # adaptive count
    valid = used & (pos >= -1.0) & (pos <= size)                                   # False for NaN
    pos = torch.where(valid, pos.clamp(min=0.0), torch.zeros((), dtype=dt, device=dev))
    low = pos.floor().long()
    edge = low >= size - 1
    low = torch.where(edge, size - 1, low)
    high = torch.where(edge, size - 1, low + 1)
    pos = torch.where(edge, low.to(dt), pos)
    frac = pos - low.to(dt)
    zero = torch.zeros((), dtype=dt, device=dev)
    w_low = torch.where(valid, 1.0 - frac, zero)
    w_high = torch.where(valid, frac, zero)
    weights = torch.zeros(n, pooled, size, dtype=dt, device=dev)
    weights.scatter_add_(2, low, w_low)
    weights.scatter_add_(2, high, w_high)
    return weights, grid


def _window(weights: Tensor) -> tuple[Tensor, Tensor]:
    """Restrict per-box axis weights (N, P, S) to the smallest common window length.

    Returns ``(w, idx)``: ``w`` (N, P, L) the weights at feature indices ``idx`` (N, L), where
    ``idx[n]`` is a run of L consecutive indices starting at box n's first used row (clamped at
    the border; positions past it carry zero weight so clamped duplicates add nothing).
    """
    n, p, s = weights.shape
    used = (weights != 0).any(1)                                                   # (N, S)
    has = used.any(1)
    first = used.to(torch.int8).argmax(1)
    last = s - 1 - used.flip(1).to(torch.int8).argmax(1)
    first = torch.where(has, first, 0)
    span = torch.where(has, last - first + 1, 1)
    length = int(span.max())
    idx = first[:, None] + torch.arange(length, device=weights.device)[None, :]
    inside = idx < s
    idx = idx.clamp(max=s - 1)
    w = weights.gather(2, idx[:, None, :].expand(n, p, length)) * inside[:, None, :]
    return w, idx


def _scaled_edges(rois: Tensor, spatial_scale: float, aligned: bool) -> tuple[Tensor, ...]:
    off = 0.5 if aligned else 0.0
    return tuple(rois[:, j] * spatial_scale - off for j in (1, 2, 3, 4))  # x1, y1, x2, y2


def roi_align(features: Tensor, boxes: Tensor, output_size: int | tuple[int, int],
              spatial_scale: float = 1.0, sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """``torchvision.ops.roi_align`` for a (K, 5) box tensor, loop-free.

    Args:
        features: (B, C, H, W).
        boxes: (K, 5) rows ``[batch_index, x1, y1, x2, y2]`` in input coordinates.
        output_size: ``(h, w)`` bins per box (or one int for both).
        spatial_scale, sampling_ratio, aligned: as torchvision.

    Returns:
        (K, C, h, w) in ``features.dtype``.

    Each box reads only the rows/columns its samples touch (a window of at most H×W), so memory
    is ``K·C·window`` plus ``K·(h·H + w·W)`` for the weights, independent of the sample count.
    """
    if features.dim() != 4:
        raise ValueError(f"features must be (B, C, H, W), got {tuple(features.shape)}")
    if boxes.dim() != 2 or boxes.shape[1] != 5:
        raise ValueError(f"boxes must be (K, 5) [batch_index, x1, y1, x2, y2], got {tuple(boxes.shape)}")
    ph, pw = _pair(output_size)
    B, C, H, W = features.shape
    K = boxes.shape[0]
    dt = _compute_dtype(features.dtype)
    if K == 0 or C == 0:
        return features.new_zeros(K, C, ph, pw)
    rois = boxes.detach().to(device=features.device, dtype=dt)
    bidx = rois[:, 0].long()  # the kernel casts the index to int (truncation)
    if bool(((bidx < 0) | (bidx >= B)).any()):
        raise IndexError(f"box batch indices must lie in [0, {B - 1}]")
    x1, y1, x2, y2 = _scaled_edges(rois, spatial_scale, aligned)
    ay, gh = _axis_weights(y1, y2, ph, H, sampling_ratio, aligned)                # (K, h, H)
    ax, gw = _axis_weights(x1, x2, pw, W, sampling_ratio, aligned)                # (K, w, W)
    ay, iy = _window(ay)                                                           # (K, h, Ly)
    ax, ix = _window(ax)                                                           # (K, w, Lx)
    f = features.permute(0, 2, 3, 1)                                               # (B, H, W, C)
    win = f[bidx[:, None, None], iy[:, :, None], ix[:, None, :]].to(dt)            # (K, Ly, Lx, C)
    t = torch.einsum("kqj,kijc->kiqc", ax, win)                                    # (K, Ly, w, C)
    out = torch.einsum("kpi,kiqc->kcpq", ay, t)                                    # (K, C, h, w)
    count = (gh * gw).clamp(min=1).to(dt)
    return (out / count[:, None, None, None]).to(features.dtype)


def roi_align_grid(features: Tensor, rows: Tensor, cols: Tensor, output_size: int | tuple[int, int],
                   spatial_scale: float = 1.0, sampling_ratio: int = -1,
                   aligned: bool = False) -> Tensor:
    """Fast path: RoIAlign of every box of a grid, in every batch item, with two matmuls.

    The boxes are all ``[b, x1_j, y1_i, x2_j, y2_i]`` for ``b < B``, ``i < R``, ``j < Q`` (the
    case of LLaVA-UHD's regions, which also share one size). Since a box's row weights depend
    only on ``(y1_i, y2_i)`` and its column weights only on ``(x1_j, x2_j)``, one (R·h)×H and one
    (Q·w)×W matrix pool the whole map: ``out = Aᵧ · F · Aₓᵀ``.

    Args:
        features: (B, C, H, W).
        rows: (R, 2) ``[y1, y2]`` per grid row; cols: (Q, 2) ``[x1, x2]`` per grid column.
        output_size, spatial_scale, sampling_ratio, aligned: as :func:`roi_align`.

    Returns:
        (B, R, Q, C, h, w); ``.flatten(0, 2)`` equals ``roi_align(features, grid_rois(B, rows,
        cols), ...)``.
    """
    if features.dim() != 4:
        raise ValueError(f"features must be (B, C, H, W), got {tuple(features.shape)}")
    ph, pw = _pair(output_size)
    B, C, H, W = features.shape
    dt = _compute_dtype(features.dtype)
    off = 0.5 if aligned else 0.0
    r = rows.detach().to(device=features.device, dtype=dt) * spatial_scale - off
    c = cols.detach().to(device=features.device, dtype=dt) * spatial_scale - off
    ay, gh = _axis_weights(r[:, 0], r[:, 1], ph, H, sampling_ratio, aligned)       # (R, h, H)
    ax, gw = _axis_weights(c[:, 0], c[:, 1], pw, W, sampling_ratio, aligned)       # (Q, w, W)
    # count = max(gh·gw, 1) = max(gh,1)·max(gw,1) whenever any sample exists (else all weights are 0)
    ay = ay / gh.clamp(min=1).to(dt)[:, None, None]
    ax = ax / gw.clamp(min=1).to(dt)[:, None, None]
    R, Q = ay.shape[0], ax.shape[0]
    out = ay.reshape(R * ph, H) @ features.to(dt) @ ax.reshape(Q * pw, W).T          # (B, C, R·h, Q·w)
    out = out.reshape(B, C, R, ph, Q, pw).permute(0, 2, 4, 1, 3, 5)
    return out.to(features.dtype)


def grid_rois(batch: int, rows: Tensor, cols: Tensor) -> Tensor:
    """The (B·R·Q, 5) box list that :func:`roi_align_grid` pools, in its output order
    (batch, then grid row, then grid column)."""
    R, Q = rows.shape[0], cols.shape[0]
    b = torch.arange(batch, dtype=rows.dtype, device=rows.device)[:, None, None].expand(batch, R, Q)
    y1 = rows[:, 0][None, :, None].expand(batch, R, Q)
    y2 = rows[:, 1][None, :, None].expand(batch, R, Q)
    x1 = cols[:, 0][None, None, :].expand(batch, R, Q)
    x2 = cols[:, 1][None, None, :].expand(batch, R, Q)
    return torch.stack([b, x1, y1, x2, y2], -1).reshape(-1, 5)
