"""Benchmark 3: the cost table (visual tokens and TFLOPs per image, from the plans alone).

Uses :func:`hires_lmm.plan.cost.plan_cost` (docs/cost.md): every method at a range of sizes with a
7B LLM, LLaVA-UHD's Table 1 check (13B LLM, as the paper) and LLaVA-HR's token counts per S.
"""

from __future__ import annotations

from typing import Any

from ..plan import METHODS, plan_image
from ..plan.cost import plan_cost

TABLE_SIZES: tuple[tuple[int, int], ...] = (
    (336, 336), (672, 672), (1008, 1008), (1344, 1344), (672, 1008), (1024, 768), (4000, 3000))
#: LLaVA-UHD (arXiv v1), Table 1: 672x1008 with UHD vs 336x336 with LLaVA-1.5, 13B LLM
UHD_PAPER = {"llava-1.5": 15.5, "llava-uhd-arxiv": 14.6}
#: LLaVA-HR's visual tokens per input size S (its paper's table: 384→576, 768→576, 1024→1024, 1536→2304)
HR_SIZES = (384, 768, 1024, 1536)


def cost_table(llm_params: float = 7e9, sizes: tuple[tuple[int, int], ...] = TABLE_SIZES) -> dict[str, Any]:
    """``{"rows": {method: {"WxH": {"tokens", "tflops", "bound"}}}}`` for every method and size."""
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for m in METHODS:
        rows[m] = {}
        for s in sizes:
            plan = plan_image(m, s)
            rep = plan_cost(plan, llm_params=llm_params)
            rows[m][f"{s[0]}x{s[1]}"] = {"tokens": plan.num_visual_tokens, "tflops": rep.total_flops / 1e12,
                                         "bound": bool(plan.extra.get("bound"))}
    return {"llm_params": llm_params, "sizes": [f"{w}x{h}" for w, h in sizes], "rows": rows}


def uhd_claim() -> dict[str, Any]:
    """LLaVA-UHD's "94% of LLaVA-1.5's compute" check, as the paper counts it (13B LLM)."""
    ref = plan_cost(plan_image("llava-1.5", (336, 336)), llm_params=13e9).total_flops / 1e12
    uhd = plan_cost(plan_image("llava-uhd-arxiv", (672, 1008)), llm_params=13e9).total_flops / 1e12
    return {"llm_params": 13e9, "llava15_336_tflops": ref, "uhd_arxiv_672x1008_tflops": uhd,
            "ratio": uhd / ref, "paper": UHD_PAPER, "paper_ratio": UHD_PAPER["llava-uhd-arxiv"] / UHD_PAPER["llava-1.5"]}


def hr_tokens(image_size: tuple[int, int] = (1024, 768)) -> dict[str, Any]:
    """LLaVA-HR's visual tokens and TFLOPs (7B) for each input size S."""
    out = {}
    for S in HR_SIZES:
        plan = plan_image("llava-hr", image_size, S=S)
        out[str(S)] = {"tokens": plan.num_visual_tokens, "tflops": plan_cost(plan).total_flops / 1e12}
    return out
