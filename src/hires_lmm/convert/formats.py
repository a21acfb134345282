"""Each checkpoint format's configuration → a :class:`~hires_lmm.config.HiresConfig`.

One function per family reads the fields its reference code reads (and nothing it ignores), chooses
the method and its variant the way the reference builds its modules, and records:

* ``notes``: facts the user should know (preprocessing that differs from the checkpoint's own
  processor, inferred configs, vocabulary padding, dropped buffers), never changing the result;
* ``problems``: settings this package cannot reproduce; the conversion is refused unless forced.

Reference fields read (see the repositories named in :mod:`hires_lmm.convert.layouts`):

* transformers LLaVA / LLaVA-NeXT: ``vision_config``, ``text_config``, ``vision_feature_layer``,
  ``vision_feature_select_strategy``, ``projector_hidden_act``, ``multimodal_projector_bias``,
  ``image_grid_pinpoints`` (NeXT; each pair read as (height, width)), ``image_token_index``.
* haotian-liu/LLaVA and its descendants: ``mm_vision_tower``, ``mm_hidden_size``,
  ``mm_projector_type``, ``mm_vision_select_layer``, ``mm_vision_select_feature``,
  ``mm_patch_merge_type``, ``image_aspect_ratio``, ``image_grid_pinpoints`` (pairs read as
  (width, height)), ``mm_use_im_start_end``, and the LLM's own fields (``model_type`` llava_llama,
  llava_mistral, ...).
* LLaVA-UHD v1: ``mm_projector_type == "adapt_spatial_resampler"`` (144 queries, 12×12 grid,
  ``num_heads = hidden_size // 128``).
* LLaVA-HR: ``is_multipath_encoder``, ``vision_tower_slow`` (ConvNeXt name; "xxlarge" → LN eps 1e-5),
  ``input_image_size`` (S), ``freeze_vision`` (the MR-adapters exist iff it is False).
* INF-LLaVA: ``SpatialEmbed(channel=1024)`` with 8 heads and ``channel // 16`` bottleneck,
  crops n = 3 — all hard-coded there (the bottleneck is read from the weights).
* SliME: ``mm_projector_type == "gated"`` (576-query expert, ``mm_hidden_size // 128`` heads),
  ``mm_learnable_gated`` (−1: the gated mixture), ``mm_resampler_type`` ("cosine" selector),
  ``mm_resampler_dim`` (local queries), ``mm_resampler_topp``, ``mm_resampler_temp``,
  ``mm_patch_merge_type`` ("spatial": raster order), ``seperator`` (the separator token id),
  ``use_local_only`` / ``use_global_only``. The selector variant is not in the config: the
  published checkpoints (June 2024) come with the code that applied ``softmax(score / 0.5)`` first,
  so ``selector_variant="released"`` is the default here (the preset's "spec" is the later code).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConversionError

if TYPE_CHECKING:
    import torch

__all__ = ["KNOWN_CLIP", "LLM_TYPES", "Target", "detect_format", "translate"]

#: OpenAI CLIP towers the LLaVA family loads by name (hidden sizes are checked against the weights).
KNOWN_CLIP: dict[str, dict[str, Any]] = {
    name: {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
           "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": side, "patch_size": 14,
           "projection_dim": 768, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    for name, side in (("openai/clip-vit-large-patch14-336", 336), ("openai/clip-vit-large-patch14", 224))
}

#: haotian-liu/LLaVA-style ``model_type`` → the LLM's transformers model type.
LLM_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral", "llava_mixtral": "mixtral",
             "llava_qwen": "qwen2", "llava_gemma": "gemma"}

#: config fields of the LLaVA family that are not the LLM's (dropped from the text config)
_LLAVA_FIELDS = {
    "architectures", "_name_or_path", "transformers_version", "torch_dtype", "dtype", "image_aspect_ratio",
    "image_grid_pinpoints", "image_crop_resolution", "image_split_resolution", "tune_mm_mlp_adapter",
    "freeze_mm_mlp_adapter", "tune_mm_vision_resampler", "unfreeze_mm_vision_tower", "use_mm_proj",
    "tokenizer_padding_side", "tokenizer_model_max_length", "freeze_vision", "input_image_size",
    "is_multipath_encoder", "vision_tower_slow", "vision_tower", "delay_load", "seperator", "use_local_only",
    "use_global_only", "s2", "s2_scales", "model_type",
}

FORMATS: tuple[str, ...] = ("hf-llava", "hf-llava-next", "llava", "llava-uhd", "llava-hr", "inf-llava", "slime")


@dataclass
class Target:
    """What a checkpoint becomes: the HiresConfig fields plus where external parts come from."""

    method: str
    plan_options: dict[str, Any]
    vision_config: dict[str, Any]
    select_layer: int
    connector: dict[str, Any]
    text_config: dict[str, Any]
    convnext_config: dict[str, Any] | None = None
    #: reference-name prefix of the CLIP tower's weights, and the hires prefix they map to
    vit_ref_prefix: str = ""
    vit_hires_prefix: str = ""
    #: a directory to take the CLIP weights from when the checkpoint has none
    vision_dir: Path | None = None
    #: the same for LLaVA-HR's ConvNeXt
    convnext_ref_prefix: str = ""
    convnext_hires_prefix: str = ""
    convnext_dir: Path | None = None
    notes: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- helpers


def _under(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _vision_from_dir(path: Path) -> dict[str, Any]:
    """The vision config of a local CLIP/SigLIP directory (full model or vision-only)."""
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise ConversionError(f"vision directory {path}: no config.json")
    cfg = AutoConfig.from_pretrained(str(path))
    if getattr(cfg, "model_type", None) in ("clip", "siglip"):
        cfg = cfg.vision_config
    if cfg.model_type not in ("clip_vision_model", "siglip_vision_model"):
        raise ConversionError(f"vision directory {path}: model_type {cfg.model_type!r} is not a CLIP/SigLIP vision tower")
    return cfg.to_dict()


def _vision_from_weights(clip: Mapping[str, torch.Tensor], name: str | None, notes: list[str]) -> dict[str, Any]:
    """A CLIP vision config read off its weights (names without the ``vision_model.`` level)."""
    try:
        patch = clip["embeddings.patch_embedding.weight"]
        pos = clip["embeddings.position_embedding.weight"]
        fc1 = clip["encoder.layers.0.mlp.fc1.weight"]
    except KeyError as e:
        raise ConversionError(f"cannot read the CLIP config off the checkpoint: no {e.args[0]!r}") from None
    hidden, p = int(patch.shape[0]), int(patch.shape[-1])
    grid = math.isqrt(int(pos.shape[0]) - 1)
    layers = 1 + max((int(m.group(1)) for k in clip if (m := re.match(r"encoder\.layers\.(\d+)\.", k))), default=-1)
    if layers == 0:
        raise ConversionError("cannot read the CLIP config off the checkpoint: no encoder layers")
    cfg = {"model_type": "clip_vision_model", "hidden_size": hidden, "intermediate_size": int(fc1.shape[0]),
           "num_hidden_layers": layers, "image_size": grid * p, "patch_size": p, "hidden_act": "quick_gelu",
           "layer_norm_eps": 1e-5}
    known = KNOWN_CLIP.get(name or "")
    if known and all(known[k] == cfg[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                  "image_size", "patch_size")):
        return dict(known)
    cfg["num_attention_heads"] = max(1, hidden // 64)
    notes.append(f"CLIP config read off the weights (hidden {hidden}, {layers} layers, {grid * p}px/{p}); "
                 f"attention heads assumed hidden/64 = {cfg['num_attention_heads']}, quick_gelu, LN eps 1e-5; "
                 "give --vision DIR to use the tower's own config")
    return cfg


def _resolve_vision(raw: Mapping[str, Any], state: Mapping[str, torch.Tensor], ref_prefix: str,
                    vision_dir: Path | None, t: Target) -> None:
    """Vision config (and external weights) for a LLaVA-family checkpoint.

    The config comes from ``--vision DIR``, else from ``mm_vision_tower`` when that is a local
    directory, else it is read off the checkpoint's CLIP weights (exactly :data:`KNOWN_CLIP`'s when
    ``mm_vision_tower`` names a known OpenAI tower of those shapes). The weights come from the
    checkpoint when it has them; released LLaVA checkpoints usually do not (the frozen tower is
    loaded from ``mm_vision_tower`` at run time), and then from that directory.
    """
    name = raw.get("mm_vision_tower") or raw.get("vision_tower")
    clip = _under(state, ref_prefix)
    clip = {k.removeprefix("vision_model."): v for k, v in clip.items()}
    local = vision_dir or (Path(name) if isinstance(name, str) and Path(name).is_dir() else None)
    if local is not None:
        t.vision_config = _vision_from_dir(local)
        if not clip:
            t.vision_dir = local
    elif clip:
        t.vision_config = _vision_from_weights(clip, name, t.notes)
    else:
        hint = f" (e.g. a local copy of {name})" if name else ""
        raise ConversionError(f"the checkpoint holds no vision-tower weights ({ref_prefix}*) and mm_vision_tower "
                              f"{name!r} is not a local directory: give --vision DIR{hint}")
    if "mm_hidden_size" in raw and int(raw["mm_hidden_size"]) != int(t.vision_config["hidden_size"]):
        t.problems.append(f"mm_hidden_size {raw['mm_hidden_size']} differs from the vision tower's hidden size "
                          f"{t.vision_config['hidden_size']}")


def _text_from_llava(raw: Mapping[str, Any], t: Target) -> None:
    from transformers import AutoConfig

    mt = raw.get("model_type", "llava_llama")
    llm_type = LLM_TYPES.get(mt)
    if llm_type is None:
        raise ConversionError(f"model_type {mt!r}: unsupported LLM (supported: {', '.join(sorted(LLM_TYPES))})")
    d = {k: v for k, v in raw.items() if k not in _LLAVA_FIELDS and not k.startswith("mm_")}
    t.text_config = AutoConfig.for_model(llm_type, **d).to_dict()


def _check_select(raw: Mapping[str, Any], t: Target) -> None:
    if "mm_vision_select_layer" not in raw:
        raise ConversionError("config has no mm_vision_select_layer (the reference's CLIPVisionTower requires it)")
    t.select_layer = int(raw["mm_vision_select_layer"])
    feat = raw.get("mm_vision_select_feature", "patch")
    if feat != "patch":
        t.problems.append(f"mm_vision_select_feature {feat!r}: only 'patch' (CLS dropped) is implemented")
    if raw.get("mm_use_im_start_end"):
        t.problems.append("mm_use_im_start_end: <im_start>/<im_end> tokens around the image are not implemented")


def _projector(kind: str, t: Target) -> str:
    if kind == "linear" or re.fullmatch(r"mlp\d+x_gelu", kind):
        return kind
    t.problems.append(f"mm_projector_type {kind!r} is not available for this method")
    return "mlp2x_gelu"


def _heads(width: int) -> int:
    """The references' ``width // 128`` heads (at least 1, for toy widths)."""
    return max(1, width // 128)


def _pad_note(raw: Mapping[str, Any], t: Target, want: str = "pad") -> None:
    got = raw.get("image_aspect_ratio")
    if got != want:
        t.notes.append(f"image_aspect_ratio is {got!r}; the {t.method} planner prepares images as "
                       f"{want!r} (the released recipe); pixel inputs differ from this checkpoint's loader")


# --------------------------------------------------------------------------- transformers formats


def _hf(fmt: str, raw: Mapping[str, Any], src: Path, t: Target) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(src))
    want = "llava" if fmt == "hf-llava" else "llava_next"
    if cfg.model_type != want:
        raise ConversionError(f"{src}: model_type {cfg.model_type!r}; --from {fmt} expects {want!r}")
    t.vision_config = cfg.vision_config.to_dict()
    t.text_config = cfg.text_config.to_dict()
    layer = cfg.vision_feature_layer
    if not isinstance(layer, int):
        t.problems.append(f"vision_feature_layer {layer!r}: several concatenated layers are not implemented")
        layer = -2
    t.select_layer = int(layer)
    strategy = cfg.vision_feature_select_strategy
    has_cls = t.vision_config.get("model_type") == "clip_vision_model"
    if (strategy == "default") != has_cls:
        t.problems.append(f"vision_feature_select_strategy {strategy!r} with a {t.vision_config.get('model_type')} "
                          "tower: only dropping CLIP's CLS token ('default') is implemented")
    act = cfg.projector_hidden_act
    if act != "gelu":
        t.problems.append(f"projector_hidden_act {act!r}: the mlp2x_gelu projector uses exact GELU ('gelu')")
    if not getattr(cfg, "multimodal_projector_bias", True):
        t.problems.append("multimodal_projector_bias is False: the mlp2x_gelu projector has biases")
    t.connector = {"projector": "mlp2x_gelu"}
    side, patch = int(t.vision_config["image_size"]), int(t.vision_config["patch_size"])
    t.plan_options = {} if (side, patch) == (336, 14) else {"side": side, "patch": patch}
    t.vit_ref_prefix = "vision_tower."
    if fmt == "hf-llava":
        t.method = "llava-1.5"
        t.notes.append("llava-1.5 pads the image to a square in the CLIP mean colour (the original LLaVA-1.5 "
                       "recipe); transformers' llava-1.5-hf processor resizes the shortest edge and "
                       "centre-crops instead: same model, different pixels")
    else:
        t.method = "llava-next"
        # transformers reads each pinpoint as (height, width); the planner takes (width, height)
        t.plan_options["pinpoints"] = [[int(w), int(h)] for h, w in cfg.image_grid_pinpoints]


