"""The conversion: read a reference checkpoint, map every tensor, refuse on any mismatch, save.

:func:`convert_checkpoint` reads the config and every weight shard, translates the config
(:mod:`~hires_lmm.convert.formats`), builds the hires model from it, renames every tensor
(:mod:`~hires_lmm.convert.layouts`), and refuses — naming them — when a tensor has no place in
the model, a weight of the model has no tensor, shapes disagree or a weight holds NaN. Only then
are the weights loaded and the model written with :meth:`HiresLMM.save_pretrained`, a directory
that :meth:`HiresLMM.from_pretrained` loads (it checks the names again).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .formats import FORMATS, Target, detect_format, translate
from .io import ConversionError, dominant_dtype, load_tokenizer, read_config, read_state_dict
from .layouts import layout_for

if TYPE_CHECKING:
    from ..model import HiresLMM

__all__ = ["DTYPES", "ConversionReport", "build_converted", "convert_checkpoint"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_LIST_LIMIT = 40


@dataclass
class ConversionReport:
    """What a conversion did (also written to ``conversion.json`` beside the model)."""

    format: str
    method: str
    src: str
    dst: str | None
    files: list[str]
    tensors: int
    loaded: int
    dropped: dict[str, int] = field(default_factory=dict)
    external: dict[str, str] = field(default_factory=dict)
    vocab_padded: int = 0
    dtype: str = "float32"
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _names(items: list[str]) -> str:
    items = sorted(items)
    more = f" ... (+{len(items) - _LIST_LIMIT} more)" if len(items) > _LIST_LIMIT else ""
    return ", ".join(items[:_LIST_LIMIT]) + more


def _pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Grow an embedding / LM head matrix to ``rows`` rows filled with the mean row
    (deterministic; the added rows are only the ``<image>`` placeholder, never embedded)."""
    extra = t.float().mean(0, keepdim=True).to(t.dtype).expand(rows - t.shape[0], -1)
    return torch.cat([t, extra], dim=0)


