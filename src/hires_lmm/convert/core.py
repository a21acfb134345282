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
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from ..config import HiresConfig
from ..model import HiresLMM, build_from_config
from ..text import ensure_image_token, separator_id
from ..vision.convnext import ConvNeXt
from ..vision.vit import ViT
from .formats import FORMATS, Target, detect_format, translate
from .io import ConversionError, dominant_dtype, load_tokenizer, read_config, read_state_dict
from .layouts import layout_for

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


@dataclass
class _Source:
    """A checkpoint as read: its config, every tensor, the files read, its (detected) format and
    its tokenizer (``<image>`` added), with the notes reading it gave."""

    src: Path
    fmt: str
    raw: dict[str, Any]
    state: dict[str, torch.Tensor]
    files: list[Path]
    tokenizer: PreTrainedTokenizerBase
    notes: list[str]


@dataclass
class _Mapped:
    """The checkpoint's tensors under hires names (``origin``: where each came from), and what
    had no place: dropped by rule (counted by reason), unmapped, or mapped twice."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)
    dropped: Counter[str] = field(default_factory=Counter)
    unmapped: list[str] = field(default_factory=list)
    twice: list[str] = field(default_factory=list)
    external: dict[str, str] = field(default_factory=dict)
    vocab_padded: int = 0


def _read_source(fmt: str, src: Path) -> _Source:
    """Phase 1, read the source: config.json, every weight shard, the format ("auto": detected
    from the config and the weight names) and the tokenizer, ``<image>`` added to it."""
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
    return _Source(src, fmt, raw, state, files, tok, notes)


def _translate(source: _Source, *, vision: str | Path | None, convnext: str | Path | None, force: bool,
               connector: dict[str, Any] | None) -> Target:
    """Phase 2, translate the checkpoint's config (:func:`~hires_lmm.convert.formats.translate`):
    what the reference asks for and this package cannot reproduce is refused unless ``force``
    (then noted); ``connector`` overrides the translated options; the vocabulary grows to the
    tokenizer's."""
    separators: dict[str, int | None] = {}
    for s in (",", "\n"):
        try:
            separators[s] = separator_id(source.tokenizer, s)
        except ValueError:
            separators[s] = None
    t: Target = translate(source.fmt, source.raw, source.state, source.src, vision_dir=Path(vision) if vision else None,
                          convnext_dir=Path(convnext) if convnext else None, separators=separators)
    if t.problems:
        if not force:
            raise ConversionError(f"{source.src}: this {source.fmt} checkpoint asks for what hires-lmm cannot reproduce:"
                                  "\n  - " + "\n  - ".join(t.problems) + "\n(--force converts anyway)")
        source.notes.extend(f"FORCED, differs from the checkpoint: {p}" for p in t.problems)
    t.connector.update(connector or {})
    source.notes.extend(t.notes)
    vocab = int(t.text_config.get("vocab_size", 0))
    if len(source.tokenizer) > vocab:
        t.text_config["vocab_size"] = len(source.tokenizer)
    return t


def _build_config(source: _Source, t: Target) -> HiresConfig:
    """Phase 3, build the config: the translated fields, and where the model was converted from."""
    return HiresConfig(method=t.method, plan_options=t.plan_options, vision_config=t.vision_config,
                       select_layer=t.select_layer, convnext_config=t.convnext_config, connector=t.connector,
                       text_config=t.text_config,
                       converted_from={"format": source.fmt, "source": str(source.src.resolve())})


def _target_dtype(dtype: str | torch.dtype | None, state: dict[str, torch.Tensor]) -> torch.dtype:
    """The model's dtype: float32 for None, the checkpoint's storage dtype for "auto" (float32
    when that is not one of :data:`DTYPES`), else the one named or given."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        stored = dominant_dtype(state.values())
        return stored if stored in DTYPES.values() else torch.float32
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ConversionError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")


def _build_model(config: HiresConfig, tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype) -> HiresLMM:
    """Phase 4, build the model the config describes, its random initialisation directly in
    ``dtype`` (the weights are replaced anyway: no float32 copy of a large LLM is made)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return build_from_config(config, tokenizer)
    finally:
        torch.set_default_dtype(previous)


def _map_weights(source: _Source, t: Target, expected: dict[str, torch.Tensor]) -> _Mapped:
    """Phase 5, map the weights: every tensor of the checkpoint renamed by its format's layout
    (:func:`~hires_lmm.convert.layouts.layout_for`), then the external encoders' (``--vision`` /
    ``--convnext`` directories) under the model's names."""
    nested = any("vision_tower.vision_model." in k for k in expected)
    layout = layout_for(source.fmt, nested=nested)
    m = _Mapped()
    for ref, tensor in source.state.items():
        why = layout.dropped(ref)
        if why:
            m.dropped[why] += 1
            continue
        name = layout.to_hires(ref)
        if name is None:
            m.unmapped.append(ref)
        elif name in m.tensors:
            m.twice.append(f"{m.origin[name]} and {ref} (both → {name})")
        else:
            m.tensors[name], m.origin[name] = tensor, ref
    if t.vision_dir is not None:
        vit = ViT.from_pretrained(t.vision_dir)
        for k, v in vit.state_dict().items():
            m.tensors[t.vit_hires_prefix + k], m.origin[t.vit_hires_prefix + k] = v, f"{t.vision_dir}:{k}"
        m.external["vision_tower"] = str(t.vision_dir)
    if t.convnext_dir is not None:
        cnx = ConvNeXt.from_pretrained(t.convnext_dir)
        prefix = "visual.vision_tower.slow_vision_tower."
        for k, v in cnx.state_dict().items():
            m.tensors[prefix + k], m.origin[prefix + k] = v, f"{t.convnext_dir}:{k}"
        m.external["convnext"] = str(t.convnext_dir)
    return m


