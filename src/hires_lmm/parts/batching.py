"""Batching helpers of the runtime: flatten the views of a batch, split results back per image,
and run a module once per group of equal shapes (no Python loop over views touches a module)."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = ["flat", "run_grouped", "split"]


def flat(views: Sequence[Sequence[Tensor]]) -> list[Tensor]:
    """The views of every image, in order."""
    return [v for vs in views for v in vs]


def split(x: Tensor | Sequence[Any], counts: Sequence[int]) -> list[Any]:
    """``x`` cut into consecutive runs of ``counts[i]`` items (one run per image)."""
    out, k = [], 0
    for c in counts:
        out.append(x[k:k + c])
        k += c
    return out


def run_grouped(fn: Callable[[Tensor, Any], Tensor], items: Sequence[Tensor],
                key: Callable[[int, Tensor], Hashable]) -> list[Tensor]:
    """Apply ``fn(stacked, key)`` to stacked groups of items sharing ``key(i, item)``; the results
    ``fn(...)[j]`` come back in input order (one group when every item has the same shape: the
    same single batched call as stacking them all)."""
    groups: dict[Any, list[int]] = {}
    for i, t in enumerate(items):
        groups.setdefault(key(i, t), []).append(i)
    out: list[Tensor | None] = [None] * len(items)
    for k, idx in groups.items():
        res = fn(torch.stack([items[i] for i in idx]), k)
        for j, i in enumerate(idx):
            out[i] = res[j]
    return out  # type: ignore[return-value]
