"""The arguments of a training run, defined once: :class:`TrainConfig`.

Each field carries its command-line help in ``field(metadata={"help": ...})`` (and, where the
default spelling does not do, its ``flags``, ``choices``, ``metavar`` or ``parse``: the argparse
``type``); :func:`add_arguments` builds the ``hires train`` flags from :func:`dataclasses.fields`
and :func:`config_from_args` reads them back. The flag of a field is ``--`` + its name with
dashes; a bool is ``--name`` (``store_true``), or ``--no-name`` when it defaults to True; a field
without a default is a required flag; ``metadata={"cli": False}`` keeps a field off the command
line (set from the Python API or by the CLI itself).

No torch is imported here: ``hires`` builds every subcommand's parser at start-up.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any, TypeGuard

from ..plan.budget import BudgetError, check_budget, parse_budget
from .errors import TrainingError, one_line
from .resume import OVERRIDABLE

MIXED_PRECISION = ("auto", "no", "bf16", "fp16")

__all__ = ["MIXED_PRECISION", "SCHEDULES", "TrainConfig", "add_arguments", "check_config", "cli_fields",
           "config_from_args", "constant_with_warmup", "cosine_with_warmup"]


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warmup to 1, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def constant_with_warmup(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warmup to 1, then constant."""
    return (step + 1) / max(1, warmup) if step < warmup else 1.0


#: ``TrainConfig.lr_schedule`` → multiplier(step, total, warmup)
SCHEDULES: dict[str, Callable[[int, int, int], float]] = {"cosine": cosine_with_warmup,
                                                          "constant": constant_with_warmup}


# --- argparse types of the fields whose flag is not a plain int / float / str -----------------------

def parse_field_list(text: str) -> tuple[str, ...]:
    """``--allow-changed``: comma-separated field names (``max-steps`` spells ``max_steps`` too)."""
    return tuple(f.strip().replace("-", "_") for f in text.split(",") if f.strip())


def _help(text: str, **more: Any) -> dict[str, Any]:
    return {"help": text, **more}


#: a field kept off the command line
OFF_CLI = {"cli": False}


