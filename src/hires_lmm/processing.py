"""Pixels and text for the model as transformers users expect them: ``HiresImageProcessor`` and
``HiresProcessor`` (the pattern of transformers' ``LlavaNextImageProcessor`` / ``LlavaProcessor``).

The image processor loads, plans and renders each image as the method's reference code does
(:func:`prepare_image`; the exact reference pixels by default, ``fast_decode=True`` for the
reduced-JPEG path) and packs the views of a batch into tensors. Views differ in size within a
method (LLaVA-UHD's slices, LLaVA-HR's two resolutions), so they are zero-padded::

    pixel_values  (B, V, 3, H, W)  float32, sample b's views in plan order, each at the top left
    view_sizes    (B, V, 2)        int64 (height, width) of each view; (0, 0) for padding
    image_sizes   (B, I, 2)        int64 (height, width) of each original image; (0, 0) for padding

B = samples, V / I = most views / images of a sample, H x W = the largest view. The sample axis
comes first so every tensor splits and repeats by sample (``GenerationMixin`` expands inputs per
sample for ``num_return_sequences`` and beam search; data-parallel wrappers split on dim 0). The
model re-plans each image from its size (a plan is a pure function of the size and the config)
and takes each view's ``view_sizes`` region; ``input_ids`` hold one ``<image>`` token per image.

The processor adds the tokenizer and a chat template that takes plain strings or OpenAI / HF
content lists (``{"type": "image"}``, ``{"type": "image_url", ...}``, ``{"type": "text", "text":
...}``) and renders the reference conversation format (``vicuna_v1``, ``llama3`` or ``chatml``, as
:mod:`hires_lmm.data.templates` renders it for training).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase
from transformers.image_processing_base import BatchFeature as ImageBatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ProcessorMixin

from .errors import HiresError, one_line
from .image import DEFAULT_MAX_PIXELS, load_image
from .image.load import ImageSource, image_size
from .image.render import load_and_render, render
from .parts import MethodSpec, spec_from_dict
from .plan import METHODS, Plan, plan_image
from .text import IMAGE_TOKEN

PREPROCESSOR_NAME = "preprocessor_config.json"
PROCESSOR_NAME = "processor_config.json"


class ProcessorInputError(HiresError, ValueError):
    """Text and images that do not go together (placeholders vs images, bad tensors)."""


# --- one image ------------------------------------------------------------------------------------
@dataclass
class ImageInput:
    """An image ready for the model: its plan and its rendered views ``[(3, h, w), ...]``."""

    plan: Plan
    views: list[torch.Tensor]


#: a composed method as the model config records it (its method-file form), or the spec itself
MethodSpecLike = MethodSpec | Mapping[str, Any]


def method_spec_of(method_spec: MethodSpecLike | None, plan_options: Mapping[str, Any] | None = None) -> MethodSpec | None:
    """The :class:`~hires_lmm.parts.MethodSpec` of a composed method (None for a preset: no
    ``method_spec``), its views options replaced by ``plan_options`` as
    :func:`hires_lmm.parts.spec_from_config` does (training stages update the config's
    ``plan_options``, not the saved spec)."""
    if method_spec is None or (isinstance(method_spec, Mapping) and not method_spec):
        return None
    spec = method_spec if isinstance(method_spec, MethodSpec) else spec_from_dict(method_spec)
    if plan_options is not None:
        spec = dataclasses.replace(spec, options={**spec.options, "views": dict(plan_options)})
    return spec


def plan_for(method: str, size: tuple[int, int], plan_options: Mapping[str, Any] | None = None,
             method_spec: MethodSpecLike | None = None) -> Plan:
    """The plan of an image of ``size`` = (width, height) with the token count the model splices:
    the planner's plan of ``method`` for a preset; for a composed method (``method_spec``, e.g.
    LLaVA-NeXT's tiles through UHD's spatial resampler) its parts' plan
    (:meth:`hires_lmm.parts.MethodSpec.plan`), whose budget (``max_visual_tokens``) applies to the
    composed count and may choose other views than the planner alone would."""
    spec = method_spec_of(method_spec, plan_options)
    if spec is None:
        return plan_image(method, size, **(plan_options or {}))
    return spec.plan(size)


def _planner_options(plan: Plan, plan_options: Mapping[str, Any]) -> dict[str, Any]:
    """Planner options that plan the views of a composed method's ``plan``: under a budget, the
    configuration the composed count chose (``extra["budget_choice"]``), planned unbudgeted."""
    choice = plan.extra.get("budget_choice")
    if "max_visual_tokens" not in plan.extra or not isinstance(choice, Mapping):
        return dict(plan_options)
    return {**plan_options, "max_visual_tokens": None, **choice}


def prepare_image(image: ImageSource, method: str, plan_options: dict[str, Any] | None = None, *, fast: bool = False,
                  max_pixels: int | None = DEFAULT_MAX_PIXELS, method_spec: MethodSpecLike | None = None) -> ImageInput:
    """Load (safely), plan and render one image for ``method`` — no model needed, so data-loader
    workers can do it.

    ``fast`` plans from the file's header and decodes a reduced copy when the plan needs less
    than the full resolution (:func:`~hires_lmm.image.render.load_and_render`: 2-4x faster on
    large JPEGs, within a few grey levels of the exact pixels); the default renders the exact
    pixels the reference code sees. ``max_pixels`` is the decompression-bomb limit.

    ``method_spec`` (a composed method: the model config's ``method_spec``) plans through the
    method's parts (:func:`plan_for`): the plan carries the count the model splices, and a budget
    in ``plan_options`` renders the views its composed count chose.
    """
    spec = method_spec_of(method_spec, plan_options or {})
    if spec is None:
        if fast and not isinstance(image, Image.Image):
            plan, views = load_and_render(image, method, plan_options, max_pixels=max_pixels)
            return ImageInput(plan, views)
        img = image if isinstance(image, Image.Image) and image.mode == "RGB" else load_image(image, max_pixels=max_pixels)
        plan = plan_image(method, img.size, **(plan_options or {}))
        return ImageInput(plan, render(img, plan))
    if fast and not isinstance(image, Image.Image):
        if not isinstance(image, (str, os.PathLike, bytes, bytearray)):
            image = image.read()  # a stream is read twice: the header, then the pixels
        plan = spec.plan(image_size(image, max_pixels=max_pixels))
        planned, views = load_and_render(image, spec.parts["views"], _planner_options(plan, plan_options or {}),
                                         max_pixels=max_pixels)
        if planned.views == plan.views and planned.canvases == plan.canvases:
            return ImageInput(plan, views)
    img = image if isinstance(image, Image.Image) and image.mode == "RGB" else load_image(image, max_pixels=max_pixels)
    plan = spec.plan(img.size)
    return ImageInput(plan, render(img, plan))


# --- the tensor contract --------------------------------------------------------------------------
def pack_images(samples: Sequence[Sequence[ImageInput]]) -> dict[str, torch.Tensor]:
    """The views of a batch as ``pixel_values`` / ``view_sizes`` / ``image_sizes`` (module docstring);
    ``{}`` when no sample has an image."""
    B = len(samples)
    V = max((sum(len(im.views) for im in s) for s in samples), default=0)
    if V == 0:
        return {}
    I = max(len(s) for s in samples)  # noqa: E741
    views = [v for s in samples for im in s for v in im.views]
    H, W = max(v.shape[-2] for v in views), max(v.shape[-1] for v in views)
    pixel_values = views[0].new_zeros(B, V, 3, H, W, dtype=torch.float32)
    view_sizes = torch.zeros(B, V, 2, dtype=torch.long)
    image_sizes = torch.zeros(B, I, 2, dtype=torch.long)
    for b, sample in enumerate(samples):
        k = 0
        for i, im in enumerate(sample):
            w, h = im.plan.image_size
            image_sizes[b, i] = torch.tensor([h, w])
            for v in im.views:  # a copy per view, on the CPU, while preparing data
                pixel_values[b, k, :, : v.shape[-2], : v.shape[-1]] = v
                view_sizes[b, k] = torch.tensor(v.shape[-2:])
                k += 1
    return {"pixel_values": pixel_values, "view_sizes": view_sizes, "image_sizes": image_sizes}


def unpack_images(pixel_values: torch.Tensor | None, view_sizes: torch.Tensor | None,
                  image_sizes: torch.Tensor | None, method: str, plan_options: dict[str, Any] | None,
                  batch_size: int, *, method_spec: MethodSpecLike | None = None) -> list[list[ImageInput]]:
    """The inverse of :func:`pack_images`: per sample its :class:`ImageInput` s, each re-planned
    from its size (``method`` / ``plan_options`` / ``method_spec`` must be those the pixels were
    prepared with, see :func:`plan_for`; a view whose size differs from the plan's is refused)."""
    if pixel_values is None:
        return [[] for _ in range(batch_size)]
    if view_sizes is None or image_sizes is None:
        raise ProcessorInputError("pixel_values need view_sizes and image_sizes (as HiresProcessor returns them)")
    if pixel_values.dim() != 5 or view_sizes.shape[:2] != pixel_values.shape[:2] or image_sizes.dim() != 3:
        raise ProcessorInputError(f"expected pixel_values (B, V, 3, H, W), view_sizes (B, V, 2), image_sizes (B, I, 2); "
                                  f"got {tuple(pixel_values.shape)}, {tuple(view_sizes.shape)}, {tuple(image_sizes.shape)}")
    if pixel_values.shape[0] != batch_size:
        raise ProcessorInputError(f"pixel_values hold {pixel_values.shape[0]} samples but input_ids {batch_size}")
    sizes, vsizes = image_sizes.tolist(), view_sizes.tolist()  # one device sync for all of them
    spec = method_spec_of(method_spec, plan_options or {})
    name = spec.name if spec is not None else method
    out: list[list[ImageInput]] = []
    for b in range(batch_size):
        sample, k = [], 0
        for h, w in sizes[b]:
            if h <= 0 or w <= 0:
                continue
            size = (int(w), int(h))
            plan = spec.plan(size) if spec is not None else plan_image(method, size, **(plan_options or {}))
            views = []
            for view in plan.views:
                vh, vw = vsizes[b][k] if k < len(vsizes[b]) else (0, 0)
                if (vw, vh) != tuple(view.size):
                    raise ProcessorInputError(
                        f"sample {b}: view {k} is {vw}x{vh} but {name}'s plan of a {w}x{h} image has a "
                        f"{view.size[0]}x{view.size[1]} {view.role} view; pixel_values were prepared for another "
                        "method or other plan options")
                views.append(pixel_values[b, k, :, :vh, :vw])
                k += 1
            sample.append(ImageInput(plan, views))
        out.append(sample)
    return out


# --- the image processor --------------------------------------------------------------------------
class HiresImageProcessor(BaseImageProcessor):
    """Plan and render images for one method (see the module docstring for the outputs).

    Args:
        method: one of :data:`hires_lmm.plan.METHODS`.
        plan_options: the planner's keyword arguments (the model config's ``plan_options``).
        fast_decode: plan from the file header and decode a reduced copy (paths and bytes only;
            a few grey levels from the exact pixels). Default: the reference pixels.
        max_pixels: the decompression-bomb limit of the safe loader.
        method_spec: a composed method's method-file form (the model config's ``method_spec``):
            the views are still ``method``'s, but the token counts (:meth:`num_visual_tokens`,
            vLLM's ``_get_num_multimodal_tokens``) are the composed parts' (e.g. a resampler's).
    """

    model_input_names = ["pixel_values", "view_sizes", "image_sizes"]

    def __init__(self, method: str = "llava-1.5", plan_options: dict[str, Any] | None = None,
                 fast_decode: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 method_spec: dict[str, Any] | None = None, **kwargs: Any) -> None:
        if method not in METHODS:
            raise ProcessorInputError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
        super().__init__(**kwargs)
        self.method = method
        self.plan_options = dict(plan_options or {})
        self.fast_decode = bool(fast_decode)
        self.max_pixels = max_pixels
        self.method_spec = dict(method_spec) if method_spec else None

    @property
    def spec(self) -> MethodSpec | None:
        """The composed method's :class:`~hires_lmm.parts.MethodSpec` (None for a preset), its
        views options :attr:`plan_options`."""
        return method_spec_of(self.method_spec, self.plan_options)

    def plan(self, size: tuple[int, int], **plan_options: Any) -> Plan:
        """The plan of an image of ``size`` = (width, height), with the token count the model
        splices (:func:`plan_for`: the parts' plan for a composed method, ``method_spec``).
        ``plan_options`` override :attr:`plan_options` (e.g. ``max_visual_tokens``)."""
        return plan_for(self.method, size, {**self.plan_options, **plan_options}, self.method_spec)

    def count_plan(self, size: tuple[int, int], **plan_options: Any) -> Plan:
        """:meth:`plan` (its older name)."""
        return self.plan(size, **plan_options)

    def num_visual_tokens(self, size: tuple[int, int], **plan_options: Any) -> int:
        """Visual tokens of an image of ``size`` = (width, height), in closed form before encoding
        (SliME: the bound before its text-guided selector drops local tokens; a composed method:
        its parts' count, see :meth:`plan`)."""
        return int(self.plan(size, **plan_options).num_visual_tokens)

    def prepare(self, image: Any, *, fast: bool | None = None, **plan_options: Any) -> ImageInput:
        """One image (PIL image, path, bytes or data URL) → :class:`ImageInput` (``plan_options``
        override :attr:`plan_options`, e.g. a request's ``max_visual_tokens``)."""
        if isinstance(image, ImageInput):
            return image
        return prepare_image(image, self.method, {**self.plan_options, **plan_options},
                             fast=self.fast_decode if fast is None else fast, max_pixels=self.max_pixels,
                             method_spec=self.method_spec)

    def __call__(self, images: Any, *args: Any, **kwargs: Any) -> ImageBatchFeature:
        """:meth:`preprocess`."""
        return self.preprocess(images, *args, **kwargs)

    def preprocess(self, images: Any, return_tensors: str | None = "pt", fast_decode: bool | None = None,
                   **kwargs: Any) -> ImageBatchFeature:
        """``images``: one image, a list (one sample per image) or a list of lists (per sample)."""
        if kwargs:
            raise ProcessorInputError(f"HiresImageProcessor got unknown argument(s) {', '.join(sorted(kwargs))}")
        if return_tensors not in (None, "pt"):
            raise ProcessorInputError(f"return_tensors={return_tensors!r}: only 'pt' (torch tensors)")
        samples = _per_sample(images)
        prepared = [[self.prepare(im, fast=fast_decode) for im in s] for s in samples]
        return ImageBatchFeature(pack_images(prepared))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any,
                        **kwargs: Any) -> HiresImageProcessor:
        """From ``preprocessor_config.json`` in the directory ``pretrained_model_name_or_path``;
        for a model directory saved before the processor existed, from its ``config.json`` (method
        and plan options). transformers' hub arguments are accepted and unused (a local directory)."""
        _no_more_positional("HiresImageProcessor.from_pretrained", args)
        for k in _HUB_KWARGS:
            kwargs.pop(k, None)
        p = Path(pretrained_model_name_or_path)
        f = p / PREPROCESSOR_NAME
        if f.is_file():
            d = _read_json(f)
        elif (p / "config.json").is_file():
            raw = _read_json(p / "config.json")
            d = {"method": raw.get("method", "llava-1.5"), "plan_options": raw.get("plan_options") or {},
                 "method_spec": raw.get("method_spec")}
        else:
            raise ProcessorInputError(f"{p}: no {PREPROCESSOR_NAME} (nor a hires-lmm config.json)")
        keys = ("method", "plan_options", "fast_decode", "max_pixels", "method_spec")
        d = {k: v for k, v in d.items() if k in keys}
        d.update({k: v for k, v in kwargs.items() if k in keys})
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        out = {"image_processor_type": type(self).__name__, "method": self.method, "plan_options": self.plan_options,
               "fast_decode": self.fast_decode, "max_pixels": self.max_pixels}
        if self.method_spec:  # a composed method only: a preset's file is as it always was
            out["method_spec"] = self.method_spec
        return out

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> list[str]:  # noqa: ARG002
        """Write ``preprocessor_config.json`` (:meth:`to_dict`) into ``save_directory``."""
        _no_more_positional("HiresImageProcessor.save_pretrained", args)
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        f = Path(save_directory) / PREPROCESSOR_NAME
        f.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return [str(f)]


_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "resume_download", "revision",
               "subfolder", "token", "use_auth_token", "trust_remote_code", "_from_auto", "_commit_hash",
               "code_revision", "backend", "use_fast")


