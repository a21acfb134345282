"""Building models: the seven presets, or any method spec / method file (:mod:`hires_lmm.parts`),
each at full size (parts loaded from local directories) or ``tiny`` (a few layers, small widths, a
tokenizer built in memory; runs on a CPU, no download).

>>> from hires_lmm.methods import build_model
>>> model = build_model("llava-uhd", tiny=True)            # doctest: +SKIP
>>> model = build_model("uhd-slime.json", tiny=True)       # a method file   # doctest: +SKIP
>>> model = build_model("llava-hr", vision="clip-vit-l-336", llm="vicuna-7b",
...                     convnext="convnext-l")               # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import HiresConfig
from .model import HiresLMM, build_from_config, load_llm
from .parts import METHOD_SPECS, MethodSpec, config_fields, get_part, resolve_method
from .plan import METHODS
from .text import build_byte_tokenizer

__all__ = ["PRESETS", "TINY_CONVNEXT", "TINY_TEXT", "TINY_VISION", "Preset", "build_from_config", "build_model",
           "tiny_config"]


@dataclass(frozen=True)
class Preset:
    """A preset's defaults as older code reads them (derived from its :class:`MethodSpec`: the
    planner options, the connector hyper-parameters at full size, what the tiny preset changes)."""

    method: str
    plan_options: dict[str, Any] = field(default_factory=dict)
    connector: dict[str, Any] = field(default_factory=dict)
    tiny_connector: dict[str, Any] = field(default_factory=dict)
    needs_convnext: bool = False

    @classmethod
    def of(cls, spec: MethodSpec) -> Preset:
        full, tiny = spec.connector(), spec.connector(tiny=True)
        return cls(spec.name, dict(spec.options.get("views", {})), full,
                   {k: v for k, v in tiny.items() if full.get(k) != v}, _needs_convnext(spec))


def _needs_convnext(spec: MethodSpec) -> bool:
    return bool(getattr(get_part("encoder", spec.parts["encoder"]), "needs_convnext", False))


#: the seven presets (their specs: :data:`hires_lmm.parts.METHOD_SPECS`)
PRESETS: dict[str, Preset] = {m: Preset.of(METHOD_SPECS[m]) for m in METHODS}
assert set(PRESETS) == set(METHODS)

#: The tiny ViT keeps CLIP-L/14-336's geometry (336 px, 14 px patches: 24×24 grid), so plans and
#: token counts are the real ones; only widths and depths shrink.
TINY_VISION: dict[str, Any] = {
    "model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4,
    "num_attention_heads": 2, "image_size": 336, "patch_size": 14, "projection_dim": 32,
}
TINY_TEXT: dict[str, Any] = {
    "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 8192,
    "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
}
TINY_CONVNEXT: dict[str, Any] = {"depths": [1, 1, 1, 1], "dims": [16, 32, 64, 128]}


def tiny_config(method: str | os.PathLike | Mapping[str, Any] | MethodSpec, vocab_size: int,
                **overrides: Any) -> HiresConfig:
    """The tiny configuration of ``method`` (a preset name, a method file or spec; ``overrides``
    update the parts' options, flat as in ``connector``: an unknown one raises)."""
    spec = resolve_method(method).with_options(overrides)
    fields = config_fields(spec, tiny=True, model_keys=overrides)
    return HiresConfig(vision_config=dict(TINY_VISION),
                       convnext_config=dict(TINY_CONVNEXT) if _needs_convnext(spec) else None,
                       text_config={**TINY_TEXT, "vocab_size": vocab_size}, **fields)


def build_model(method: str | os.PathLike | Mapping[str, Any] | MethodSpec, *, tiny: bool = False,
                vision: str | os.PathLike | None = None, llm: str | os.PathLike | None = None,
                convnext: str | os.PathLike | None = None, seed: int = 0, torch_dtype: torch.dtype | None = None,
                words: Sequence[str] = (), method_spec: str | os.PathLike | Mapping[str, Any] | MethodSpec | None = None,
                **connector: Any) -> HiresLMM:
    """Build ``method`` tiny (random weights, in memory) or from local Hugging Face directories.

    Args:
        method: a preset (:data:`hires_lmm.plan.METHODS`), a method file (JSON/YAML path), a
            method-file dict or a :class:`~hires_lmm.parts.MethodSpec`.
        tiny: the tiny preset; otherwise ``vision`` (a CLIP/SigLIP directory) and ``llm`` (any
            causal LM directory with its tokenizer) are required, plus ``convnext`` for LLaVA-HR's
            encoder. With ``tiny``, ``vision`` / ``convnext`` / ``llm`` directories replace the tiny
            random encoders and LLM (the demo pretrains tiny ones and gives them to every method); a
            tiny ``llm`` brings its own tokenizer, so ``words`` is then unused.
        seed: seeds the random initialisation of every new part.
        words: whole-word tokens of the tiny tokenizer (:func:`hires_lmm.text.build_byte_tokenizer`).
        method_spec: replaces ``method`` (the trainer passes ``connector={"method_spec": ...}``
            through to here, so a run from a method file keeps ``method`` a planner name).
        connector: overrides of the parts' options, flat (``heads=4``, ``selector_p=1.0``); one
            that no part of the method has raises (a typo is not saved).

    An impossible combination of parts raises :class:`~hires_lmm.parts.PartError` naming the
    stages that clash, before any weight is built.
    """
    spec = resolve_method(method_spec if method_spec is not None else method).with_options(connector)
    needs_convnext = _needs_convnext(spec)
    fields = config_fields(spec, tiny=tiny, model_keys=connector)
    torch.manual_seed(seed)
    if tiny:
        lm = None
        if llm is not None:
            lm, tok = load_llm(llm, torch_dtype)
        else:
            tok = build_byte_tokenizer(words)
        config = HiresConfig(vision_config=dict(TINY_VISION),
                             convnext_config=dict(TINY_CONVNEXT) if needs_convnext else None,
                             text_config={**TINY_TEXT, "vocab_size": len(tok)}, **fields)
        if lm is not None:
            config.text_config = lm.config.to_dict()
        vit, cnx = _load_encoders(config, vision, convnext if needs_convnext else None)
        return build_from_config(config, tok, llm=lm, vit=vit, convnext=cnx).eval()
    if vision is None or llm is None:
        raise ValueError("a full-size model needs --vision DIR and --llm DIR (or use --tiny)")
    if needs_convnext and convnext is None:
        raise ValueError(f"{spec.name} needs --convnext DIR (its high-resolution pathway)")
    lm, tok = load_llm(llm, torch_dtype)
    config = HiresConfig(vision_config={}, convnext_config=None, text_config=lm.config.to_dict(), **fields)
    vit, cnx = _load_encoders(config, vision, convnext if needs_convnext else None)
    model = build_from_config(config, tok, llm=lm, vit=vit, convnext=cnx)
    if torch_dtype is not None:
        # transformers' @wraps(nn.Module.to) makes mypy see PreTrainedModel.to unbound (dtype as self)
        model.to(torch_dtype)  # type: ignore[arg-type]
    return model.eval()


def _load_encoders(config: HiresConfig, vision: str | os.PathLike | None,
                   convnext: str | os.PathLike | None) -> tuple[Any, Any]:
    """Load the encoders given as directories and record their configs in ``config``."""
    vit = cnx = None
    if vision is not None:
        from .vision.vit import ViT

        vit = ViT.from_pretrained(vision)
        config.vision_config = copy.deepcopy(vit.config.to_dict())
    if convnext is not None:
        from .vision.convnext import ConvNeXt

        cnx = ConvNeXt.from_pretrained(convnext)
        config.convnext_config = cnx.config.to_dict()
    return vit, cnx
