"""The training loop, top to bottom: build → stage → data → validate → optimise → checkpoint.

Runs on one CPU for a smoke run or on many processes under ``torchrun`` / ``accelerate launch``:
data parallel, FSDP2 or DeepSpeed ZeRO-2/3 as the launch's accelerate config says, never
overridden; a requested engine that is not what ends up active stops the run before training
(:mod:`.distributed`, docs/training.md).

* The arguments: :class:`~.config.TrainConfig` (its fields also make ``hires train``'s flags).
* :func:`train` runs in named phases: :func:`_start` (accelerator, processes, output directory,
  resume point), :func:`_model_for_stage`, :func:`_load_data`, :class:`_Optimization`,
  :func:`_read_checkpoint`, :func:`_prepare`, :func:`_restore_position`, :func:`_record_start`,
  :func:`_loop` (:func:`_step` per optimizer step) and :func:`_finish`.
* Visual tokens are counted as the model splices them (:class:`~hires_lmm.data.records.VisualTokenCounter`: a composed
  method's compressed count) within ``max_visual_tokens`` when one is given (saved in the model's
  ``plan_options``); a record over ``max_length``, or whose image no plan fits, is a bad record.
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import torch

from ..model import HiresLMM
from . import checkpoint as ckpt_io
from .batches import GlobalBatches
from .config import MIXED_PRECISION as MIXED_PRECISION  # re-exported: the arguments' old home
from .config import SCHEDULES as SCHEDULES
from .config import TrainConfig, _is_int, check_config, config_defaults, config_json
from .config import constant_with_warmup as constant_with_warmup
from .config import cosine_with_warmup as cosine_with_warmup
from .distributed import Engine, setup
from .errors import CheckpointError, ConfigMismatchError, TrainingError, one_line
from .resume import check_same_data, check_same_run, data_fingerprint, truncate_metrics
from .stages import Stage, apply_stage, get_stage, trainable_state_dict

CKPT_DIR = "checkpoints"
STATE_FILE = ckpt_io.STATE_FILE
CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"

__all__ = ["CheckpointError", "ConfigMismatchError", "TrainConfig", "TrainResult", "TrainingError", "check_config",
           "train"]


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
        visual: Any = model.visual  # each method's visual module: its encoders are attributes, not typed
        visual.vit.gradient_checkpointing = True
        if hasattr(visual, "vision_tower"):  # LLaVA-HR's ConvNeXt
            visual.vision_tower.convnext.gradient_checkpointing = True
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

    Records are validated (structure, images, template) and their lengths counted in the same
    pass, by the model's own planning (:meth:`~hires_lmm.data.records.VisualTokenCounter.of`: a
    composed method's compressed count, within the model's ``max_visual_tokens``); each image
    header is read once. A record over ``max_length``, or with an image no plan fits the budget
    for, is a bad record."""
    from ..data.records import DataError, VisualTokenCounter, load_records, validate

    try:
        records = load_records(cfg.data_path, strict=False, seed=cfg.seed)  # validate reports every problem at once
        report = validate(records, image_folder=cfg.image_folder, tokenizer=model.tokenizer, template=template,
                          max_length=cfg.max_length, counter=VisualTokenCounter.of(model),
                          progress=cfg.progress and main)
    except DataError:
        raise
    except OSError as e:  # a directory, no permission, an I/O error
        raise TrainingError(f"cannot read the training data {cfg.data_path}: {one_line(e)}") from None
    problems = report.problems
    if problems:
        if not cfg.skip_bad:
            if len(problems) == len(report.budget_problems):  # only the budget: one line naming a record
                raise TrainingError(f"{problems[0]}; {report.num_bad} of {report.num_records} record(s) cannot be "
                                    f"planned within max_visual_tokens="
                                    f"{model.config.plan_options.get('max_visual_tokens')} "
                                    "(pass --skip-bad to skip them, or a larger --max-visual-tokens)")
            report.raise_if_bad()
        if main:
            print(f"skipping {report.num_bad} bad record(s) (--skip-bad); first: {problems[0]}")
    if not report.ok_records:
        raise TrainingError("no usable records to train on")
    return report.ok_records, report.lengths, report.num_bad


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
    changed = check_same_run(saved, config_json(cfg), config_defaults(), allowed=cfg.allow_changed, where=where)
    if changed and procs.is_main:
        print(f"--resume: changed on purpose (--allow-changed): {', '.join(changed)}")
    return path, state


def _position(saved: dict[str, Any], path: Path, steps_per_epoch: int) -> dict[str, int]:
    """The data position of a checkpoint's state, checked: the loop indexes with it."""
    raw = {k: saved.get(k) for k in ("step", "epoch", "batch_in_epoch", "accelerator_step")}
    pos = {k: v for k, v in raw.items() if _is_int(v) and v >= 0}
    if len(pos) < len(raw) or pos["batch_in_epoch"] > steps_per_epoch:
        raise CheckpointError(f"checkpoint {path}: {STATE_FILE} has no valid step and data position")
    return pos