def _no_more_positional(what: str, args: tuple[Any, ...]) -> None:
    """Refuse positional arguments after the directory (transformers' hub options, e.g.
    ``push_to_hub``, which a local directory does not use, are keywords)."""
    if args:
        raise ProcessorInputError(f"{what} takes the directory only, not {len(args)} more positional argument(s)")


def _read_json(f: Path) -> dict[str, Any]:
    try:
        d = json.loads(f.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProcessorInputError(f"{f}: not a readable JSON file ({one_line(e)})") from None
    if not isinstance(d, dict):
        raise ProcessorInputError(f"{f}: expected a JSON object")
    return d


def _is_image(x: Any) -> bool:
    return isinstance(x, (Image.Image, ImageInput, str, bytes, os.PathLike))


def _per_sample(images: Any) -> list[list[Any]]:
    if images is None:
        return []
    if _is_image(images):
        return [[images]]
    images = list(images)
    if all(_is_image(x) for x in images):
        return [[x] for x in images]
    if all(isinstance(x, (list, tuple)) and all(_is_image(y) for y in x) for x in images):
        return [list(x) for x in images]
    raise ProcessorInputError("images: an image, a list of images, or one list of images per text")


# --- chat templates -------------------------------------------------------------------------------
# Content may be a string or a list of parts; parts join with "\n" and an image part is one
# <image> (so [image, text] is LLaVA's "<image>\n" + text), as the server renders them.
_CONTENT = (
    "{%- macro content(c) -%}{%- if c is string -%}{{ c }}{%- else -%}"
    "{%- for p in c -%}{%- if not loop.first -%}{{ '\\n' }}{%- endif -%}"
    "{%- if p['type'] in ['image', 'image_url', 'input_image'] -%}{{ '<image>' }}"
    "{%- elif p['type'] in ['text', 'input_text'] -%}{{ p['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{%- endmacro -%}"
)

_SYSTEMS = {
    "vicuna_v1": ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                  "helpful, detailed, and polite answers to the user's questions."),
    "llama3": ("You are a helpful language and vision assistant. You are able to understand the visual content that "
               "the user provides, and assist the user with a variety of tasks using natural language."),
    "chatml": "You are a helpful assistant.",
}


