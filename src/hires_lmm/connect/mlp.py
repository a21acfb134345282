"""LLaVA's feature projectors (haotian-liu/LLaVA ``multimodal_projector/builder.py``).

The modules are plain ``nn.Linear`` / ``nn.Sequential`` so their state-dict keys are those of a
released ``mm_projector`` (``0.weight``, ``0.bias``, ``2.weight``, ``2.bias`` for mlp2x_gelu) and
a checkpoint's ``model.mm_projector.*`` tensors load after stripping the prefix.
"""

from __future__ import annotations

import re

from torch import nn

__all__ = ["MLP2xGelu", "build_projector"]

_MLP_RE = re.compile(r"^mlp(\d+)x_gelu$")


class MLP2xGelu(nn.Sequential):
    """``Linear(d_in→d_out) → GELU → Linear(d_out→d_out)``: LLaVA-1.5's ``mlp2x_gelu``.

    Input ``(..., d_in)`` → output ``(..., d_out)``. Default PyTorch ``nn.Linear`` init, as LLaVA
    builds it (no custom initialisation).
    """

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))
        self.d_in, self.d_out = d_in, d_out


def build_projector(kind: str, d_in: int, d_out: int) -> nn.Module:
    """The projector named by LLaVA's ``mm_projector_type``.

    ``"linear"`` → ``nn.Linear(d_in, d_out)``; ``"mlp{N}x_gelu"`` → N linear layers with GELU
    between them (``Linear(d_in→d_out)``, then N−1 × ``GELU, Linear(d_out→d_out)``), the layout of
    LLaVA's builder, so the linear layers sit at indices 0, 2, 4, …
    """
    if kind == "linear":
        return nn.Linear(d_in, d_out)
    m = _MLP_RE.match(kind)
    if m:
        depth = int(m.group(1))
        if depth < 1:
            raise ValueError(f"projector depth must be at least 1, got {kind!r}")
        if depth == 2:
            return MLP2xGelu(d_in, d_out)
        layers: list[nn.Module] = [nn.Linear(d_in, d_out)]
        for _ in range(1, depth):
            layers += [nn.GELU(), nn.Linear(d_out, d_out)]
        return nn.Sequential(*layers)
    raise ValueError(f"unknown projector type {kind!r} (expected 'linear' or 'mlp<N>x_gelu')")
