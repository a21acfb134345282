"""``hires export``: a hires-lmm llava-1.5 / llava-next directory → a transformers LLaVA directory.

The output loads with transformers' own ``LlavaForConditionalGeneration`` /
``LlavaNextForConditionalGeneration`` and ``AutoProcessor`` (so vLLM and SGLang serve it), and
gives hires-lmm's logits on the same pixels (``tests/test_export.py``: < 1e-4).

What is written (one temporary directory, moved into place only when complete):

* ``config.json``: ``LlavaConfig`` / ``LlavaNextConfig`` with the LLM's config as ``text_config``
  (its bos/eos/pad ids and vocabulary size taken from the tokenizer and the weights), the tower's
  as ``vision_config``, ``vision_feature_layer`` = the model's ``select_layer``,
  ``vision_feature_select_strategy`` "default" (CLIP: CLS dropped) or "full" (SigLIP),
  ``image_token_id`` = ``<image>``'s id, and for LLaVA-NeXT ``image_grid_pinpoints`` as (height,
  width) pairs in the planner's order (the order decides ties);
* the weights, saved by transformers itself (``save_pretrained``), under the names obtained by
  inverting the ``hf-llava`` / ``hf-llava-next`` layouts of :mod:`~hires_lmm.convert.layouts`;
* the tokenizer, ``processor_config.json`` / ``preprocessor_config.json`` (``LlavaProcessor`` with
  ``LlavaImageProcessor(do_pad=True)``: LLaVA-1.5's pad-to-square in the CLIP mean colour;
  ``LlavaNextProcessor`` with ``LlavaNextImageProcessor``), the chat template (made to accept the
  processors' ``[{"type": "image"}, {"type": "text", ...}]`` messages too) and
  ``generation_config.json``.

Pixels: the PIL backend of both image processors (transformers' choice when torchvision is not
installed, or ``AutoProcessor.from_pretrained(dir, backend="pil")``) gives hires-lmm's pixels
(< 1e-5); the torchvision backend (transformers' default when torchvision is installed) resizes
with torch and differs by a few grey levels. See docs/export.md.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from ..errors import one_line
from .export_targets import EXPORT_TARGETS, ExportError, check_exportable
from .layouts import Layout, layout_for

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = ["EXPORT_TARGETS", "ExportError", "ExportReport", "chat_template_for_processor", "export_checkpoint",
           "hf_config", "hf_state_dict", "verify_export"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LIST_LIMIT = 12

#: Prepended to the model's chat template: messages whose content is a list of typed parts (as
#: transformers' processors and OpenAI-style servers send them) become LLaVA's text, each image
#: as ``<image>\n`` first, then the text parts joined by a space; string contents pass unchanged,
#: so the model's own template then renders exactly the text it was trained on. One line, no
#: output: nothing is added to the rendered prompt.
_NORMALISE = (
    "{%- set _hx = namespace(msgs=[]) -%}"
    "{%- for _m in messages -%}"
    "{%- if _m['content'] is string or _m['content'] is none -%}{%- set _hx.msgs = _hx.msgs + [_m] -%}"
    "{%- else -%}{%- set _hx_s = namespace(img='', txt=[]) -%}"
    "{%- for _c in _m['content'] -%}"
    "{%- if _c['type'] == 'image' -%}{%- set _hx_s.img = _hx_s.img + '<image>\\n' -%}"
    "{%- elif _c['type'] == 'text' -%}{%- set _hx_s.txt = _hx_s.txt + [_c['text']] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set _hx.msgs = _hx.msgs + [dict(_m, content=_hx_s.img + _hx_s.txt | join(' '))] -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- set messages = _hx.msgs -%}"
)


@dataclass
class ExportReport:
    """What an export wrote (also ``export.json`` beside the model)."""

    to: str
    method: str
    architecture: str
    src: str
    dst: str
    tensors: int
    dtype: str
    image_token_id: int
    pinpoints: list[list[int]] | None = None
    verify: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def chat_template_for_processor(template: str | None) -> str | None:
    """The model's chat template, made to accept typed content lists too (see ``_NORMALISE``)."""
    if not template:
        return None
    if template.startswith(_NORMALISE):  # exported before: normalise once
        return template
    return _NORMALISE + template


