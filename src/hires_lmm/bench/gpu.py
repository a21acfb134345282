"""Benchmark 5 (GPU only): ViT-L/14-336 encoding efficiency in bf16 and a training step's memory.

* **Encoding**: a ViT-L/14-336-shaped CLIP tower (width 1024, 24 layers, 16 heads, MLP 4096;
  random weights) in bf16 encodes a batch of uniform 336x336 views and LLaVA-UHD's slices of 8
  images (packed, and one call per view). Achieved TFLOP/s (FLOPs of the 23 blocks LLaVA reads,
  :func:`hires_lmm.plan.cost.vit_flops`) as a fraction of the GPU's dense bf16 peak: the vendor
  figure when the device is in :data:`PEAK_BF16_TFLOPS`, and a large bf16 matmul measured in the
  same run (what the GPU reaches in practice). Target: at least 50% of the peak.
* **Training step**: LLaVA-1.5 with the ViT-L tower and a 7B-shaped Llama (hidden 4096, 32 heads,
  MLP 11008, vocabulary 32000) in bf16, AdamW, one forward + backward + optimizer step on a batch
  of image-text samples; ``torch.cuda.max_memory_allocated`` of the step. The full 32 layers with
  AdamW states do not fit one 80 GB GPU without sharding, so the step is measured at two depths
  and the memory extrapolated linearly to 32 layers (documented as such in the report).

Every function takes the device and the shapes, so the tests run them on a CPU with tiny shapes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from .common import interleaved, ratio
from .encode import bench_encode, vit_config

#: dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, by a substring of the device name
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("GH200", 989.4), ("A100", 312.0),
    ("L40S", 362.1), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0), ("RTX 4090", 165.2),
)
VIT_L = vit_config(1024, 24, heads=16, mlp=4096)
LLAMA_7B: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
    "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
}
TARGET_FRACTION = 0.5


def vendor_peak(name: str) -> float | None:
    """The dense bf16 peak of a device by name (TFLOP/s), or None when unknown."""
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return peak
    return None


def measured_matmul_tflops(device: str | torch.device, n: int = 8192, dtype: torch.dtype = torch.bfloat16,
                           repeat: int = 10) -> float:
    """TFLOP/s of an n x n x n matmul: the practical ceiling of the GPU's matrix units."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None
    t = interleaved({"mm": lambda: [a @ b for _ in range(repeat)]}, repeat=3, sync=sync)["mm"]
    return 2 * n ** 3 * repeat / t / 1e12


def bench_vit_encoding(device: str | torch.device = "cuda", *, config: dict[str, Any] = VIT_L, batch: int = 32,
                       dtype: torch.dtype = torch.bfloat16, repeat: int = 5, peak: float | None = None,
                       uhd_sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, Any]:
    """ViT encoding throughput in ``dtype``: uniform batch and LLaVA-UHD's packed slices."""
    from ..vision.vit import ViT
    from .encode import encoder_flops

    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else None
    torch.manual_seed(0)
    vit = ViT.from_config(config).eval().to(device=dev, dtype=dtype)
    x = torch.randn(batch, 3, 336, 336, device=dev, dtype=dtype)
    with torch.inference_mode():
        t = interleaved({"uniform": lambda: vit(x)}, repeat=repeat, warmup=2, sync=sync)["uniform"]
    flops = encoder_flops(vit, list(x.unbind(0)))
    achieved = flops / t / 1e12
    out: dict[str, Any] = {"batch": batch, "dtype": str(dtype).replace("torch.", ""), "width": vit.hidden_size,
                           "layers_run": vit.select_layer_index(), "seconds": t, "tflops": flops / 1e12,
                           "achieved_tflops_per_s": achieved, "vendor_peak_tflops": peak,
                           "fraction_of_vendor_peak": ratio(achieved, peak) if peak else None,
                           "target_fraction": TARGET_FRACTION}
    if uhd_sizes is not None:
        enc = bench_encode(config, name="ViT-L/14-336 bf16", repeat=repeat, sizes=uhd_sizes, device=dev,
                           dtype=dtype, sync=sync)
        out["uhd"] = enc
        out["uhd_packed_tflops_per_s"] = enc["packed_gflops_per_s"] / 1e3
    return out


