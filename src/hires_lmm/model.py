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
from transformers.modeling_outputs import CausalLMOutputWithPast

from .compat import CACHE_FIELD, cache_kwargs, output_cache
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
class HiresOutput(CausalLMOutputWithPast):
    """The LLM's output plus the spliced :class:`Batch` (a field, so DDP's output handling keeps it).

    A ``CausalLMOutputWithPast``, so the KV cache lives under the field name the installed
    transformers uses (``cache`` from 5.24, ``past_key_values`` before; read it with
    :func:`hires_lmm.compat.output_cache`).

    Attributes:
        loss: mean cross-entropy over labelled tokens, when labels were given.
        logits: (B, T, V) over the spliced sequence.
        batch: the spliced inputs.
    """

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

        Returns a :class:`HiresOutput` (loss, logits, the KV cache and the spliced batch).
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
        return HiresOutput(loss=out.loss, logits=out.logits, batch=batch, **{CACHE_FIELD: output_cache(out)})

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
        past = output_cache(out)
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
                           use_cache=True, **cache_kwargs(self.llm, past))
            past, logits, next_pos = output_cache(out), out.logits[:, -1], next_pos + 1
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
        file; other files already in ``path`` (checkpoints, metrics) are left alone. The new
        directory and files get the user's umask permissions, like any other file they write."""
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
    def from_pretrained(cls, path: str | os.PathLike, *, torch_dtype: torch.dtype | None = None,
                        device: str | torch.device | None = None) -> "HiresLMM":
        """Load a directory written by :meth:`save_pretrained`.

        Refuses, with a one-line :class:`~hires_lmm.errors.ModelLoadError` (a ValueError; a
        missing directory or config.json is a :class:`~hires_lmm.errors.ModelNotFoundError`, also
        a FileNotFoundError) naming the file and the problem: a config.json that is not valid JSON
        or not a hires-lmm config, one without the ``<image>`` placeholder (or a tokenizer without
        its token: images would never be spliced), a weights index naming files outside the
        directory, only ``.bin`` weights, an unreadable weights file, and weights whose names or
        shapes do not match the config (e.g. a changed hidden size).
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        from .errors import ModelLoadError, ModelNotFoundError, one_line
        from .methods import build_from_config
        from .text import IMAGE_TOKEN

        path = Path(path)
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
            config = HiresConfig.from_pretrained(path)
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