def _system_head(name: str) -> str:
    default = json.dumps(_SYSTEMS[name])
    return ("{%- if messages and messages[0]['role'] == 'system' -%}{%- set system = content(messages[0]['content']) -%}"
            "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set system = " + default + " -%}"
            "{%- set loop_messages = messages -%}{%- endif -%}")


#: Jinja chat templates rendering exactly what :mod:`hires_lmm.data.templates` renders.
CHAT_TEMPLATES: dict[str, str] = {
    # conv_vicuna_v1: "SYSTEM USER: q ASSISTANT: a</s>USER: ..."
    "vicuna_v1": _CONTENT + _system_head("vicuna_v1") + (
        "{{ system + ' ' }}{%- for m in loop_messages -%}"
        "{%- if m['role'] == 'user' -%}{{ 'USER: ' + content(m['content']) + ' ' }}"
        "{%- else -%}{{ 'ASSISTANT:' }}{%- set a = content(m['content']) -%}{%- if a -%}{{ ' ' + a }}{%- endif -%}"
        "{{ eos_token }}{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"),
    # Llama-3 instruct, contents trimmed (LLaVA-NeXT's preprocess_llama3)
    "llama3": _CONTENT + _system_head("llama3") + (
        "{%- if system -%}{{ '<|start_header_id|>system<|end_header_id|>\\n\\n' + system | trim + '<|eot_id|>' }}{%- endif -%}"
        "{%- for m in loop_messages -%}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + content(m['content']) | trim + '<|eot_id|>' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"),
    # Qwen2 ChatML
    "chatml": _CONTENT + _system_head("chatml") + (
        "{%- if system -%}{{ '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}{%- endif -%}"
        "{%- for m in loop_messages -%}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + content(m['content']) + '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"),
}


