"""The LMM: plan → render → encode → connect → splice into any Hugging Face causal LM.

:class:`HiresLMM` holds the LLM, the tokenizer and a visual module (:mod:`hires_lmm.visual`) that
turns the rendered views of a batch of images into LLM-space visual token sequences. Text holds one
``<image>`` placeholder per image; :meth:`HiresLMM.build_inputs` replaces each with its image's
tokens (visual positions never carry a loss). Forward computes logits and the loss;
:meth:`HiresLMM.generate` decodes a batch with left padding and a KV cache.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from PIL import Image
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import ModelOutput

from .config import HiresConfig
from .image import DEFAULT_MAX_PIXELS, load_image
from .image.render import load_and_render, render
from .plan import Plan, plan_image
from .text import ensure_image_token, separator_id

IGNORE_INDEX = -100
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


@dataclass
class ImageInput:
    """An image ready for the model: its plan and its rendered views ``[(3, h, w), ...]``."""

    plan: Plan
    views: list[torch.Tensor]


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


def prepare_image(image: Image.Image | str | os.PathLike | bytes, method: str,
                  plan_options: dict[str, Any] | None = None, *, fast: bool = False,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageInput:
    """Load (safely), plan and render one image for ``method`` — no model needed, so data-loader
    workers can do it.

    ``fast`` plans from the file's header and decodes a reduced copy when the plan needs less
    than the full resolution (:func:`~hires_lmm.image.render.load_and_render`: 2-4x faster on
    large JPEGs, within a few grey levels of the exact pixels); the default renders the exact
    pixels the reference code sees. ``max_pixels`` is the decompression-bomb limit.
    """
    if fast and not isinstance(image, Image.Image):
        plan, views = load_and_render(image, method, plan_options, max_pixels=max_pixels)
        return ImageInput(plan, views)
    img = image if isinstance(image, Image.Image) and image.mode == "RGB" else load_image(image, max_pixels=max_pixels)
    plan = plan_image(method, img.size, **(plan_options or {}))
    return ImageInput(plan, render(img, plan))


@dataclass
class HiresOutput(ModelOutput):
    """The LLM's output plus the spliced :class:`Batch` (a field, so DDP's output handling keeps it).

    Attributes:
        loss: mean cross-entropy over labelled tokens, when labels were given.
        logits: (B, T, V) over the spliced sequence.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Any = None
    batch: Batch | None = None


