"""What ``hires export`` can write, and why the other methods cannot be (torch-free, so the CLI
can build its parser and refuse a method before torch is imported).

transformers serves the LLaVA family through two classes: ``LlavaForConditionalGeneration`` (one
fixed-size view, a two-layer projector) and ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT's
anyres tiles, unpadding and ``image_newline``). vLLM and SGLang implement exactly those two
architectures for these checkpoints, so an export is worth having only when a model is one of
them; the other five methods have parts neither class can hold, named in :data:`UNSUPPORTED`.
"""

from __future__ import annotations

from .errors import ConversionError

__all__ = ["EXPORT_TARGETS", "UNSUPPORTED", "ExportError", "check_exportable"]

#: ``--to`` format → (the hires-lmm method it represents, the transformers class it loads as)
EXPORT_TARGETS: dict[str, tuple[str, str]] = {
    "hf-llava": ("llava-1.5", "LlavaForConditionalGeneration"),
    "hf-llava-next": ("llava-next", "LlavaNextForConditionalGeneration"),
}

#: method → what transformers' LLaVA classes lack to represent it
UNSUPPORTED: dict[str, str] = {
    "llava-uhd": "variable-size slices encoded at their own aspect ratio and the 144-query spatially "
                 "constrained resampler with ','/'\\n' separators",
    "llava-uhd-arxiv": "variable-size slices encoded at their own aspect ratio and the 64-query perceiver "
                       "resampler with ','/'\\n' separators",
    "llava-hr": "dual vision encoders (CLIP + ConvNeXt joined by MR-adapters)",
    "inf-llava": "the dual-perspective enhancement module (DEM) fusing crop and strided views",
    "slime": "the gated mixture of adapters and the text-guided local-token selector",
}


class ExportError(ConversionError):
    """A model that cannot be exported faithfully; the one-line message says why."""


def check_exportable(method: str, to: str) -> None:
    """Refuse (:class:`ExportError`) a method that format ``to`` cannot represent."""
    if to not in EXPORT_TARGETS:
        raise ExportError(f"unknown export format {to!r}; choose from {', '.join(EXPORT_TARGETS)}")
    want, cls = EXPORT_TARGETS[to]
    if method in UNSUPPORTED:
        raise ExportError(f"{method} cannot be exported to transformers: LlavaForConditionalGeneration and "
                          f"LlavaNextForConditionalGeneration have no {UNSUPPORTED[method]}; "
                          "only llava-1.5 (--to hf-llava) and llava-next (--to hf-llava-next) export")
    if method != want:
        other = next((k for k, (m, _) in EXPORT_TARGETS.items() if m == method), None)
        hint = f" (use --to {other})" if other else ""
        raise ExportError(f"--to {to} writes a {cls} ({want}); this model is {method}{hint}")
