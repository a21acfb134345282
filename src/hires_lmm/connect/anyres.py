"""LLaVA-NeXT "anyres" feature packing (transformers' ``LlavaNextModel.pack_image_features``).

The base view's tokens come first; the tiles' tokens are reassembled into one
(rows·24)×(cols·24) map, the rows/columns that only show padding are cut away ("unpad"), and the
learned ``image_newline`` vector is appended after every row of the map.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["unpad_image", "pack_anyres"]


def unpad_image(tensor: Tensor, original_size: tuple[int, int]) -> Tensor:
    """Remove the padding rows or columns of a (C, H, W) map of a resized-and-padded image.

    ``original_size = (w, h)`` of the original image (transformers takes (h, w); the arithmetic is
    the same): if the image is wider than the map, ``new_h = int(round(h·W/w, 7))`` rows are
    kept, ``(H − new_h) // 2`` removed from each side; otherwise the same on the columns.
    """
    orig_w, orig_h = original_size
    cur_h, cur_w = tensor.shape[1:]
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        pad = (cur_h - new_h) // 2
        return tensor[:, pad:cur_h - pad, :]
    new_w = int(round(orig_w * (cur_h / orig_h), 7))
    pad = (cur_w - new_w) // 2
    return tensor[:, :, pad:cur_w - pad]


def pack_anyres(base: Tensor, tiles: Tensor | None, grid: tuple[int, int], image_size: tuple[int, int],
                newline: Tensor | None) -> Tensor:
    """One image's LLaVA-NeXT visual token sequence.

    Args:
        base: (P, D) tokens of the base (whole-image) view, P = s² (576).
        tiles: (cols·rows, P, D) tokens of the tiles in row-major order, or None / empty for an
            image without tiles.
        grid: ``(cols, rows)`` of the tile grid.
        image_size: ``(w, h)`` of the original image.
        newline: (D,) the ``image_newline`` vector, or None to append nothing.

    Returns:
        (N, D): base tokens, then the unpadded map row by row, each row followed by ``newline``
        (N = P + rows'·(cols' + 1) for an rows'×cols' unpadded map). Without tiles: base tokens
        then one ``newline``, as transformers does.
    """
    if tiles is None or tiles.shape[0] == 0:
        return base if newline is None else torch.cat([base, newline[None].to(base)], dim=0)
    cols, rows = grid
    n, p, d = tiles.shape
    side = math.isqrt(p)
    if side * side != p or n != cols * rows:
        raise ValueError(f"tiles {tuple(tiles.shape)} do not form a {cols}x{rows} grid of square token maps")
    # (rows, cols, s, s, D) → (D, rows·s, cols·s): tile rows stacked, each tile's rows side by side
    fmap = tiles.view(rows, cols, side, side, d).permute(4, 0, 2, 1, 3).reshape(d, rows * side, cols * side)
    fmap = unpad_image(fmap, image_size)
    if newline is not None:
        nl = newline.to(fmap)[:, None, None].expand(d, fmap.shape[1], 1)
        fmap = torch.cat([fmap, nl], dim=-1)
    return torch.cat([base, fmap.flatten(1, 2).transpose(0, 1)], dim=0)
