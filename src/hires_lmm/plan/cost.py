"""Compute cost per image from a plan alone: visual tokens and FLOPs.

Conventions (documented in docs/cost.md):

* A dense layer costs 2 FLOPs per multiply-accumulate: ``2 · tokens · d_in · d_out``.
* Attention adds ``2 · 2 · q · k · d`` (scores and the weighted sum) per layer.
* ViT pass over T tokens (patches + CLS), width d, MLP width f, L layers:
  ``L · (2·T·(4d² + 2df) + 4·T²·d) + 2·P·(3·p²)·d`` with P patches of side p. All L layers
  are counted: the references run the whole tower even when they read layer −2.
* ConvNeXt: stem, depthwise 7×7 and the pointwise MLPs of every block, and the downsamplers.
* The LLM's prefill of the visual tokens: ``2 · params · tokens`` (dense layers only; attention
  over a few hundred tokens is ~2% of a 13B model and is left out, as in UHD's Table 1).

Reproduces LLaVA-UHD's Table 1: ``llava-uhd-arxiv`` at 672×1008 vs ``llava-1.5`` at 336 with a 13B
LLM, 14.6 vs 15.5 TFLOPs (94%); see tests/test_cost.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .types import Plan, View
from .uhd import best_pooling_size

#: (params, hidden size) of common LLM sizes; the hidden size of an unknown LLM is taken from the
#: nearest entry (log scale) unless given.
KNOWN_LLMS: tuple[tuple[float, int], ...] = (
    (0.5e9, 896), (1.1e9, 2048), (1.5e9, 1536), (3e9, 2560), (7e9, 4096), (8e9, 4096),
    (13e9, 5120), (34e9, 7168), (70e9, 8192),
)


@dataclass(frozen=True)
class ViTShape:
    """A ViT's shape; defaults are CLIP ViT-L/14."""

    width: int = 1024
    layers: int = 24
    mlp: int = 4096
    patch: int = 14


@dataclass(frozen=True)
class ConvNeXtShape:
    """Defaults are LLaVA-HR's ConvNeXt-L."""

    depths: tuple[int, ...] = (3, 3, 27, 3)
    dims: tuple[int, ...] = (192, 384, 768, 1536)
    mlp_ratio: int = 4


@dataclass
class ViewCost:
    role: str
    size: tuple[int, int]
    encoder: str
    tokens: int
    flops: float


@dataclass
class CostReport:
    """FLOPs of one image through a method; ``*_flops`` fields are plain FLOPs."""

    method: str
    image_size: tuple[int, int]
    num_visual_tokens: int
    llm_params: float
    llm_hidden: int
    views: list[ViewCost] = field(default_factory=list)
    connector_flops: float = 0.0
    connector_parts: dict[str, float] = field(default_factory=dict)
    llm_flops: float = 0.0
    #: the plan's visual-token budget and what it chose, when planned under one (else None / {})
    max_visual_tokens: int | None = None
    budget_choice: dict = field(default_factory=dict)

    @property
    def vision_flops(self) -> float:
        return sum(v.flops for v in self.views)

    @property
    def total_flops(self) -> float:
        return self.vision_flops + self.connector_flops + self.llm_flops

    def to_json(self) -> dict:
        t = 1e12
        return {
            "method": self.method,
            "image_size": list(self.image_size),
            "num_visual_tokens": self.num_visual_tokens,
            "llm_params": self.llm_params,
            "llm_hidden": self.llm_hidden,
            "tflops": {
                "vision": self.vision_flops / t,
                "connector": self.connector_flops / t,
                "llm_prefill": self.llm_flops / t,
                "total": self.total_flops / t,
            },
            "vision_views": [
                {"role": v.role, "size": list(v.size), "encoder": v.encoder, "tokens": v.tokens,
                 "tflops": v.flops / t} for v in self.views
            ],
            "connector_parts_tflops": {k: v / t for k, v in self.connector_parts.items()},
            # only under a budget, so the JSON of an unbudgeted cost stays exactly as it was
            **({"max_visual_tokens": self.max_visual_tokens, "budget_choice": self.budget_choice}
               if self.max_visual_tokens is not None else {}),
        }


def llm_hidden_for(params: float) -> int:
    """Hidden size of the known LLM nearest in parameter count (log scale)."""
    return min(KNOWN_LLMS, key=lambda e: abs(math.log(e[0] / params)))[1]


def dense(tokens: float, d_in: float, d_out: float) -> float:
    return 2.0 * tokens * d_in * d_out


def attention(q: float, k: float, d: float) -> float:
    return 4.0 * q * k * d


def vit_flops(n_patches: int, shape: ViTShape = ViTShape(), cls: bool = True) -> float:
    """One ViT pass over ``n_patches`` patches (plus CLS when ``cls``)."""
    T = n_patches + (1 if cls else 0)
    d = shape.width
    per_layer = dense(T, d, 4 * d) + dense(T, d, 2 * shape.mlp) + attention(T, T, d)
    return shape.layers * per_layer + dense(n_patches, 3 * shape.patch ** 2, d)