def _read_raw(src: Path) -> dict[str, Any]:
    cfg = src / "config.json"
    if not cfg.is_file():
        raise ExportError(f"{src}: no config.json; not a hires-lmm model directory")
    try:
        raw = json.loads(cfg.read_bytes().decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{cfg}: not a JSON config ({one_line(e)})") from None
    if not isinstance(raw, dict) or raw.get("model_type") != "hires_lmm":
        got = raw.get("model_type") if isinstance(raw, dict) else type(raw).__name__
        raise ExportError(f"{cfg}: model_type {got!r} is not 'hires_lmm'; export takes a hires-lmm model directory")
    return raw


def _geometry(raw: dict[str, Any]) -> tuple[int, int, bool]:
    """(side, patch, has_cls) after refusing what transformers' LLaVA classes cannot express."""
    vision = raw.get("vision_config") or {}
    vtype = vision.get("model_type", "clip_vision_model")
    if vtype not in ("clip_vision_model", "siglip_vision_model"):
        raise ExportError(f"vision tower {vtype!r}: transformers' LLaVA export supports CLIP and SigLIP towers")
    opts = dict(raw.get("plan_options") or {})
    side, patch = int(opts.pop("side", 336)), int(opts.pop("patch", 14))
    opts.pop("pinpoints", None)
    if opts:
        raise ExportError(f"plan options {sorted(opts)} have no transformers equivalent")
    from transformers import AutoConfig

    # the tower's geometry as transformers reads it (its class defaults for fields not stored)
    tower = AutoConfig.for_model(vtype, **{k: v for k, v in vision.items() if k != "model_type"})
    v_side, v_patch = int(tower.image_size), int(tower.patch_size)
    if (side, patch) != (v_side, v_patch):
        raise ExportError(f"the plan renders {side}px views with {patch}px patches but the tower is {v_side}px/{v_patch}: "
                          "hires-lmm interpolates position embeddings, transformers' LLaVA does not")
    connector = dict(raw.get("connector") or {})
    proj = connector.pop("projector", "mlp2x_gelu")
    if proj != "mlp2x_gelu":
        raise ExportError(f"projector {proj!r}: transformers' LlavaMultiModalProjector is mlp2x_gelu "
                          "(linear_1, GELU, linear_2) only")
    if connector:
        raise ExportError(f"connector options {sorted(connector)} have no transformers equivalent")
    select = raw.get("select_layer", -2)
    if not isinstance(select, int):
        raise ExportError(f"select_layer {select!r}: expected one layer index")
    return side, patch, vtype == "clip_vision_model"


def _pinpoints(raw: dict[str, Any]) -> list[list[int]]:
    """The planner's (w, h) pinpoints, in its order, as transformers' (h, w) pairs."""
    from ..plan import NEXT_PINPOINTS

    pins = (raw.get("plan_options") or {}).get("pinpoints") or NEXT_PINPOINTS
    return [[int(h), int(w)] for w, h in pins]


def hf_config(raw: dict[str, Any], to: str, tokenizer: PreTrainedTokenizerBase, vocab_size: int,
              dtype: torch.dtype) -> Any:
    """The ``LlavaConfig`` / ``LlavaNextConfig`` of a hires-lmm config (a dict of config.json)."""
    from transformers import LlavaConfig, LlavaNextConfig

    from ..text import IMAGE_TOKEN

    check_exportable(raw.get("method", "?"), to)
    side, patch, has_cls = _geometry(raw)
    vision = {k: v for k, v in raw["vision_config"].items() if k not in ("dtype", "torch_dtype")}
    text = {k: v for k, v in raw["text_config"].items() if k not in ("dtype", "torch_dtype")}
    if "model_type" not in text:
        raise ExportError("text_config has no model_type")
    text["vocab_size"] = int(vocab_size)  # the weights' rows (the tokenizer may have grown them)
    # the LLM config's own ids would otherwise be the model class's defaults (Llama: 1, 2), not
    # this tokenizer's, and generate() would stop at the wrong token
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        tid = getattr(tokenizer, name, None)
        if tid is not None:
            text[name] = int(tid)
    # transformers types the result as int | list[int]; for one token (a str) it is an int or None
    image_id = cast("int | None", tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    if image_id is None or image_id == tokenizer.unk_token_id:
        raise ExportError(f"the tokenizer has no {IMAGE_TOKEN} token")
    common: dict[str, Any] = dict(
        vision_config=vision, text_config=text, image_token_id=int(image_id), projector_hidden_act="gelu",
        vision_feature_select_strategy="default" if has_cls else "full",
        vision_feature_layer=int(raw.get("select_layer", -2)), multimodal_projector_bias=True,
        image_seq_length=(side // patch) ** 2, tie_word_embeddings=bool(text.get("tie_word_embeddings", False)))
    cfg: LlavaConfig | LlavaNextConfig
    try:
        if to == "hf-llava":
            cfg = LlavaConfig(**common)
        else:
            cfg = LlavaNextConfig(**common, image_grid_pinpoints=_pinpoints(raw))
    except (TypeError, ValueError, KeyError) as e:
        raise ExportError(f"transformers refuses the LLaVA config: {one_line(e)}") from None
    cfg.dtype = dtype
    cfg.architectures = [EXPORT_TARGETS[to][1]]
    return cfg


def _spellings(layout: Layout, name: str) -> list[str]:
    """Every reference spelling of hires name ``name`` under ``layout`` (its prefix table inverted:
    the longest matching hires prefix, each reference prefix that maps to it)."""
    import re

    for rx, rep in layout.unrenames:
        name = re.sub(rx, rep, name)
    best = max((our for _ref, our in layout.prefixes if name.startswith(our)), key=len, default=None)
    if best is None:
        return []
    return [ref + name[len(best):] for ref, our in layout.prefixes if our == best]


def hf_state_dict(state: dict[str, torch.Tensor], to: str, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """hires-lmm weights under the names of a transformers model whose state dict is ``expected``.

    Each hires name is translated with the inverted ``hf-llava(-next)`` layout (the import's own
    table) and the spelling the model has is taken; a weight with no place, a model weight left
    without one, or a shape that differs is refused by name.
    """
    layout = layout_for(to)
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for name, t in state.items():
        hit = [s for s in _spellings(layout, name) if s in expected]
        if len(hit) != 1:
            unmapped.append(name)
            continue
        out[hit[0]] = t
    missing = sorted(set(expected) - set(out))
    shapes = sorted(f"{k}: {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in out.items()
                    if tuple(v.shape) != tuple(expected[k].shape))
    problems = []
    for what, items in (("weights with no place in transformers' model", unmapped),
                        ("weights of transformers' model with no hires-lmm weight", missing),
                        ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else ""
            problems.append(f"{what} ({len(items)}): {', '.join(sorted(items)[:_LIST_LIMIT])}{more}")
    if problems:
        raise ExportError(f"the weights do not fit {EXPORT_TARGETS[to][1]}: " + "; ".join(problems))
    return out


def _disk_state_dict(state: dict[str, torch.Tensor], to: str, dtype: torch.dtype, *,
                     tied: bool) -> dict[str, torch.Tensor]:
    """The weights under the names of transformers' LLaVA checkpoints on the Hub (llava-hf:
    ``vision_tower.vision_model.*``, ``multi_modal_projector.*``, ``language_model.model.*``,
    ``language_model.lm_head.weight``, ``image_newline``): the canonical spelling of the
    layout's inverse. transformers 5 loads them as it loads its own (flatter) names, and
    transformers 4, vLLM and SGLang expect exactly these. A tied LM head is left to the tying."""
    layout = layout_for(to)
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        ref = layout.to_reference(name)
        if ref is None:  # hf_state_dict has refused such a weight already
            raise ExportError(f"no transformers name for {name}")
        if tied and ref == "language_model.lm_head.weight":
            continue
        out[ref] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    return out


def _save_weights(state: dict[str, torch.Tensor], root: Path, max_shard_size: str | int) -> None:
    """``model.safetensors``, or shards with ``model.safetensors.index.json`` past ``max_shard_size``."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    split = split_torch_state_dict_into_shards(state, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    for fname, names in split.filename_to_tensors.items():
        save_file({n: state[n] for n in names}, root / fname, metadata={"format": "pt"})
    if split.is_sharded:
        (root / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": split.metadata, "weight_map": split.tensor_to_filename}, indent=2), encoding="utf-8")


def _image_processor(to: str, side: int, pinpoints: list[list[int]] | None) -> Any:
    """The PIL image processor giving hires-lmm's pixels (its config is backend-independent)."""
    from transformers.image_utils import PILImageResampling

    from ..image.render import CLIP_MEAN, CLIP_STD

    kw: dict[str, Any] = dict(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                              image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
                              resample=PILImageResampling.BICUBIC, do_center_crop=True, do_rescale=True,
                              do_normalize=True, do_convert_rgb=True)
    if to == "hf-llava":
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        # do_pad: LLaVA-1.5's expand2square in the mean colour (int(m * 255), as LLaVA computes
        # it); the square's resize to the shortest edge makes the centre crop a no-op
        return LlavaImageProcessorPil(do_pad=True, **kw)
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    assert pinpoints is not None  # export passes _pinpoints(raw) for hf-llava-next
    return LlavaNextImageProcessorPil(do_pad=True, image_grid_pinpoints=pinpoints, **kw)


def _processor(to: str, tokenizer: PreTrainedTokenizerBase, side: int, patch: int, has_cls: bool,
               pinpoints: list[list[int]] | None, template: str | None) -> Any:
    from transformers import LlavaNextProcessor, LlavaProcessor

    from ..text import IMAGE_TOKEN

    cls = LlavaProcessor if to == "hf-llava" else LlavaNextProcessor
    return cls(image_processor=_image_processor(to, side, pinpoints), tokenizer=tokenizer, patch_size=patch,
               vision_feature_select_strategy="default" if has_cls else "full", image_token=IMAGE_TOKEN,
               num_additional_image_tokens=1 if has_cls else 0, chat_template=template)


def _generation_config(src: Path, tokenizer: PreTrainedTokenizerBase) -> Any:
    """SRC's generation_config.json when it has one (a converted checkpoint's), with the
    tokenizer's bos/eos/pad ids where it names none."""
    from transformers import GenerationConfig

    gen = GenerationConfig.from_pretrained(str(src)) if (src / "generation_config.json").is_file() else GenerationConfig()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if getattr(gen, name, None) is None and getattr(tokenizer, name, None) is not None:
            setattr(gen, name, int(getattr(tokenizer, name)))
    return gen


def _fix_permissions(root: Path) -> None:
    """mkdtemp makes a 0700 directory and safetensors writes 0600 files: give them what a plain
    mkdir / open would (0777 / 0666 less the umask), so a server's user can read the export."""
    umask = os.umask(0o22)
    os.umask(umask)
    for dirpath, dirnames, filenames in os.walk(root):
        for f in filenames:
            p = Path(dirpath) / f
            if not p.is_symlink():
                os.chmod(p, 0o666 & ~umask)
        for d in dirnames:
            os.chmod(Path(dirpath) / d, 0o777 & ~umask)
    os.chmod(root, 0o777 & ~umask)


def _move_into_place(tmp: Path, dst: Path) -> None:
    """``tmp`` becomes ``dst`` by renames only: an existing ``dst`` is moved aside first and
    removed once the new one is in place (restored if that fails), so ``dst`` is at every moment
    either the old directory or the complete new one, never a mixture."""
    if not dst.exists() or (dst.is_dir() and not any(dst.iterdir())):
        os.replace(tmp, dst)  # rename(2) also replaces an empty directory
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old.", dir=dst.parent))
    os.rmdir(old)
    os.replace(dst, old)
    try:
        os.replace(tmp, dst)
    except BaseException:
        os.replace(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def export_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, to: str, dtype: str = "auto",
                      overwrite: bool = False, max_shard_size: str | int = "5GB",
                      verify: bool = False) -> ExportReport:
    """Export the hires-lmm model directory ``src`` to a transformers LLaVA directory ``dst``.

    Args:
        src: a :meth:`HiresLMM.from_pretrained` directory of a llava-1.5 or llava-next model.
        dst: the output directory; refused when it holds files, unless ``overwrite`` (then
            replaced as a whole, atomically).
        to: "hf-llava" (llava-1.5 → ``LlavaForConditionalGeneration``) or "hf-llava-next"
            (llava-next → ``LlavaNextForConditionalGeneration``).
        dtype: "auto" (the model's) or float32 / bfloat16 / float16.
        max_shard_size: passed to transformers' ``save_pretrained``.
        verify: before moving the export into place, load it with transformers' class and
            ``AutoProcessor`` and compare logits with hires-lmm's on test images (float32, same
            pixels); refused when they differ by 1e-4 or more (see :func:`verify_export`).

    Raises:
        ExportError: the method or a setting of the model has no transformers equivalent, the
            weights do not fit, ``dst`` is not empty, or the check fails (one line each).
    """
    from transformers import AutoTokenizer, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from ..model import HiresLMM

    src, dst = Path(src), Path(dst)
    if to not in EXPORT_TARGETS:
        raise ExportError(f"unknown export format {to!r}; choose from {', '.join(EXPORT_TARGETS)}")
    if not src.is_dir():
        raise ExportError(f"{src}: no such model directory")
    if dtype != "auto" and dtype not in _DTYPES:
        raise ExportError(f"unknown dtype {dtype!r}; choose auto, {', '.join(_DTYPES)}")
    if dst.exists() and not dst.is_dir():
        raise ExportError(f"{dst} exists and is not a directory")
    if dst.exists() and any(dst.iterdir()) and not overwrite:
        raise ExportError(f"{dst} exists and is not empty (--overwrite replaces it)")
    if dst.resolve() == src.resolve():
        raise ExportError(f"{dst}: the output directory must not be the model directory")
    raw = _read_raw(src)
    method = str(raw.get("method"))
    check_exportable(method, to)  # before loading any weight: refusals are instant
    side, patch, has_cls = _geometry(raw)
    model = HiresLMM.from_pretrained(src)
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    target = _DTYPES[dtype] if dtype != "auto" else next(v.dtype for v in state.values() if v.is_floating_point())
    # nn.Module.__getattr__ types the embedding's parameter as Tensor | Module
    vocab = int(cast(torch.Tensor, model.llm.get_input_embeddings().weight).shape[0])
    config = hf_config(raw, to, tokenizer, vocab, target)
    pins = _pinpoints(raw) if to == "hf-llava-next" else None
    cls = LlavaForConditionalGeneration if to == "hf-llava" else LlavaNextForConditionalGeneration
    with torch.device("meta"):  # shapes and names only: no second copy of the weights
        hf = cls(config)
    hf_state_dict(state, to, hf.state_dict())  # every weight has its place in transformers' model
    del hf
    files = _disk_state_dict(state, to, target, tied=bool(config.tie_word_embeddings))
    gen = _generation_config(src, tokenizer)
    notes = []
    template = chat_template_for_processor(getattr(tokenizer, "chat_template", None))
    if template is None:
        notes.append("the model's tokenizer has no chat template: none is exported (the processor then needs "
                     "a prompt in the model's own format)")
    else:
        tokenizer.chat_template = template
    processor = _processor(to, tokenizer, side, patch, has_cls, pins, template)
    if not has_cls:
        notes.append("SigLIP tower: vision_feature_select_strategy 'full' (no CLS token to drop)")
    notes.append("pixels: the image processor's PIL backend gives hires-lmm's pixels; transformers' torchvision "
                 "backend (its default when torchvision is installed) resizes with torch: a few grey levels apart")

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        try:
            config.save_pretrained(tmp)
            gen.save_pretrained(tmp)
            _save_weights(files, tmp, max_shard_size)
            processor.save_pretrained(tmp)
            # also the image processor's own file: what transformers 4.x and servers' loaders read
            processor.image_processor.save_pretrained(tmp)
        except OSError as e:  # a full disk, an unwritable place
            raise ExportError(f"cannot write {dst}: {one_line(e)}") from None
        report = ExportReport(to=to, method=method, architecture=EXPORT_TARGETS[to][1], src=str(src), dst=str(dst),
                              tensors=len(files), dtype=str(target).replace("torch.", ""),
                              image_token_id=int(config.image_token_id), pinpoints=pins, notes=notes)
        if verify:
            report.verify = verify_export(model, tmp, to)
            if report.verify["max_logit_diff"] >= 1e-4:
                raise ExportError(f"the exported model's logits differ from hires-lmm's by "
                                  f"{report.verify['max_logit_diff']:.3g} (>= 1e-4); not written")
        (tmp / "export.json").write_text(json.dumps(report.to_json(), indent=2), encoding="utf-8")
        _fix_permissions(tmp)
        _move_into_place(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


#: verify_export's default test images (w, h): a square, landscape and portrait, and for
#: LLaVA-NeXT sizes whose pinpoint choice ties (small) or needs unpadding of rows or columns
VERIFY_SIZES: tuple[tuple[int, int], ...] = ((336, 336), (500, 375), (300, 900), (200, 150), (1000, 300))


def verify_export(model: Any, path: str | os.PathLike, to: str,
                  sizes: tuple[tuple[int, int], ...] = VERIFY_SIZES) -> dict[str, Any]:
    """Load ``path`` with transformers' class and ``AutoProcessor`` (PIL backend) and compare its
    float32 logits with ``model``'s (a :class:`HiresLMM`) on one prompt per test image size.

    Both models get the processor's pixels; the processor's pixels are compared with hires-lmm's
    rendering separately, and its expanded ``<image>`` count with the plan's visual tokens.

    A ``model`` in another dtype is cast to float32 in place (the comparison is in float32).

    Returns ``{"max_logit_diff", "max_pixel_diff", "sizes"}``.
    """
    import numpy as np
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration, LlavaNextForConditionalGeneration

    from ..model import ImageInput

    cls = LlavaForConditionalGeneration if to == "hf-llava" else LlavaNextForConditionalGeneration
    hf = cls.from_pretrained(str(path), dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(str(path), backend="pil")
    ours = model.float().eval() if model.dtype != torch.float32 else model.eval()
    rng = np.random.default_rng(0)
    prompt = "USER: <image>\nWhat is in the picture? ASSISTANT:"
    max_logit = max_pixel = 0.0
    for w, h in sizes:
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
        enc = proc(text=prompt, images=img, return_tensors="pt")
        px = enc["pixel_values"].float()
        views = list(px[0]) if px.ndim == 5 else [px[0]]
        plan = ours.plan(img.size)
        views = views[:len(plan.views)]
        mine = ours.prepare_image(img).views
        max_pixel = max(max_pixel, float((torch.stack(views) - torch.stack(mine)).abs().max()))
        n_image = int((enc["input_ids"] == hf.config.image_token_id).sum())
        if n_image != plan.num_visual_tokens:
            raise ExportError(f"the exported processor expands <image> to {n_image} tokens for a {w}x{h} image; "
                              f"hires-lmm's plan has {plan.num_visual_tokens}")
        ids = torch.tensor(ours.tokenizer(prompt).input_ids, dtype=torch.long)
        kw = {"image_sizes": enc["image_sizes"]} if "image_sizes" in enc else {}
        with torch.no_grad():
            a = ours([ids], [[ImageInput(plan, views)]]).logits.float()
            b = hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=px, **kw).logits
        if a.shape != b.shape:
            raise ExportError(f"logits of shape {tuple(b.shape)} from the export, {tuple(a.shape)} from hires-lmm")
        max_logit = max(max_logit, float((a - b).abs().max()))
    return {"max_logit_diff": max_logit, "max_pixel_diff": max_pixel, "sizes": [list(s) for s in sizes]}