# --------------------------------------------------------------------------- LLaVA family


def _llava(raw: Mapping[str, Any], state: Mapping[str, torch.Tensor], t: Target, vision_dir: Path | None) -> None:
    _check_select(raw, t)
    _text_from_llava(raw, t)
    t.vit_ref_prefix = "model.vision_tower.vision_tower."
    _resolve_vision(raw, state, t.vit_ref_prefix, vision_dir, t)
    t.connector = {"projector": _projector(raw.get("mm_projector_type", "linear"), t)}
    aspect, merge = raw.get("image_aspect_ratio"), raw.get("mm_patch_merge_type", "flat")
    if aspect == "anyres":
        t.method = "llava-next"
        if merge != "spatial_unpad":
            t.problems.append(f"mm_patch_merge_type {merge!r} with anyres: only 'spatial_unpad' is implemented")
        pins = raw.get("image_grid_pinpoints")
        if isinstance(pins, str):
            import ast

            pins = ast.literal_eval(pins)
        if not pins:
            raise ConversionError("image_aspect_ratio anyres without image_grid_pinpoints")
        # haotian-liu/LLaVA reads each pinpoint as (width, height), as the planner does
        t.plan_options = {"pinpoints": [[int(w), int(h)] for w, h in pins]}
        t.notes.append("LLaVA's own unpad truncates with int(); the llava-next model rounds as transformers "
                       "does (int(round(x, 7))): they differ only when float error puts a scaled side just "
                       "below an integer")
    else:
        t.method = "llava-1.5"
        if merge != "flat":
            t.problems.append(f"mm_patch_merge_type {merge!r} without anyres is not implemented")
        _pad_note(raw, t)


