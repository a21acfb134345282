"""The model's configuration, saved as ``config.json`` in Hugging Face style.

Every choice of a method is recorded: the planner options, the vision encoder's config and feature
layer, the ConvNeXt config (LLaVA-HR), the connector's hyper-parameters and the LLM's config, so
``from_pretrained`` rebuilds exactly the model that was saved.
"""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from .plan import METHODS


class HiresConfig(PretrainedConfig):
    """Configuration of a :class:`~hires_lmm.model.HiresLMM`.

    Args:
        method: one of :data:`hires_lmm.plan.METHODS`.
        plan_options: keyword arguments of the method's planner (e.g. ``{"S": 1024}``).
        vision_config: the ViT's Hugging Face config as a dict (``model_type`` ``clip_vision_model``
            or ``siglip_vision_model``).
        select_layer: which hidden state the connector reads (-2: second-to-last, LLaVA's default).
        convnext_config: LLaVA-HR's ConvNeXt config as a dict (depths, dims, ...), else None.
        connector: method-specific connector hyper-parameters (queries, heads, variants).
        text_config: the LLM's Hugging Face config as a dict.
        image_token: the text placeholder replaced by an image's visual tokens.
        method_spec: a composed method's method-file form with every option written out
            (:mod:`hires_lmm.parts.configs`); None for a preset (and then not written to config.json).
    """

    model_type = "hires_lmm"
    #: a preset's (the class default, so config.json has no ``method_spec`` key)
    method_spec: dict[str, Any] | None = None

    def __init__(self, method: str = "llava-1.5", plan_options: dict[str, Any] | None = None,
                 vision_config: dict[str, Any] | None = None, select_layer: int = -2,
                 convnext_config: dict[str, Any] | None = None, connector: dict[str, Any] | None = None,
                 text_config: dict[str, Any] | None = None, image_token: str = "<image>",
                 method_spec: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        self.method = method
        self.plan_options = dict(plan_options or {})
        self.vision_config = dict(vision_config or {})
        self.select_layer = select_layer
        self.convnext_config = dict(convnext_config) if convnext_config else None
        self.connector = dict(connector or {})
        self.text_config = dict(text_config or {})
        self.image_token = image_token
        if method_spec:  # kept as given (a malformed one is refused, named, when the model is built)
            self.method_spec = method_spec
        super().__init__(**kwargs)

    def llm_config(self) -> PretrainedConfig:
        """The LLM's config object, rebuilt from ``text_config``."""
        from transformers import AutoConfig

        d = dict(self.text_config)
        model_type = d.pop("model_type", None)
        if model_type is None:
            raise ValueError("text_config has no model_type")
        return AutoConfig.for_model(model_type, **d)

    def get_text_config(self, decoder: bool | None = None, encoder: bool | None = None) -> PretrainedConfig:  # noqa: ARG002
        """The LLM's config object (what transformers' generation reads: layers, heads, vocab).

        ``text_config`` stays a plain dict in config.json and in this object (converters and
        exporters read it as one), so the object is rebuilt on each call: change the dict, not it.
        A config whose ``text_config`` has no ``model_type`` yet (while it is being built or
        validated: transformers 5.6 validates token ids inside ``__init__``) answers with itself,
        transformers' own default for a config without a text sub-config.
        """
        if "model_type" not in self.text_config:
            return self
        return self.llm_config()

    def vit_config(self) -> PretrainedConfig:
        """The vision encoder's config object, rebuilt from ``vision_config``."""
        from transformers import AutoConfig

        d = dict(self.vision_config)
        model_type = d.pop("model_type", "clip_vision_model")
        return AutoConfig.for_model(model_type, **d)
