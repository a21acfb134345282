"""The LMM: plan → render → encode → connect → splice into any Hugging Face causal LM.

:class:`HiresLMM` is a transformers ``PreTrainedModel`` with ``GenerationMixin`` holding the LLM
(``llm``), the tokenizer and a visual module (``visual``, :mod:`hires_lmm.visual`) that turns the
rendered views of a batch of images into LLM-space visual token sequences. Text holds one
``<image>`` placeholder per image; :meth:`HiresLMM.build_inputs` replaces each with its image's
tokens (visual positions never carry a loss).

Two ways in, one model:

* **transformers' tensors** (``HiresProcessor`` output): ``input_ids`` (B, T) with one ``<image>``
  token per image, ``attention_mask``, ``pixel_values`` (B, V, 3, H, W), ``view_sizes``,
  ``image_sizes`` (:mod:`hires_lmm.processing`). ``model(**inputs)`` and
  ``model.generate(**inputs)`` (greedy, sampling, beam search, stop strings, streamers).
* **lists** (training, the server, older code): ``model(input_ids=[ids, ...], images=[[ImageInput,
  ...], ...], labels=[...])`` and ``model.generate(prompts, images, max_new_tokens=...)`` → texts.

Splicing changes the sequence length (each ``<image>`` becomes hundreds of tokens, and SliME's
selector keeps a text-dependent number), so the KV cache after the prefill is longer than the
``input_ids`` / ``attention_mask`` that ``GenerationMixin`` keeps extending. The prefill records
the spliced attention mask for its cache (:attr:`HiresLMM._splices`, keyed weakly by the cache
object); each later step rebuilds its mask and positions as that record + the columns added since,
so nothing of ``GenerationMixin`` needs to change.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn as nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    GenerationMixin,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from .compat import CACHE_FIELD, cache_kwargs, output_cache
from .config import HiresConfig
from .errors import ModelLoadError, ModelNotFoundError, one_line
from .generation import StopStringCriteria, sample_next, sampling_processors
from .image import DEFAULT_MAX_PIXELS
from .image.load import ImageSource
from .plan import Plan
from .processing import HiresProcessor, ImageInput, plan_for, prepare_image, unpack_images
from .text import IMAGE_TOKEN, ensure_image_token, separator_id
from .vision.vit import ViT
from .visual import build_visual

IGNORE_INDEX = -100
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
GENERATION_CONFIG_NAME = "generation_config.json"

#: keyword arguments transformers' Auto classes and hub helpers pass to ``from_pretrained``; a
#: local directory needs none of them
_HUB_KWARGS = frozenset({"cache_dir", "force_download", "local_files_only", "proxies", "resume_download", "revision",
                         "subfolder", "token", "use_auth_token", "trust_remote_code", "_from_auto", "_commit_hash",
                         "code_revision", "adapter_kwargs", "low_cpu_mem_usage", "use_safetensors", "attn_implementation"})


@dataclass
class Batch:
    """Spliced inputs for the LLM.

    Attributes:
        inputs_embeds: (B, T, D) text and visual embeddings, padded.
        attention_mask: (B, T) 1 for real positions.
        position_ids: (B, T) positions counting real tokens only (left or right padding).
        labels: (B, T) or None; -100 on visual tokens, padding and unlabelled text.
        num_visual_tokens: visual tokens spliced per image, in input order.
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor | None
    num_visual_tokens: list[int]


@dataclass
class HiresOutput(CausalLMOutputWithPast):
    """The LLM's output plus the spliced :class:`Batch` (a field, so DDP's output handling keeps it).

    A ``CausalLMOutputWithPast``, so the KV cache lives under the field name the installed
    transformers uses (``cache`` from 5.24, ``past_key_values`` before; read it with
    :func:`hires_lmm.compat.output_cache`).

    Attributes:
        loss: mean cross-entropy over labelled tokens, when labels were given.
        logits: (B, T, V) over the spliced sequence.
        batch: the spliced inputs (None on decoding steps, which splice nothing).
    """

    batch: Batch | None = None


def _input_embedding(llm: PreTrainedModel) -> nn.Embedding:
    """The LLM's input embedding (transformers types it as any ``nn.Module``; every causal LM's
    is an ``nn.Embedding``, or a subclass such as Gemma's scaled one)."""
    return cast(nn.Embedding, llm.get_input_embeddings())