def _pad_vocabulary(model: HiresLMM, m: _Mapped, expected: dict[str, torch.Tensor], notes: list[str]) -> None:
    """Rows the model's embeddings / LM head have beyond the checkpoint's (``<image>`` and any
    tokenizer growth) take the mean row; recorded in ``m.vocab_padded`` and ``notes``."""
    emb = model.llm.get_input_embeddings().weight
    out = model.llm.get_output_embeddings()
    vocab_names = [n for n, p in expected.items() if p is emb or (out is not None and p is out.weight)]
    for n in vocab_names:
        v = m.tensors.get(n)
        if v is not None and v.ndim == 2 and v.shape[0] < expected[n].shape[0] and v.shape[1] == expected[n].shape[1]:
            m.vocab_padded = expected[n].shape[0] - v.shape[0]
            m.tensors[n] = _pad_rows(v, expected[n].shape[0])
    if m.vocab_padded:
        notes.append(f"vocabulary grown by {m.vocab_padded} row(s) (mean embedding) for the tokenizer's "
                     f"{len(model.tokenizer)} tokens")


def _check_weights(source: _Source, t: Target, m: _Mapped, expected: dict[str, torch.Tensor], tied: set[str]) -> None:
    """Phase 6a, check: refuse, naming them, tensors with no place, tensors mapped twice, weights
    of the model without a tensor, unexpected tensors, shape mismatches and NaN (SliME's NaN
    ``pos_embed`` excepted: replaced by the fixed table its reference rebuilds, noted)."""
    mapped, origin = m.tensors, m.origin
    missing = sorted(set(expected) - set(mapped) - tied)
    unexpected = sorted(f"{origin[n]} (→ {n})" for n in set(mapped) - set(expected))
    shapes = sorted(f"{origin[n]}: {tuple(mapped[n].shape)} vs {n}: {tuple(expected[n].shape)}"
                    for n in set(mapped) & set(expected) if tuple(mapped[n].shape) != tuple(expected[n].shape))
    nans = []
    for n in sorted(set(mapped) & set(expected)):
        v = mapped[n]
        if v.is_floating_point() and bool(torch.isnan(v).any()):
            if source.fmt == "slime" and n.endswith("pos_embed"):
                # SliME's Resampler rebuilds its fixed sin-cos table when it finds NaN (a zero-3 init
                # artefact of some checkpoints): use the table it rebuilds
                mapped[n] = expected[n].detach().clone()
                source.notes.append(f"{origin[n]} holds NaN; replaced by the fixed sin-cos table the reference rebuilds")
            else:
                nans.append(origin[n])
    errors = []
    for what, items in (("tensors with no place in the model", m.unmapped), ("tensors mapped twice", m.twice),
                        ("weights of the model missing from the checkpoint", missing),
                        ("unexpected tensors", unexpected), ("shape mismatches", shapes), ("tensors holding NaN", nans)):
        if items:
            errors.append(f"{what} ({len(items)}): {_names(items)}")
    if errors:
        hint = ""
        if any("vision_tower" in n for n in missing) and t.vision_dir is None \
                and source.fmt not in ("hf-llava", "hf-llava-next"):
            hint = "\n(a checkpoint without its vision tower needs --vision DIR)"
        raise ConversionError(f"{source.src}: the {source.fmt} checkpoint does not match a {t.method} model:\n  "
                              + "\n  ".join(errors) + hint)


def _load_weights(model: HiresLMM, m: _Mapped, dtype: torch.dtype) -> None:
    """Phase 6b, load the checked weights (cast to each parameter's dtype), tie the LLM's, and
    move the whole model to ``dtype``."""
    with torch.no_grad():
        model.load_state_dict(m.tensors, strict=False)  # copy_ casts to each parameter's dtype
    if hasattr(model.llm, "tie_weights"):
        model.llm.tie_weights()
    # transformers' @wraps(nn.Module.to) makes mypy see PreTrainedModel.to unbound (dtype as self)
    model.to(dtype)  # type: ignore[arg-type]


def build_converted(fmt: str, src: str | Path, *, vision: str | Path | None = None,
                    convnext: str | Path | None = None, force: bool = False,
                    connector: dict[str, Any] | None = None,
                    dtype: str | torch.dtype | None = None) -> tuple[HiresLMM, ConversionReport]:
    """Convert the checkpoint in ``src`` to an in-memory :class:`~hires_lmm.model.HiresLMM`.

    The phases, in order: read the source (:func:`_read_source`), translate its config
    (:func:`_translate`) and build ours (:func:`_build_config`), build the model (:func:`_build_model`),
    map the weights (:func:`_map_weights`, :func:`_pad_vocabulary`), check and load them
    (:func:`_check_weights`, :func:`_load_weights`).

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
    source = _read_source(fmt, Path(src))
    t = _translate(source, vision=vision, convnext=convnext, force=force, connector=connector)
    config = _build_config(source, t)
    target = _target_dtype(dtype, source.state)
    model = _build_model(config, source.tokenizer, target)
    expected = model.state_dict(keep_vars=True)
    tied = set(expected) - set(model._dedup_state_dict())
    mapped = _map_weights(source, t, expected)
    _pad_vocabulary(model, mapped, expected, source.notes)
    _check_weights(source, t, mapped, expected, tied)
    _load_weights(model, mapped, target)
    report = ConversionReport(format=source.fmt, method=t.method, src=str(source.src), dst=None,
                              files=[f.name for f in source.files], tensors=len(source.state),
                              loaded=len(mapped.tensors), dropped=dict(mapped.dropped), external=mapped.external,
                              vocab_padded=mapped.vocab_padded, dtype=str(target).replace("torch.", ""),
                              notes=source.notes)
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