def _uhd(raw: Mapping[str, Any], state: Mapping[str, torch.Tensor], t: Target, vision_dir: Path | None,
         separators: Mapping[str, int | None]) -> None:
    _check_select(raw, t)
    _text_from_llava(raw, t)
    t.vit_ref_prefix = "model.vision_tower.vision_tower."
    _resolve_vision(raw, state, t.vit_ref_prefix, vision_dir, t)
    kind = raw.get("mm_projector_type")
    if kind != "adapt_spatial_resampler":
        t.problems.append(f"mm_projector_type {kind!r}: LLaVA-UHD v1 checkpoints use 'adapt_spatial_resampler'")
    t.method = "llava-uhd"
    q = state.get("model.mm_projector.query")
    grid = math.isqrt(int(q.shape[0])) if q is not None else 12
    if grid != 12:
        t.problems.append(f"{grid * grid} resampler queries; the reference builds 144 (12x12)")
    t.connector = {"resampler": "spatial", "grid": grid, "heads": _heads(int(raw["hidden_size"]))}
    # slice_process.py hard-codes the spatial schema's token ids (Llama/Vicuna vocabulary)
    ref = {",": 29892, "\n": 13}
    if any(separators.get(k) not in (None, v) for k, v in ref.items()):
        vocab = int(t.text_config.get("vocab_size", 0))
        if max(ref.values()) < vocab:
            t.connector["separator_ids"] = dict(ref)
            t.notes.append(f"LLaVA-UHD's slice_process.py hard-codes the separators ',' = 29892 and '\\n' = 13; "
                           f"this tokenizer's are {separators}: recorded as connector.separator_ids, which the "
                           "model must honour")
        else:
            t.notes.append(f"LLaVA-UHD's slice_process.py hard-codes the separators ',' = 29892 and '\\n' = 13, "
                           f"outside this {vocab}-token vocabulary; the tokenizer's own {separators} are used")