def build_converted(fmt: str, src: str | Path, *, vision: str | Path | None = None,
                    convnext: str | Path | None = None, force: bool = False,
                    connector: dict[str, Any] | None = None,
                    dtype: str | torch.dtype | None = None) -> tuple[HiresLMM, ConversionReport]:
    """Convert the checkpoint in ``src`` to an in-memory :class:`~hires_lmm.model.HiresLMM`.

    Args:
        fmt: one of :data:`FORMATS`, or "auto" (detected from the config and weight names).
        src: the checkpoint directory (config.json, weights, tokenizer files).
        vision: a local CLIP/SigLIP directory for the vision tower when the checkpoint has none
            (released LLaVA checkpoints omit the frozen tower; ``mm_vision_tower`` names it).
        convnext: a local ConvNeXt directory for LLaVA-HR when the checkpoint has none.
        force: convert even when the config asks for something this package cannot reproduce
            (the problems become notes). Weight mismatches are never forced.
        connector: overrides of the connector options (e.g. ``{"selector_variant": "spec"}``).
        dtype: the model's dtype: None (float32), "auto" (the checkpoint's storage dtype), a name
            of :data:`DTYPES` or a torch dtype. The model is built in it directly (no float32
            copy of a large LLM is ever made).

    Returns:
        ``(model, report)``; the model is in eval mode.
    """
    from ..config import HiresConfig
    from ..methods import build_from_config
    from ..text import ensure_image_token, separator_id

    src = Path(src)
    raw = read_config(src)
    state, files = read_state_dict(src)
    if fmt == "auto":
        fmt = detect_format(raw, set(state))
    if fmt not in FORMATS:
        raise ConversionError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)} or auto")
    notes: list[str] = []
    tok = load_tokenizer(src, notes)
    n_tok = len(tok)
    ensure_image_token(tok)
    if len(tok) > n_tok:
        notes.append("added <image> to the tokenizer (the reference splices image features at a placeholder id "
                     "outside the vocabulary)")
    separators: dict[str, int | None] = {}
    for s in (",", "\n"):
        try:
            separators[s] = separator_id(tok, s)
        except ValueError:
            separators[s] = None
    t: Target = translate(fmt, raw, state, src, vision_dir=Path(vision) if vision else None,
                          convnext_dir=Path(convnext) if convnext else None, separators=separators)
    if t.problems:
        if not force:
            raise ConversionError(f"{src}: this {fmt} checkpoint asks for what hires-lmm cannot reproduce:\n  - "
                                  + "\n  - ".join(t.problems) + "\n(--force converts anyway)")
        notes += [f"FORCED, differs from the checkpoint: {p}" for p in t.problems]
    t.connector.update(connector or {})
    notes += t.notes
    vocab = int(t.text_config.get("vocab_size", 0))
    if len(tok) > vocab:
        t.text_config["vocab_size"] = len(tok)
    config = HiresConfig(method=t.method, plan_options=t.plan_options, vision_config=t.vision_config,
                         select_layer=t.select_layer, convnext_config=t.convnext_config, connector=t.connector,
                         text_config=t.text_config, converted_from={"format": fmt, "source": str(src.resolve())})
    stored = dominant_dtype(state.values())
    if dtype is None:
        target = torch.float32
    elif isinstance(dtype, torch.dtype):
        target = dtype
    elif dtype == "auto":
        target = stored if stored in DTYPES.values() else torch.float32
    elif dtype in DTYPES:
        target = DTYPES[dtype]
    else:
        raise ConversionError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(target)  # random init directly in the target dtype: the weights are replaced anyway
    try:
        model = build_from_config(config, tok)
    finally:
        torch.set_default_dtype(previous)

    expected = model.state_dict(keep_vars=True)
    tied = set(expected) - set(model._dedup_state_dict())
    nested = any("vision_tower.vision_model." in k for k in expected)
    layout = layout_for(fmt, nested=nested)

    mapped: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    dropped: Counter[str] = Counter()
    unmapped, twice = [], []
    for ref, tensor in state.items():
        why = layout.dropped(ref)
        if why:
            dropped[why] += 1
            continue
        name = layout.to_hires(ref)
        if name is None:
            unmapped.append(ref)
        elif name in mapped:
            twice.append(f"{origin[name]} and {ref} (both → {name})")
        else:
            mapped[name], origin[name] = tensor, ref
    external: dict[str, str] = {}
    if t.vision_dir is not None:
        from ..vision.vit import ViT

        vit = ViT.from_pretrained(t.vision_dir)
        for k, v in vit.state_dict().items():
            mapped[t.vit_hires_prefix + k], origin[t.vit_hires_prefix + k] = v, f"{t.vision_dir}:{k}"
        external["vision_tower"] = str(t.vision_dir)
    if t.convnext_dir is not None:
        from ..vision.convnext import ConvNeXt

        cnx = ConvNeXt.from_pretrained(t.convnext_dir)
        prefix = "visual.vision_tower.slow_vision_tower."
        for k, v in cnx.state_dict().items():
            mapped[prefix + k], origin[prefix + k] = v, f"{t.convnext_dir}:{k}"
        external["convnext"] = str(t.convnext_dir)

    # vocabulary: rows added for <image> (and any tokenizer growth) take the mean row
    emb = model.llm.get_input_embeddings().weight
    out = model.llm.get_output_embeddings()
    vocab_names = [n for n, p in expected.items() if p is emb or (out is not None and p is out.weight)]
    padded = 0
    for n in vocab_names:
        if n in mapped and mapped[n].ndim == 2 and mapped[n].shape[0] < expected[n].shape[0] \
                and mapped[n].shape[1] == expected[n].shape[1]:
            padded = expected[n].shape[0] - mapped[n].shape[0]
            mapped[n] = _pad_rows(mapped[n], expected[n].shape[0])
    if padded:
        notes.append(f"vocabulary grown by {padded} row(s) (mean embedding) for the tokenizer's {len(tok)} tokens")

    missing = sorted(set(expected) - set(mapped) - tied)
    unexpected = sorted(f"{origin[n]} (→ {n})" for n in set(mapped) - set(expected))
    shapes = sorted(f"{origin[n]}: {tuple(mapped[n].shape)} vs {n}: {tuple(expected[n].shape)}"
                    for n in set(mapped) & set(expected) if tuple(mapped[n].shape) != tuple(expected[n].shape))
    nans = []
    for n in sorted(set(mapped) & set(expected)):
        v = mapped[n]
        if v.is_floating_point() and bool(torch.isnan(v).any()):
            if fmt == "slime" and n.endswith("pos_embed"):
                # SliME's Resampler rebuilds its fixed sin-cos table when it finds NaN (a zero-3 init
                # artefact of some checkpoints): use the table it rebuilds
                mapped[n] = expected[n].detach().clone()
                notes.append(f"{origin[n]} holds NaN; replaced by the fixed sin-cos table the reference rebuilds")
            else:
                nans.append(origin[n])
    errors = []
    for what, items in (("tensors with no place in the model", unmapped), ("tensors mapped twice", twice),
                        ("weights of the model missing from the checkpoint", missing),
                        ("unexpected tensors", unexpected), ("shape mismatches", shapes), ("tensors holding NaN", nans)):
        if items:
            errors.append(f"{what} ({len(items)}): {_names(items)}")
    if errors:
        hint = ""
        if any("vision_tower" in m for m in missing) and t.vision_dir is None and fmt not in ("hf-llava", "hf-llava-next"):
            hint = "\n(a checkpoint without its vision tower needs --vision DIR)"
        raise ConversionError(f"{src}: the {fmt} checkpoint does not match a {t.method} model:\n  "
                              + "\n  ".join(errors) + hint)
    with torch.no_grad():
        model.load_state_dict(mapped, strict=False)  # copy_ casts to each parameter's dtype
    if hasattr(model.llm, "tie_weights"):
        model.llm.tie_weights()
    # transformers' @wraps(nn.Module.to) makes mypy see PreTrainedModel.to unbound (dtype as self)
    model.to(target)  # type: ignore[arg-type]
    report = ConversionReport(format=fmt, method=t.method, src=str(src), dst=None, files=[f.name for f in files],
                              tensors=len(state), loaded=len(mapped), dropped=dict(dropped), external=external,
                              vocab_padded=padded, dtype=str(target).replace("torch.", ""),
                              notes=notes)
    return model.eval(), report


