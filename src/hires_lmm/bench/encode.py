"""Benchmark 2: encoding LLaVA-UHD's variable-sized slices of a batch of 8 images.

Contenders, all with the same ViT (random weights) on the same views:

* **reference call**: transformers' vision model called once per view with
  ``output_hidden_states=True`` and ``interpolate_pos_encoding=True``, layer -2 read: what LLaVA's
  ``CLIPVisionTower`` does for a list of images (all blocks run, every hidden state kept);
* **per view**: one call per view of the library's ``ViT`` (runs only the blocks LLaVA reads);
* **grouped**: ``ViT.encode_views(packed=False)``, one batched call per distinct view size;
* **packed**: ``ViT.encode_views`` (the library's default for mixed sizes): one token sequence
  with block-diagonal attention;
* **uniform**: as many 336x336 views in one batched call (and through ``encode_views``), the
  throughput a batch of equal views reaches. Compared per FLOP (the slices' FLOPs differ a little
  from the uniform views'), with the FLOP count of :func:`hires_lmm.plan.cost.vit_flops`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..plan import plan_image
from ..plan.cost import ViTShape, vit_flops
from ..vision.vit import ViT
from .common import interleaved, ratio

#: the batch: 8 images of varied sizes and aspect ratios
UHD_BATCH_SIZES: tuple[tuple[int, int], ...] = (
    (1000, 600), (800, 1200), (1600, 900), (672, 1088), (1024, 768), (500, 375), (2000, 1000), (768, 1366))

TARGET_VS_PER_VIEW = 3.0
TARGET_VS_UNIFORM = 0.85


def vit_config(width: int, layers: int, heads: int | None = None, mlp: int | None = None) -> dict[str, Any]:
    """A CLIP-geometry ViT config (336 px, patch 14: a 24x24 native grid)."""
    return {"model_type": "clip_vision_model", "hidden_size": width, "intermediate_size": mlp or 4 * width,
            "num_hidden_layers": layers, "num_attention_heads": heads or max(1, width // 64),
            "image_size": 336, "patch_size": 14}


def uhd_views(sizes: Sequence[tuple[int, int]] = UHD_BATCH_SIZES, method: str = "llava-uhd",
              seed: int = 0) -> list[torch.Tensor]:
    """Random normalised pixels for every view LLaVA-UHD's plans of ``sizes`` make."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, v.size[1], v.size[0], generator=g)
            for s in sizes for v in plan_image(method, s).views]


def encoder_flops(vit: ViT, views: Sequence[torch.Tensor], layers: int | None = None) -> float:
    """FLOPs of encoding ``views`` with ``layers`` blocks (default: those ``vit`` runs; LLaVA
    reads layer -2)."""
    c = vit.config
    shape = ViTShape(width=c.hidden_size, layers=vit.select_layer_index() if layers is None else layers,
                     mlp=c.intermediate_size,
                     patch=c.patch_size)
    p = vit.patch_size
    return sum(vit_flops((v.shape[-2] // p) * (v.shape[-1] // p), shape, cls=vit.has_cls) for v in views)


def bench_encode(config: dict[str, Any], *, name: str, repeat: int = 3,
                 sizes: Sequence[tuple[int, int]] = UHD_BATCH_SIZES, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, sync: Callable[[], None] | None = None) -> dict[str, Any]:
    """Time per-view, grouped, packed and uniform encoding; check packed = per-view features."""
    torch.manual_seed(0)
    vit = ViT.from_config(config).eval().to(device=device, dtype=dtype)
    views = [v.to(device=device, dtype=dtype) for v in uhd_views(sizes)]
    uniform = torch.randn(len(views), 3, 336, 336, device=device, dtype=dtype)
    uniform_list = list(uniform.unbind(0))
    p = vit.patch_size
    with torch.inference_mode():
        ref = [vit(v[None])[0] for v in views]
        packed = vit.encode_views(views, packed=True)
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(ref, packed))
        tower, layer = vit.vision_tower, vit.select_layer

        def reference_call() -> list[torch.Tensor]:
            return [tower(pixel_values=v[None], output_hidden_states=True,
                          interpolate_pos_encoding=True).hidden_states[layer] for v in views]

        t = interleaved({
            "reference_call": reference_call,
            "per_view": lambda: [vit(v[None]) for v in views],
            "grouped": lambda: vit.encode_views(views, packed=False),
            "packed": lambda: vit.encode_views(views, packed=True),
            "uniform_batched": lambda: vit(uniform),
            "uniform_library": lambda: vit.encode_views(uniform_list, packed=True),
        }, repeat=repeat, sync=sync)
    flops, uflops = encoder_flops(vit, views), encoder_flops(vit, uniform_list)
    best_uniform = min(t["uniform_batched"], t["uniform_library"])
    return {
        "config": name, "width": vit.hidden_size, "layers_run": vit.select_layer_index(),
        "heads": int(vit.config.num_attention_heads), "images": len(sizes), "views": len(views),
        "distinct_sizes": len({tuple(v.shape) for v in views}),
        "distinct_lengths": len({(v.shape[-2] // p) * (v.shape[-1] // p) for v in views}),
        "tokens": sum((v.shape[-2] // p) * (v.shape[-1] // p) for v in views),
        "gflops": flops / 1e9, "uniform_gflops": uflops / 1e9, "layers": vit.num_layers,
        "reference_gflops": encoder_flops(vit, views, vit.num_layers) / 1e9,
        **{f"{k}_s": v for k, v in t.items()},
        "packed_gflops_per_s": flops / 1e9 / t["packed"],
        "uniform_gflops_per_s": uflops / 1e9 / best_uniform,
        "packed_vs_per_view": ratio(t["per_view"], t["packed"]),
        "grouped_vs_per_view": ratio(t["per_view"], t["grouped"]),
        "packed_vs_reference_call": ratio(t["reference_call"], t["packed"]),
        # throughput per FLOP, against the better of the two uniform runs
        "packed_vs_uniform": ratio(flops / t["packed"], uflops / best_uniform),
        "packed_vs_uniform_batched": ratio(flops / t["packed"], uflops / t["uniform_batched"]),
        "max_abs_diff_vs_per_view": diff,
        "target_vs_per_view": TARGET_VS_PER_VIEW, "target_vs_uniform": TARGET_VS_UNIFORM, "repeat": repeat,
        "device": str(device), "dtype": str(dtype).replace("torch.", ""),
    }
