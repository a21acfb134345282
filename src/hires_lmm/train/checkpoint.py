"""Training checkpoints that resume exactly and never unpickle anything.

A checkpoint ``step-N/`` holds only safetensors and JSON, so a tampered or foreign file can at
worst be refused, never run code (accelerate's ``save_state`` writes pickles, loaded with
``weights_only=False``: resuming a tampered one ran arbitrary code):

=========================  ================================================================
``model.safetensors``      the trainable parameters and the buffers (frozen weights are rebuilt
                           from the run's arguments, which ``--resume`` checks are unchanged)
``optimizer.safetensors``  every tensor of ``optimizer.state_dict()["state"]`` as ``"<id>/<key>"``
``optimizer.json``         the rest: ``param_groups`` and any non-tensor state values
``scheduler.json``         ``scheduler.state_dict()`` without its (rebuilt) ``lr_lambdas``, and the
                           fp16 grad scaler's state
``rng-<rank>.json``        each process's python, numpy, torch (and CUDA) RNG states
``trainer_state.json``     format, version, number of processes and the trainer's own state (step,
                           data position, arguments); written last, it marks the checkpoint
                           complete
=========================  ================================================================

Every value read back is checked against what the live objects hold (same keys, kinds, shapes)
before it is applied; anything else raises :class:`CheckpointError` with a one-line message.

Interface: :func:`save` (atomic: a temporary directory renamed into place), :func:`load`,
:func:`read_state` (the trainer's state only, to check arguments before building anything) and
:func:`latest`. Processes are described by :class:`Processes`; every process writes its own RNG
file and the main process everything shared.

The files hold **full** (consolidated) tensors whatever the engine: under FSDP or DeepSpeed ZeRO
the :class:`Parts` carry collective ``model_state`` / ``optimizer_state`` functions that gather the
shards (every process calls them; the main process gets the full tensors) and a
``load_optimizer`` that scatters a full optimizer state back (:mod:`.distributed`). So one
format, checked the same way, serves every engine, and a sharded run's checkpoint is read by the
same code as a single process's. On resume the checks run against the *unsharded* model and a
probe optimizer before anything is sharded (:func:`read_checked`); the model's tensors are loaded
into the plain model then, and the rest applied to the live, sharded objects afterwards
(:func:`apply_rest`).
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from .errors import CheckpointError, one_line

FORMAT = "hires-lmm-checkpoint"
VERSION = 1
STATE_FILE = "trainer_state.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
#: what accelerate's save_state wrote before this format: never opened, only recognised
_PICKLE_SUFFIXES = (".bin", ".pkl", ".pt", ".pth", ".pickle")
_STEP_DIR = re.compile(r"step-(\d+)")


def rng_file(rank: int) -> str:
    """The RNG-state file of process ``rank``."""
    return f"rng-{rank}.json"


def expected_files(world_size: int) -> set[str]:
    """Every file a complete checkpoint of ``world_size`` processes holds, and nothing else."""
    return {STATE_FILE, MODEL_FILE, OPTIMIZER_TENSORS, OPTIMIZER_META, SCHEDULER_FILE,
            *(rng_file(r) for r in range(world_size))}


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes, and a barrier that waits for all."""

    rank: int = 0
    world_size: int = 1
    barrier: Callable[[], None] = field(default=lambda: None, compare=False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


@dataclass
class Parts:
    """The live objects a checkpoint saves and restores (``model`` unwrapped from DDP).

    ``model_state`` and ``optimizer_state`` (collective under a sharding engine: every process
    calls them, the main process gets full CPU tensors, the others may get ``None``) default to
    :func:`model_tensors` and ``optimizer.state_dict()``; ``load_optimizer`` (a full, checked
    ``state_dict`` keyed by parameter id) defaults to ``optimizer.load_state_dict``.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: Any | None = None  # torch.amp.GradScaler under fp16, else None
    model_state: Callable[[], Mapping[str, torch.Tensor] | None] | None = None
    optimizer_state: Callable[[], dict[str, Any] | None] | None = None
    load_optimizer: Callable[[dict[str, Any]], None] | None = None


# --- files ---------------------------------------------------------------------------------------

def _fsync(path: Path) -> None:
    """Flush ``path`` to disk: the directory rename that publishes a checkpoint must not outrun
    its contents after a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    # allow_nan=False: a NaN would be written as a bare token other JSON readers reject
    path.write_text(json.dumps(obj, allow_nan=False))
    _fsync(path)


def _write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file(dict(tensors), str(path), metadata={"format": "pt"})
    _fsync(path)


def _read_json(directory: Path, name: str) -> Any:
    try:
        return json.loads((directory / name).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {directory}: {name} is missing") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {directory}: {name} is not valid JSON ({one_line(e, 120)})") from None


def _read_tensors(directory: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / name
    if not path.is_file():
        raise CheckpointError(f"checkpoint {directory}: {name} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {directory}: {name} is not a valid safetensors file "
                              f"({one_line(e, 120)})") from None


def _bad(directory: Path, name: str, what: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {directory}: {name}: {what}")


# --- model ---------------------------------------------------------------------------------------

def model_keys(model: nn.Module) -> set[str]:
    """Trainable parameters and persistent buffers: what training changes. Frozen parameters
    are rebuilt bit-identically from the (checked) arguments, so they are not saved."""
    sd_keys = set(model.state_dict().keys())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n for n, _ in model.named_buffers()} & sd_keys  # non-persistent ones are not state
    return trainable | buffers


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's part of a checkpoint (copies on the CPU: safetensors refuses shared memory)."""
    keys = model_keys(model)
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in model.state_dict().items() if k in keys}


def _check_tensors_match(directory: Path, name: str, saved: Mapping[str, torch.Tensor],
                         live: Mapping[str, torch.Tensor]) -> None:
    missing, unexpected = sorted(set(live) - set(saved)), sorted(set(saved) - set(live))
    if missing or unexpected:
        raise _bad(directory, name, f"does not match this model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in saved.items():
        if v.shape != live[k].shape or v.dtype != live[k].dtype:
            raise _bad(directory, name, f"{k} is {v.dtype} {tuple(v.shape)}, the model has "
                                        f"{live[k].dtype} {tuple(live[k].shape)}")


def load_model_tensors(directory: Path, model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Check ``tensors`` against ``model`` (same keys, shapes, dtypes) and copy them in."""
    live = {k: v for k, v in model.state_dict().items() if k in model_keys(model)}
    _check_tensors_match(directory, MODEL_FILE, tensors, live)
    model.load_state_dict(dict(tensors), strict=False)


# --- optimizer -----------------------------------------------------------------------------------

def _json_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def optimizer_parts(optimizer: torch.optim.Optimizer | Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` (or such a full state dict) split into tensors
    (``"<param id>/<key>"``) and a JSON part."""
    sd = optimizer if isinstance(optimizer, Mapping) else optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{pid}/{key}"] = v.detach().to("cpu", copy=True).contiguous()
            elif _json_scalar(v):
                values.setdefault(str(pid), {})[key] = v
            else:  # a new optimizer with richer state: fail at save, not silently at resume
                raise TypeError(f"optimizer state {key!r} of type {type(v).__name__} cannot be checkpointed")
    return tensors, {"param_groups": sd["param_groups"], "state_values": values}


def _restore_groups(directory: Path, saved: Any, live: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Saved ``param_groups`` checked against the live ones: same count, keys, kinds and number
    of parameters (JSON turned tuples such as ``betas`` into lists; they are turned back)."""
    if not isinstance(saved, list) or len(saved) != len(live):
        raise _bad(directory, OPTIMIZER_META, f"expected {len(live)} parameter groups")
    out = []
    for g, cur in zip(saved, live):
        if not isinstance(g, dict) or set(g) != set(cur):
            raise _bad(directory, OPTIMIZER_META, "parameter groups do not match this optimizer")
        if g.get("name", None) != cur.get("name", None):
            raise _bad(directory, OPTIMIZER_META, f"group {g.get('name')!r} where this run has {cur.get('name')!r}")
        params = g["params"]
        if not (isinstance(params, list) and len(params) == len(cur["params"])
                and all(isinstance(i, int) and not isinstance(i, bool) for i in params)):
            raise _bad(directory, OPTIMIZER_META, f"group {cur.get('name')!r} has other parameters")
        fixed = {}
        for k, v in g.items():
            want = cur[k]
            if isinstance(want, tuple) and isinstance(v, list):
                v = tuple(v)
            if k != "params" and not _same_kind(v, want):
                raise _bad(directory, OPTIMIZER_META, f"{k} is {v!r}")
            fixed[k] = v
        out.append(fixed)
    return out


def load_optimizer_parts(directory: Path, optimizer: torch.optim.Optimizer, tensors: Mapping[str, torch.Tensor],
                         meta: Any) -> dict[str, Any]:
    """Rebuild ``optimizer.state_dict()`` from its two files, check it and load it into
    ``optimizer`` (the run's, or an unsharded probe of it). Returns the checked state dict."""
    live = optimizer.state_dict()
    if not isinstance(meta, dict) or set(meta) != {"param_groups", "state_values"}:
        raise _bad(directory, OPTIMIZER_META, "not an optimizer description")
    groups = _restore_groups(directory, meta["param_groups"], live["param_groups"])
    params: dict[int, torch.nn.Parameter] = {}  # saved id → live parameter (ids number the parameters group by group)
    for g, live_group in zip(groups, optimizer.param_groups):
        params.update(zip(g["params"], live_group["params"]))
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        pid, _, name = key.partition("/")
        if not pid.isdigit() or int(pid) not in params or not name:
            raise _bad(directory, OPTIMIZER_TENSORS, f"unexpected tensor {key!r}")
        p = params[int(pid)]
        if v.dim() > 0 and v.shape != p.shape:  # AdamW's moments have their parameter's shape
            raise _bad(directory, OPTIMIZER_TENSORS, f"{key} is {tuple(v.shape)}, its parameter {tuple(p.shape)}")
        state.setdefault(int(pid), {})[name] = v
    values = meta["state_values"]
    if not isinstance(values, dict):
        raise _bad(directory, OPTIMIZER_META, "state_values is not an object")
    for pid, kv in values.items():
        if not pid.isdigit() or int(pid) not in params or not isinstance(kv, dict) \
                or not all(_json_scalar(v) for v in kv.values()):
            raise _bad(directory, OPTIMIZER_META, f"unexpected state for parameter {pid!r}")
        state.setdefault(int(pid), {}).update(kv)
    full = {"state": state, "param_groups": groups}
    try:
        optimizer.load_state_dict(full)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise _bad(directory, OPTIMIZER_META, f"refused by the optimizer ({one_line(e, 120)})") from None
    return full


# --- scheduler, scaler ---------------------------------------------------------------------------

def _same_kind(value: Any, like: Any) -> bool:
    """``value`` (read from JSON) is of the kind of ``like`` (the live value): the loaders set
    attributes from these, so a string where a number belongs must not get through."""
    if like is None:
        return value is None
    if isinstance(like, bool):
        return isinstance(value, bool)
    if isinstance(like, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(like, (list, tuple)):
        return isinstance(value, (list, tuple)) and len(value) == len(like) and all(map(_same_kind, value, like))
    return type(value) is type(like)


def _scheduler_json(scheduler: Any) -> dict[str, Any]:
    # lr_lambdas are functions of the run's arguments, rebuilt by the trainer
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


def _check_like(directory: Path, name: str, saved: Any, live: Mapping[str, Any], what: str) -> None:
    if not isinstance(saved, dict) or set(saved) != set(live):
        raise _bad(directory, name, f"{what} state does not match this run's")
    for k, v in saved.items():
        if not _same_kind(v, live[k]):
            raise _bad(directory, name, f"{what} {k} is {one_line(repr(v), 60)}")


def load_schedule(directory: Path, parts: Parts, saved: Any) -> None:
    """Restore the scheduler (and the fp16 grad scaler) from ``scheduler.json``'s content."""
    if not isinstance(saved, dict) or set(saved) != {"scheduler", "scaler"}:
        raise _bad(directory, SCHEDULER_FILE, "not a scheduler description")
    live = _scheduler_json(parts.scheduler)
    _check_like(directory, SCHEDULER_FILE, saved["scheduler"], live, "scheduler")
    if (saved["scaler"] is None) != (parts.scaler is None):
        raise _bad(directory, SCHEDULER_FILE, "saved with another --mixed-precision (grad scaler)")
    if parts.scaler is not None:
        _check_like(directory, SCHEDULER_FILE, saved["scaler"], parts.scaler.state_dict(), "grad scaler")
        parts.scaler.load_state_dict(saved["scaler"])
    state = dict(saved["scheduler"])
    if "lr_lambdas" in parts.scheduler.state_dict():  # LambdaLR's loader expects the key
        state["lr_lambdas"] = [None] * len(parts.scheduler.state_dict()["lr_lambdas"])
    parts.scheduler.load_state_dict(state)


# --- RNG -----------------------------------------------------------------------------------------

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unb64(s: Any) -> torch.Tensor:
    if not isinstance(s, str):
        raise TypeError("not a base64 string")
    return torch.frombuffer(bytearray(base64.b64decode(s, validate=True)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """This process's python, numpy, torch and CUDA RNG states, as JSON values."""
    version, internal, gauss = random.getstate()
    legacy = np.random.get_state()
    assert isinstance(legacy, tuple)  # get_state's default form (legacy=True), not the dict
    name, keys, pos, has_gauss, cached = legacy
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "torch": _b64(torch.get_rng_state()),
            "cuda": [_b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else []}


def _parse_rng(directory: Path, name: str, saved: Any) -> tuple[Any, Any, torch.Tensor, list[torch.Tensor]]:
    """:func:`rng_state`'s ``saved`` checked and decoded (python, numpy, torch, CUDA states);
    nothing is applied."""
    try:
        if not isinstance(saved, dict) or set(saved) != {"python", "numpy", "torch", "cuda"}:
            raise ValueError("not an RNG state")
        version, internal, gauss = saved["python"]
        py = (int(version), tuple(int(i) for i in internal), None if gauss is None else float(gauss))
        np_name, keys, pos, has_gauss, cached = saved["numpy"]
        if np_name != "MT19937":
            raise ValueError(f"numpy generator {np_name!r}")
        npy = (np_name, np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached))
        cpu = _unb64(saved["torch"])
        cuda = [_unb64(s) for s in saved["cuda"]]
        random.Random().setstate(py)  # validates before the global generators are touched
        np.random.RandomState().set_state(npy)
    except (ValueError, TypeError, OverflowError, KeyError) as e:
        raise _bad(directory, name, f"not a valid RNG state ({one_line(e, 100)})") from None
    if cpu.numel() != torch.get_rng_state().numel():
        raise _bad(directory, name, f"not a valid torch RNG state ({cpu.numel()} bytes)")
    return py, npy, cpu, cuda


def _check_rng(directory: Path, name: str, saved: Any) -> None:
    _parse_rng(directory, name, saved)


def set_rng_state(directory: Path, name: str, saved: Any) -> None:
    """Restore :func:`rng_state`'s ``saved``; malformed states are refused, not half-applied."""
    py, npy, cpu, cuda = _parse_rng(directory, name, saved)
    try:  # checks the length before it changes anything
        torch.set_rng_state(cpu)
    except RuntimeError as e:
        raise _bad(directory, name, f"not a valid torch RNG state ({one_line(e, 100)})") from None
    random.setstate(py)
    np.random.set_state(npy)
    # the same device count: restore them; another machine: the CUDA streams start afresh
    if torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# --- whole checkpoints ---------------------------------------------------------------------------

def write(directory: Path, step_state: Mapping[str, Any], parts: Parts, procs: Processes) -> None:
    """Write this process's files into ``directory`` (all but ``trainer_state.json``, which
    :func:`save` writes last, once every process has written)."""
    _write_json(directory / rng_file(procs.rank), rng_state())
    # collective under a sharding engine: every process takes part in the gather
    model = parts.model_state() if parts.model_state is not None else (model_tensors(parts.model) if procs.is_main else None)
    optim = parts.optimizer_state() if parts.optimizer_state is not None else (
        parts.optimizer.state_dict() if procs.is_main else None)
    if procs.is_main:
        assert model is not None and optim is not None, "the main process gathers the full state"
        _write_tensors(directory / MODEL_FILE, model)
        tensors, meta = optimizer_parts(optim)
        _write_tensors(directory / OPTIMIZER_TENSORS, tensors)
        _write_json(directory / OPTIMIZER_META, meta)
        _write_json(directory / SCHEDULER_FILE, {"scheduler": _scheduler_json(parts.scheduler),
                                                 "scaler": parts.scaler.state_dict() if parts.scaler is not None else None})


def _publish(tmp: Path, final: Path) -> None:
    """Move the finished ``tmp`` to ``final``; an existing ``final`` is moved aside first and
    removed only once the new one is in place."""
    aside = final.with_name(f".old-{final.name}")
    shutil.rmtree(aside, ignore_errors=True)
    if final.exists():
        os.replace(final, aside)
    os.replace(tmp, final)
    shutil.rmtree(aside, ignore_errors=True)


def _step_of(p: Path) -> int | None:
    m = _STEP_DIR.fullmatch(p.name)
    return int(m.group(1)) if m else None


def _prune(root: Path, keep_last: int) -> None:
    done = sorted((p for p in root.iterdir() if _step_of(p) is not None), key=lambda p: _step_of(p) or 0)
    for old in done[:-max(1, keep_last)]:
        shutil.rmtree(old, ignore_errors=True)


def save(root: Path, step: int, state: Mapping[str, Any], parts: Parts, procs: Processes, *, keep_last: int) -> Path:
    """Write ``root/step-<step>`` atomically (a temporary directory renamed into place) and keep
    the last ``keep_last``. ``state`` (JSON values) is what :func:`load` returns. Every process
    calls it."""
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}"
    if procs.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    procs.barrier()
    write(tmp, state, parts, procs)
    procs.barrier()
    if procs.is_main:
        _write_json(tmp / STATE_FILE, {"format": FORMAT, "version": VERSION, "world_size": procs.world_size,
                                       "state": dict(state)})
        _publish(tmp, final)
        _prune(root, keep_last)
    procs.barrier()
    return final


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (an interrupted save's temporary directory,
    which lacks ``trainer_state.json`` or is still named ``.tmp-…``, is ignored)."""
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if _step_of(p) is not None and (p / STATE_FILE).is_file()]
    return max(done, key=lambda p: _step_of(p) or 0, default=None)


def _check_contents(directory: Path, world_size: int) -> None:
    present = {p.name for p in directory.iterdir()}
    foreign = sorted(present - expected_files(world_size))
    if foreign:
        raise CheckpointError(f"checkpoint {directory}: unexpected file(s) {', '.join(foreign[:5])}: "
                              "a checkpoint holds only the safetensors and JSON files this program writes")


def read_state(directory: Path, procs: Processes) -> dict[str, Any]:
    """The trainer's state saved in ``directory``, after checking the checkpoint is of this
    format and of as many processes as this run has. Opens only ``trainer_state.json``."""
    head = _read_json(directory, STATE_FILE)
    if not isinstance(head, dict) or head.get("format") != FORMAT:
        if any(p.suffix in _PICKLE_SUFFIXES for p in directory.iterdir()):
            raise CheckpointError(f"checkpoint {directory} is in the old pickle format (accelerate's save_state), "
                                  "which can run code when loaded: it is not resumed; start again with --overwrite")
        raise CheckpointError(f"checkpoint {directory}: {STATE_FILE} is not a {FORMAT} state")
    if head.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {directory} has format version {head.get('version')!r}; "
                              f"this program reads version {VERSION}")
    world = head.get("world_size")
    if world != procs.world_size:
        raise CheckpointError(f"checkpoint {directory} was written by {world} process(es), this run has "
                              f"{procs.world_size}: resume with the same number of processes")
    if not isinstance(head.get("state"), dict):
        raise CheckpointError(f"checkpoint {directory}: {STATE_FILE} holds no trainer state")
    _check_contents(directory, procs.world_size)
    return head["state"]


@dataclass
class Restored:
    """A checkpoint read and checked by :func:`read_checked`: the trainer's state, the full
    optimizer state (keyed by parameter id), the scheduler's JSON and this process's RNG state."""

    directory: Path
    state: dict[str, Any]
    optimizer_state: dict[str, Any]
    schedule: Any
    rng: Any


def read_checked(directory: Path, parts: Parts, procs: Processes) -> Restored:
    """Read every file of ``directory``, check it against ``parts`` and load it into them: the
    model's tensors into ``parts.model``, the optimizer state into ``parts.optimizer`` and the
    schedule into ``parts.scheduler``. The RNG states are only checked (:func:`apply_rest` sets
    them). Under a sharding engine ``parts`` is the *unsharded* model (which is then sharded with
    the checkpoint's weights in it) and a throwaway optimizer and scheduler of the same
    construction, so every check sees full shapes; every file is read before anything is
    applied."""
    state = read_state(directory, procs)
    model = _read_tensors(directory, MODEL_FILE)
    opt_tensors = _read_tensors(directory, OPTIMIZER_TENSORS)
    opt_meta = _read_json(directory, OPTIMIZER_META)
    schedule = _read_json(directory, SCHEDULER_FILE)
    rng = _read_json(directory, rng_file(procs.rank))
    _check_rng(directory, rng_file(procs.rank), rng)
    load_model_tensors(directory, parts.model, model)
    full = load_optimizer_parts(directory, parts.optimizer, opt_tensors, opt_meta)
    load_schedule(directory, parts, schedule)
    return Restored(directory, state, full, schedule, rng)


def apply_rest(restored: Restored, parts: Parts, procs: Processes) -> None:
    """Give the live (possibly sharded) ``parts`` the optimizer state, schedule and this
    process's RNG states of ``restored`` (checked by :func:`read_checked`)."""
    if parts.load_optimizer is not None:
        parts.load_optimizer(restored.optimizer_state)
    else:
        parts.optimizer.load_state_dict(restored.optimizer_state)
    load_schedule(restored.directory, parts, restored.schedule)
    set_rng_state(restored.directory, rng_file(procs.rank), restored.rng)  # last: nothing after it may draw numbers


def load(directory: Path, parts: Parts, procs: Processes) -> dict[str, Any]:
    """Restore ``parts`` (unsharded: the model and optimizer the checks run against are the live
    ones) and this process's RNG states from ``directory``; return the trainer's state. Every file
    is read and checked before anything is applied."""
    restored = read_checked(directory, parts, procs)
    set_rng_state(directory, rng_file(procs.rank), restored.rng)
    return restored.state
