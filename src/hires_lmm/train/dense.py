"""Dense pretraining of a vision encoder from random weights.

The papers start from a pretrained CLIP (and LLaVA-HR from a pretrained ConvNeXt); a tiny encoder
trained from scratch has no such start, and the only signal an LMM gives it (one answer token per
image, through the LLM's attention) is far too weak to learn to see in a few hundred steps. Here a
linear head classifies every output cell of the encoder (a ViT patch, a ConvNeXt stride-32 cell)
into "background" or one of the answer classes, so each image supervises hundreds of cells at
once; the head is thrown away and the encoder is then shared, frozen, by every method (the
``frozen-encoders`` stage), as CLIP is in the papers.

The data comes from a *sampler* ``(rng, n) -> (pixels (n, 3, H, W), labels (n, gh, gw))`` with
labels 0 for background and ``1..C`` for the classes (``-100``: ignored); see
:func:`hires_lmm.demo.pretrain` for the synthetic task's sampler.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DenseResult", "cell_labels", "encoder_grid", "pretrain_dense"]

Sampler = Callable[[np.random.Generator, int], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class DenseResult:
    """How a pretraining run ended: the last steps' mean loss and cell accuracies (foreground:
    cells of a class, right class; background: cells of none, predicted as none)."""

    steps: int
    loss: float
    fg_acc: float
    bg_acc: float
    seconds: float


def cell_labels(box: tuple[float, float, float, float], label: int, grid: tuple[int, int], cell: float) -> torch.Tensor:
    """(gh, gw) labels: ``label`` where a cell's centre lies inside ``box`` (x0, y0, x1, y1, in
    the encoder input's pixels), 0 elsewhere. ``cell``: the cell's side in pixels."""
    gh, gw = grid
    cx = (torch.arange(gw, dtype=torch.float32) + 0.5) * cell
    cy = (torch.arange(gh, dtype=torch.float32) + 0.5) * cell
    inside = ((cy >= box[1]) & (cy < box[3]))[:, None] & ((cx >= box[0]) & (cx < box[2]))[None, :]
    return inside.long() * int(label)


def encoder_grid(encoder: nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The encoder's output cells as a map: (B, 3, H, W) -> (B, gh, gw, d).

    A :class:`~hires_lmm.vision.vit.ViT` gives its LLaVA features (patch grid, CLS dropped); a
    :class:`~hires_lmm.vision.convnext.ConvNeXt` its stage-4 map (stride 32)."""
    from ..vision.convnext import ConvNeXt
    from ..vision.vit import ViT

    if isinstance(encoder, ViT):
        feats = encoder(pixels)                               # (B, gh*gw, d)
        p = encoder.patch_size
        return feats.unflatten(1, (pixels.shape[2] // p, pixels.shape[3] // p))
    if isinstance(encoder, ConvNeXt):
        return encoder.forward_features(pixels).permute(0, 2, 3, 1)
    raise TypeError(f"dense pretraining supports ViT and ConvNeXt encoders, got {type(encoder).__name__}")


def pretrain_dense(encoder: nn.Module, sampler: Sampler, num_classes: int, *, steps: int, batch_size: int,
                   lr: float = 1e-2, warmup: int = 20, fg_weight: float = 5.0, seed: int = 0,
                   desc: str = "pretrain encoder", progress: bool = True) -> DenseResult:
    """Train ``encoder`` and a linear head on ``sampler``'s cell labels (see the module doc).

    AdamW at ``lr`` (tiny encoders from scratch want a large one) with linear warmup and cosine
    decay; foreground cells weigh ``fg_weight`` (they are a few percent of all cells). The encoder
    is left in eval mode with its trained weights; the head is discarded.
    """
    from tqdm.auto import tqdm

    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    x, _ = sampler(np.random.default_rng(seed + 1), 1)
    with torch.no_grad():
        d = encoder_grid(encoder, x).shape[-1]
    head = nn.Linear(d, 1 + num_classes)
    params = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    encoder.train()
    t0 = time.perf_counter()
    losses: list[float] = []
    fg_hits = fg_n = bg_hits = bg_n = 0
    bar = tqdm(range(steps), desc=desc, unit="step", disable=not progress)
    for step in bar:
        scale = (step + 1) / warmup if step < warmup else 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        pixels, labels = sampler(rng, batch_size)
        logits = head(encoder_grid(encoder, pixels))          # (B, gh, gw, 1+C)
        if logits.shape[1:3] != labels.shape[1:]:
            raise ValueError(f"labels {tuple(labels.shape[1:])} do not match the encoder grid {tuple(logits.shape[1:3])}")
        flat, target = logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)
        weight = torch.where(target > 0, fg_weight, 1.0) * (target != -100)
        ce = F.cross_entropy(flat, target.clamp(min=0), reduction="none")
        loss = (ce * weight).sum() / weight.sum().clamp(min=1e-6)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step >= steps - max(1, steps // 5):               # statistics over the last fifth
            with torch.no_grad():
                pred = flat.argmax(-1)
                fg, bg = target > 0, target == 0
                fg_hits += int((pred[fg] == target[fg]).sum())
                fg_n += int(fg.sum())
                bg_hits += int((pred[bg] == 0).sum())
                bg_n += int(bg.sum())
            losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}")
    encoder.eval()
    return DenseResult(steps, float(np.mean(losses)) if losses else float("nan"), fg_hits / max(1, fg_n),
                       bg_hits / max(1, bg_n), time.perf_counter() - t0)
