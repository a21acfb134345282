"""Named presets: the seven methods, each at full size (parts loaded from local directories) or
``tiny`` (a few layers, small widths, a tokenizer built in memory; runs on a CPU, no download).

>>> from hires_lmm.methods import build_model
>>> model = build_model("llava-uhd", tiny=True)            # doctest: +SKIP
>>> model = build_model("llava-hr", vision="clip-vit-l-336", llm="vicuna-7b",
...                     convnext="convnext-l")               # doctest: +SKIP
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import HiresConfig
from .model import HiresLMM, load_llm
from .plan import METHODS
from .text import build_byte_tokenizer


@dataclass(frozen=True)
class Preset:
    """A method's defaults: planner options and connector hyper-parameters (full size), and what
    the tiny preset changes."""

    method: str
    plan_options: dict[str, Any] = field(default_factory=dict)
    connector: dict[str, Any] = field(default_factory=dict)
    tiny_connector: dict[str, Any] = field(default_factory=dict)
    needs_convnext: bool = False


PRESETS: dict[str, Preset] = {
    "llava-1.5": Preset("llava-1.5", connector={"projector": "mlp2x_gelu"}),
    "llava-next": Preset("llava-next", connector={"projector": "mlp2x_gelu"}),
    "llava-uhd": Preset("llava-uhd", connector={"resampler": "spatial", "grid": 12, "heads": None}),
    "llava-uhd-arxiv": Preset("llava-uhd-arxiv", connector={"resampler": "perceiver", "queries": 64, "heads": None}),
    "llava-hr": Preset("llava-hr", plan_options={"S": 1024},
                       connector={"projector": "mlp2x_gelu", "gate": "scalar", "adapters": True},
                       needs_convnext=True),
    "inf-llava": Preset("inf-llava", connector={"projector": "mlp2x_gelu", "heads": 8, "bottleneck": 64,
                                                "variant": "code"},
                        tiny_connector={"heads": 4, "bottleneck": 8}),
    "slime": Preset("slime", connector={"projector": "mlp2x_gelu", "global_queries": 576, "local_queries": 144,
                                        "heads": 8, "selector_p": 0.95, "selector_variant": "spec"},
                    tiny_connector={"heads": 4}),
}
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


def tiny_config(method: str, vocab_size: int, **overrides: Any) -> HiresConfig:
    """The tiny configuration of ``method`` (``overrides`` update the connector)."""
    p = PRESETS[method]
    connector = {**p.connector, **p.tiny_connector, **overrides}
    text = {**TINY_TEXT, "vocab_size": vocab_size}
    return HiresConfig(method=method, plan_options=dict(p.plan_options), vision_config=dict(TINY_VISION),
                       convnext_config=dict(TINY_CONVNEXT) if p.needs_convnext else None,
                       connector=connector, text_config=text)


def build_from_config(config: HiresConfig, tokenizer, llm=None, vit=None, convnext=None) -> HiresLMM:  # noqa: ANN001
    """Assemble a model from its config; parts not given are built with random weights."""
    from transformers import AutoModelForCausalLM

    from .visual import build_visual

    if llm is None:
        llm = AutoModelForCausalLM.from_config(config.llm_config())
    d_llm = llm.get_input_embeddings().embedding_dim
    visual = build_visual(config, d_llm, vit=vit, convnext=convnext)
    return HiresLMM(config, llm, tokenizer, visual)


def build_model(method: str, *, tiny: bool = False, vision: str | os.PathLike | None = None,
                llm: str | os.PathLike | None = None, convnext: str | os.PathLike | None = None,
                seed: int = 0, torch_dtype: torch.dtype | None = None, words: Sequence[str] = (),
                **connector: Any) -> HiresLMM:
    """Build ``method`` tiny (random weights, in memory) or from local Hugging Face directories.

    Args:
        method: one of :data:`hires_lmm.plan.METHODS`.
        tiny: the tiny preset; otherwise ``vision`` (a CLIP/SigLIP directory) and ``llm`` (any
            causal LM directory with its tokenizer) are required, plus ``convnext`` for LLaVA-HR.
            With ``tiny``, ``vision`` / ``convnext`` / ``llm`` directories replace the tiny random
            encoders and LLM (the demo pretrains tiny ones and gives them to every method); a tiny
            ``llm`` brings its own tokenizer, so ``words`` is then unused.
        seed: seeds the random initialisation of every new part.
        words: whole-word tokens of the tiny tokenizer (:func:`hires_lmm.text.build_byte_tokenizer`).
        connector: overrides of the connector hyper-parameters.
    """
    if method not in PRESETS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    torch.manual_seed(seed)
    p = PRESETS[method]
    if tiny:
        lm = None
        if llm is not None:
            lm, tok = load_llm(llm, torch_dtype)
        else:
            tok = build_byte_tokenizer(words)
        config = tiny_config(method, len(tok), **connector)
        if lm is not None:
            config.text_config = lm.config.to_dict()
        vit, cnx = _load_encoders(config, vision, convnext if p.needs_convnext else None)
        return build_from_config(config, tok, llm=lm, vit=vit, convnext=cnx).eval()
    if vision is None or llm is None:
        raise ValueError("a full-size model needs --vision DIR and --llm DIR (or use --tiny)")
    if p.needs_convnext and convnext is None:
        raise ValueError(f"{method} needs --convnext DIR (its high-resolution pathway)")
    lm, tok = load_llm(llm, torch_dtype)
    config = HiresConfig(method=method, plan_options=dict(p.plan_options), vision_config={},
                         convnext_config=None, connector={**p.connector, **connector},
                         text_config=lm.config.to_dict())
    vit, cnx = _load_encoders(config, vision, convnext if p.needs_convnext else None)
    model = build_from_config(config, tok, llm=lm, vit=vit, convnext=cnx)
    if torch_dtype is not None:
        model.to(torch_dtype)
    return model.eval()


def _load_encoders(config: HiresConfig, vision: str | os.PathLike | None,
                   convnext: str | os.PathLike | None) -> tuple[Any, Any]:
    """Load the encoders given as directories and record their configs in ``config``."""
    vit = cnx = None
    if vision is not None:
        from .vision.vit import ViT

        vit = ViT.from_pretrained(vision)
        config.vision_config = copy.deepcopy(vit.vision_tower.config.to_dict())
    if convnext is not None:
        from .vision.convnext import ConvNeXt

        cnx = ConvNeXt.from_pretrained(convnext)
        config.convnext_config = cnx.config.to_dict()
    return vit, cnx
