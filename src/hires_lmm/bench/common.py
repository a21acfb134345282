"""Shared helpers of the benchmarks: timing, thread settings, a description of the machine."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch


def set_threads(n: int | None) -> int:
    """Use ``n`` CPU threads in torch (default: every core); returns the number in use."""
    n = n or os.cpu_count() or 1
    torch.set_num_threads(n)
    return torch.get_num_threads()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the figures were measured on."""
    import PIL
    import transformers

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pillow": PIL.__version__,
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:  # not on every platform
        info["load_average"] = None
    return info


def interleaved(fns: Mapping[str, Callable[[], Any]], *, repeat: int, warmup: int = 1,
                sync: Callable[[], None] | None = None) -> dict[str, float]:
    """Median seconds of each function, timed round-robin (``repeat`` rounds after ``warmup``), so
    that a change in the machine's load affects every contender alike.

    ``sync`` (e.g. ``torch.cuda.synchronize``) is called before reading the clock.
    """
    sync = sync or (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync()
    runs: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(max(1, repeat)):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync()
            runs[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in runs.items()}


def ratio(a: float, b: float) -> float:
    """``a / b``, NaN when ``b`` is 0."""
    return a / b if b else float("nan")