def _train_model(layers: int, vision: dict[str, Any], text: dict[str, Any], device: torch.device,
                 dtype: torch.dtype) -> Any:
    from ..methods import build_from_config, tiny_config
    from ..text import build_byte_tokenizer

    tok = build_byte_tokenizer()
    cfg = tiny_config("llava-1.5", len(tok))
    cfg.vision_config = dict(vision)
    cfg.text_config = {**text, "num_hidden_layers": layers, "vocab_size": max(len(tok), text.get("vocab_size", 0))}
    # transformers' @wraps(nn.Module.to) makes mypy see PreTrainedModel.to unbound (self missing)
    return build_from_config(cfg, tok).to(device=device, dtype=dtype).train()  # type: ignore[call-arg]


def train_step(layers: int, *, device: str | torch.device = "cuda", vision: dict[str, Any] = VIT_L,
               text: dict[str, Any] = LLAMA_7B, batch: int = 4, text_tokens: int = 128,
               dtype: torch.dtype = torch.bfloat16, steps: int = 2) -> dict[str, Any]:
    """One AdamW step of LLaVA-1.5 (``vision`` + ``layers`` blocks of ``text``); time and memory."""
    from ..image.render import render
    from ..model import ImageInput
    from ..plan import plan_image
    from .preprocess import synth_photo

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    torch.manual_seed(0)
    model = _train_model(layers, vision, text, dev, dtype)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    img = synth_photo((800, 600), seed=3)
    plan = plan_image("llava-1.5", img.size)
    image = ImageInput(plan, [v.to(dev, dtype) for v in render(img, plan)])
    g = torch.Generator().manual_seed(0)
    image_id = model.image_token_id
    ids = []
    for _ in range(batch):
        t = torch.randint(3, 250, (text_tokens,), generator=g)
        t[t == image_id] = 3
        t[0] = image_id
        ids.append(t)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        out = model(ids, [[image] for _ in range(batch)], labels=[t.clone() for t in ids])
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t0)
    res = {"llm_layers": layers, "params": params, "batch": batch,
           "sequence": text_tokens - 1 + plan.num_visual_tokens, "step_s": min(times),
           "loss": float(out.loss.detach()), "max_memory_gb": torch.cuda.max_memory_allocated(dev) / 2 ** 30 if cuda else None}
    del model, opt, out
    if cuda:
        torch.cuda.empty_cache()
    return res


def extrapolate_memory(a: dict[str, Any], b: dict[str, Any], layers: int = 32) -> float | None:
    """Peak memory at ``layers`` LLM layers, linear in depth through two measured steps."""
    if a.get("max_memory_gb") is None or b.get("max_memory_gb") is None or a["llm_layers"] == b["llm_layers"]:
        return None
    per_layer = (b["max_memory_gb"] - a["max_memory_gb"]) / (b["llm_layers"] - a["llm_layers"])
    return a["max_memory_gb"] + per_layer * (layers - a["llm_layers"])


def bench_gpu(*, quick: bool = False) -> dict[str, Any]:
    """Section 5; ``{"skipped": reason}`` without a CUDA device."""
    if not torch.cuda.is_available():
        return {"skipped": "no CUDA GPU on this machine: section 5 was not run"}
    from .encode import UHD_BATCH_SIZES

    name = torch.cuda.get_device_name(0)
    peak = vendor_peak(name)
    measured = measured_matmul_tflops("cuda", n=4096 if quick else 8192)
    enc = bench_vit_encoding("cuda", batch=16 if quick else 64, repeat=3 if quick else 10, peak=peak,
                             uhd_sizes=UHD_BATCH_SIZES)
    enc["measured_matmul_tflops_per_s"] = measured
    enc["fraction_of_measured_peak"] = enc["achieved_tflops_per_s"] / measured
    depths = (1, 2) if quick else (4, 8)
    steps = []
    for n in depths:
        try:
            steps.append(train_step(n, device="cuda", batch=2 if quick else 4))
        except torch.cuda.OutOfMemoryError as e:  # report rather than fail the whole run
            steps.append({"llm_layers": n, "error": f"out of memory: {e}"[:200]})
    ok = [s for s in steps if "error" not in s]
    return {"device": name, "vendor_peak_tflops": peak, "encoding": enc, "train_steps": steps,
            "train_memory_32_layers_gb": extrapolate_memory(ok[0], ok[1]) if len(ok) == 2 else None}
