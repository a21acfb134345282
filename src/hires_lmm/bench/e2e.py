"""Benchmark 4: end to end, per method (tiny presets): time to first token and decode speed.

``HiresLMM.generate`` on one in-memory image and a short prompt, greedy. A forward hook on the LLM
stamps the end of every LLM call: the first (the prefill) ends the **time to first token**
(image preparation, vision encoding, splicing and prefill), the following ones are decode steps
(**tokens/s**). As serving benchmarks do ("ignore EOS"), the hook also masks the EOS logit so that
the random-weight models always generate the requested number of tokens.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from ..plan import METHODS
from .preprocess import synth_photo

PROMPT = "<image>\nDescribe the picture in detail."


def _timed_generate(model: Any, image: Any, new_tokens: int) -> tuple[float, float, int]:
    """(time to first token s, decode tokens/s, decode steps) of one ``generate`` call: the prefill
    gives the first token, each decode step (LLM forward) one more."""
    stamps: list[float] = []
    eos = model.tokenizer.eos_token_id

    def hook(_m: Any, _i: Any, out: Any) -> None:
        if eos is not None:
            out.logits[..., eos] = float("-inf")
        stamps.append(time.perf_counter())

    h = model.llm.register_forward_hook(hook)
    try:
        t0 = time.perf_counter()
        model.generate([PROMPT], [[image]], max_new_tokens=new_tokens)
    finally:
        h.remove()
    ttft = stamps[0] - t0
    steps = len(stamps) - 1
    rate = steps / (stamps[-1] - stamps[0]) if steps else float("nan")
    return ttft, rate, steps


def bench_e2e(methods: Sequence[str] = METHODS, *, new_tokens: int = 32, repeat: int = 3,
              image_size: tuple[int, int] = (1024, 768)) -> list[dict[str, Any]]:
    """One row per method: visual tokens, time to first token, decode tokens/s (medians)."""
    from ..methods import build_model

    image = synth_photo(image_size, seed=7)
    rows = []
    for m in methods:
        model = build_model(m, tiny=True)
        with torch.inference_mode():
            plan = model.prepare_image(image).plan
            _timed_generate(model, image, min(new_tokens, 4))  # warm-up
            runs = [_timed_generate(model, image, new_tokens) for _ in range(max(1, repeat))]
        rows.append({
            "method": m, "image_size": list(image_size), "views": len(plan.views),
            "visual_tokens": plan.num_visual_tokens, "new_tokens": new_tokens,
            "ttft_s": statistics.median(r[0] for r in runs),
            "decode_tokens_per_s": statistics.median(r[1] for r in runs),
            "decode_steps": runs[-1][2], "repeat": repeat,
        })
        del model
    return rows