@dataclass
class TrainConfig:
    """Everything a run needs; saved as ``OUT/train_config.json``. Each field's ``help`` is its
    ``hires train`` flag's (module docstring)."""

    method: str = field(metadata=_help("a preset or a method file (JSON/YAML: {\"base\": PRESET, STAGE: PART, ...})",
                                       flags=("--method", "-m")))
    data_path: str = field(metadata=_help("LLaVA JSON/JSONL, or a LLaVA-NeXT YAML list of files"))
    output_dir: str = field(metadata=_help("where checkpoints, metrics and the trained model go"))
    image_folder: str = field(default=".", metadata=_help("the folder the records' image paths are relative to"))
    stage: str = field(default="scratch", metadata=_help(
        "the paper's stage (1, 2; SliME 1a, 1b, 2, 3), 'scratch' (all parts train) or 'frozen-encoders' "
        "(all but the vision encoders)"))
    tiny: bool = field(default=False, metadata=_help("the tiny preset of the method (random weights, no downloads)"))
    vision: str | None = field(default=None, metadata=_help("local CLIP/SigLIP directory (Hugging Face format)"))
    llm: str | None = field(default=None, metadata=_help("local causal LM directory (Hugging Face format)"))
    convnext: str | None = field(default=None, metadata=_help("local ConvNeXt weights (llava-hr)"))
    init: str | None = field(default=None, metadata=_help("start from a previous stage's output directory"))
    template: str | None = field(default=None, metadata=_help(
        "plain, vicuna_v1, llama3, chatml or tokenizer (default: the stage's)"))
    max_steps: int | None = field(default=None, metadata=_help("optimizer steps (default: --epochs over the data)"))
    epochs: float = field(default=1.0, metadata=_help("passes over the data when --max-steps is not given"))
    batch_size: int = field(default=4, metadata=_help("per process, per micro-batch"))
    grad_accum: int = field(default=1, metadata=_help("micro-batches per optimizer step (gradient accumulation)"))
    lr: float | None = field(default=None, metadata=_help(
        "one learning rate for every trained group (default: the paper's)"))
    lr_schedule: str = field(default="cosine", metadata=_help(
        "after the linear warmup: cosine decay to 0 (LLaVA's) or constant", choices=tuple(SCHEDULES)))
    warmup_ratio: float = field(default=0.03, metadata=_help("share of the steps the learning rate warms up over"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW's weight decay"))
    max_grad_norm: float = field(default=1.0, metadata=OFF_CLI)
    max_length: int = field(default=4096, metadata=_help(
        "longest sequence (text + visual tokens); longer records are bad records"))
    seed: int = field(default=0, metadata=_help("seeds the model's initialisation and the data order"))
    save_steps: int = field(default=100, metadata=_help("a checkpoint every this many steps (and at the end)"))
    keep_last: int = field(default=2, metadata=_help("checkpoints kept"))
    resume: bool = field(default=False, metadata=_help(
        "continue from the newest checkpoint in --output-dir (the same arguments and data)"))
    overwrite: bool = field(default=False, metadata=_help("replace a non-empty --output-dir"))
    skip_bad: bool = field(default=False, metadata=_help("skip (and count) bad records instead of stopping"))
    group_by_length: bool = field(default=True, metadata=_help(
        "batches in shuffled order, without LLaVA's grouping of similar lengths"))
    num_workers: int = field(default=0, metadata=_help("DataLoader worker processes loading and rendering images"))
    gradient_checkpointing: bool = field(default=False, metadata=_help(
        "recompute activations in the backward pass (less memory, more time)"))
    mixed_precision: str = field(default="auto", metadata=_help(
        "auto: the launch's accelerate config (else no)", choices=MIXED_PRECISION))
    #: the visual-token budget every image is planned within (``plan_options["max_visual_tokens"]``)
    max_visual_tokens: int | None = field(default=None, metadata=_help(
        "visual-token budget: every image is planned within B tokens (saved in the model's plan_options); "
        "a record whose image cannot be is a bad record", metavar="B", parse=parse_budget))
    log_steps: int = field(default=1, metadata=OFF_CLI)
    progress: bool = field(default=True, metadata=_help("no progress bars"))
    #: connector options of the model, or ``{"method_spec": ...}`` of a method file (set by the CLI)
    connector: dict[str, Any] | None = field(default=None, metadata=OFF_CLI)
    #: fields of :data:`~.resume.OVERRIDABLE` a ``--resume`` may change (others are refused)
    allow_changed: tuple[str, ...] = field(default=(), metadata=_help(
        f"with --resume: the arguments that may differ from the resumed run (comma-separated: "
        f"{', '.join(sorted(OVERRIDABLE))})", metavar="FIELDS", parse=parse_field_list))


# --- the command line ---------------------------------------------------------------------------------

#: the argparse ``type`` of a field's annotation (``from __future__ import annotations``: strings)
_TYPES: dict[str, Callable[[str], Any]] = {"str": str, "str | None": str, "int": int, "int | None": int,
                                           "float": float, "float | None": float}


def cli_fields() -> list[Field[Any]]:
    """The fields of :class:`TrainConfig` that are ``hires train`` flags."""
    return [f for f in fields(TrainConfig) if f.metadata.get("cli", True)]


def _flags(f: Field[Any]) -> tuple[str, ...]:
    if "flags" in f.metadata:
        return tuple(f.metadata["flags"])
    name = f.name.replace("_", "-")
    return (f"--no-{name}",) if f.type == "bool" and f.default is True else (f"--{name}",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag to ``parser`` for every field of :func:`cli_fields` (module docstring)."""
    for f in cli_fields():
        meta: Mapping[str, Any] = f.metadata
        kw: dict[str, Any] = {"dest": f.name, "help": meta.get("help")}
        if f.default is MISSING:
            kw["required"] = True
        else:
            kw["default"] = f.default
        if f.type == "bool":
            kw["action"] = "store_false" if f.default is True else "store_true"
        else:
            parse = meta.get("parse") or _TYPES.get(str(f.type))
            if parse is None:  # a new field of another type: give it a ``parse`` (or ``cli: False``)
                raise TypeError(f"TrainConfig.{f.name}: no argparse type for {f.type!r}")
            kw["type"] = parse
            for key in ("choices", "metavar"):
                if key in meta:
                    kw[key] = meta[key]
        parser.add_argument(*_flags(f), **kw)


def config_from_args(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``hires train`` flags; ``overrides`` set fields the
    command line does not give (``connector``) or that the CLI resolves (``method``)."""
    values = {f.name: getattr(args, f.name) for f in cli_fields()}
    return TrainConfig(**{**values, **overrides})


# --- checks ---------------------------------------------------------------------------------------------

def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _argument_problems(cfg: TrainConfig) -> list[str]:
    """Every bad value of ``cfg`` (checked before anything is built or written)."""
    problems = []
    for name, low in (("batch_size", 1), ("grad_accum", 1), ("max_length", 1), ("save_steps", 1),
                      ("keep_last", 1), ("log_steps", 1), ("num_workers", 0)):
        v = getattr(cfg, name)
        if not _is_int(v) or v < low:
            problems.append(f"{name} must be an integer ≥ {low}, got {v!r}")
    if cfg.max_steps is not None and (not _is_int(cfg.max_steps) or cfg.max_steps < 1):
        problems.append(f"max_steps must be an integer ≥ 1, got {cfg.max_steps!r}")
    if not _is_number(cfg.epochs) or cfg.epochs <= 0:
        problems.append(f"epochs must be a number > 0, got {cfg.epochs!r}")
    for name in ("weight_decay", "max_grad_norm") + (("lr",) if cfg.lr is not None else ()):
        v = getattr(cfg, name)
        if not _is_number(v) or v < 0:
            problems.append(f"{name} must be a number ≥ 0, got {v!r}")
    if not _is_number(cfg.warmup_ratio) or not 0 <= cfg.warmup_ratio <= 1:
        problems.append(f"warmup_ratio must be between 0 and 1, got {cfg.warmup_ratio!r}")
    if cfg.lr_schedule not in SCHEDULES:
        problems.append(f"unknown lr_schedule {cfg.lr_schedule!r}; choose from {', '.join(SCHEDULES)}")
    if cfg.mixed_precision not in MIXED_PRECISION:
        problems.append(f"unknown mixed_precision {cfg.mixed_precision!r}; choose from {', '.join(MIXED_PRECISION)}")
    for name in ("method", "data_path", "output_dir", "stage"):
        if not isinstance(getattr(cfg, name), str) or not getattr(cfg, name):
            problems.append(f"{name} must be a non-empty string, got {getattr(cfg, name)!r}")
    unknown = sorted(set(cfg.allow_changed) - OVERRIDABLE) if isinstance(cfg.allow_changed, (list, tuple)) else None
    if unknown is None or unknown:
        problems.append(f"allow_changed {unknown if unknown else cfg.allow_changed!r} not allowed: a resumed run "
                        f"may change only {', '.join(sorted(OVERRIDABLE))}")
    if cfg.max_visual_tokens is not None:
        try:
            check_budget(cfg.max_visual_tokens)
        except BudgetError as e:
            problems.append(one_line(e))
    if cfg.connector is not None and not isinstance(cfg.connector, dict):
        problems.append(f"connector must be a dict of connector options, got {type(cfg.connector).__name__}")
    try:
        json.dumps(asdict(cfg), allow_nan=False)
    except (TypeError, ValueError) as e:  # it is saved as train_config.json
        problems.append(f"the arguments cannot be saved as JSON ({one_line(e, 80)})")
    return problems


def check_config(cfg: TrainConfig) -> None:
    """Raise one :class:`TrainingError` naming every bad argument of ``cfg``."""
    problems = _argument_problems(cfg)
    if problems:
        raise TrainingError("bad training arguments: " + "; ".join(problems))


def config_json(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg`` as it reads back from ``train_config.json`` (tuples become lists)."""
    out: dict[str, Any] = json.loads(json.dumps(asdict(cfg)))
    return out


def config_defaults() -> dict[str, Any]:
    """Each field's default (a saved config without a field had its default)."""
    return {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