def reference_template_name(tokenizer: PreTrainedTokenizerBase) -> str:
    """The conversation format a model with this tokenizer was trained with in the references:
    Llama-3's header tokens → ``llama3`` (LLaVA-NeXT / SliME on Llama-3), ChatML's →
    ``chatml`` (Qwen2), otherwise ``vicuna_v1`` (LLaVA-1.5, LLaVA-UHD, LLaVA-HR, INF-LLaVA, SliME
    and LLaVA-NeXT on Vicuna)."""
    vocab = tokenizer.get_vocab()
    if "<|start_header_id|>" in vocab and "<|eot_id|>" in vocab:
        return "llama3"
    if "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        return "chatml"
    return "vicuna_v1"


# --- the processor --------------------------------------------------------------------------------
class HiresProcessor(ProcessorMixin):
    """Image processor + tokenizer + chat template of one hires-lmm model.

    ``processor(text=..., images=..., return_tensors="pt")`` returns ``input_ids``,
    ``attention_mask`` and the pixel tensors (module docstring), ready for ``model(**inputs)`` and
    ``model.generate(**inputs)``. Each text holds one ``<image>`` per image; ``images`` is a flat
    list (taken in placeholder order across the texts) or one list per text.
    """

    attributes = ["image_processor", "tokenizer"]
    image_processor_class = "HiresImageProcessor"
    tokenizer_class = "AutoTokenizer"

    def __init__(self, image_processor: HiresImageProcessor | None = None,
                 tokenizer: PreTrainedTokenizerBase | None = None, chat_template: str | None = None,
                 **kwargs: Any) -> None:  # noqa: ARG002 - keys of older processor_config files
        if image_processor is None or tokenizer is None:
            raise ProcessorInputError("HiresProcessor needs an image_processor and a tokenizer")
        if chat_template is None:
            chat_template = CHAT_TEMPLATES[reference_template_name(tokenizer)]
        # set directly: ProcessorMixin's checks of attribute classes against its own registries
        # differ between transformers releases
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.image_token = IMAGE_TOKEN
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @classmethod
    def from_model(cls, model: Any) -> HiresProcessor:
        """The processor of a :class:`~hires_lmm.model.HiresLMM` (its tokenizer, method, plan options)."""
        ip = HiresImageProcessor(model.config.method, model.config.plan_options,
                                 method_spec=getattr(model.config, "method_spec", None))
        return cls(ip, model.tokenizer)

    # --- inputs ---
    def __call__(self, text: str | Sequence[str] | None = None, images: Any = None, *,
                 return_tensors: str | None = "pt", padding: bool | str = True, padding_side: str | None = None,
                 fast_decode: bool | None = None, add_special_tokens: bool = True, **kwargs: Any) -> BatchFeature:
        if text is None:
            raise ProcessorInputError("HiresProcessor needs text (with one <image> per image)")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(t, str) for t in texts):
            raise ProcessorInputError("text: a string or a list of strings")
        counts = [t.count(IMAGE_TOKEN) for t in texts]
        samples = self._group(images, counts)
        for k in ("images_kwargs", "text_kwargs", "common_kwargs", "videos_kwargs", "audio_kwargs"):
            kwargs.pop(k, None)  # apply_chat_template passes these (empty) dicts on some releases
        kwargs.pop("return_mm_token_type_ids", None)
        enc = self.tokenizer(texts, padding=padding, return_tensors=return_tensors,
                             add_special_tokens=add_special_tokens,
                             **({"padding_side": padding_side} if padding_side else {}), **kwargs)
        data = dict(enc)
        prepared = [[self.image_processor.prepare(im, fast=fast_decode) for im in s] for s in samples]
        data.update(pack_images(prepared))
        return BatchFeature(data)

    @staticmethod
    def _group(images: Any, counts: list[int]) -> list[list[Any]]:
        total = sum(counts)
        if images is None:
            flat: list[Any] | None = []
        elif _is_image(images):
            flat = [images]
        else:
            images = list(images)
            flat = images if all(_is_image(x) for x in images) else None
        if flat is not None:
            if len(flat) != total:
                raise ProcessorInputError(f"the text holds {total} {IMAGE_TOKEN} placeholder(s) but {len(flat)} image(s) "
                                          "were given")
            out, k = [], 0
            for c in counts:
                out.append(flat[k:k + c])
                k += c
            return out
        nested = _per_sample(images)
        if len(nested) != len(counts):
            raise ProcessorInputError(f"{len(counts)} texts but {len(nested)} image lists")
        for i, (c, s) in enumerate(zip(counts, nested)):
            if c != len(s):
                raise ProcessorInputError(f"text {i} holds {c} {IMAGE_TOKEN} placeholder(s) but has {len(s)} image(s)")
        return nested

    def num_visual_tokens(self, images: Sequence[Any]) -> list[int]:
        """Visual tokens per image (PIL images or (width, height) sizes), before encoding."""
        sizes = [im.size if isinstance(im, Image.Image) else tuple(im) for im in images]
        return [self.image_processor.num_visual_tokens(s) for s in sizes]

    def _get_num_multimodal_tokens(self, image_sizes: Sequence[Sequence[int]] | None = None, **kwargs: Any):
        """transformers' hook (vLLM uses it): tokens and views per image of ``image_sizes`` (height, width)."""
        from transformers.processing_utils import MultiModalData

        data: dict[str, list[int]] = {}
        if image_sizes is not None:
            plans = [self.image_processor.plan((int(w), int(h))) for h, w in image_sizes]
            data = {"num_image_tokens": [int(p.num_visual_tokens) for p in plans],
                    "num_image_patches": [len(p.views) for p in plans]}
        return MultiModalData(**data)

    @property
    def model_input_names(self) -> list[str]:
        return list(dict.fromkeys(self.tokenizer.model_input_names + self.image_processor.model_input_names))

    def batch_decode(self, *args: Any, **kwargs: Any) -> list[str]:
        return self.tokenizer.batch_decode(*args, **kwargs)

    def decode(self, *args: Any, **kwargs: Any) -> str:
        return self.tokenizer.decode(*args, **kwargs)

    # --- files ---
    # the template is stored in processor_config.json under its own key: chat_template.jinja is the
    # tokenizer's own template (which the server's "tokenizer" format and older code read)
    def to_dict(self) -> dict[str, Any]:
        return {"processor_class": type(self).__name__, "hires_chat_template": self.chat_template}

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, tokenizer: bool = True,
                        **kwargs: Any) -> list[str]:  # noqa: ARG002
        """Write ``preprocessor_config.json``, ``processor_config.json`` (with the chat template)
        and, unless ``tokenizer=False``, the tokenizer's files into ``save_directory``."""
        _no_more_positional("HiresProcessor.save_pretrained", args)
        p = Path(save_directory)
        p.mkdir(parents=True, exist_ok=True)
        files = self.image_processor.save_pretrained(p)
        (p / PROCESSOR_NAME).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        files.append(str(p / PROCESSOR_NAME))
        if tokenizer:
            files += list(self.tokenizer.save_pretrained(p))
        return files

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any) -> HiresProcessor:
        """From a directory written by :meth:`save_pretrained` or :meth:`HiresLMM.save_pretrained`
        (also one saved before the processor existed: method and plan options from config.json)."""
        _no_more_positional("HiresProcessor.from_pretrained", args)
        for k in _HUB_KWARGS:
            kwargs.pop(k, None)
        p = Path(pretrained_model_name_or_path)
        if not p.is_dir():
            raise ProcessorInputError(f"{p}: no such directory")
        image_processor = HiresImageProcessor.from_pretrained(p, **kwargs)
        try:
            tokenizer = AutoTokenizer.from_pretrained(p)
        except Exception as e:  # noqa: BLE001 - any failure here is a broken tokenizer file
            raise ProcessorInputError(f"{p}: cannot load the tokenizer ({type(e).__name__}: {one_line(e)})") from None
        template = kwargs.get("chat_template")
        if template is None and (p / PROCESSOR_NAME).is_file():
            template = _read_json(p / PROCESSOR_NAME).get("hires_chat_template")
        return cls(image_processor, tokenizer, chat_template=template)


__all__ = ["CHAT_TEMPLATES", "HiresImageProcessor", "HiresProcessor", "ImageInput", "ProcessorInputError",
           "MethodSpecLike", "method_spec_of", "pack_images", "plan_for", "prepare_image", "reference_template_name",
           "unpack_images"]


from . import auto as _auto  # noqa: E402 - registration deferred while this module was importing

_auto.retry()