def convnext_flops(S: int, shape: ConvNeXtShape = ConvNeXtShape()) -> float:
    """ConvNeXt on an S×S input: stem (4×4/4), blocks (dw 7×7 + MLP), 2×2/2 downsamplers."""
    hw = (S / 4) ** 2
    flops = dense(hw, 3 * 16, shape.dims[0])
    for i, (depth, c) in enumerate(zip(shape.depths, shape.dims)):
        if i > 0:
            hw /= 4
            flops += dense(hw, 4 * shape.dims[i - 1], c)
        flops += depth * (2.0 * hw * 49 * c + dense(hw, c, shape.mlp_ratio * c) + dense(hw, shape.mlp_ratio * c, c))
    return flops


def mlp2x(tokens: float, d_in: int, d_out: int) -> float:
    """mlp2x_gelu: Linear(d_in→d_out) → GELU → Linear(d_out→d_out)."""
    return dense(tokens, d_in, d_out) + dense(tokens, d_out, d_out)


def _view_patches(v: View, patch: int) -> int:
    return (v.size[0] // patch) * (v.size[1] // patch)


def plan_cost(plan: Plan, *, llm_params: float = 7e9, llm_hidden: int | None = None,
              vit: ViTShape = ViTShape(), convnext: ConvNeXtShape = ConvNeXtShape()) -> CostReport:
    """Visual tokens and FLOPs per image for ``plan``'s method (see the module docstring)."""
    D = llm_hidden or llm_hidden_for(llm_params)
    d = vit.width
    p = plan.patch_size
    rep = CostReport(plan.method, plan.image_size, plan.num_visual_tokens, llm_params, D,
                     max_visual_tokens=plan.extra.get("max_visual_tokens"),
                     budget_choice=dict(plan.extra.get("budget_choice", {})))
    parts: dict[str, float] = {}
    m = plan.method
    for v in plan.views:
        if v.role == "highres":  # LLaVA-HR's ConvNeXt pathway
            rep.views.append(ViewCost(v.role, v.size, "convnext", (v.size[0] // 32) ** 2, convnext_flops(v.size[0], convnext)))
        else:
            n = _view_patches(v, p)
            cls = m != "llava-hr"  # LLaVA-HR drops CLS right after the embeddings
            rep.views.append(ViewCost(v.role, v.size, "vit", n + cls, vit_flops(n, vit, cls)))

    if m in ("llava-1.5", "llava-next"):
        parts["projector"] = sum(mlp2x(_view_patches(v, p), d, D) for v in plan.views)
    elif m == "llava-uhd":
        q = plan.extra["queries_per_part"]
        for v in plan.views:
            gw, gh = v.size[0] // p, v.size[1] // p
            ph, pw = best_pooling_size(gw / gh)
            keys = q * ph * pw  # each query attends only to its region's pooled keys
            parts["resampler kv_proj"] = parts.get("resampler kv_proj", 0) + dense(gw * gh, d, D)
            parts["resampler attention"] = parts.get("resampler attention", 0) + (
                dense(keys, D, 2 * D) + dense(q, D, D) + attention(q, ph * pw, D) + dense(q, D, 2 * D))
    elif m == "llava-uhd-arxiv":
        q = plan.extra["queries_per_part"]
        for v in plan.views:
            T = _view_patches(v, p)
            parts["resampler kv_proj"] = parts.get("resampler kv_proj", 0) + dense(T, d, D)
            parts["resampler attention"] = parts.get("resampler attention", 0) + (
                dense(T, D, 2 * D) + dense(q, D, D) + attention(q, T, D) + dense(q, D, 2 * D))
    elif m == "llava-hr":
        L = plan.extra["vit_grid"] ** 2
        H = plan.extra["convnext_grid"] ** 2
        C = convnext.dims[-1]
        per_adapter = (dense(H, C, C) + dense(H, C, d) + 2.0 * L * 49 * d + dense(L, d, d)
                       + dense(1, 2 * d, d // 2))
        parts["MR-adapters (3)"] = 3 * per_adapter
        parts["final fusion"] = dense(L, d, d) + dense(min(H, L), C, d)
        parts["projector"] = mlp2x(L, d, D)
    elif m == "inf-llava":
        n = plan.extra["n"]
        T = (n * 24) ** 2  # aligned local/global maps
        per_direction = dense(T, d, 4 * d) + attention(T, 576, d)  # windows/sub-grids of 576 tokens
        parts["DEM attention (2 directions)"] = 2 * per_direction
        parts["DEM bottlenecks"] = 2 * (dense(T, d, 64) + dense(T, 64, d // 2))
        parts["projector"] = mlp2x(576, d, D)
    elif m == "slime":
        G = 576
        n_tiles = len(plan.views) - 1
        parts["global MLP expert"] = mlp2x(G, d, D)
        parts["global resampler expert"] = dense(G, d, 4 * d) + attention(G, G, d) + mlp2x(G, d, D)
        parts["gate"] = dense(G, d, 2)
        parts["local compressor"] = n_tiles * (dense(G, d, 2 * d) + dense(144, d, 2 * d) + attention(144, G, d))
        parts["local projector"] = mlp2x(144 * n_tiles, d, D)
    rep.connector_parts = parts
    rep.connector_flops = sum(parts.values())
    rep.llm_flops = 2.0 * llm_params * plan.num_visual_tokens
    return rep
