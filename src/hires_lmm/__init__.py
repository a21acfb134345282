"""hires-lmm: the high-resolution multimodal LLMs of the LLaVA family in one codebase.

``import hires_lmm`` is cheap (no torch): it registers the model, its config and its processors
with transformers' Auto classes as soon as those are used (:mod:`hires_lmm.auto`), and makes the
main classes available lazily::

    import hires_lmm
    from transformers import AutoModelForImageTextToText, AutoProcessor
    model = AutoModelForImageTextToText.from_pretrained("out/uhd")   # a HiresLMM
    processor = AutoProcessor.from_pretrained("out/uhd")             # a HiresProcessor
"""

from __future__ import annotations

from typing import Any

from . import auto as _auto

__version__ = "0.1.0"

_auto.install()

#: names importable from the package, each from the module that defines it (imported on first use)
_LAZY = {
    "HiresConfig": "config",
    "HiresLMM": "model",
    "ImageInput": "processing",
    "HiresImageProcessor": "processing",
    "HiresProcessor": "processing",
    "build_model": "methods",
    "plan_image": "plan",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'hires_lmm' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = ["HiresConfig", "HiresImageProcessor", "HiresLMM", "HiresProcessor", "ImageInput", "__version__",
           "build_model", "plan_image"]
