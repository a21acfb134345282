"""``hires bench``: the figures of docs/performance.md, measured on the machine at hand.

Sections: 1. preprocessing large photos for LLaVA-NeXT against transformers (:mod:`.preprocess`),
2. encoding LLaVA-UHD's variable-sized slices, packed vs per view vs uniform (:mod:`.encode`),
3. the cost table (:mod:`.cost_table`), 4. end to end per method (:mod:`.e2e`), 5. on a GPU,
ViT-L bf16 efficiency and a ViT-L + 7B training step (:mod:`.gpu`). :func:`run_bench` runs them,
:func:`write_report` writes the Markdown.
"""

from __future__ import annotations

import importlib
from typing import Any

# imported on first use: the CLI imports ``hires_lmm.bench.cli`` (and so this package) to
# register ``hires bench``, and `hires plan` / `hires cost` must not pay for torch at start-up
_LAZY = {"format_report": "report", "write_report": "report", "SECTIONS": "runner", "SUMMARY_KEYS": "runner",
         "BenchSettings": "runner", "run_bench": "runner", "summary": "runner"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["SECTIONS", "SUMMARY_KEYS", "BenchSettings", "format_report", "run_bench", "summary", "write_report"]
