"""The training loop, top to bottom: build → stage → data → validate → optimise → checkpoint.

Runs on one CPU for a smoke run or on many GPUs under ``torchrun`` / ``accelerate launch``
(data parallel; FSDP and DeepSpeed through accelerate configs, see docs/training.md).

* AdamW, cosine schedule with linear warmup, gradient accumulation, gradient clipping.
* Deterministic global batches (:mod:`.batches`): a resumed run continues exactly.
* Checkpoints: ``OUT/checkpoints/step-XXXXXXX`` written to a temporary directory and renamed
  (atomic), the last ``keep_last`` kept; each holds model, optimizer, scheduler and every
  process's RNG states plus ``trainer_state.json``.
* SIGINT / SIGTERM: finish the current step, save a checkpoint, exit cleanly (resume with
  ``--resume``). SIGKILL loses at most the steps since the last checkpoint.
* Metrics: ``OUT/metrics.jsonl`` (loss, learning rate, tokens/s, visual tokens per sample) and a
  progress bar.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..model import HiresLMM, prepare_image
from .batches import GlobalBatches
from .stages import Stage, apply_stage, get_stage, trainable_state_dict

CKPT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"


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
    log_steps: int = 1
    progress: bool = True
    connector: dict[str, Any] | None = None


class TrainingError(RuntimeError):
    """A problem found before or during training, reported without a traceback by the CLI."""


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


def _build_model(cfg: TrainConfig) -> HiresLMM:
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


def _prepare_output(cfg: TrainConfig) -> Path:
    out = Path(cfg.output_dir)
    if out.exists() and any(out.iterdir()) and not (cfg.resume or cfg.overwrite):
        raise TrainingError(f"{out} exists and is not empty: pass --resume to continue or --overwrite to replace it")
    if cfg.overwrite and not cfg.resume and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint (temporary directories of an interrupted save are ignored)."""
    d = out / CKPT_DIR
    if not d.is_dir():
        return None
    done = [p for p in d.iterdir() if p.name.startswith("step-") and (p / STATE_FILE).exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves and exits at the next step boundary."""

    def __init__(self) -> None:
        self.raised: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
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
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.utils import set_seed

    from ..data.dataset import LlavaDataset, collate
    from ..data.records import load_records, validate
    from ..data.templates import get_template

    mp = cfg.mixed_precision
    if mp == "auto":
        mp = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    # cpu=True when there is no GPU: accelerate then sets up gloo for torchrun's processes
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=mp, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    main = accelerator.is_main_process
    out = _prepare_output(cfg) if main else Path(cfg.output_dir)
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)

    model = _build_model(cfg)
    stage: Stage = get_stage(cfg.method, cfg.stage, cfg.lr)
    groups = apply_stage(model, stage)
    if cfg.gradient_checkpointing:
        # transformers >= 5.x renamed it (the old name warns and goes in v6)
        enable = getattr(model.llm, "activation_checkpointing_enable", None) or model.llm.gradient_checkpointing_enable
        enable()
        model.visual.vit.gradient_checkpointing = True
        if hasattr(model.visual, "vision_tower"):  # LLaVA-HR's ConvNeXt
            model.visual.vision_tower.convnext.gradient_checkpointing = True
    template = get_template(cfg.template or stage.template)
    model.config.template = template.name  # recorded in config.json: prediction uses the same template

    records = load_records(cfg.data_path, strict=False, seed=cfg.seed)  # validate reports every problem at once
    report = validate(records, image_folder=cfg.image_folder, tokenizer=model.tokenizer, template=template,
                      max_length=cfg.max_length, method=cfg.method, plan_options=model.config.plan_options,
                      progress=cfg.progress and main)
    skipped = report.num_bad
    if report.problems:
        if not cfg.skip_bad:
            report.raise_if_bad()
        records = report.ok_records
        if main:
            print(f"skipping {skipped} bad record(s) (--skip-bad); first: {report.problems[0]}")
    if not records:
        raise TrainingError("no usable records to train on")
    # images are loaded, planned and rendered in the DataLoader (workers when --num-workers > 0)
    prepare = functools.partial(prepare_image, method=cfg.method, plan_options=dict(model.config.plan_options))
    dataset = LlavaDataset(records, image_folder=cfg.image_folder, tokenizer=model.tokenizer, template=template,
                           model_prepare=prepare, method=cfg.method, plan_options=model.config.plan_options,
                           lengths=report.lengths)
    plan = GlobalBatches(dataset.lengths(), cfg.batch_size, world=accelerator.num_processes,
                         rank=accelerator.process_index, accum=cfg.grad_accum, seed=cfg.seed,
                         group_by_length=cfg.group_by_length)
    steps_per_epoch = plan.steps_per_epoch()
    total = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup = int(cfg.warmup_ratio * total)

    optimizer = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    if cfg.lr_schedule not in SCHEDULES:
        raise TrainingError(f"unknown lr_schedule {cfg.lr_schedule!r}; choose from {', '.join(SCHEDULES)}")
    schedule = SCHEDULES[cfg.lr_schedule]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: schedule(s, total, warmup))
    model.train()
    # the scheduler is not prepared: accelerate would step it once per process per step
    ddp_model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    ckpt = latest_checkpoint(out) if cfg.resume else None
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        state = json.loads((ckpt / STATE_FILE).read_text())
        if main:
            print(f"resumed from {ckpt} at step {state['step']}")
    elif cfg.resume and main:
        print(f"--resume: no checkpoint in {out / CKPT_DIR}, starting from step 0")
    if main:
        (out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))

    metrics = open(out / "metrics.jsonl", "a") if main else None
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
                            accelerator.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.max_grad_norm)
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
                    save_checkpoint(accelerator, out, state, cfg.keep_last)
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
    if main:
        save_final(accelerator.unwrap_model(ddp_model), out, stage, cfg)
    accelerator.wait_for_everyone()
    return TrainResult(state["step"], last_loss, str(out), None, skipped)


def _agree(accelerator: Any, flag: bool) -> bool:
    """True on every rank if any rank was signalled (all ranks must stop at the same step)."""
    if accelerator.num_processes == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, "sum").item() > 0)


def save_checkpoint(accelerator: Any, out: Path, state: dict[str, int], keep_last: int) -> Path:
    """Write ``checkpoints/step-N`` atomically (temporary directory, then rename) and prune."""
    root = out / CKPT_DIR
    final = root / f"step-{state['step']:07d}"
    tmp = root / f".tmp-step-{state['step']:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted((p for p in root.iterdir() if p.name.startswith("step-")), key=lambda p: p.name)
        for old in done[:-max(1, keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_final(model: HiresLMM, out: Path, stage: Stage, cfg: TrainConfig) -> None:
    """A stage-1 run saves only its trainable parts (plus config and tokenizer); later stages and
    ``scratch`` save a complete model directory."""
    model.eval()
    if stage.save_trainable_only:
        from safetensors.torch import save_file

        tmp = out / ".trainable.tmp"
        save_file(trainable_state_dict(model), tmp, metadata={"format": "pt"})
        os.replace(tmp, out / "trainable.safetensors")
        (out / "stage.json").write_text(json.dumps({"method": cfg.method, "stage": stage.name, "seed": cfg.seed,
                                                    "tiny": cfg.tiny, "plan_options": model.config.plan_options},
                                                   indent=2))
    else:
        model.save_pretrained(out)
