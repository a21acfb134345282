"""State-dict name layouts: each reference checkpoint's parameter names ↔ this package's names.

A :class:`Layout` is a table of prefix pairs ``(reference prefix, hires prefix)`` (longest match
wins in both directions; several reference spellings may share one hires prefix, the first is the
canonical one written by :meth:`Layout.to_reference`), a few whole-name renames, and the reference
names that carry nothing the reference's forward uses (buffers and unused heads), which are
dropped and reported.

The CLIP tower: the references (transformers 4.x) nest it as ``...vision_tower.vision_model.X``;
transformers 5's ``CLIPVisionModel`` has no ``vision_model`` level, so ``X`` lands directly under
our ``vision_tower.`` (``nested=True`` keeps the level for a transformers that still has it).

Reference names, read from each repository's model code:

* haotian-liu/LLaVA (``llava_arch.py``, ``clip_encoder.py``, ``multimodal_projector/builder.py``):
  ``model.vision_tower.vision_tower.vision_model.*`` (``CLIPVisionTower.vision_tower`` is a
  ``CLIPVisionModel``), ``model.mm_projector.{0,2}.*`` (``nn.Sequential`` of Linear, GELU, Linear),
  ``model.image_newline`` (when ``'unpad' in mm_patch_merge_type``), the LLM ``model.*`` and
  ``lm_head.weight`` (``LlavaLlamaForCausalLM`` is a ``LlamaForCausalLM``).
* LLaVA-UHD v1 (``adapt_spatial_resampler.py``): ``model.mm_projector.{query, pos_embed, kv_proj.weight,
  attn.in_proj_weight, attn.in_proj_bias, attn.out_proj.*, ln_q.*, ln_kv.*, ln_post.*, proj}``;
  the CLIP tower is ``AdaptCLIPVisionModel`` (a ``CLIPVisionModel`` subclass, same names).
* LLaVA-HR (``multipath_encoder_wapper.py``, ``convnext_encoder.py``, ``convnext.py``):
  ``model.vision_tower.fast_vision_tower.vision_tower.vision_model.*`` (CLIP),
  ``model.vision_tower.slow_vision_tower.vision_tower.{stem,stages}.*`` (timm ConvNeXt; the block's
  layer scale is named ``weight``; ``head.*``/``norm_pre.*`` exist but the forward never uses them),
  ``model.vision_tower.align_stages_latent.{0,1,2}.{slow_conv,slow_proj,fast_conv,fast_proj,gate.{0,2}}.*``
  and ``model.vision_tower.align_stages.0.{fast_proj,slow_proj}.*``.
* INF-LLaVA (``llava_arch.py``: ``LlavaMetaModel.spatial_embed = SpatialEmbed``):
  ``model.spatial_embed.{attention.linears.{0..3}, attention.ln, ffn_crop.{0,2}, ffn_stride.{0,2}, ln_fuse}.*``.
* SliME (``multimodal_projector/builder.py: GatedBlock``, ``multimodal_resampler/builder.py:
  TextGuidedSampler``): ``model.mm_projector.{projection.{0,2}, attn.{query,pos_embed,attn.*,ln_q,ln_kv,ln_post},
  w_gate, w_noise}`` plus the unused buffers ``mean``/``std``; ``model.sampler.post_qformer.*`` (the
  144-query compressor; the cosine selector has no parameters).
* transformers ``LlavaForConditionalGeneration`` / ``LlavaNextForConditionalGeneration``: the
  checkpoint layout (``vision_tower.vision_model.*`` or, as transformers 5 saves it,
  ``vision_tower.*``; ``multi_modal_projector.linear_{1,2}.*``; ``language_model.model.*``;
  ``language_model.lm_head.weight``; ``image_newline``) and the in-memory one (``model.vision_tower.*``,
  ``model.multi_modal_projector.*``, ``model.language_model.*``, ``lm_head.weight``, ``model.image_newline``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

__all__ = ["BUFFERS", "Layout", "layout_for"]

#: Reference names that are buffers, not weights: CLIP's ``position_ids`` (persistent in old
#: transformers) and Llama's rotary ``inv_freq`` (persistent in transformers 4.28–4.30).
BUFFERS: tuple[str, ...] = (r".*\.embeddings\.position_ids", r".*\.rotary_emb\.inv_freq")


@dataclass(frozen=True)
class Layout:
    """Reference ↔ hires names for one checkpoint format."""

    name: str
    prefixes: tuple[tuple[str, str], ...]
    #: (hires regex, replacement) applied after the prefix mapping on import, and the inverse pairs
    #: applied before it on export
    renames: tuple[tuple[str, str], ...] = ()
    unrenames: tuple[tuple[str, str], ...] = ()
    #: regexes (full match) of reference names dropped on import: (regex, why)
    drop: tuple[tuple[str, str], ...] = field(default=())

    def dropped(self, ref: str) -> str | None:
        """Why ``ref`` is dropped, or None if it is a weight to map."""
        for rx in BUFFERS:
            if re.fullmatch(rx, ref):
                return "buffer"
        for rx, why in self.drop:
            if re.fullmatch(rx, ref):
                return why
        return None

    def to_hires(self, ref: str) -> str | None:
        """The hires name of reference name ``ref``; None when no prefix matches."""
        best = max((p for p in self.prefixes if ref.startswith(p[0])), key=lambda p: len(p[0]), default=None)
        if best is None:
            return None
        name = best[1] + ref[len(best[0]):]
        for rx, rep in self.renames:
            name = re.sub(rx, rep, name)
        return name

    def to_reference(self, hires: str) -> str | None:
        """The canonical reference name of hires name ``hires`` (the first spelling listed)."""
        for rx, rep in self.unrenames:
            hires = re.sub(rx, rep, hires)
        best = None
        for ref_p, our_p in self.prefixes:  # longest hires prefix; the first of equal ones
            if hires.startswith(our_p) and (best is None or len(our_p) > len(best[1])):
                best = (ref_p, our_p)
        return None if best is None else best[0] + hires[len(best[1]):]

    def export(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A hires state dict under the reference's names (for tests and round trips)."""
        out = {}
        for k, v in state.items():
            ref = self.to_reference(k)
            if ref is None:
                raise KeyError(f"{self.name}: no reference name for {k!r}")
            out[ref] = v
        return out


