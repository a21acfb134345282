"""Converting released checkpoints into hires-lmm model directories (``hires convert``).

>>> from hires_lmm.convert import convert_checkpoint
>>> report = convert_checkpoint("hf-llava-next", "llava-v1.6-vicuna-7b-hf", "out/next")  # doctest: +SKIP
>>> from hires_lmm.model import HiresLMM
>>> model = HiresLMM.from_pretrained("out/next")                                           # doctest: +SKIP

Formats (:data:`FORMATS`): ``hf-llava`` and ``hf-llava-next`` (transformers'
``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``), ``llava``
(haotian-liu/LLaVA: LLaVA-1.5 and, with ``image_aspect_ratio: anyres``, LLaVA-NeXT), ``llava-uhd``
(thunlp/LLaVA-UHD, ECCV/v1 code), ``llava-hr`` (luogen1996/LLaVA-HR), ``inf-llava``
(WeihuangLin/INF-LLaVA) and ``slime`` (yfzhang114/SliME).

The package imports torch lazily: ``FORMATS`` and ``ConversionError`` are cheap.
"""

from __future__ import annotations

from typing import Any

from .errors import ConversionError
from .formats import FORMATS

_LAZY = {
    "DTYPES": ".core", "ConversionReport": ".core", "build_converted": ".core", "convert_checkpoint": ".core",
    "detect_format": ".formats", "read_state_dict": ".io", "Layout": ".layouts", "layout_for": ".layouts",
}

__all__ = ["DTYPES", "FORMATS", "ConversionError", "ConversionReport", "Layout", "build_converted",
           "convert_checkpoint", "detect_format", "layout_for", "read_state_dict"]
assert set(__all__) == {"FORMATS", "ConversionError", *_LAZY}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