class HiresLMM(nn.Module):
    """A high-resolution LMM of one method (see :mod:`hires_lmm.methods` for the presets)."""

    def __init__(self, config: HiresConfig, llm: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 visual: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.llm = llm
        self.tokenizer = tokenizer
        self.visual = visual
        self.image_token_id = ensure_image_token(tokenizer)
        if self.llm.get_input_embeddings().num_embeddings < len(tokenizer):
            self.llm.resize_token_embeddings(len(tokenizer))
        self.separator_ids = {s: separator_id(tokenizer, s) for s in (",", "\n")}
        # a converted checkpoint records the ids its reference code used (e.g. SliME's tokenizer(',')[-1])
        self.separator_ids.update({k: int(v) for k, v in config.connector.get("separator_ids", {}).items()})
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token

    # --- images ---------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    def plan(self, size: tuple[int, int]) -> Plan:
        return plan_image(self.config.method, size, **self.config.plan_options)

    def prepare_image(self, image: Image.Image | str | os.PathLike | bytes, *, fast: bool = False,
                      max_pixels: int | None = DEFAULT_MAX_PIXELS) -> ImageInput:
        """Load (safely), plan and render one image (``fast``: see :func:`prepare_image`)."""
        return prepare_image(image, self.config.method, self.config.plan_options, fast=fast, max_pixels=max_pixels)

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
        for ids, sample in zip(input_ids, images):
            n = int((ids == self.image_token_id).sum())
            if n != len(sample):
                raise ValueError(f"a sample has {n} {self.config.image_token} placeholder(s) but {len(sample)} image(s)")
            if self.config.method == "slime":  # the selector compares tokens with the sample's text
                t = embed(ids[ids != self.image_token_id].to(self.device))
                text_embeds += [t] * len(sample)
        visual = self.encode_images(flat, text_embeds if self.config.method == "slime" else None)
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
    def forward(self, input_ids: Sequence[torch.Tensor], images: Sequence[Sequence[ImageInput]],
                labels: Sequence[torch.Tensor] | None = None, **llm_kwargs: Any):
        """Logits (B, T, V) over the spliced sequence, and the loss when ``labels`` are given.

        Returns a :class:`HiresOutput` (loss, logits, past_key_values and the spliced batch).
        """
        batch = self.build_inputs(input_ids, images, labels)
        mask = batch.attention_mask
        # training on right padding: a real token never attends to a later position, so the causal
        # mask alone is exact for every real position (pad positions carry no labels); without the
        # padding mask SDPA takes its is_causal kernel (about 2.5x faster on the CPU). Not done
        # when no labels are given: a caller may continue decoding from the returned cache.
        if labels is not None and bool((mask[:, :-1] >= mask[:, 1:]).all()):
            mask = None
        out = self.llm(inputs_embeds=batch.inputs_embeds, attention_mask=mask,
                       position_ids=batch.position_ids, labels=batch.labels, **llm_kwargs)
        return HiresOutput(loss=out.loss, logits=out.logits, past_key_values=out.past_key_values, batch=batch)

    # --- generation -----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[str], images: Sequence[Sequence[Any]] | None = None, *,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop: Sequence[str] = (), seed: int | None = None, chat: bool = False,
                 template: str | None = None) -> list[str]:
        """Decode a batch of prompts (each with its images) with left padding and a KV cache.

        ``temperature`` 0 is greedy; otherwise sampling with nucleus ``top_p``. Generation ends
        at the EOS token, at any of ``stop`` (excluded from the text) or after
        ``max_new_tokens``. ``template`` (e.g. "vicuna_v1", the one the model was trained with)
        wraps each prompt as a user turn and adds the template's end-of-turn tokens to the stops;
        ``chat=True`` uses the tokenizer's own chat template instead.
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
        gen = torch.Generator(device="cpu")
        if seed is not None:
            gen.manual_seed(seed)
        B = len(prompts)
        mask, pos = batch.attention_mask, batch.position_ids
        out = self.llm(inputs_embeds=batch.inputs_embeds, attention_mask=mask, position_ids=pos, use_cache=True)
        past = out.past_key_values
        logits = out.logits[:, -1]
        done = torch.zeros(B, dtype=torch.bool)
        generated: list[list[int]] = [[] for _ in range(B)]
        texts_out: list[str | None] = [None] * B  # set when a stop string ends a sequence
        next_pos = pos[:, -1:] + 1
        # tokens a stop string can span: a character may take up to 4 byte-fallback tokens; two more
        # keep its first token off the tail's edge, where a tokenizer may drop a leading space
        tail = 4 * max((len(s) for s in stop), default=0) + 2
        for _ in range(max_new_tokens):
            nxt = self._pick(logits.float(), temperature, top_p, gen)
            for i in range(B):
                if done[i]:
                    continue
                t = int(nxt[i])
                if t in stop_ids:
                    done[i] = True
                    continue
                generated[i].append(t)
                # a stop string that just completed lies within the last few tokens: decode that
                # tail only (not the whole text again every step), the whole text once it matches
                if stop and any(s in tok.decode(generated[i][-tail:], skip_special_tokens=True) for s in stop):
                    text = tok.decode(generated[i], skip_special_tokens=True)
                    cut = min((text.find(s) for s in stop if s in text), default=-1)
                    if cut >= 0:
                        texts_out[i] = text[:cut]
                        done[i] = True
            if bool(done.all()):
                break
            nxt = nxt.masked_fill(done.to(nxt.device), tok.pad_token_id)
            mask = torch.cat([mask, (~done).long().to(mask.device)[:, None]], dim=1)
            out = self.llm(input_ids=nxt[:, None].to(self.device), attention_mask=mask, position_ids=next_pos,
                           past_key_values=past, use_cache=True)
            past, logits, next_pos = out.past_key_values, out.logits[:, -1], next_pos + 1
        return [t if t is not None else tok.decode(g, skip_special_tokens=True) for t, g in zip(texts_out, generated)]

    @staticmethod
    def _pick(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
        """Next token per row: greedy when temperature is 0, else nucleus sampling."""
        if temperature <= 0:
            return logits.argmax(-1).cpu()
        probs = torch.softmax(logits / temperature, dim=-1).cpu()
        if top_p < 1.0:
            sorted_p, idx = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest set reaching top_p
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
        return torch.multinomial(probs / probs.sum(-1, keepdim=True), 1, generator=gen).squeeze(-1)

    # --- persistence ----------------------------------------------------------------------------
    def save_pretrained(self, path: str | os.PathLike, max_shard_size: str | int = "5GB") -> None:
        """Write config.json, model.safetensors (sharded with an index when large) and the
        tokenizer files (with its chat template). Written to a temporary directory first and
        moved into place (config.json last), so an interrupted save never leaves a half-written
        file; other files already in ``path`` (checkpoints, metrics) are left alone."""
        from huggingface_hub import split_torch_state_dict_into_shards
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            self.config.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            state = self._dedup_state_dict()
            split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                                       max_shard_size=max_shard_size)
            for fname, names in split.filename_to_tensors.items():
                save_file({n: state[n].contiguous() for n in names}, tmp / fname, metadata={"format": "pt"})
            if split.is_sharded:
                (tmp / WEIGHTS_INDEX_NAME).write_text(json.dumps(
                    {"metadata": split.metadata, "weight_map": split.tensor_to_filename}, indent=2))
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
    def from_pretrained(cls, path: str | os.PathLike, *, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None) -> "HiresLMM":
        """Load a directory written by :meth:`save_pretrained`; refuses missing or unexpected weights."""
        from safetensors.torch import load_file

        from .methods import build_from_config

        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: no config.json; not a hires-lmm model directory")
        config = HiresConfig.from_pretrained(path)
        # config= spares AutoTokenizer a second, generic read of config.json (which warns)
        tokenizer = AutoTokenizer.from_pretrained(path, config=config)
        model = build_from_config(config, tokenizer)
        if (path / WEIGHTS_INDEX_NAME).exists():
            files = sorted(set(json.loads((path / WEIGHTS_INDEX_NAME).read_text())["weight_map"].values()))
        else:
            files = [WEIGHTS_NAME]
        state: dict[str, torch.Tensor] = {}
        for f in files:
            state.update(load_file(path / f))
        expected = set(model.state_dict())
        tied = expected - set(model._dedup_state_dict())
        missing = sorted(expected - set(state) - tied)
        unexpected = sorted(set(state) - expected)
        if missing or unexpected:
            raise ValueError(f"{path}: weights do not match the config; missing {missing[:20]}, unexpected {unexpected[:20]}")
        model.load_state_dict(state, strict=False)
        if hasattr(model.llm, "tie_weights"):
            model.llm.tie_weights()
        if torch_dtype is not None:
            model.to(torch_dtype)
        if device is not None:
            model.to(device)
        return model.eval()


def load_llm(path: str | os.PathLike, torch_dtype: torch.dtype | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Any Hugging Face causal LM and its tokenizer from a local directory."""
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(f"LLM directory {p} does not exist")
    llm = AutoModelForCausalLM.from_pretrained(p, dtype=torch_dtype) if torch_dtype else AutoModelForCausalLM.from_pretrained(p)
    return llm, AutoTokenizer.from_pretrained(p)