def _clip(prefix: str, nested: bool) -> str:
    return prefix + ("vision_model." if nested else "")


def layout_for(fmt: str, *, nested: bool = False) -> Layout:
    """The layout of checkpoint format ``fmt`` (see :data:`hires_lmm.convert.FORMATS`)."""
    vit = _clip("visual.vit.vision_tower.", nested)
    if fmt in ("hf-llava", "hf-llava-next"):
        pairs: list[tuple[str, str]] = []
        for root in ("vision_tower.", "model.vision_tower."):
            pairs += [(root + "vision_model.", vit), (root, vit)]
        for root in ("multi_modal_projector.", "model.multi_modal_projector."):
            pairs += [(root + "linear_1.", "visual.mm_projector.0."), (root + "linear_2.", "visual.mm_projector.2.")]
        pairs += [("language_model.model.", "llm.model."), ("model.language_model.", "llm.model."),
                  ("language_model.lm_head.", "llm.lm_head."), ("lm_head.", "llm.lm_head.")]
        if fmt == "hf-llava-next":
            pairs += [("image_newline", "visual.image_newline"), ("model.image_newline", "visual.image_newline")]
        return Layout(fmt, tuple(pairs))
    llm = [("model.", "llm.model."), ("lm_head.", "llm.lm_head.")]
    clip_ref = "model.vision_tower.vision_tower."
    if fmt in ("llava", "llava-uhd", "inf-llava", "slime"):
        pairs = [(clip_ref + "vision_model.", vit), (clip_ref, vit),
                 ("model.mm_projector.", "visual.mm_projector."), ("model.image_newline", "visual.image_newline")]
        drop: tuple[tuple[str, str], ...] = ()
        if fmt == "inf-llava":
            pairs.append(("model.spatial_embed.", "visual.spatial_embed.spatial_embed."))
        if fmt == "slime":
            pairs.append(("model.sampler.post_qformer.", "visual.sampler."))
            drop = ((r"model\.mm_projector\.(mean|std)", "GatedBlock's unused Normal() buffers"),)
        return Layout(fmt, tuple(pairs + llm), drop=drop)
    if fmt == "llava-hr":
        fast_ref = "model.vision_tower.fast_vision_tower.vision_tower."
        slow_ref = "model.vision_tower.slow_vision_tower.vision_tower."
        fast = _clip("visual.vision_tower.fast_vision_tower.vision_tower.", nested)
        slow = "visual.vision_tower.slow_vision_tower."
        pairs = [(fast_ref + "vision_model.", fast), (fast_ref, fast), (slow_ref, slow),
                 ("model.vision_tower.", "visual.vision_tower."), ("model.mm_projector.", "visual.mm_projector.")]
        block = r"^(visual\.vision_tower\.slow_vision_tower\.stages\.\d+\.blocks\.\d+)"
        return Layout(
            fmt, tuple(pairs + llm),
            renames=((block + r"\.weight$", r"\1.gamma"),),      # timm's layer scale `weight` → `gamma`
            unrenames=((block + r"\.gamma$", r"\1.weight"),),
            drop=((re.escape(slow_ref) + r"(head|norm_pre)\..*", "ConvNeXt classifier head (never run by LLaVA-HR)"),))
    raise ValueError(f"unknown checkpoint format {fmt!r}")
