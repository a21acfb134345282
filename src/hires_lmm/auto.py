"""Registration with transformers' Auto classes, done by ``import hires_lmm`` without importing torch.

After ``import hires_lmm``, a directory written by :meth:`HiresLMM.save_pretrained` loads with
``AutoConfig``, ``AutoModelForImageTextToText``, ``AutoModelForCausalLM`` (the model generates
text, with or without images), ``AutoProcessor`` and ``AutoImageProcessor`` — no
``trust_remote_code``: the classes are registered in this process (``register(...)`` of each Auto
class, transformers' public API for models outside the library).

Why a hook instead of registering at once: registering needs the classes, and they import torch
and transformers' model code (seconds), while ``hires_lmm.plan`` and the ``hires plan`` command
promise not to import torch at all. Auto classes cannot be used before transformers' ``auto``
modules are imported, so ``import hires_lmm`` only installs an import hook
(:class:`_AutoModulesHook`) that registers the classes right after the first of those modules
finishes loading (or registers at once if one is loaded already). When that moment falls inside
the import of hires-lmm's own model module (which imports transformers), registration is retried
at the end of that module (:func:`retry`).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from typing import Any

#: transformers modules whose loading means an Auto class is about to be used
WATCHED = ("transformers.models.auto.configuration_auto", "transformers.models.auto.modeling_auto",
           "transformers.models.auto.processing_auto", "transformers.models.auto.image_processing_auto")

_state = {"done": False, "busy": False}


def register() -> bool:
    """Register hires-lmm's classes with the Auto classes (idempotent). True once done; False when
    a module it needs is still being imported (then :func:`retry` finishes the job later)."""
    if _state["done"] or _state["busy"]:
        return _state["done"]
    _state["busy"] = True
    try:
        try:
            # our classes first: the ImportError of a module still being imported ends this try
            from transformers.models.auto.configuration_auto import AutoConfig
            from transformers.models.auto.image_processing_auto import AutoImageProcessor
            from transformers.models.auto.modeling_auto import AutoModelForCausalLM, AutoModelForImageTextToText
            from transformers.models.auto.processing_auto import AutoProcessor

            from .config import HiresConfig
            from .model import HiresLMM
            from .processing import HiresImageProcessor, HiresProcessor
        except ImportError:
            return False
        try:
            AutoConfig.register(HiresConfig.model_type, HiresConfig, exist_ok=True)
            AutoModelForImageTextToText.register(HiresConfig, HiresLMM, exist_ok=True)
            AutoModelForCausalLM.register(HiresConfig, HiresLMM, exist_ok=True)
            _register_image_processor(AutoImageProcessor, HiresConfig, HiresImageProcessor)
            AutoProcessor.register(HiresConfig, HiresProcessor, exist_ok=True)
        except (TypeError, ValueError, AttributeError) as e:  # an Auto API this code does not know
            warnings.warn(f"hires_lmm: could not register with transformers' Auto classes ({e}); "
                          "use hires_lmm.model.HiresLMM.from_pretrained directly", RuntimeWarning, stacklevel=2)
        _state["done"] = True
        return True
    finally:
        _state["busy"] = False


def _register_image_processor(auto: Any, config_class: type, cls: type) -> None:
    import inspect

    params = inspect.signature(auto.register).parameters
    if "image_processor_classes" in params:  # transformers >= 5.x with named backends
        auto.register(config_class, image_processor_classes={"pil": cls}, exist_ok=True)
    else:
        auto.register(config_class, slow_image_processor_class=cls, exist_ok=True)


def retry() -> None:
    """Register if transformers' Auto modules are loaded and registration has not happened yet
    (called at the end of :mod:`hires_lmm.model` and :mod:`hires_lmm.processing`)."""
    if not _state["done"] and any(m in sys.modules for m in WATCHED):
        register()


class _AutoModulesHook(importlib.abc.MetaPathFinder):
    """Wraps the loader of the :data:`WATCHED` modules so that :func:`register` runs after one loads."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name not in WATCHED or _state["done"]:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):  # noqa: ANN001, ANN202
                return loader.create_module(spec)

            def exec_module(self, module):  # noqa: ANN001, ANN202
                loader.exec_module(module)
                register()

        spec.loader = _Loader()
        return spec


def install() -> None:
    """Install the hook (once); register at once if an Auto module is already loaded."""
    if any(m in sys.modules for m in WATCHED):
        register()
        return
    if not any(isinstance(f, _AutoModulesHook) for f in sys.meta_path):
        sys.meta_path.insert(0, _AutoModulesHook())


__all__ = ["WATCHED", "install", "register", "retry"]