def _checkpoint_state(state: dict[str, int], accelerator: Any, cfg: TrainConfig, data: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint records besides tensors: the data position, accelerate's micro-step
    counter (gradient accumulation phase), the arguments and the data's fingerprint."""
    return {**state, "accelerator_step": int(accelerator.step), "config": config_json(cfg), "data": data}


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


# --- the run, phase by phase ---------------------------------------------------------------------

@dataclass
class _Run:
    """What every phase of :func:`train` shares: the arguments, the engine and this process."""

    cfg: TrainConfig
    engine: Engine
    accelerator: Any
    procs: ckpt_io.Processes
    out: Path
    resume_from: Path | None  # the checkpoint ``--resume`` continues from
    saved: dict[str, Any] | None  # its trainer state

    @property
    def main(self) -> bool:
        return bool(self.accelerator.is_main_process)


@dataclass
class _Data:
    """The records to train on, their dataset and the global batches cut from them."""

    dataset: Any  # LlavaDataset
    batches: GlobalBatches
    fingerprint: dict[str, Any]
    skipped: int
    steps_per_epoch: int
    total: int  # optimizer steps of the run
    warmup: int


class _Optimization:
    """AdamW with the run's weight decay and the learning-rate schedule over ``total`` steps;
    built twice on a resume (a probe the checkpoint is checked against, then the live one)."""

    def __init__(self, cfg: TrainConfig, total: int, warmup: int) -> None:
        self.weight_decay, self.schedule = cfg.weight_decay, SCHEDULES[cfg.lr_schedule]
        self.total, self.warmup = total, warmup

    def optimizer(self, param_groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
        return torch.optim.AdamW(param_groups, weight_decay=self.weight_decay)

    def scheduler(self, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        schedule, total, warmup = self.schedule, self.total, self.warmup
        # a lambda, as before: LambdaLR saves the state of callable objects, not of functions
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s, total, warmup))


@dataclass
class _Live:
    """The prepared (wrapped, possibly sharded) model and its optimisation, as the loop drives them."""

    model: Any  # the engine's wrapper of the model (DDP, FSDP, DeepSpeed) or the model
    optimizer: Any  # accelerate's wrapper of the optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    parts: ckpt_io.Parts  # what a checkpoint saves
    clip_params: list[torch.nn.Parameter]


def train(cfg: TrainConfig) -> TrainResult:
    """Run one training stage (see the module docstring): the phases below, in order."""
    check_config(cfg)
    run = _start(cfg)
    model, stage, groups, template = _model_for_stage(cfg, run.engine)
    data = _load_data(run, model, template)
    optimization = _Optimization(cfg, data.total, data.warmup)
    restored = _read_checkpoint(run, model, groups, optimization)
    live = _prepare(run, model, groups, optimization)
    del groups  # FSDP replaced the parameters: the engine knows the live ones
    state = _restore_position(run, restored, live, data.steps_per_epoch)
    _record_start(run, state)
    last_loss, stopped_by = _loop(run, data, live, stage, state)
    if stopped_by:
        if run.main:
            print(f"stopped by {stopped_by} at step {state['step']}; checkpoint saved — continue with --resume")
        return TrainResult(state["step"], last_loss, str(run.out), stopped_by, data.skipped)
    _finish(run, live, stage)
    return TrainResult(state["step"], last_loss, str(run.out), None, data.skipped)


def _start(cfg: TrainConfig) -> _Run:
    """The accelerator and this process's place (what the launch asked for, checked), the output
    directory (made by the main process), the checkpoint to resume from (refused early, before
    anything is built, when the arguments differ) and the seed."""
    from accelerate.utils import set_seed

    engine = setup(cfg.grad_accum, cfg.mixed_precision)
    accelerator = engine.accelerator
    procs = ckpt_io.Processes(accelerator.process_index, accelerator.num_processes, accelerator.wait_for_everyone)
    out = _prepare_output(cfg) if accelerator.is_main_process else Path(cfg.output_dir)
    accelerator.wait_for_everyone()
    resume_from, saved = _resume_point(cfg, out, procs)
    set_seed(cfg.seed)
    return _Run(cfg, engine, accelerator, procs, out, resume_from, saved)


def _load_data(run: _Run, model: HiresLMM, template: Any) -> _Data:
    """The validated records (the same as the resumed run's), their dataset (images loaded,
    planned and rendered in the DataLoader: workers when ``--num-workers`` > 0), this rank's
    global batches and the run's length in steps."""
    from ..data.dataset import LlavaDataset
    from ..data.records import VisualTokenCounter

    cfg = run.cfg
    records, lengths, skipped = _load_and_validate(cfg, model, template, run.main)
    fingerprint = data_fingerprint(records, lengths)
    if run.saved is not None:
        check_same_data(run.saved.get("data"), fingerprint, str(run.resume_from))
    dataset = LlavaDataset(records, image_folder=cfg.image_folder, tokenizer=model.tokenizer, template=template,
                           model_prepare=VisualTokenCounter.of(model).prepare, method=cfg.method,
                           plan_options=model.config.plan_options, lengths=lengths)
    batches = GlobalBatches(dataset.lengths(), cfg.batch_size, world=run.accelerator.num_processes,
                            rank=run.accelerator.process_index, accum=cfg.grad_accum, seed=cfg.seed,
                            group_by_length=cfg.group_by_length)
    steps_per_epoch = batches.steps_per_epoch()
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    return _Data(dataset, batches, fingerprint, skipped, steps_per_epoch, total, int(cfg.warmup_ratio * total))


def _read_checkpoint(run: _Run, model: HiresLMM, groups: list[dict[str, Any]],
                     optimization: _Optimization) -> ckpt_io.Restored | None:
    """With a checkpoint to resume from: every file checked against the unsharded model and a
    probe optimizer of the same construction; the model's weights go into the plain model,
    which is then sharded (:func:`_prepare`)."""
    if run.resume_from is None:
        return None
    probe = optimization.optimizer([dict(g) for g in groups])
    return ckpt_io.read_checked(run.resume_from, ckpt_io.Parts(model, probe, optimization.scheduler(probe),
                                                               run.accelerator.scaler), run.procs)


def _prepare(run: _Run, model: HiresLMM, groups: list[dict[str, Any]], optimization: _Optimization) -> _Live:
    """The model in training mode, wrapped (and sharded) by the engine with its optimizer; the
    scheduler is not prepared (accelerate would step it once per process per step)."""
    cfg, engine = run.cfg, run.engine
    model.train()
    ddp_model, optimizer, torch_optimizer = engine.prepare(model, groups, optimization.optimizer,
                                                           micro_batch=cfg.batch_size, max_grad_norm=cfg.max_grad_norm)
    scheduler = optimization.scheduler(torch_optimizer)
    return _Live(ddp_model, optimizer, scheduler, engine.parts(scheduler, run.accelerator.scaler),
                 engine.trainable_parameters())


def _restore_position(run: _Run, restored: ckpt_io.Restored | None, live: _Live, steps_per_epoch: int) -> dict[str, int]:
    """The data position to start from: step 0, or the checkpoint's (its optimizer state,
    schedule, RNG states and accelerate's micro-step counter given to the live parts)."""
    if restored is None:
        if run.cfg.resume and run.main:
            print(f"--resume: no checkpoint in {run.out / CKPT_DIR}, starting from step 0")
        return {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    assert run.resume_from is not None  # restored from it
    pos = _position(restored.state, run.resume_from, steps_per_epoch)
    ckpt_io.apply_rest(restored, live.parts, run.procs)
    run.accelerator.step = pos.pop("accelerator_step")
    if run.main:
        print(f"resumed from {run.resume_from} at step {pos['step']}")
    return pos


def _record_start(run: _Run, state: dict[str, int]) -> None:
    """On the main process: ``metrics.jsonl`` cut back to the starting step (the steps after the
    checkpoint are trained again: their old lines go) and ``train_config.json`` written."""
    if not run.main:
        return
    if run.cfg.resume:
        truncate_metrics(run.out / METRICS_FILE, state["step"])
    try:
        _write_json_atomic(run.out / CONFIG_FILE, asdict(run.cfg))
    except OSError as e:
        raise TrainingError(f"cannot write {run.out / CONFIG_FILE}: {one_line(e)}") from None


def _loop(run: _Run, data: _Data, live: _Live, stage: Stage, state: dict[str, int]) -> tuple[float | None, str | None]:
    """Optimizer steps from ``state`` (updated in place) to ``data.total``, epoch after epoch:
    each step logged (``metrics.jsonl``, the progress bar) and checkpointed every ``save_steps``,
    at the end and when a signal stops the run. Returns the last loss and what stopped the run
    early (``None``: it ran to the end)."""
    cfg, main = run.cfg, run.main
    metrics = _open_metrics(run.out) if main else None
    bar = None
    if main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=data.total, initial=state["step"], desc=f"train {cfg.method} stage {stage.name}", unit="step")
    last_loss: float | None = None
    stopped_by: str | None = None
    try:
        with _StopFlag() as stop:
            while state["step"] < data.total and not stopped_by:
                it = _epoch_batches(run, data, state)
                while state["step"] < data.total and state["batch_in_epoch"] < data.steps_per_epoch:
                    last_loss, counts, seconds = _step(run, live, it)
                    state["step"] += 1
                    state["batch_in_epoch"] += 1
                    if metrics is not None and state["step"] % cfg.log_steps == 0:
                        _log(metrics, state, last_loss, live, counts, seconds)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix(loss=f"{last_loss:.4f}")
                    stop_now = _agree(run.accelerator, stop.raised is not None)
                    if state["step"] % cfg.save_steps == 0 or stop_now or state["step"] == data.total:
                        _save(run.out, state, live.parts, run.procs, run.accelerator, cfg, data.fingerprint)
                    if stop_now:
                        stopped_by = stop.raised or "signal on another rank"
                        break
                if not stopped_by and state["batch_in_epoch"] >= data.steps_per_epoch:
                    state["epoch"] += 1
                    state["batch_in_epoch"] = 0
    finally:
        if bar is not None:
            bar.close()
        if metrics is not None:
            metrics.close()
    return last_loss, stopped_by


def _epoch_batches(run: _Run, data: _Data, state: dict[str, int]) -> Iterator[dict[str, Any]]:
    """This rank's micro-batches of the current epoch from the current position, loaded."""
    from ..data.dataset import collate

    micro = list(data.batches.micro_batches(state["epoch"], state["batch_in_epoch"]))
    loader = torch.utils.data.DataLoader(data.dataset, batch_sampler=_ListSampler(micro), collate_fn=collate,
                                         num_workers=run.cfg.num_workers)
    return iter(loader)


def _step(run: _Run, live: _Live, it: Iterator[dict[str, Any]]) -> tuple[float, torch.Tensor, float]:
    """One optimizer step of ``grad_accum`` micro-batches: the loss (mean over the micro-batches
    and processes), the tokens, visual tokens and images of the step (summed over processes)
    and its seconds."""
    cfg, accelerator = run.cfg, run.accelerator
    t0 = time.perf_counter()
    losses, n_tokens, n_visual, n_images = [], 0, 0, 0
    for _ in range(cfg.grad_accum):
        batch = next(it)
        with accelerator.accumulate(live.model):
            o = live.model(batch["input_ids"], batch["image_inputs"], batch["labels"])
            accelerator.backward(o.loss)
            if accelerator.sync_gradients and cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(live.clip_params, cfg.max_grad_norm)
            live.optimizer.step()
            if accelerator.sync_gradients:
                live.scheduler.step()
            live.optimizer.zero_grad(set_to_none=True)
        losses.append(o.loss.detach().float())
        n_tokens += int(o.batch.attention_mask.sum())
        n_visual += sum(o.batch.num_visual_tokens)
        n_images += len(o.batch.num_visual_tokens)
    loss = accelerator.reduce(torch.stack(losses).mean(), reduction="mean")
    counts = accelerator.reduce(torch.tensor([n_tokens, n_visual, n_images], dtype=torch.float64), "sum")
    return float(loss), counts, time.perf_counter() - t0


def _log(metrics: IO[str], state: dict[str, int], loss: float, live: _Live, counts: torch.Tensor, seconds: float) -> None:
    """One line of ``metrics.jsonl``: loss, learning rate, tokens per second, visual tokens per sample."""
    rec = {"step": state["step"], "epoch": state["epoch"], "loss": loss, "lr": live.scheduler.get_last_lr()[0],
           "tokens_per_s": float(counts[0]) / seconds,
           "visual_tokens_per_sample": float(counts[1] / max(1.0, float(counts[2]))) if counts[2] else 0.0,
           "step_time_s": seconds}
    metrics.write(json.dumps(rec) + "\n")
    metrics.flush()


def _finish(run: _Run, live: _Live, stage: Stage) -> None:
    """Save the trained model (:func:`save_final`) once every process is done. Under a sharding
    engine the shards are gathered (collective) and loaded into a fresh unsharded model on the
    main process (frozen weights rebuilt from the arguments, as a checkpoint's are)."""
    from accelerate.utils import set_seed

    cfg, engine, main = run.cfg, run.engine, run.main
    run.accelerator.wait_for_everyone()
    distributed = engine.describe()
    if engine.sharded:
        full = engine.model_state()
        if main:
            set_seed(cfg.seed)
            final, _, _, _ = _model_for_stage(cfg, engine, for_training=False)
            assert full is not None  # gathered onto the main process
            ckpt_io.load_model_tensors(run.out, final, full)
            save_final(final, run.out, stage, cfg, distributed)
    elif main:
        save_final(run.accelerator.unwrap_model(live.model), run.out, stage, cfg, distributed)
    run.accelerator.wait_for_everyone()


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
