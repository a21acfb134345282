"""Reading checkpoints: config, every weight shard, tokenizer and chat template.

A checkpoint directory holds its weights as one file or as shards with an index:
``model.safetensors``, ``model.safetensors.index.json`` + ``model-0000i-of-0000n.safetensors``,
``pytorch_model.bin``, ``pytorch_model.bin.index.json`` + shards (LLaVA's releases), or, without an
index, any ``*.safetensors`` / ``*.bin`` files. All of them are read; a tensor named in two files,
a shard named by the index but missing, or a tensor the index names but no shard holds is an error.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from .errors import ConversionError

__all__ = ["ConversionError", "dominant_dtype", "load_tokenizer", "read_config", "read_state_dict", "weight_files"]

_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLES = ("model.safetensors", "pytorch_model.bin")


def read_config(src: Path) -> dict[str, Any]:
    """``config.json`` of a checkpoint directory as a dict."""
    f = src / "config.json"
    if not src.is_dir():
        raise ConversionError(f"{src}: not a directory")
    if not f.is_file():
        raise ConversionError(f"{src}: no config.json; not a Hugging Face style checkpoint directory")
    try:
        raw = json.loads(f.read_bytes().decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise ConversionError(f"{f}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):  # a list or a number would fail later with an AttributeError
        raise ConversionError(f"{f}: expected a JSON object, got {type(raw).__name__}")
    return raw


def weight_files(src: Path) -> tuple[list[Path], dict[str, str] | None]:
    """The weight files of ``src`` and the index's name → file map (None without an index)."""
    for name in _INDEXES:
        idx = src / name
        if idx.is_file():
            try:
                weight_map = json.loads(idx.read_text(encoding="utf-8"))["weight_map"]
                files = sorted(set(weight_map.values()))
                if not all(isinstance(f, str) and f for f in files):
                    raise TypeError("weight_map values must be file names")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ConversionError(f"{idx}: not a weight index ({e!r})") from None
            root = src.resolve()
            # resolved (symlinks too), then kept inside the checkpoint: an index naming
            # ../elsewhere must not make the conversion read (or torch.load) files outside it
            outside = [f for f in files if not (src / f).resolve().is_relative_to(root) or (src / f).resolve() == root]
            if outside:
                raise ConversionError(f"{idx} names weight file(s) outside {src}: {outside}; refused")
            missing = [f for f in files if not (src / f).is_file()]
            if missing:
                raise ConversionError(f"{idx} names shard(s) that are not in {src}: {missing}")
            return [src / f for f in files], dict(weight_map)
    for name in _SINGLES:
        if (src / name).is_file():
            return [src / name], None
    found = sorted(p for p in src.iterdir() if p.is_file() and p.suffix in (".safetensors", ".bin"))
    if not found:
        raise ConversionError(f"{src}: no weights (*.safetensors or *.bin, with or without an index)")
    return found, None


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip archive (legacy format): mmap is not possible
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):  # common training-checkpoint wrappers
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ConversionError(f"{path}: not a state dict (got {type(sd).__name__})")
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ConversionError(f"{path}: entries that are not tensors: {bad[:20]}")
    return sd


def read_state_dict(src: Path) -> tuple[dict[str, torch.Tensor], list[Path]]:
    """Every tensor of the checkpoint in ``src`` (all shards), and the files read."""
    files, weight_map = weight_files(src)
    state: dict[str, torch.Tensor] = {}
    twice: list[str] = []
    for f in files:
        part = _load_file(f)
        twice += [k for k in part if k in state]
        state.update(part)
    if twice:
        raise ConversionError(f"{src}: tensors stored in more than one file: {sorted(twice)[:20]}")
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(state))
        if absent:
            raise ConversionError(f"{src}: the index names tensors that no shard holds: {absent[:20]}"
                                  + (f" (+{len(absent) - 20} more)" if len(absent) > 20 else ""))
    return state, files


def dominant_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """The floating dtype holding most elements (the checkpoint's storage dtype)."""
    count: Counter[torch.dtype] = Counter()
    for t in tensors:
        if t.is_floating_point():
            count[t.dtype] += t.numel()
    return count.most_common(1)[0][0] if count else torch.float32


def load_tokenizer(src: Path, notes: list[str]):
    """The checkpoint's tokenizer; when it has no chat template, the processor's one
    (``chat_template.jinja`` or ``chat_template.json``, as transformers' processors save it)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src))
    except Exception as e:  # noqa: BLE001 - any loading failure is a user-facing error here
        raise ConversionError(f"{src}: cannot load the tokenizer ({type(e).__name__}: {e})") from None
    if not getattr(tok, "chat_template", None):
        template = None
        jinja, js = src / "chat_template.jinja", src / "chat_template.json"
        if jinja.is_file():
            template = jinja.read_text(encoding="utf-8")
        elif js.is_file():
            try:
                template = json.loads(js.read_text(encoding="utf-8")).get("chat_template")
            except json.JSONDecodeError:
                template = None
        if template:
            tok.chat_template = template
            notes.append("chat template taken from the processor's chat_template file (the tokenizer had none)")
        else:
            notes.append("the checkpoint has no chat template; generate with template=... (e.g. vicuna_v1 for LLaVA-1.5)")
    return tok