def _hr(raw: Mapping[str, Any], state: Mapping[str, torch.Tensor], t: Target, vision_dir: Path | None,
        convnext_dir: Path | None) -> None:
    from ..vision.convnext import ConvNeXtConfig

    _text_from_llava(raw, t)
    if not raw.get("is_multipath_encoder"):
        t.problems.append("is_multipath_encoder is not set: a single-path LLaVA-HR model is plain LLaVA (use --from llava)")
    layer = int(raw.get("mm_vision_select_layer", -2))
    if layer > 100:
        t.problems.append(f"mm_vision_select_layer {layer} (> 100: multi-stage ConvNeXt features) is not implemented")
    t.select_layer = layer if -24 <= layer < 0 else -2  # unused by the dual-path encoder (it runs every block)
    if raw.get("mm_use_im_start_end"):
        t.problems.append("mm_use_im_start_end: <im_start>/<im_end> tokens around the image are not implemented")
    t.vit_ref_prefix = "model.vision_tower.fast_vision_tower.vision_tower."
    _resolve_vision(raw, state, t.vit_ref_prefix, vision_dir, t)
    t.method = "llava-hr"
    S = raw.get("input_image_size")
    if S is None:
        S = 1024
        t.notes.append("input_image_size is not set; using S = 1024")
    t.plan_options = {"S": int(S)}
    adapters = not raw.get("freeze_vision", True)  # the reference: enable_adapter = not args.freeze_vision
    t.connector = {"projector": _projector(raw.get("mm_projector_type", "linear"), t), "gate": "scalar",
                   "adapters": adapters}
    slow_name = str(raw.get("vision_tower_slow") or "")
    t.convnext_ref_prefix = "model.vision_tower.slow_vision_tower.vision_tower."
    slow = _under(state, t.convnext_ref_prefix)
    if slow:
        try:
            stages = sorted({int(m.group(1)) for k in slow if (m := re.match(r"stages\.(\d+)\.", k))})
            depths = [1 + max(int(m.group(1)) for k in slow if (m := re.match(rf"stages\.{s}\.blocks\.(\d+)\.", k)))
                      for s in stages]
            dims = [int(slow[f"stages.{s}.blocks.0.conv_dw.weight"].shape[0]) for s in stages]
            dw = slow["stages.0.blocks.0.conv_dw.weight"]
            fc1 = slow["stages.0.blocks.0.mlp.fc1.weight"]
            stem = slow["stem.0.weight"]
        except (KeyError, ValueError) as e:
            raise ConversionError(f"cannot read the ConvNeXt config off the checkpoint ({e!r})") from None
        cfg = ConvNeXtConfig(depths=tuple(depths), dims=tuple(dims), in_chans=int(stem.shape[1]),
                             patch_size=int(stem.shape[-1]), kernel_size=int(dw.shape[-1]),
                             mlp_ratio=fc1.shape[0] / dims[0], norm_eps=1e-5 if "xxlarge" in slow_name else 1e-6)
        t.convnext_config = cfg.to_dict()
    elif convnext_dir is not None:
        from ..vision.convnext import ConvNeXt

        t.convnext_config = ConvNeXt.from_pretrained(convnext_dir).config.to_dict()
        t.convnext_dir = convnext_dir
    else:
        raise ConversionError(f"the checkpoint holds no ConvNeXt weights ({t.convnext_ref_prefix}*): give --convnext DIR")
    _pad_note(raw, t)


