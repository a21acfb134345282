"""The training loop, top to bottom: build → stage → data → validate → optimise → checkpoint.

Runs on one CPU for a smoke run or on many processes under ``torchrun`` / ``accelerate launch``:
data parallel, FSDP2 or DeepSpeed ZeRO-2/3 as the launch's accelerate config says, never
overridden; a requested engine that is not what ends up active stops the run before training
(:mod:`.distributed`, docs/training.md).

* AdamW, cosine schedule with linear warmup, gradient accumulation, gradient clipping.
* Deterministic global batches (:mod:`.batches`): a resumed run continues exactly.
* Checkpoints (:mod:`.checkpoint`): ``OUT/checkpoints/step-XXXXXXX`` written to a temporary
  directory and renamed (atomic), the last ``keep_last`` kept; safetensors and JSON only (nothing
  is unpickled on ``--resume``). ``--resume`` refuses other arguments or data (:mod:`.resume`).
* Every foreseeable failure (bad arguments, unreadable files, output directory, model directories,
  checkpoints) raises :class:`TrainingError` (or the data's :class:`~hires_lmm.data.records.DataError`)
  with a one-line message.
* SIGINT / SIGTERM: finish the current step, save a checkpoint, exit cleanly (resume with
  ``--resume``). SIGKILL loses at most the steps since the last checkpoint.
* Metrics: ``OUT/metrics.jsonl`` (loss, learning rate, tokens/s, visual tokens per sample) and a
  progress bar.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import time
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..model import HiresLMM
from ..plan.budget import BudgetError, check_budget
from . import checkpoint as ckpt_io
from .batches import GlobalBatches, ImagePlanner, count_lengths
from .distributed import Engine, setup
from .errors import CheckpointError, ConfigMismatchError, TrainingError, one_line
from .resume import OVERRIDABLE, check_same_data, check_same_run, data_fingerprint, truncate_metrics
from .stages import Stage, apply_stage, get_stage, trainable_state_dict

CKPT_DIR = "checkpoints"
STATE_FILE = ckpt_io.STATE_FILE
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
MIXED_PRECISION = ("auto", "no", "bf16", "fp16")

__all__ = ["CheckpointError", "ConfigMismatchError", "TrainConfig", "TrainResult", "TrainingError", "check_config",
           "train"]


@dataclass
class TrainConfig:
    """Everything a run needs; saved as ``OUT/train_config.json``."""

    method: str
    data_path: str
    output_dir: str
    image_folder: str = "."
    stage: str = "scratch"
    tiny: bool = False
    vision: str | None = None
    llm: str | None = None
    convnext: str | None = None
    init: str | None = None
    template: str | None = None
    max_steps: int | None = None
    epochs: float = 1.0
    batch_size: int = 4
    grad_accum: int = 1
    lr: float | None = None
    lr_schedule: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 4096
    seed: int = 0
    save_steps: int = 100
    keep_last: int = 2
    resume: bool = False
    overwrite: bool = False
    skip_bad: bool = False
    group_by_length: bool = True
    num_workers: int = 0
    gradient_checkpointing: bool = False
    mixed_precision: str = "auto"
    #: the visual-token budget every image is planned within (``plan_options["max_visual_tokens"]``)
    max_visual_tokens: int | None = None
    log_steps: int = 1
    progress: bool = True
    connector: dict[str, Any] | None = None
    #: fields of :data:`~.resume.OVERRIDABLE` a ``--resume`` may change (others are refused)
    allow_changed: tuple[str, ...] = ()


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
SCHEDULES = {"cosine": cosine_with_warmup, "constant": constant_with_warmup}


# --- arguments -----------------------------------------------------------------------------------

def _is_int(v: Any) -> bool:
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


def _config_json(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg`` as it reads back from ``train_config.json`` (tuples become lists)."""
    return json.loads(json.dumps(asdict(cfg)))