def _rows(x: Sequence[torch.Tensor] | torch.Tensor) -> Sequence[torch.Tensor]:
    """Per-sample 1-D tensors: a list as given, the rows of a (B, T) tensor."""
    return list(x) if isinstance(x, torch.Tensor) else x


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counting real tokens only: what :meth:`HiresLMM.build_inputs` gives."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class HiresLMM(PreTrainedModel, GenerationMixin):
    """A high-resolution LMM of one method (see :mod:`hires_lmm.methods` for the presets).

    Build one with :func:`hires_lmm.methods.build_model` or load one with :meth:`from_pretrained`
    (also ``AutoModelForImageTextToText`` / ``AutoModelForCausalLM`` after ``import hires_lmm``).
    Parameter names are those of its parts (``llm.*``, ``visual.*``), as in every saved directory.
    """

    config_class = HiresConfig
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    # a visual module stays on one device (its views are packed together); the LLM's decoder
    # layers are added by post_init from the LLM's own list
    _no_split_modules = ["Llava15Visual", "NextVisual", "UHDVisual", "HRVisual", "INFVisual", "SlimeVisual",
                         "ComposedVisual", "DualPathVisual"]
    _skip_keys_device_placement = ["cache", "past_key_values"]

    def __init__(self, config: HiresConfig, llm: PreTrainedModel | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None, visual: nn.Module | None = None) -> None:
        if tokenizer is None:
            raise ModelLoadError("HiresLMM needs its tokenizer: load a directory with HiresLMM.from_pretrained(dir) "
                                 "(or an Auto class), or build a preset with hires_lmm.methods.build_model")
        super().__init__(config)
        if llm is None:
            llm = AutoModelForCausalLM.from_config(config.llm_config())
        if visual is None:
            visual = build_visual(config, _input_embedding(llm).embedding_dim)
        self.llm = llm
        self.tokenizer = tokenizer
        self.visual = visual
        self.image_token_id = ensure_image_token(tokenizer)
        if _input_embedding(self.llm).num_embeddings < len(tokenizer):
            self.llm.resize_token_embeddings(len(tokenizer))
        # only the separators this method's visual module splices must be single tokens (a
        # word-level tokenizer has none, and llava-1.5/-next/-hr/inf-llava never use them)
        try:
            self.separator_ids = {s: separator_id(tokenizer, s) for s in getattr(visual, "separators", (",", "\n"))}
        except ValueError as e:
            raise ValueError(f"{config.method} splices separator tokens between views: {e}") from None
        # a converted checkpoint records the ids its reference code used (e.g. SliME's tokenizer(',')[-1])
        self.separator_ids.update({k: int(v) for k, v in config.connector.get("separator_ids", {}).items()})
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        # the tokenizer's ids, not the LLM config's defaults (Llama's 1/2 are not every tokenizer's)
        self.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                  pad_token_id=tokenizer.pad_token_id)
        # spliced attention masks of prefills, per KV cache (see the module docstring)
        self._splices: weakref.WeakKeyDictionary[Any, tuple[torch.Tensor, int]] = weakref.WeakKeyDictionary()
        self.post_init()

    def init_weights(self) -> None:
        """Only ties the LLM's weights: every part is initialised (seeded) when it is built, and
        transformers' re-initialisation would draw other weights than the presets'."""
        if hasattr(self.llm, "tie_weights"):
            self.llm.tie_weights()

    # --- transformers' accessors ------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module | None:
        return self.llm.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module) -> None:
        self.llm.set_output_embeddings(value)

    def get_decoder(self) -> nn.Module:
        return self.llm.get_decoder()

    @property
    def language_model(self) -> PreTrainedModel:
        return self.llm

    def processor(self) -> HiresProcessor:
        """The :class:`~hires_lmm.processing.HiresProcessor` of this model (tokenizer, method, plan options)."""
        return HiresProcessor.from_model(self)

    # --- images ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return _input_embedding(self.llm).weight.device

    @property
    def dtype(self) -> torch.dtype:
        return _input_embedding(self.llm).weight.dtype

    def plan(self, size: tuple[int, int], **plan_options: Any) -> Plan:
        """The plan of an image of ``size`` = (width, height), with the token count this model's
        forward splices for it: a composed method's (``config.method_spec``, e.g. LLaVA-NeXT's
        views through UHD's spatial resampler) is its parts' count
        (:meth:`hires_lmm.parts.MethodSpec.plan`), a preset's the planner's plan unchanged
        (:func:`hires_lmm.processing.plan_for`).

        ``plan_options`` override the config's ``plan_options`` for this call (e.g. a request's
        ``max_visual_tokens``); a budget no plan fits raises
        :class:`~hires_lmm.plan.budget.BudgetError`.
        """
        return plan_for(self.config.method, size, self._plan_options(plan_options), self.config.method_spec)

    def _plan_options(self, overrides: dict[str, Any]) -> dict[str, Any]:
        return {**(self.config.plan_options or {}), **overrides}

    def prepare_image(self, image: ImageSource, *, fast: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                      **plan_options: Any) -> ImageInput:
        """Load (safely), plan and render one image (``fast``: see :func:`prepare_image`) as this
        model's forward expects it: planned by :meth:`plan` (a composed method through its parts,
        so the plan's ``num_visual_tokens`` is the count spliced, and a budget the composed
        count's); ``plan_options`` override the config's for this image (``max_visual_tokens``)."""
        return prepare_image(image, self.config.method, self._plan_options(plan_options), fast=fast,
                             max_pixels=max_pixels, method_spec=self.config.method_spec)

    def encode_images(self, images: Sequence[ImageInput], text_embeds: Sequence[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
        """Visual token sequences, one ``(n_i, D)`` tensor per image (all views encoded together)."""
        if not images:
            return []
        views = [[v.to(self.device, self.dtype) for v in im.views] for im in images]
        return self.visual(
            [im.plan for im in images], views, embed=self.llm.get_input_embeddings(),
            separator_ids=self.separator_ids, text_embeds=text_embeds)

    # --- splicing -------------------------------------------------------------------------------
    def build_inputs(self, input_ids: Sequence[torch.Tensor], images: Sequence[Sequence[ImageInput]],
                     labels: Sequence[torch.Tensor] | None = None, padding_side: str = "right") -> Batch:
        """Replace every ``<image>`` placeholder with its image's visual tokens and pad.

        Args:
            input_ids: per sample, a 1-D tensor of token ids (no padding) holding one
                ``<image>`` per image of that sample.
            images: per sample, its images in placeholder order.
            labels: per sample, 1-D labels aligned with ``input_ids`` (-100 = no loss).
            padding_side: "right" for training, "left" for generation.
        """
        if len(input_ids) != len(images):
            raise ValueError(f"{len(input_ids)} texts but {len(images)} image lists")
        embed = self.llm.get_input_embeddings()
        flat = [im for sample in images for im in sample]
        text_embeds: list[torch.Tensor | None] = []
        # a text-guided selector (SliME's, or one composed into another method) reads the sample's text
        needs_text = bool(getattr(self.visual, "needs_text", self.config.method == "slime"))
        for ids, sample in zip(input_ids, images):
            n = int((ids == self.image_token_id).sum())
            if n != len(sample):
                raise ValueError(f"a sample has {n} {self.config.image_token} placeholder(s) but {len(sample)} image(s)")
            if needs_text:  # the selector compares tokens with the sample's text
                t = embed(ids[ids != self.image_token_id].to(self.device))
                text_embeds += [t] * len(sample)
        visual = self.encode_images(flat, text_embeds if needs_text else None)
        seqs, labs, k = [], [], 0
        for i, ids in enumerate(input_ids):
            ids = ids.to(self.device)
            lab = labels[i].to(self.device) if labels is not None else None
            where = (ids == self.image_token_id).nonzero().flatten().tolist()
            safe = ids.masked_fill(ids == self.image_token_id, 0)
            emb = embed(safe)
            parts, lparts, start = [], [], 0
            for pos in where:
                parts += [emb[start:pos], visual[k].to(emb.dtype)]
                if lab is not None:
                    lparts += [lab[start:pos], torch.full((visual[k].shape[0],), IGNORE_INDEX, dtype=lab.dtype, device=lab.device)]
                start, k = pos + 1, k + 1
            parts.append(emb[start:])
            seqs.append(torch.cat(parts))
            if lab is not None:
                lparts.append(lab[start:])
                labs.append(torch.cat(lparts))
        B, T, D = len(seqs), max(s.shape[0] for s in seqs), seqs[0].shape[1]
        out = seqs[0].new_zeros(B, T, D)
        mask = torch.zeros(B, T, dtype=torch.long, device=self.device)
        lab_out = torch.full((B, T), IGNORE_INDEX, dtype=torch.long, device=self.device) if labels is not None else None
        for i, s in enumerate(seqs):
            n = s.shape[0]
            sl = slice(T - n, T) if padding_side == "left" else slice(0, n)
            out[i, sl] = s
            mask[i, sl] = 1
            if lab_out is not None:
                lab_out[i, sl] = labs[i]
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        return Batch(out, mask, pos, lab_out, [v.shape[0] for v in visual])

    # --- forward --------------------------------------------------------------------------------
    def forward(self, input_ids: Sequence[torch.Tensor] | torch.Tensor | None = None,
                images: Sequence[Sequence[ImageInput]] | None = None,
                labels: Sequence[torch.Tensor] | torch.Tensor | None = None, *,
                attention_mask: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                view_sizes: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                **llm_kwargs: Any) -> HiresOutput:
        """Logits over the spliced sequence, and the loss when ``labels`` are given.

        Either lists, ``input_ids=[ids (T_i,), ...]`` with ``images=[[ImageInput, ...], ...]`` (and
        ``labels=[(T_i,), ...]``, -100 = no loss), or transformers' tensors: ``input_ids`` (B, T)
        with ``attention_mask`` (B, T), optional ``pixel_values`` / ``view_sizes`` /
        ``image_sizes`` (:mod:`hires_lmm.processing`) and ``labels`` (B, T); or ``inputs_embeds``
        (B, T, D) already spliced. Positions count real tokens only (``position_ids`` are used with
        ``inputs_embeds`` only: they cannot be given for a sequence before it is spliced). A KV
        cache (``cache=``, or ``past_key_values=`` before transformers 5.24) continues a spliced
        prefill; ``input_ids`` are then the new tokens (B, q) and ``attention_mask`` the text's mask
        extended by them, as ``GenerationMixin`` keeps it.

        Returns a :class:`HiresOutput` (loss, logits (B, T', V), the KV cache, the spliced batch).
        """
        cache = llm_kwargs.pop("cache", None)
        if cache is None:
            cache = llm_kwargs.pop("past_key_values", None)
        llm_kwargs.pop("cache_position", None)  # positions are the spliced sequence's, computed here
        if logits_to_keep:
            llm_kwargs["logits_to_keep"] = logits_to_keep
        if use_cache is not None:
            llm_kwargs["use_cache"] = use_cache
        if cache is not None:
            llm_kwargs.update(cache_kwargs(self.llm, cache))
        if isinstance(input_ids, (list, tuple)) or images is not None:
            if input_ids is None:
                raise ModelLoadError("images need input_ids (one 1-D tensor per sample)")
            return self._forward_lists(_rows(input_ids), images, None if labels is None else _rows(labels), **llm_kwargs)
        if labels is not None and not isinstance(labels, torch.Tensor):
            raise ModelLoadError("labels of a (batch, length) input are a (batch, length) tensor")
        if inputs_embeds is not None:
            if input_ids is not None:
                raise ModelLoadError("give input_ids or inputs_embeds, not both")
            if position_ids is None and attention_mask is not None:
                position_ids = _positions(attention_mask)[:, -inputs_embeds.shape[1]:]
            out = self.llm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                           labels=labels, **llm_kwargs)
            return HiresOutput(loss=out.loss, logits=out.logits, **{CACHE_FIELD: output_cache(out)})
        if input_ids is None:
            raise ModelLoadError("forward needs input_ids (or inputs_embeds)")
        if not isinstance(input_ids, torch.Tensor):
            raise ModelLoadError("input_ids: a (batch, length) tensor, or a list of 1-D tensors")
        if cache is not None and pixel_values is None and cache.get_seq_length() > 0:
            record = self._splices.get(cache)
            if record is not None:  # after a prefill that spliced images
                return self._forward_step(input_ids, attention_mask, record, cache, **llm_kwargs)
            # after a prefill of embeddings (generate_text): the mask is the spliced sequence's already
            pos = _positions(attention_mask)[:, -input_ids.shape[1]:] if attention_mask is not None else None
            out = self.llm(input_ids=input_ids.to(self.device), attention_mask=attention_mask, position_ids=pos,
                           labels=labels, **llm_kwargs)
            return HiresOutput(loss=out.loss, logits=out.logits, **{CACHE_FIELD: output_cache(out)})
        return self._forward_tensors(input_ids, attention_mask, pixel_values, view_sizes, image_sizes, labels,
                                     for_cache=cache is not None or bool(use_cache), **llm_kwargs)

    def _forward_lists(self, input_ids: Sequence[torch.Tensor], images: Sequence[Sequence[ImageInput]] | None,
                       labels: Sequence[torch.Tensor] | None, **llm_kwargs: Any) -> HiresOutput:
        batch = self.build_inputs(input_ids, images if images is not None else [[] for _ in input_ids], labels)
        full = batch.attention_mask
        mask: torch.Tensor | None = full
        # training on right padding: a real token never attends to a later position, so the causal
        # mask alone is exact for every real position (pad positions carry no labels); without the
        # padding mask SDPA takes its is_causal kernel (about 2.5x faster on the CPU). Not done
        # when no labels are given: a caller may continue decoding from the returned cache.
        if labels is not None and bool((full[:, :-1] >= full[:, 1:]).all()):
            mask = None
        out = self.llm(inputs_embeds=batch.inputs_embeds, attention_mask=mask,
                       position_ids=batch.position_ids, labels=batch.labels, **llm_kwargs)
        return HiresOutput(loss=out.loss, logits=out.logits, batch=batch, **{CACHE_FIELD: output_cache(out)})

    def _forward_tensors(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                         pixel_values: torch.Tensor | None, view_sizes: torch.Tensor | None,
                         image_sizes: torch.Tensor | None, labels: torch.Tensor | None, *, for_cache: bool,
                         **llm_kwargs: Any) -> HiresOutput:
        """A prefill (or a whole forward) of padded tensors: unpad each row, splice, re-pad.

        The spliced batch is left-padded when a cache is filled (generation continues at the last
        column), otherwise padded on the side the input was."""
        if input_ids.dim() != 2:
            raise ModelLoadError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        keep = mask.bool().cpu()
        ids = input_ids.cpu()
        rows = [ids[b][keep[b]] for b in range(ids.shape[0])]
        labs = None
        if labels is not None:
            lab = labels.cpu()
            labs = [lab[b][keep[b]] for b in range(ids.shape[0])]
        left = for_cache or (bool(keep[:, -1].all()) and not bool(keep[:, 0].all()))
        images = unpack_images(pixel_values, view_sizes, image_sizes, self.config.method, self.config.plan_options,
                               ids.shape[0], method_spec=self.config.method_spec)
        batch = self.build_inputs(rows, images, labs, padding_side="left" if left else "right")
        out = self.llm(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids, labels=batch.labels, **llm_kwargs)
        cache = output_cache(out)
        if cache is not None:
            self._splices[cache] = (batch.attention_mask, input_ids.shape[1])
        return HiresOutput(loss=out.loss, logits=out.logits, batch=batch, **{CACHE_FIELD: cache})

    def _forward_step(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      record: tuple[torch.Tensor, int], kv: Any, **llm_kwargs: Any) -> HiresOutput:
        """A decoding step after a spliced prefill: mask = the prefill's spliced mask + the columns
        ``GenerationMixin`` added after the text since; positions count real tokens."""
        prefix, text_len = record
        q = input_ids.shape[1]
        added = kv.get_seq_length() - prefix.shape[1] + q  # columns after the prompt, this step's included
        if attention_mask is not None:
            if attention_mask.shape[1] != text_len + added:
                raise ModelLoadError(f"attention_mask has {attention_mask.shape[1]} columns; after a prompt of "
                                     f"{text_len} and {added} new token(s) it should have {text_len + added}")
            tail = attention_mask[:, text_len:].to(prefix)
        else:
            tail = prefix.new_ones(prefix.shape[0], added)
        if prefix.shape[0] != input_ids.shape[0]:
            raise ModelLoadError(f"the cache was filled for {prefix.shape[0]} rows, not {input_ids.shape[0]}")
        mask = torch.cat([prefix, tail], dim=1)
        out = self.llm(input_ids=input_ids.to(self.device), attention_mask=mask, position_ids=_positions(mask)[:, -q:],
                       **llm_kwargs)
        new_cache = output_cache(out)
        if new_cache is not None and new_cache is not kv:
            self._splices[new_cache] = record
        return HiresOutput(loss=out.loss, logits=out.logits, **{CACHE_FIELD: new_cache})

    # --- generation -----------------------------------------------------------------------------
    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, *args: Any,
                                      inputs_embeds: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                                      view_sizes: torch.Tensor | None = None, image_sizes: torch.Tensor | None = None,
                                      **kwargs: Any) -> dict[str, Any]:
        """``GenerationMixin``'s inputs, with the pixel inputs on the first step (the prefill) only,
        as transformers' LLaVA models do; every step when no cache is kept."""
        kwargs.pop("position_ids", None)  # text positions; forward computes the spliced sequence's
        inputs = super().prepare_inputs_for_generation(input_ids, *args, inputs_embeds=inputs_embeds, **kwargs)
        cache = inputs.get("cache", inputs.get("past_key_values"))
        first = cache is None or cache.get_seq_length() == 0
        if first or not kwargs.get("use_cache", True):
            if inputs.get("inputs_embeds") is None:  # a legacy prompt spliced already has no pixels
                inputs.update(pixel_values=pixel_values, view_sizes=view_sizes, image_sizes=image_sizes)
        return inputs

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``GenerationMixin.generate`` on tensors (``model.generate(**processor(...),
        max_new_tokens=...)``, returns token ids), or, given a list of prompt strings, the list
        interface: ``model.generate(prompts, images, max_new_tokens=64, temperature=0.0,
        top_p=1.0, stop=(), seed=None, chat=False, template=None)`` → one text per prompt (see
        :meth:`generate_text`)."""
        first = args[0] if args else kwargs.get("prompts")
        if isinstance(first, (list, tuple)) and (not first or isinstance(first[0], str)):
            if args:
                kwargs["prompts"] = args[0]
                if len(args) > 1:
                    kwargs["images"] = args[1]
                if len(args) > 2:
                    raise TypeError("generate(prompts, images, **options): options are keyword arguments")
            return self.generate_text(**kwargs)
        with torch.no_grad():
            return super().generate(*args, **kwargs)

    @torch.no_grad()
    def generate_text(self, prompts: Sequence[str], images: Sequence[Sequence[Any]] | None = None, *,
                      max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                      stop: Sequence[str] = (), seed: int | None = None, chat: bool = False,
                      template: str | None = None, **generate_kwargs: Any) -> list[str]:
        """Decode a batch of prompts (each with its images) with ``GenerationMixin``: left padding,
        a KV cache, the shared sampler and stop matcher (:mod:`hires_lmm.generation`).

        ``temperature`` 0 is greedy; otherwise sampling with nucleus ``top_p`` (seeded by ``seed``
        without touching the caller's random state). Generation ends at the EOS token, at any of
        ``stop`` (excluded from the text) or after ``max_new_tokens``. ``template`` (e.g.
        "vicuna_v1", the one the model was trained with) wraps each prompt as a user turn and adds
        the template's end-of-turn tokens to the stops; ``chat=True`` uses the tokenizer's own
        chat template instead. Other keyword arguments go to ``GenerationMixin.generate``
        (``streamer=TextIteratorStreamer(...)``, ``repetition_penalty``, ...).
        """
        images = images if images is not None else [[] for _ in prompts]
        if len(images) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
        tok = self.tokenizer
        stop_ids = {tok.eos_token_id} - {None}
        if template is not None:
            from .data.templates import get_template

            tpl = get_template(template)
            ids = [torch.tensor(tpl.prompt(tok, p), dtype=torch.long) for p in prompts]
            stop_ids |= set(tpl.stop_token_ids(tok))
        else:
            texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                     if chat else p for p in prompts]
            ids = [torch.tensor(tok(t, add_special_tokens=True).input_ids, dtype=torch.long) for t in texts]
        prepared = [[im if isinstance(im, ImageInput) else self.prepare_image(im) for im in sample] for sample in images]
        batch = self.build_inputs(ids, prepared, padding_side="left")
        B, T = batch.attention_mask.shape
        end_ids = sorted(int(t) for t in stop_ids)
        # sampling by the shared processors alone: GenerationMixin adds no warper of its own
        # (temperature 1, top_p 1, top_k 0 are identities)
        sampling = {"temperature": 1.0, "top_p": 1.0, "top_k": 0} if temperature > 0 else {}
        config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=temperature > 0, num_beams=1,
                                  eos_token_id=end_ids or None, pad_token_id=tok.pad_token_id,
                                  bos_token_id=tok.bos_token_id, **sampling)
        processors = sampling_processors(temperature, top_p) if temperature > 0 else None
        criteria = StopStringCriteria(tok, stop, B, end_ids) if stop else None
        dev = self.device
        fork = [dev.index or 0] if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=fork, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            out = GenerationMixin.generate(
                self, inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask, generation_config=config,
                logits_processor=processors, stopping_criteria=[criteria] if criteria else None, **generate_kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        texts_out: list[str] = []
        for i, row in enumerate(sequences.tolist()):
            cut = next((k for k, t in enumerate(row) if t in stop_ids), len(row))
            if criteria is not None and criteria.matchers[i].stopped:
                texts_out.append(criteria.matchers[i].finish())
            else:
                text = tok.decode(row[:cut], skip_special_tokens=True)  # one sequence: a str
                texts_out.append(text if isinstance(text, str) else "".join(text))
        return texts_out

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
        """Next token per row (kept for callers of the old helper): :func:`hires_lmm.generation.sample_next`."""
        return sample_next(logits, temperature, top_p, gen)

    # --- persistence ----------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, max_shard_size: str | int = "5GB",
                        is_main_process: bool = True, safe_serialization: bool = True, **kwargs: Any) -> None:
        """Write config.json, model.safetensors (sharded with an index when large), the
        generation config, the processor's files and the tokenizer files (with its chat template).
        Written to a temporary directory first and moved into place (config.json last), so an
        interrupted save never leaves a half-written file; other files already in ``save_directory``
        (checkpoints, metrics) are left alone. The new directory and files get the user's umask
        permissions, like any other file they write.

        transformers' ``is_main_process=False`` writes nothing (the other ranks of a distributed
        run); weights are always safetensors; other transformers options are refused."""
        from huggingface_hub import split_torch_state_dict_into_shards
        from safetensors.torch import save_file

        if args:
            raise ModelLoadError(f"save_pretrained takes the directory only, not {len(args)} more positional argument(s)")
        if not safe_serialization:
            raise ModelLoadError("hires-lmm saves safetensors only (safe_serialization=False is not supported)")
        if kwargs:
            raise ModelLoadError(f"save_pretrained: unsupported argument(s) {', '.join(sorted(kwargs))}")
        if not is_main_process:
            return

        path = Path(save_directory)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            self.config.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            # the processor's files (AutoProcessor / AutoImageProcessor) and generation defaults
            self.processor().save_pretrained(tmp, tokenizer=False)
            self.generation_config.save_pretrained(tmp)
            state = self._dedup_state_dict()
            split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                                       max_shard_size=max_shard_size)
            for fname, names in split.filename_to_tensors.items():
                save_file({n: state[n].contiguous() for n in names}, tmp / fname, metadata={"format": "pt"})
            if split.is_sharded:
                (tmp / WEIGHTS_INDEX_NAME).write_text(json.dumps(
                    {"metadata": split.metadata, "weight_map": split.tensor_to_filename}, indent=2))
            # mkdtemp makes the directory 0700 and safetensors writes its files 0600: give both the
            # permissions a plain mkdir / open would (0777 / 0666 less the umask), or a model saved
            # for a group or a server to read would be unreadable to it
            umask = os.umask(0o22)
            os.umask(umask)
            for f in tmp.iterdir():
                if f.is_file() and not f.is_symlink():
                    os.chmod(f, 0o666 & ~umask)
            os.chmod(tmp, 0o777 & ~umask)
            if not path.exists():
                os.replace(tmp, path)
            else:  # move file by file, config.json last; other files in the directory are kept
                new = {p.name for p in tmp.iterdir()}
                for f in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
                    os.replace(f, path / f.name)
                for stale in path.glob("model*.safetensors*"):  # shards of an earlier save
                    if stale.name not in new:
                        stale.unlink()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _dedup_state_dict(self) -> dict[str, torch.Tensor]:
        """State dict with tied tensors (e.g. lm_head ↔ embeddings) stored once."""
        seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
        out = {}
        for name, t in self.state_dict().items():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if key in seen:
                continue
            seen[key] = name
            out[name] = t.detach().cpu()
        return out

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike | None, *model_args: Any,
                        config: PretrainedConfig | str | os.PathLike | None = None,
                        dtype: torch.dtype | str | None = None, device_map: str | dict | torch.device | None = None,
                        torch_dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
                        **kwargs: Any) -> HiresLMM:
        """Load the directory ``pretrained_model_name_or_path``, written by :meth:`save_pretrained`.

        Refuses, with a one-line :class:`~hires_lmm.errors.ModelLoadError` (a ValueError; a
        missing directory or config.json is a :class:`~hires_lmm.errors.ModelNotFoundError`, also
        a FileNotFoundError) naming the file and the problem: a config.json that is not valid JSON
        or not a hires-lmm config, one without the ``<image>`` placeholder (or a tokenizer without
        its token: images would never be spliced), a weights index naming files outside the
        directory, only ``.bin`` weights, an unreadable weights file, and weights whose names or
        shapes do not match the config (e.g. a changed hidden size).

        transformers' arguments: ``dtype`` (a ``torch.dtype``, its name, or "auto": the dtype the
        weights are stored in), ``device_map`` ("cpu", "cuda:0", a device, a ``{module: device}``
        dict, or "auto" / "balanced" / "sequential": spread over the GPUs by accelerate, never
        splitting a visual module or a decoder layer), ``config`` (a :class:`HiresConfig`, or the
        directory of one, to use instead of config.json's); the hub arguments the Auto classes pass are accepted and unused
        (the path is a local directory). ``torch_dtype`` is the older name of ``dtype``; ``device``
        is ``device_map`` with one device.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if model_args:
            raise ModelLoadError(f"from_pretrained takes the directory only, not {len(model_args)} more positional argument(s)")
        if pretrained_model_name_or_path is None:
            raise ModelLoadError("from_pretrained needs a model directory")
        if config is not None and not isinstance(config, (HiresConfig, str, os.PathLike)):
            raise ModelLoadError(f"config must be a HiresConfig (or its directory), not {type(config).__name__}")
        unknown = sorted(set(kwargs) - _HUB_KWARGS)
        if unknown:
            raise ModelLoadError(f"from_pretrained: unsupported argument(s) {', '.join(unknown)}")
        if torch_dtype is not None:
            if dtype is not None and dtype != torch_dtype:
                raise ModelLoadError("give dtype or torch_dtype (its older name), not both")
            dtype = torch_dtype
        if device is not None:
            if device_map is not None:
                raise ModelLoadError("give device_map or device, not both")
            device_map = device
        path = Path(pretrained_model_name_or_path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ModelNotFoundError(f"{path}: no config.json; not a hires-lmm model directory")
        # read and checked here first: transformers' own errors for a broken file are long,
        # multi-line and do not always name it
        try:
            raw = json.loads(cfg_file.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            raise ModelLoadError(f"{cfg_file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{cfg_file}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        except OSError as e:
            raise ModelLoadError(f"{cfg_file}: cannot read it ({one_line(e)})") from None
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{cfg_file}: expected a JSON object, got {type(raw).__name__}")
        if raw.get("model_type") != HiresConfig.model_type:
            raise ModelLoadError(f"{cfg_file}: model_type is {raw.get('model_type')!r}, not {HiresConfig.model_type!r}; "
                                 "not a hires-lmm model (a released checkpoint? convert it with `hires convert`)")
        # the model splices images at <image> only: a config naming no placeholder (or another one)
        # would load and then never see an image, answering from the text alone
        if raw.get("image_token") != IMAGE_TOKEN:
            what = "has no image_token" if raw.get("image_token") in (None, "") else f"has image_token {raw['image_token']!r}"
            raise ModelLoadError(f"{cfg_file}: {what}; hires-lmm models splice images at {IMAGE_TOKEN!r}")
        try:
            if not isinstance(config, HiresConfig):
                config = HiresConfig.from_pretrained(path if config is None else config)
            config.llm_config()  # a text_config transformers cannot rebuild fails here, named
        except (ValueError, TypeError, KeyError, OSError) as e:
            raise ModelLoadError(f"{cfg_file}: not a usable hires-lmm config ({one_line(e)})") from None
        try:
            # config= spares AutoTokenizer a second, generic read of config.json (which warns)
            tokenizer = AutoTokenizer.from_pretrained(path, config=config)
        except Exception as e:  # noqa: BLE001 - any failure here is a broken tokenizer file
            raise ModelLoadError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {one_line(e)})") from None
        tid = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        if tid is None or tid == tokenizer.unk_token_id:
            # HiresLMM would add it afresh, with an embedding row the saved weights never trained
            raise ModelLoadError(f"{path}: the tokenizer has no {IMAGE_TOKEN!r} token; not a directory "
                                 "written by save_pretrained")
        def weight_files() -> list[str]:
            """The safetensors files: the index's (each inside ``path``) or model.safetensors."""
            index = path / WEIGHTS_INDEX_NAME
            if not index.exists():
                if (path / WEIGHTS_NAME).is_file():
                    return [WEIGHTS_NAME]
                bins = sorted(p.name for p in path.glob("*.bin"))
                if bins:
                    # torch.load of a .bin can run code from the file; hires-lmm loads safetensors only
                    raise ModelLoadError(f"{path}: only .bin weights ({', '.join(bins[:3])}); hires-lmm loads "
                                         f"{WEIGHTS_NAME} only (re-save the model with save_pretrained, or `hires convert` it)")
                raise ModelLoadError(f"{path}: no {WEIGHTS_NAME} (nor {WEIGHTS_INDEX_NAME})")
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                files = sorted(set(weight_map.values()))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ModelLoadError(f"{index}: not a weights index with a weight_map ({one_line(e)})") from None
            root = path.resolve()
            for f in files:
                # resolved (symlinks too) and kept inside the directory: an index naming ../elsewhere
                # must not make loading read files the directory does not hold
                target = (path / f).resolve() if isinstance(f, str) and f else None
                if target is None or not target.is_relative_to(root) or target == root:
                    raise ModelLoadError(f"{index}: weight file {f!r} is not a file inside {path}; refused")
                if not target.is_file():
                    raise ModelLoadError(f"{index}: names {f!r}, which is not in {path}")
            return files

        files = weight_files()
        try:
            model = build_from_config(config, tokenizer)
        except (ValueError, TypeError, KeyError, RuntimeError) as e:  # e.g. heads not dividing hidden_size
            raise ModelLoadError(f"{cfg_file}: cannot build the model it describes ({one_line(e)})") from None
        state: dict[str, torch.Tensor] = {}
        where: dict[str, str] = {}
        for f in files:
            try:
                part = load_file(path / f)
            except (SafetensorError, OSError, ValueError) as e:
                raise ModelLoadError(f"{path / f}: not a readable safetensors file ({one_line(e)})") from None
            state.update(part)
            where.update(dict.fromkeys(part, f))
        expected = model.state_dict()
        tied = set(expected) - set(model._dedup_state_dict())
        missing = sorted(set(expected) - set(state) - tied)
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ModelLoadError(f"{path}: weights do not match the config; missing {missing[:20]}, unexpected {unexpected[:20]}")
        shapes = [f"{n} is {tuple(state[n].shape)} in {where[n]} but {tuple(expected[n].shape)} for config.json"
                  for n in sorted(state) if tuple(state[n].shape) != tuple(expected[n].shape)]
        if shapes:  # e.g. a changed hidden_size: load_state_dict's error would be a multi-line traceback
            more = f" (+{len(shapes) - 5} more)" if len(shapes) > 5 else ""
            raise ModelLoadError(f"{path}: {len(shapes)} weight(s) do not match the shapes config.json asks for: "
                                 + "; ".join(shapes[:5]) + more)
        model.load_state_dict(state, strict=False)
        if hasattr(model.llm, "tie_weights"):
            model.llm.tie_weights()
        if (path / GENERATION_CONFIG_NAME).is_file():
            try:
                model.generation_config = GenerationConfig.from_pretrained(path)
            except (OSError, ValueError, TypeError) as e:
                raise ModelLoadError(f"{path / GENERATION_CONFIG_NAME}: not a usable generation config ({one_line(e)})") from None
        model.name_or_path = model.config._name_or_path = str(path)
        target = _resolve_dtype(dtype, state, path)
        if target is not None:
            model.to(target)  # type: ignore[arg-type]  # transformers' @wraps(nn.Module.to) types PreTrainedModel.to unbound
        _place(model, device_map, target)
        return model.eval()


def build_from_config(config: HiresConfig, tokenizer: PreTrainedTokenizerBase, llm: PreTrainedModel | None = None,
                      vit: ViT | None = None, convnext: nn.Module | None = None) -> HiresLMM:
    """Assemble a model from its config; parts not given are built with random weights (the LLM
    first, then the visual module's parts in :data:`hires_lmm.parts.BUILD_ORDER`: the order the
    presets draw their weights in). :func:`hires_lmm.methods.build_model` builds a preset or a
    method file with it, :meth:`HiresLMM.from_pretrained` the model of a saved config.json."""
    if llm is None:
        llm = AutoModelForCausalLM.from_config(config.llm_config())
    d_llm = _input_embedding(llm).embedding_dim
    visual = build_visual(config, d_llm, vit=vit, convnext=convnext)
    return HiresLMM(config, llm, tokenizer, visual)


def _resolve_dtype(dtype: torch.dtype | str | None, state: dict[str, torch.Tensor], path: Path) -> torch.dtype | None:
    """``dtype`` as a ``torch.dtype``; "auto" is the dtype most of the stored floating weights have."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str):
        raise ModelLoadError(f"dtype must be a torch.dtype, its name or 'auto', not {type(dtype).__name__}")
    if dtype == "auto":
        counts: dict[torch.dtype, int] = {}
        for t in state.values():
            if t.is_floating_point():
                counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
        return max(counts, key=lambda d: counts[d]) if counts else None
    named = getattr(torch, dtype.removeprefix("torch."), None)
    if not isinstance(named, torch.dtype) or not named.is_floating_point:
        raise ModelLoadError(f"dtype {dtype!r} is not a floating-point torch dtype (e.g. 'bfloat16', 'float16', 'auto')")
    return named


def _place(model: HiresLMM, device_map: str | dict | torch.device | None, dtype: torch.dtype | None) -> None:
    """Move ``model`` to one device, or dispatch it over several with accelerate (hooks move each
    part's inputs to its device)."""
    if device_map is None:
        return
    if isinstance(device_map, (torch.device, int)) or (isinstance(device_map, str)
                                                        and device_map not in ("auto", "balanced", "balanced_low_0", "sequential")):
        try:
            model.to(torch.device(device_map))  # type: ignore[arg-type]  # transformers' @wraps(nn.Module.to) types PreTrainedModel.to unbound
        except (RuntimeError, AssertionError, ValueError) as e:
            raise ModelLoadError(f"device_map {device_map!r}: {one_line(e)}") from None
        return
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory

    if isinstance(device_map, str):
        no_split = sorted(model._no_split_modules)
        max_memory = None
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, dtype=dtype, no_split_module_classes=no_split,
                                             low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype)
    if not isinstance(device_map, dict):
        raise ModelLoadError(f"device_map must be a device, 'auto' / 'balanced' / 'sequential' or a dict, not {device_map!r}")
    devices = set(device_map.values())
    if len(devices) == 1:  # one device: no hooks needed
        (only,) = devices
        model.to(torch.device(f"cuda:{only}") if isinstance(only, int) else torch.device(only))  # type: ignore[arg-type]  # transformers' @wraps(nn.Module.to) types PreTrainedModel.to unbound
        return
    if "disk" in devices:
        raise ModelLoadError("device_map places weights on 'disk'; hires-lmm keeps every weight in memory")
    dispatch_model(model, device_map=device_map)


def load_llm(path: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any Hugging Face causal LM and its tokenizer from a local directory."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"LLM directory {p} does not exist")
    llm = AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype) if torch_dtype else AutoModelForCausalLM.from_pretrained(p)
    return llm, AutoTokenizer.from_pretrained(p)


from . import auto as _auto  # noqa: E402 - registration deferred while this module was importing

_auto.retry()