def _inf(raw: Mapping[str, Any], state: Mapping[str, torch.Tensor], t: Target, vision_dir: Path | None) -> None:
    _check_select(raw, t)
    _text_from_llava(raw, t)
    t.vit_ref_prefix = "model.vision_tower.vision_tower."
    _resolve_vision(raw, state, t.vit_ref_prefix, vision_dir, t)
    t.method = "inf-llava"
    d = int(t.vision_config["hidden_size"])
    if "model.spatial_embed.fuse_linear.weight" in state:  # not in the released code; the paper's variant
        t.connector = {"projector": _projector(raw.get("mm_projector_type", "linear"), t), "heads": 8,
                       "variant": "paper"}
    else:
        w = state.get("model.spatial_embed.ffn_crop.0.weight")
        bottleneck = int(w.shape[0]) if w is not None else d // 16  # SpatialEmbed: channel // 16
        t.connector = {"projector": _projector(raw.get("mm_projector_type", "linear"), t), "heads": 8,
                       "bottleneck": bottleneck, "variant": "code"}
    if d % 8:
        t.problems.append(f"vision width {d} is not divisible by the DEM's 8 heads")
    _pad_note(raw, t)
    t.notes.append("INF-LLaVA: the training loader's 1008 px canvas is used (path='train'); the evaluation "
                   "loader's 336 px canvas upsampled in the model is plan option path='eval'")