def _config_defaults() -> dict[str, Any]:
    return {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


# --- model, stage, data --------------------------------------------------------------------------

def _model_sources(cfg: TrainConfig) -> str:
    given = [f"--{k} {v}" for k, v in (("init", cfg.init), ("vision", cfg.vision), ("llm", cfg.llm),
                                       ("convnext", cfg.convnext)) if v]
    return f" from {', '.join(given)}" if given else ""


def _build_model(cfg: TrainConfig) -> HiresLMM:
    """The model to train, or a :class:`TrainingError` naming the directories that failed."""
    try:
        return _construct_model(cfg)
    except TrainingError:
        raise
    except Exception as e:  # a user's model directory fails in library-specific ways (OSError, ValueError,
        # SafetensorError, KeyError in a config...): all of them are "this directory does not load"
        raise TrainingError(f"cannot build the {cfg.method} model{_model_sources(cfg)}: "
                            f"{type(e).__name__}: {one_line(e)}") from None


def _construct_model(cfg: TrainConfig) -> HiresLMM:
    from ..methods import build_model

    if cfg.init and (Path(cfg.init) / "config.json").exists() and not (Path(cfg.init) / "trainable.safetensors").exists():
        return HiresLMM.from_pretrained(cfg.init)  # a full model to continue from
    model = build_model(cfg.method, tiny=cfg.tiny, vision=cfg.vision, llm=cfg.llm, convnext=cfg.convnext,
                        seed=cfg.seed, **(cfg.connector or {}))
    if cfg.init:
        load_trainable(model, cfg.init)
    return model


def load_trainable(model: HiresLMM, path: str | os.PathLike) -> list[str]:
    """Load the parts a previous stage saved (``trainable.safetensors``) into ``model``."""
    from safetensors.torch import load_file

    f = Path(path) / "trainable.safetensors"
    if not f.exists():
        raise TrainingError(f"--init {path}: no trainable.safetensors (a stage-1 output) or full model there")
    state = load_file(f)
    own = model.state_dict()
    unknown = sorted(set(state) - set(own))
    if unknown:
        raise TrainingError(f"--init {path}: weights not in this model: {unknown[:10]}")
    bad = [k for k, v in state.items() if v.shape != own[k].shape]
    if bad:
        raise TrainingError(f"--init {path}: shapes differ for {bad[:10]}")
    meta = Path(path) / "stage.json"
    if meta.exists():
        info = json.loads(meta.read_text())
        if info.get("method") != model.config.method:
            raise TrainingError(f"--init {path} was trained for {info.get('method')}, not {model.config.method}")
    model.load_state_dict(state, strict=False)
    return sorted(state)


def _apply_stage(model: HiresLMM, cfg: TrainConfig) -> tuple[Stage, list[dict[str, Any]]]:
    try:
        stage = get_stage(cfg.method, cfg.stage, cfg.lr)
        return stage, apply_stage(model, stage)
    except ValueError as e:  # unknown stage, or one that trains nothing in this model
        raise TrainingError(one_line(e)) from None


def _model_for_stage(cfg: TrainConfig, engine: Engine, *, for_training: bool = True
                     ) -> tuple[HiresLMM, Stage, list[dict[str, Any]], Any]:
    """The model built (unsharded, :meth:`~.distributed.Engine.building`), staged (with its
    optimizer groups) and, ``for_training``, set up for gradient checkpointing
    (``--gradient-checkpointing`` or FSDP's ``fsdp_activation_checkpointing``), with its stage and
    chat template."""
    with engine.building():
        model = _build_model(cfg)
    if cfg.max_visual_tokens is not None:  # saved in config.json: the trained model plans within it
        model.config.plan_options = {**(model.config.plan_options or {}), "max_visual_tokens": cfg.max_visual_tokens}
    stage, groups = _apply_stage(model, cfg)
    if for_training and (cfg.gradient_checkpointing or engine.activation_checkpointing):
        # transformers >= 5.x renamed it (the old name warns and goes in v6)
        enable = getattr(model.llm, "activation_checkpointing_enable", None) or model.llm.gradient_checkpointing_enable
        enable()
        model.visual.vit.gradient_checkpointing = True
        if hasattr(model.visual, "vision_tower"):  # LLaVA-HR's ConvNeXt
            model.visual.vision_tower.convnext.gradient_checkpointing = True
    template = _template(cfg, stage)
    model.config.template = template.name  # recorded in config.json: prediction uses the same template
    return model, stage, groups, template


def _template(cfg: TrainConfig, stage: Stage) -> Any:
    from ..data.templates import get_template

    try:
        return get_template(cfg.template or stage.template)
    except ValueError as e:
        raise TrainingError(one_line(e)) from None


def _load_and_validate(cfg: TrainConfig, model: HiresLMM, template: Any, main: bool) -> tuple[list[Any], list[int], int]:
    """The usable records, their lengths and how many were skipped (``--skip-bad``).

    Records are validated (structure, images, template) without counting visual tokens; their
    lengths are then counted by the model's own planning (:func:`~.batches.count_lengths`: a
    composed method's compressed count, within the model's ``max_visual_tokens``). A record over
    ``max_length``, or with an image no plan fits the budget for, is a bad record."""
    from ..data.records import DataError, ValidationReport, load_records, validate

    try:
        records = load_records(cfg.data_path, strict=False, seed=cfg.seed)  # validate reports every problem at once
        report = validate(records, image_folder=cfg.image_folder, tokenizer=model.tokenizer, template=template,
                          max_length=None, method=None, progress=cfg.progress and main)
        counted = count_lengths(report.ok_records, report.lengths, image_folder=cfg.image_folder,
                                planner=ImagePlanner.of(model), max_length=cfg.max_length)
    except DataError:
        raise
    except OSError as e:  # a directory, no permission, an I/O error
        raise TrainingError(f"cannot read the training data {cfg.data_path}: {one_line(e)}") from None
    order = {(r.id, r.source): k for k, r in enumerate(records)}
    problems = sorted(report.problems + counted.problems, key=lambda p: order.get((p.record_id, p.source), 0))
    usable = [(r, n) for r, n in zip(report.ok_records, counted.lengths) if n is not None]
    if problems:
        full = ValidationReport(problems, [r for r, _ in usable], [n for _, n in usable], report.num_records)
        if not cfg.skip_bad:
            if len(problems) == len(counted.budget_problems):  # only the budget: one line naming a record
                bad = full.num_bad
                raise TrainingError(f"{problems[0]}; {bad} of {report.num_records} record(s) cannot be planned within "
                                    f"max_visual_tokens={model.config.plan_options.get('max_visual_tokens')} "
                                    "(pass --skip-bad to skip them, or a larger --max-visual-tokens)")
            full.raise_if_bad()
        if main:
            print(f"skipping {full.num_bad} bad record(s) (--skip-bad); first: {problems[0]}")
    if not usable:
        raise TrainingError("no usable records to train on")
    return [r for r, _ in usable], [n for _, n in usable], (full.num_bad if problems else 0)


# --- output directory, resumption ----------------------------------------------------------------

def _prepare_output(cfg: TrainConfig) -> Path:
    out = Path(cfg.output_dir)
    try:
        if out.exists() and not out.is_dir():
            raise TrainingError(f"--output-dir {out} is a file, not a directory")
        if out.exists() and any(out.iterdir()) and not (cfg.resume or cfg.overwrite):
            raise TrainingError(f"{out} exists and is not empty: pass --resume to continue or --overwrite to replace it")
        if cfg.overwrite and not cfg.resume and out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"--output-dir {out}: {one_line(e)}") from None
    return out


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (temporary directories of an interrupted save are ignored)."""
    return ckpt_io.latest(out / CKPT_DIR)


def _read_saved_config(path: Path) -> dict[str, Any]:
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise TrainingError(f"--resume: cannot read {path} ({one_line(e, 120)})") from None
    if not isinstance(saved, dict):
        raise TrainingError(f"--resume: {path} does not hold training arguments")
    return saved


def _resume_point(cfg: TrainConfig, out: Path, procs: ckpt_io.Processes) -> tuple[Path | None, dict[str, Any] | None]:
    """With ``--resume``: the checkpoint to continue from and its trainer state (``None, None``
    when there is none), after checking this run's arguments are the saved ones (those of the
    checkpoint, else ``train_config.json`` of a run that saved none)."""
    if not cfg.resume:
        return None, None
    path = latest_checkpoint(out)
    state = ckpt_io.read_state(path, procs) if path is not None else None
    if state is not None:
        saved, where = state.get("config"), str(path)
        if not isinstance(saved, dict):
            raise CheckpointError(f"checkpoint {path}: {STATE_FILE} holds no training arguments")
    elif (out / CONFIG_FILE).exists():
        saved, where = _read_saved_config(out / CONFIG_FILE), str(out / CONFIG_FILE)
    else:
        return None, None
    changed = check_same_run(saved, _config_json(cfg), _config_defaults(), allowed=cfg.allow_changed, where=where)
    if changed and procs.is_main:
        print(f"--resume: changed on purpose (--allow-changed): {', '.join(changed)}")
    return path, state


def _position(saved: dict[str, Any], path: Path, steps_per_epoch: int) -> dict[str, int]:
    """The data position of a checkpoint's state, checked: the loop indexes with it."""
    pos = {k: saved.get(k) for k in ("step", "epoch", "batch_in_epoch", "accelerator_step")}
    if not all(_is_int(v) and v >= 0 for v in pos.values()) or pos["batch_in_epoch"] > steps_per_epoch:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} has no valid step and data position")
    return pos