def convert_checkpoint(fmt: str, src: str | Path, dst: str | Path, *, vision: str | Path | None = None,
                       convnext: str | Path | None = None, dtype: str = "auto", force: bool = False,
                       overwrite: bool = False, max_shard_size: str | int = "5GB",
                       connector: dict[str, Any] | None = None) -> ConversionReport:
    """Convert the checkpoint in ``src`` and write a :meth:`HiresLMM.from_pretrained` directory.

    ``dtype``: "auto" keeps the checkpoint's storage dtype (the floating dtype of most of its
    elements), or "float32" / "bfloat16" / "float16". ``dst`` must not hold files unless
    ``overwrite``. The other arguments are :func:`build_converted`'s.
    """
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise ConversionError(f"{dst} exists and is not empty (overwrite=True / --overwrite replaces its model files)")
    if dtype != "auto" and dtype not in DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    model, report = build_converted(fmt, src, vision=vision, convnext=convnext, force=force, connector=connector,
                                    dtype=dtype)
    model.save_pretrained(dst, max_shard_size=max_shard_size)
    gen = Path(src) / "generation_config.json"
    if gen.is_file():
        shutil.copyfile(gen, dst / "generation_config.json")
    report.dst = str(dst)
    (dst / "conversion.json").write_text(json.dumps(report.to_json(), indent=2), encoding="utf-8")
    return report