def _slime(raw: Mapping[str, Any], state: Mapping[str, torch.Tensor], t: Target, vision_dir: Path | None,
           separators: Mapping[str, int | None]) -> None:
    _check_select(raw, t)
    _text_from_llava(raw, t)
    t.vit_ref_prefix = "model.vision_tower.vision_tower."
    _resolve_vision(raw, state, t.vit_ref_prefix, vision_dir, t)
    t.method = "slime"
    if raw.get("mm_projector_type") != "gated":
        t.problems.append(f"mm_projector_type {raw.get('mm_projector_type')!r}: SliME's mixture of adapters is 'gated'")
    if int(raw.get("mm_learnable_gated", -1)) >= 0:
        t.problems.append(f"mm_learnable_gated {raw['mm_learnable_gated']}: a fixed expert (training stage 1) "
                          "cannot be recorded in the config yet; only the gated mixture (-1) converts")
    if raw.get("mm_resampler_type") != "cosine":
        t.problems.append(f"mm_resampler_type {raw.get('mm_resampler_type')!r}: only the 'cosine' text-guided "
                          "selector is implemented")
    if raw.get("mm_patch_merge_type", "flat") != "spatial":
        t.problems.append(f"mm_patch_merge_type {raw.get('mm_patch_merge_type', 'flat')!r}: SliME's local tokens are "
                          "implemented in raster order ('spatial')")
    if raw.get("image_aspect_ratio") != "anyres":
        t.problems.append(f"image_aspect_ratio {raw.get('image_aspect_ratio')!r}: SliME's global + local views are 'anyres'")
    if raw.get("use_local_only") or raw.get("use_global_only"):
        t.problems.append("use_local_only / use_global_only (training stages) cannot be recorded in the config")
    temp = float(raw.get("mm_resampler_temp", 1.0))
    if temp != 1.0:
        t.problems.append(f"mm_resampler_temp {temp}: the selector's temperature is fixed at 1.0 in this package")
    d = int(t.vision_config["hidden_size"])
    gq = state.get("model.mm_projector.attn.query")
    lq = state.get("model.sampler.post_qformer.query")
    local = int(raw.get("mm_resampler_dim", lq.shape[0] if lq is not None else 144))
    t.connector = {"projector": "mlp2x_gelu", "global_queries": int(gq.shape[0]) if gq is not None else 576,
                   "local_queries": local, "heads": _heads(d),
                   "selector_p": float(raw.get("mm_resampler_topp", 0.95)), "selector_variant": "released"}
    # The checkpoints were published with the code of 2024-06-02, whose TextGuidedSampler applies
    # softmax(score / 0.5) before the top-p softmax; the line was commented out on 2024-11-08.
    t.notes.append("SliME selector: 'released' (the 2024-06 code the checkpoints were published and evaluated "
                   "with: an extra softmax at temperature 0.5); --connector selector_variant=spec gives the "
                   "current code's selector")
    sep, tokenizer_sep = raw.get("seperator"), separators.get(",")
    if sep is not None and tokenizer_sep is not None and int(sep) != int(tokenizer_sep):
        t.connector["separator_ids"] = {",": int(sep)}
        t.notes.append(f"the checkpoint's separator is token {sep} (tokenizer(',')[-1]); hires-lmm's ',' separator "
                       f"is token {tokenizer_sep}: recorded as connector.separator_ids, which the model must honour")