def _checkpoint_state(state: dict[str, int], accelerator: Any, cfg: TrainConfig, data: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint records besides tensors: the data position, accelerate's micro-step
    counter (gradient accumulation phase), the arguments and the data's fingerprint."""
    return {**state, "accelerator_step": int(accelerator.step), "config": _config_json(cfg), "data": data}


def _save(out: Path, state: dict[str, int], parts: ckpt_io.Parts, procs: ckpt_io.Processes, accelerator: Any,
          cfg: TrainConfig, data: dict[str, Any]) -> Path:
    try:  # every process calls it: under FSDP / ZeRO the state is gathered collectively
        return ckpt_io.save(out / CKPT_DIR, state["step"], _checkpoint_state(state, accelerator, cfg, data), parts,
                            procs, keep_last=cfg.keep_last)
    except OSError as e:  # a full disk, a vanished directory
        raise TrainingError(f"cannot write a checkpoint in {out / CKPT_DIR}: {one_line(e)}") from None


def _open_metrics(out: Path) -> Any:
    try:
        return open(out / METRICS_FILE, "a", encoding="utf-8")
    except OSError as e:
        raise TrainingError(f"cannot write {out / METRICS_FILE}: {one_line(e)}") from None


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves and exits at the next step boundary."""

    def __init__(self) -> None:
        self.raised: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        self.raised = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)


class _ListSampler(torch.utils.data.Sampler):
    def __init__(self, batches: list[list[int]]) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    output_dir: str
    stopped_by: str | None = None
    skipped_records: int = 0


def train(cfg: TrainConfig) -> TrainResult:
    """Run one training stage (see the module docstring)."""
    from accelerate.utils import set_seed

    from ..data.dataset import LlavaDataset, collate

    check_config(cfg)
    engine = setup(cfg.grad_accum, cfg.mixed_precision)  # what the launch asked for, checked
    accelerator = engine.accelerator
    main = accelerator.is_main_process
    procs = ckpt_io.Processes(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone)
    out = _prepare_output(cfg) if main else Path(cfg.output_dir)
    accelerator.wait_for_everyone()
    resume_from, saved = _resume_point(cfg, out, procs)  # before anything is built: refuse early
    set_seed(cfg.seed)

    model, stage, groups, template = _model_for_stage(cfg, engine)
    records, lengths, skipped = _load_and_validate(cfg, model, template, main)
    fingerprint = data_fingerprint(records, lengths)
    if saved is not None:
        check_same_data(saved.get("data"), fingerprint, str(resume_from))
    # images are loaded, planned and rendered in the DataLoader (workers when --num-workers > 0)
    dataset = LlavaDataset(records, image_folder=cfg.image_folder, tokenizer=model.tokenizer, template=template,
                           model_prepare=ImagePlanner.of(model).prepare, method=cfg.method, plan_options=model.config.plan_options,
                           lengths=lengths)
    plan = GlobalBatches(dataset.lengths(), cfg.batch_size, world=accelerator.num_processes,
                         rank=accelerator.process_index, accum=cfg.grad_accum, seed=cfg.seed,
                         group_by_length=cfg.group_by_length)
    steps_per_epoch = plan.steps_per_epoch()
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = int(cfg.warmup_ratio * total)

    schedule = SCHEDULES[cfg.lr_schedule]

    def make_optimizer(param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(param_groups, weight_decay=cfg.weight_decay)

    def make_scheduler(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, total, warmup))

    restored = None
    if resume_from is not None:
        # every file checked against the unsharded model and a probe optimizer of the same
        # construction; the model's weights go into the plain model, which is then sharded
        probe = make_optimizer([dict(g) for g in groups])
        restored = ckpt_io.read_checked(resume_from, ckpt_io.Parts(model, probe, make_scheduler(probe),
                                                                   accelerator.scaler), procs)
        del probe
    model.train()
    ddp_model, optimizer, torch_optimizer = engine.prepare(model, groups, make_optimizer, micro_batch=cfg.batch_size,
                                                           max_grad_norm=cfg.max_grad_norm)
    del groups  # FSDP replaced the parameters: the engine knows the live ones
    # the scheduler is not prepared: accelerate would step it once per process per step
    scheduler = make_scheduler(torch_optimizer)
    parts = engine.parts(scheduler, accelerator.scaler)
    clip_params = engine.trainable_parameters()

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    if restored is not None:
        pos = _position(restored.state, resume_from, steps_per_epoch)
        ckpt_io.apply_rest(restored, parts, procs)
        accelerator.step = pos.pop("accelerator_step")
        state = pos
        if main:
            print(f"resumed from {resume_from} at step {state['step']}")
    elif cfg.resume and main:
        print(f"--resume: no checkpoint in {out / CKPT_DIR}, starting from step 0")
    if main:
        if cfg.resume:  # the steps after the checkpoint are trained again: their old lines go
            truncate_metrics(out / METRICS_FILE, state["step"])
        try:
            _write_json_atomic(out / CONFIG_FILE, asdict(cfg))
        except OSError as e:
            raise TrainingError(f"cannot write {out / CONFIG_FILE}: {one_line(e)}") from None

    metrics = _open_metrics(out) if main else None
    bar = None
    if main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=state["step"], desc=f"train {cfg.method} stage {stage.name}", unit="step")
    last_loss: float | None = None
    stopped_by: str | None = None
    with _StopFlag() as stop:
        while state["step"] < total:
            micro = list(plan.micro_batches(state["epoch"], state["batch_in_epoch"]))
            loader = torch.utils.data.DataLoader(dataset, batch_sampler=_ListSampler(micro), collate_fn=collate,
                                                 num_workers=cfg.num_workers)
            it = iter(loader)
            while state["step"] < total and state["batch_in_epoch"] < steps_per_epoch:
                t0 = time.perf_counter()
                losses, n_tokens, n_visual, n_images = [], 0, 0, 0
                for _ in range(cfg.grad_accum):
                    batch = next(it)
                    with accelerator.accumulate(ddp_model):
                        o = ddp_model(batch["input_ids"], batch["image_inputs"], batch["labels"])
                        accelerator.backward(o.loss)
                        if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                            accelerator.clip_grad_norm_(clip_params, cfg.max_grad_norm)
                        optimizer.step()
                        if accelerator.sync_gradients:
                            scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    losses.append(o.loss.detach().float())
                    n_tokens += int(o.batch.attention_mask.sum())
                    n_visual += sum(o.batch.num_visual_tokens)
                    n_images += len(o.batch.num_visual_tokens)
                state["step"] += 1
                state["batch_in_epoch"] += 1
                loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean")
                last_loss = float(loss)
                tok = accelerator.reduce(torch.tensor([n_tokens, n_visual, n_images], dtype=torch.float64), "sum")
                dt = time.perf_counter() - t0
                if main and state["step"] % cfg.log_steps == 0:
                    rec = {"step": state["step"], "epoch": state["epoch"], "loss": last_loss,
                           "lr": scheduler.get_last_lr()[0], "tokens_per_s": float(tok[0]) / dt,
                           "visual_tokens_per_sample": float(tok[1] / max(1.0, float(tok[2]))) if tok[2] else 0.0,
                           "step_time_s": dt}
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}")
                stop_now = _agree(accelerator, stop.raised is not None)
                if state["step"] % cfg.save_steps == 0 or stop_now or state["step"] == total:
                    _save(out, state, parts, procs, accelerator, cfg, fingerprint)
                if stop_now:
                    stopped_by = stop.raised or "signal on another rank"
                    break
            if stopped_by:
                break
            if state["batch_in_epoch"] >= steps_per_epoch:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
    if bar is not None:
        bar.close()
    if metrics is not None:
        metrics.close()
    if stopped_by:
        if main:
            print(f"stopped by {stopped_by} at step {state['step']}; checkpoint saved — continue with --resume")
        return TrainResult(state["step"], last_loss, str(out), stopped_by, skipped)
    accelerator.wait_for_everyone()
    distributed = engine.describe()
    if engine.sharded:
        # the shards gathered (collective), loaded into a fresh unsharded model on the main
        # process (frozen weights rebuilt from the arguments, as a checkpoint's are)
        full = engine.model_state()
        if main:
            set_seed(cfg.seed)
            final, _, _, _ = _model_for_stage(cfg, engine, for_training=False)
            ckpt_io.load_model_tensors(out, final, full)
            save_final(final, out, stage, cfg, distributed)
    elif main:
        save_final(accelerator.unwrap_model(ddp_model), out, stage, cfg, distributed)
    accelerator.wait_for_everyone()
    return TrainResult(state["step"], last_loss, str(out), None, skipped)


def _agree(accelerator: Any, flag: bool) -> bool:
    """True on every rank if any rank was signalled (all ranks must stop at the same step)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, "sum").item() > 0)


def save_final(model: HiresLMM, out: Path, stage: Stage, cfg: TrainConfig,
               distributed: dict[str, Any] | None = None) -> None:
    """A stage-1 run saves only its trainable parts (plus config and tokenizer); later stages and
    ``scratch`` save a complete model directory. Both write ``stage.json``: the method, stage and
    the ``distributed`` record of :meth:`~.distributed.Engine.describe` (engine, processes, how
    many trainable parameters the fullest process held)."""
    model.eval()
    info = {"method": cfg.method, "stage": stage.name, "seed": cfg.seed, "tiny": cfg.tiny,
            "plan_options": model.config.plan_options, "distributed": distributed}
    try:
        if stage.save_trainable_only:
            from safetensors.torch import save_file

            tmp = out / ".trainable.tmp"
            save_file(trainable_state_dict(model), tmp, metadata={"format": "pt"})
            os.replace(tmp, out / "trainable.safetensors")
        else:
            model.save_pretrained(out)
        _write_json_atomic(out / "stage.json", info)
    except OSError as e:
        raise TrainingError(f"cannot save the trained model in {out}: {one_line(e)}") from None
