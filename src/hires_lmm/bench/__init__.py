"""``hires bench``: the figures of docs/performance.md, measured on the machine at hand.

Sections: 1. preprocessing large photos for LLaVA-NeXT against transformers (:mod:`.preprocess`),
2. encoding LLaVA-UHD's variable-sized slices, packed vs per view vs uniform (:mod:`.encode`),
3. the cost table (:mod:`.cost_table`), 4. end to end per method (:mod:`.e2e`), 5. on a GPU,
ViT-L bf16 efficiency and a ViT-L + 7B training step (:mod:`.gpu`). :func:`run_bench` runs them,
:func:`write_report` writes the Markdown.
"""

from .report import format_report, write_report
from .runner import SECTIONS, SUMMARY_KEYS, BenchSettings, run_bench, summary

__all__ = ["SECTIONS", "SUMMARY_KEYS", "BenchSettings", "format_report", "run_bench", "summary", "write_report"]