# --------------------------------------------------------------------------- entry points


def detect_format(raw: Mapping[str, Any], state_names: set[str]) -> str:
    """The checkpoint format of a config (and its weight names)."""
    mt = raw.get("model_type")
    # "llava" is transformers' model type, and also LLaVA's (and LLaVA-HR's) own config class's
    if mt == "llava" and ("vision_config" in raw or "text_config" in raw):
        return "hf-llava"
    if mt == "llava_next":
        return "hf-llava-next"
    if raw.get("is_multipath_encoder"):
        return "llava-hr"
    kind = raw.get("mm_projector_type")
    if kind == "adapt_spatial_resampler":
        return "llava-uhd"
    if kind == "gated":
        return "slime"
    if any(n.startswith("model.spatial_embed.") for n in state_names):
        return "inf-llava"
    if "mm_vision_tower" in raw or "mm_hidden_size" in raw:
        return "llava"
    raise ConversionError("cannot tell the checkpoint format from its config; give --from FORMAT")


def translate(fmt: str, raw: Mapping[str, Any], state: Mapping[str, torch.Tensor], src: Path, *,
              vision_dir: Path | None = None, convnext_dir: Path | None = None,
              separators: Mapping[str, int | None] | None = None) -> Target:
    """The target config of a checkpoint of format ``fmt``; ``separators`` are the tokenizer's
    "," and "\\n" ids as hires-lmm finds them (:func:`hires_lmm.text.separator_id`)."""
    separators = dict(separators or {})
    t = Target(method="", plan_options={}, vision_config={}, select_layer=-2, connector={}, text_config={})
    if fmt in ("hf-llava", "hf-llava-next"):
        _hf(fmt, raw, src, t)
        t.vit_hires_prefix = "visual.vit."
        if vision_dir is not None:
            t.notes.append("--vision is ignored: transformers checkpoints carry their vision tower")
    elif fmt == "llava":
        _llava(raw, state, t, vision_dir)
    elif fmt == "llava-uhd":
        _uhd(raw, state, t, vision_dir, separators)
    elif fmt == "llava-hr":
        _hr(raw, state, t, vision_dir, convnext_dir)
    elif fmt == "inf-llava":
        _inf(raw, state, t, vision_dir)
    elif fmt == "slime":
        _slime(raw, state, t, vision_dir, separators)
    else:
        raise ConversionError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if not t.vit_hires_prefix:
        t.vit_hires_prefix = "visual.vision_tower.fast_vision_tower." if t.method == "llava-hr" else "visual.vit."
    if fmt not in ("llava-hr",) and convnext_dir is not None:
        t.notes.append("--convnext is ignored: only LLaVA-HR has a ConvNeXt")
    # the storage dtype belongs to the saved weights, not to the architecture: a dtype in a
    # sub-config would make from_config build that part alone in half precision
    for sub in (t.text_config, t.vision_config):
        sub.pop("dtype", None)
        sub.pop("torch_dtype", None)
    return t
