"""Run the benchmarks of docs/performance.md and collect their results in one dict."""

from __future__ import annotations

import datetime as _dt
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..plan import METHODS
from .common import machine_info, set_threads
from .encode import UHD_BATCH_SIZES, vit_config

SECTIONS = ("preprocess", "encode", "cost", "e2e", "gpu")
#: the keys ``hires bench --json`` prints for tools to check
SUMMARY_KEYS = ("preprocess_speedup_vs_hf", "packed_vs_per_view", "packed_vs_uniform", "uhd_arxiv_vs_llava15_tflops")


def _tiny_vision() -> dict[str, Any]:
    from ..methods import TINY_VISION

    return dict(TINY_VISION)


@dataclass
class BenchSettings:
    """What to run and how long. :meth:`preset` gives the full and the quick settings."""

    quick: bool = False
    threads: int | None = None
    sections: tuple[str, ...] = SECTIONS
    photos: int = 4
    photo_size: tuple[int, int] = (4000, 3000)
    preprocess_repeat: int = 5
    #: (name, ViT config) of the encoding runs; the first gives the summary's figures
    encode_configs: tuple[tuple[str, dict[str, Any]], ...] = ()
    encode_images: int = len(UHD_BATCH_SIZES)
    encode_repeat: int = 3
    e2e_methods: tuple[str, ...] = tuple(METHODS)
    e2e_tokens: int = 32
    e2e_repeat: int = 3
    argv: list[str] = field(default_factory=list)

    @classmethod
    def preset(cls, quick: bool = False, **changes: Any) -> BenchSettings:
        if quick:
            s = cls(quick=True, photos=1, preprocess_repeat=3, encode_repeat=2,
                    encode_configs=(("tiny preset (width 32, 4 layers)", _tiny_vision()),),
                    e2e_tokens=8, e2e_repeat=1)
        else:
            s = cls(encode_configs=(("ViT-L width (1024 wide, 16 heads, MLP 4096; 3 layers)", vit_config(1024, 3, 16)),
                                    ("mid (width 256, 4 layers, 4 heads)", vit_config(256, 4)),
                                    ("tiny preset (width 32, 4 layers)", _tiny_vision())))
        return replace(s, **changes)


def run_bench(settings: BenchSettings, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the selected sections; every figure's reference is measured in the same run."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    set_threads(settings.threads)
    res: dict[str, Any] = {"quick": settings.quick, "machine": machine_info(), "argv": list(settings.argv),
                           "started": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                           "sections": list(settings.sections)}
    t0 = time.perf_counter()
    if "preprocess" in settings.sections:
        from .preprocess import bench_preprocess

        log(f"bench: preprocessing {settings.photos} photo(s) {settings.photo_size[0]}x{settings.photo_size[1]}")
        res["preprocess"] = bench_preprocess(n_images=settings.photos, size=settings.photo_size,
                                             repeat=settings.preprocess_repeat)
    if "encode" in settings.sections:
        from .encode import bench_encode

        res["encode"] = []
        for name, cfg in settings.encode_configs:
            log(f"bench: encoding LLaVA-UHD slices, {name}")
            res["encode"].append(bench_encode(cfg, name=name, repeat=settings.encode_repeat,
                                              sizes=UHD_BATCH_SIZES[:settings.encode_images]))
    if "cost" in settings.sections:
        from .cost_table import cost_table, hr_tokens, uhd_claim

        log("bench: cost table")
        res["cost"] = {"table": cost_table(), "uhd_claim": uhd_claim(), "hr_tokens": hr_tokens()}
    if "e2e" in settings.sections:
        from .e2e import bench_e2e

        log(f"bench: end to end, {len(settings.e2e_methods)} method(s)")
        res["e2e"] = bench_e2e(settings.e2e_methods, new_tokens=settings.e2e_tokens, repeat=settings.e2e_repeat)
    if "gpu" in settings.sections:
        from .gpu import bench_gpu

        log("bench: GPU")
        res["gpu"] = bench_gpu(quick=settings.quick)
    res["seconds"] = time.perf_counter() - t0
    res["summary"] = summary(res)
    return res


def summary(res: dict[str, Any]) -> dict[str, Any]:
    """The four figures tools check (None for a section not run), and the GPU's status."""
    enc = (res.get("encode") or [None])[0]
    pre, cost = res.get("preprocess"), res.get("cost")
    out: dict[str, Any] = {
        "preprocess_speedup_vs_hf": pre["speedup_vs_hf"] if pre else None,
        "packed_vs_per_view": enc["packed_vs_per_view"] if enc else None,
        "packed_vs_uniform": enc["packed_vs_uniform"] if enc else None,
        "uhd_arxiv_vs_llava15_tflops": cost["uhd_claim"]["ratio"] if cost else None,
    }
    gpu = res.get("gpu")
    out["gpu"] = "not run (skipped)" if gpu is None else gpu.get("skipped", "run")
    return {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in out.items()}


def parse_sections(text: str | None) -> tuple[str, ...]:
    """A comma-separated subset of :data:`SECTIONS` (ValueError for unknown names)."""
    names = [s.strip() for s in (text or "").split(",") if s.strip()]
    bad = [n for n in names if n not in SECTIONS]
    if bad:
        raise ValueError(f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    return tuple(names)


def without(sections: Sequence[str], skip: Sequence[str]) -> tuple[str, ...]:
    return tuple(s for s in sections if s not in skip)
