"""The distributed engine a run asked for, set up as asked, or a clear error before training.

The launch decides (``accelerate launch --config_file configs/accelerate/X.yaml`` or its flags,
which reach the processes as ``ACCELERATE_*`` / ``FSDP_*`` environment variables; or plain
``torchrun``): nothing here overrides it. :func:`setup` reads what was requested, builds the
:class:`~accelerate.Accelerator` that runs it and :meth:`Engine.check` stops the run when what is
active is not what was asked for (accelerate silently falls back to plain data parallelism or to
one process in several such cases).

=================  ==================================================================================
engine             what shards                                        how
=================  ==================================================================================
``single``         nothing (one process)                              plain module
``ddp``            nothing (weights, gradients, optimizer replicated) accelerate → DistributedDataParallel
``fsdp``           weights, gradients, optimizer state                FSDP2 ``fully_shard`` applied here
``deepspeed-zero2`` gradients and optimizer state                     accelerate → ``deepspeed.initialize``
``deepspeed-zero3`` weights, gradients and optimizer state            accelerate → ``deepspeed.initialize``
=================  ==================================================================================

**Why FSDP2 is applied here and not by accelerate.** accelerate turns FSDP on only for GPU-like
devices (``DistributedType.FSDP`` is unreachable on CPU, so a CPU run of ``fsdp.yaml`` became
DDP), and its wrap policy is a list of class names for *one* model, while an LMM is several: the
LLM (its decoder layers: the LLM's ``_no_split_modules``), the vision towers (their encoder layers)
and LLaVA-HR's ConvNeXt (its stages), with frozen parts in between. So the run's FSDP settings are
read from the same ``FSDP_*`` variables ``accelerate launch`` sets from ``fsdp_config``, the
accelerator is built as a plain multi-process one (``ACCELERATE_USE_FSDP`` hidden from it, so it
does not wrap the model again), and :func:`fully_shard` is applied per part, bottom-up, then to the
root. Frozen parameters are sharded like the others (FSDP2 shards per parameter and reduces only
gradients that exist, so a frozen ViT costs 1/N of its weights and no communication in backward).
Mixed precision is FSDP2's ``MixedPrecisionPolicy`` (bf16 compute, fp32 gradient reduction and
fp32 sharded master weights); fp16 needs a sharded grad scaler and is refused.

**DeepSpeed** goes through accelerate (``deepspeed.initialize``); on a machine without GPUs
accelerate builds no process group for it (every process would train alone: world size 1), so the
backend is named (gloo) there. The trainer's own values fill the DeepSpeed config's ``auto``
entries (micro batch, gradient clipping); a config that sets them to other values, or another
gradient accumulation than ``--grad-accum``, is refused. Only the trainable parameters are given to
the optimizer (LLaVA's frozen vision tower: ZeRO partitions frozen weights under stage 3 and
gathers them with its hooks like the others).

**State.** Every engine saves and restores the *same* full tensors (:mod:`.checkpoint`): the
trainable parameters (fp32 master values) and buffers, and AdamW's state keyed by parameter id,
gathered on the main process by :meth:`Engine.model_state` / :meth:`Engine.optimizer_state`
(``torch.distributed.checkpoint.state_dict`` under FSDP, DeepSpeed's ``safe_get_full_*`` under
ZeRO: never DeepSpeed's pickle-based ``save_checkpoint``) and scattered back by
:meth:`Engine.load_optimizer`. The model's weights are loaded into the unsharded model before it is
sharded, so the sharding itself distributes them.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn as nn

from . import checkpoint as ckpt_io
from .errors import TrainingError

ENGINES = ("single", "ddp", "fsdp", "deepspeed-zero2", "deepspeed-zero3")
#: the vision side's layers that become FSDP units: HF vision towers' encoder layers (CLIP, SigLIP:
#: ``*EncoderLayer``) and LLaVA-HR's ConvNeXt stages. Their embeddings are left to the root unit:
#: the ViT interpolates the position table and calls the patch convolution itself, outside the
#: embeddings module's forward, where a unit of its own would still be sharded.
VISION_UNIT_SUFFIXES = ("EncoderLayer", "ConvNeXtStage")


class DistributedError(TrainingError):
    """The launch asked for something this run cannot do, or got something else than it asked for."""


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def _world_from_env() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def _deepspeed_stage() -> int:
    """The ZeRO stage of the launch: ``zero_stage`` of the accelerate config, or that of a
    ``deepspeed_config_file``."""
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if stage is None and path:
        try:
            stage = str(json.loads(open(path, encoding="utf-8").read()).get("zero_optimization", {}).get("stage"))
        except (OSError, ValueError, AttributeError) as e:
            raise DistributedError(f"deepspeed_config_file {path}: cannot read its ZeRO stage ({e})") from None
    if stage not in ("2", "3"):
        raise DistributedError(f"DeepSpeed ZeRO stage {stage}: hires train runs stages 2 and 3 "
                               "(configs/accelerate/deepspeed_zero2.yaml, deepspeed_zero3.yaml)")
    return int(stage)


def requested_engine() -> str:
    """The engine the launch asked for (see the module docstring)."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return f"deepspeed-zero{_deepspeed_stage()}"
    if _flag("ACCELERATE_USE_FSDP"):
        version = os.environ.get("FSDP_VERSION", "1")
        if version != "2":
            raise DistributedError(f"fsdp_version {version}: hires train shards with FSDP2; set fsdp_version: 2 "
                                   "in the accelerate config (configs/accelerate/fsdp.yaml)")
        return "fsdp"
    return "ddp" if _world_from_env() > 1 else "single"


def resolve_mixed_precision(flag: str) -> str:
    """The precision of the run: the launch's when it names one (``--mixed-precision`` must then
    be ``auto`` or the same), else the flag (``auto``: bf16 on a GPU that has it, else none)."""
    launched = os.environ.get("ACCELERATE_MIXED_PRECISION")
    if launched is not None:
        launched = launched.strip().lower()
        if flag not in ("auto", launched):
            raise DistributedError(f"--mixed-precision {flag} but the accelerate config/launch sets mixed_precision "
                                   f"{launched}: the launch decides; pass --mixed-precision auto or {launched}")
        return launched
    if flag == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"
    return flag


@contextlib.contextmanager
def _hidden_env(name: str) -> Iterator[None]:
    old = os.environ.pop(name, None)
    try:
        yield
    finally:
        if old is not None:
            os.environ[name] = old


@dataclass
class FSDPSettings:
    """What ``accelerate launch`` passes from ``fsdp_config`` (``FSDP_*`` variables)."""

    wrap_policy: str = "TRANSFORMER_BASED_WRAP"
    wrap_classes: tuple[str, ...] = ()
    reshard_after_forward: bool = True
    offload_params: bool = False
    activation_checkpointing: bool = False

    @classmethod
    def from_env(cls) -> FSDPSettings:
        policy = os.environ.get("FSDP_AUTO_WRAP_POLICY", "TRANSFORMER_BASED_WRAP").strip().upper()
        if policy not in ("TRANSFORMER_BASED_WRAP", "NO_WRAP"):
            raise DistributedError(f"fsdp_auto_wrap_policy {policy}: hires train wraps by layer class "
                                   "(TRANSFORMER_BASED_WRAP, the default per part) or not at all (NO_WRAP)")
        classes = tuple(c.strip() for c in os.environ.get("FSDP_TRANSFORMER_CLS_TO_WRAP", "").split(",") if c.strip())
        reshard = os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").strip().lower()
        if reshard not in ("true", "false"):  # FSDP1's strategy names mean nothing to FSDP2
            raise DistributedError(f"fsdp_reshard_after_forward {reshard}: FSDP2 takes true or false")
        return cls(policy, classes, reshard == "true", _flag("FSDP_OFFLOAD_PARAMS"),
                   _flag("FSDP_ACTIVATION_CHECKPOINTING"))


def default_wrap_classes(model: nn.Module) -> set[str]:
    """The classes FSDP wraps by default, per part: the LLM's decoder layers (its
    ``_no_split_modules``), the vision towers' encoder layers and LLaVA-HR's ConvNeXt stages."""
    llm = getattr(model, "llm", None)
    names: set[str] = set(getattr(llm, "_no_split_modules", None) or ())
    visual = getattr(model, "visual", model)
    names.update(type(m).__name__ for m in visual.modules() if type(m).__name__.endswith(VISION_UNIT_SUFFIXES))
    return names


def fsdp_units(model: nn.Module, settings: FSDPSettings) -> list[tuple[str, nn.Module]]:
    """The submodules that become their own FSDP units (children before their parents), or a
    :class:`DistributedError` when the configured classes name nothing in this model."""
    if settings.wrap_policy == "NO_WRAP":
        return []
    wanted = set(settings.wrap_classes) or default_wrap_classes(model)
    units = [(n, m) for n, m in model.named_modules() if n and type(m).__name__ in wanted]
    if not units:
        raise DistributedError(f"fsdp_transformer_layer_cls_to_wrap {','.join(sorted(wanted))}: no such layer in "
                               f"this model (its layers: {', '.join(sorted(default_wrap_classes(model)))}); "
                               "remove the setting to wrap per part")
    return list(reversed(units))  # named_modules is parents-first; fully_shard needs children first


@dataclass
class Engine:
    """One run's distributed engine: prepares the model and optimizer, gathers and scatters
    their state, reports how much of the model each process holds."""

    name: str
    accelerator: Any
    mixed_precision: str
    grad_accum: int
    fsdp: FSDPSettings | None = None
    #: set by :meth:`prepare`
    module: nn.Module | None = None
    wrapped: Any = None
    optimizer: Any = None
    torch_optimizer: torch.optim.Optimizer | None = None
    names: list[str] = field(default_factory=list)  # trainable parameters, in optimizer id order
    group_sizes: list[int] = field(default_factory=list)  # parameters per optimizer group
    keys: set[str] = field(default_factory=set)  # the model's checkpoint keys
    trainable_params: int = 0

    @property
    def world_size(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def sharded(self) -> bool:
        return self.name in ("fsdp", "deepspeed-zero2", "deepspeed-zero3")

    @property
    def activation_checkpointing(self) -> bool:
        """FSDP's ``fsdp_activation_checkpointing`` asks for it (as ``--gradient-checkpointing`` does)."""
        return bool(self.fsdp and self.fsdp.activation_checkpointing)

    @contextlib.contextmanager
    def building(self) -> Iterator[None]:
        """Build the model unsharded. accelerate's DeepSpeed plugin registers its config with
        transformers even with ``zero3_init_flag: false``, and transformers then constructs every
        ``PreTrainedModel`` inside ``deepspeed.zero.Init`` (already partitioned, initialised with
        other random numbers): the frozen weights would not be the ones the arguments rebuild,
        nothing could be loaded into the model before sharding, and the run would not match a
        single process's. So the registration is lifted while the model is built."""
        if not self.name.startswith("deepspeed"):
            yield
            return
        from transformers.integrations import unset_hf_deepspeed_config

        plugin = self.accelerator.state.deepspeed_plugin
        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            plugin.set_deepspeed_weakref()

    # --- checks ----------------------------------------------------------------------------------
    def check_launch(self) -> None:
        """Before anything is built: the processes, the accelerator's type and accumulation are
        those asked for."""
        from accelerate.utils import DistributedType

        acc = self.accelerator
        want = _world_from_env()
        if acc.num_processes != want:
            raise DistributedError(f"{want} processes were launched but accelerate runs {acc.num_processes}: "
                                   "check the launch command and config")
        if self.name.startswith("deepspeed") and acc.distributed_type != DistributedType.DEEPSPEED:
            raise DistributedError(f"{self.name} was asked for but accelerate runs {acc.distributed_type.value} "
                                   "(use_cpu: true turns DeepSpeed off; remove it)")
        if not self.name.startswith("deepspeed") and acc.distributed_type == DistributedType.DEEPSPEED:
            raise DistributedError("accelerate runs DeepSpeed but the launch did not ask for it")
        if self.name == "deepspeed-zero3" and acc.state.deepspeed_plugin.zero3_init_flag:
            raise DistributedError("zero3_init_flag: true builds the model already partitioned, which hires train does "
                                   "not do (frozen weights are rebuilt from the arguments, checkpoints load before "
                                   "sharding): set zero3_init_flag: false")
        if acc.gradient_accumulation_steps != self.grad_accum:
            raise DistributedError(f"the accelerate config sets gradient_accumulation_steps "
                                   f"{acc.gradient_accumulation_steps} but --grad-accum is {self.grad_accum}: "
                                   "remove it from the config (the trainer's flag decides the global batch)")

    def check_active(self) -> None:
        """After :meth:`prepare`: the model is wrapped the way the engine's name says."""
        from torch.distributed.fsdp import FSDPModule
        from torch.nn.parallel import DistributedDataParallel

        w = self.wrapped
        if self.name == "fsdp":
            ok = isinstance(w, FSDPModule)
        elif self.name.startswith("deepspeed"):
            from deepspeed import DeepSpeedEngine

            ok = isinstance(w, DeepSpeedEngine) and w.zero_optimization_stage() == int(self.name[-1])
        elif self.name == "ddp":
            ok = isinstance(w, DistributedDataParallel)
        else:
            ok = self.world_size == 1
        if not ok:
            raise DistributedError(f"{self.name} was asked for but the model is a {type(w).__name__} after preparation")

    # --- preparation -----------------------------------------------------------------------------
    def _shard(self, model: nn.Module) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        assert self.fsdp is not None
        device = self.accelerator.device
        model.to(device)
        mesh = init_device_mesh(device.type, (self.world_size,))
        kwargs: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": self.fsdp.reshard_after_forward}
        if self.mixed_precision == "bf16":
            # compute in bf16, reduce gradients and keep the sharded master weights in fp32
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        elif self.mixed_precision == "fp16":
            raise DistributedError("mixed_precision fp16 under FSDP needs a sharded grad scaler: use bf16")
        if self.fsdp.offload_params and device.type != "cpu":  # on a CPU run the weights are there already
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for _, unit in fsdp_units(model, self.fsdp):
            fully_shard(unit, **kwargs)
        fully_shard(model, **kwargs)

    def _configure_deepspeed(self, micro_batch: int, max_grad_norm: float) -> None:
        """Fill the DeepSpeed config's ``auto`` entries with the trainer's values; refuse others."""
        ds = self.accelerator.state.deepspeed_plugin.deepspeed_config
        for key, value in (("train_micro_batch_size_per_gpu", micro_batch), ("gradient_clipping", max_grad_norm)):
            have = ds.get(key, "auto")
            if have == "auto":
                ds[key] = value
            elif float(have) != float(value):
                flag = "--batch-size" if key.startswith("train_micro") else "--max-grad-norm"
                raise DistributedError(f"the DeepSpeed config sets {key} {have} but {flag} is {value}: "
                                       "set it to auto (the trainer decides)")
        ds.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
        ds.setdefault("zero_allow_untested_optimizer", True)  # torch's AdamW

    def prepare(self, model: nn.Module, groups: Sequence[dict[str, Any]],
                make_optimizer: Callable[[list[dict[str, Any]]], torch.optim.Optimizer], *, micro_batch: int,
                max_grad_norm: float) -> tuple[Any, Any, torch.optim.Optimizer]:
        """Shard or wrap ``model`` and build its optimizer from ``groups`` (``make_optimizer`` is
        called once, on the parameters the engine trains: FSDP's sharded ones). Returns the model
        to call, the optimizer to step and the torch optimizer (for the LR scheduler)."""
        by_id = {id(p): n for n, p in model.named_parameters()}
        self.names = [by_id[id(p)] for g in groups for p in g["params"]]
        self.group_sizes = [len(g["params"]) for g in groups]
        self.keys = ckpt_io.model_keys(model)
        self.trainable_params = sum(p.numel() for g in groups for p in g["params"])
        if self.name == "fsdp":
            self._shard(model)
            params = dict(model.named_parameters())
            it = iter(self.names)
            groups = [{**g, "params": [params[next(it)] for _ in g["params"]]} for g in groups]
        groups = [dict(g) for g in groups]
        opt = make_optimizer(groups)
        if self.name.startswith("deepspeed"):
            self._configure_deepspeed(micro_batch, max_grad_norm)
        if self.name == "fsdp":
            wrapped, optimizer = model, self.accelerator.prepare(opt)
        else:
            wrapped, optimizer = self.accelerator.prepare(model, opt)
        self.module, self.wrapped, self.optimizer, self.torch_optimizer = (
            self.accelerator.unwrap_model(wrapped), wrapped, optimizer, opt)
        self.check_active()
        return wrapped, optimizer, opt

    @property
    def live_module(self) -> nn.Module:
        """The unwrapped model :meth:`prepare` set up."""
        if self.module is None:
            raise RuntimeError("Engine.prepare has not run")
        return self.module

    @property
    def live_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer :meth:`prepare` built."""
        if self.torch_optimizer is None:
            raise RuntimeError("Engine.prepare has not run")
        return self.torch_optimizer

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters gradient clipping looks at (FSDP's sharded ones)."""
        params = dict(self.live_module.named_parameters())
        return [params[n] for n in self.names]

    # --- evidence --------------------------------------------------------------------------------
    def trainable_params_local(self) -> int:
        """Trainable parameter elements this process holds."""
        total = 0
        for p in self.trainable_parameters():
            if hasattr(p, "ds_tensor"):  # ZeRO-3: the partition this rank owns
                total += p.ds_tensor.numel()
            elif hasattr(p, "to_local"):  # FSDP2's DTensor shard
                total += p.to_local().numel()
            else:
                total += p.numel()
        return total

    def describe(self) -> dict[str, Any]:
        """``stage.json``'s ``distributed`` record (collective: every process calls it, after
        training and before the final model is gathered): the engine, the processes, the
        trainable parameters and the most of them one process holds, and each process's peak
        memory so far (CPU RSS; on GPUs also the peak of torch's allocator)."""
        import resource

        device = self.accelerator.device
        rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        local = torch.tensor([self.trainable_params_local(), rss_mib,
                              torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0],
                             dtype=torch.float64, device=device)
        every = self.accelerator.gather(local[None]).reshape(-1, 3).cpu()
        out = {"engine": self.name, "world_size": self.world_size, "trainable_params": self.trainable_params,
               "trainable_params_per_rank": int(every[:, 0].max().item()), "mixed_precision": self.mixed_precision,
               "peak_rss_mib_per_rank": [round(float(v)) for v in every[:, 1]]}
        if device.type == "cuda":
            out["peak_gpu_mib_per_rank"] = [round(float(v)) for v in every[:, 2]]
        return out

    # --- state -----------------------------------------------------------------------------------
    def _params_by_name(self) -> dict[str, nn.Parameter]:
        return dict(self.live_module.named_parameters())

    def model_state(self) -> dict[str, torch.Tensor] | None:
        """The checkpoint's model tensors (trainable parameters as fp32 master values, buffers),
        full, on the main process (``None`` elsewhere). Collective."""
        main = self.accelerator.is_main_process
        if not self.sharded:
            return ckpt_io.model_tensors(self.live_module) if main else None
        if self.name == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            # a model's state dict holds tensors (the type allows any state-dict value)
            sd = cast(dict[str, torch.Tensor], get_model_state_dict(
                self.live_module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)))
            return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items() if k in self.keys} if main else None
        from deepspeed.utils import safe_get_full_fp32_param

        params = self._params_by_name()
        out: dict[str, torch.Tensor] = {}
        for n in self.names:  # collective under ZeRO-3 (an all-gather per parameter)
            t = safe_get_full_fp32_param(params[n])
            out[n] = t.detach().to("cpu", copy=True).contiguous()
        for n, b in self.live_module.named_buffers():  # replicated
            if n in self.keys:
                out[n] = b.detach().to("cpu", copy=True).contiguous()
        return out if main else None

    def optimizer_state(self) -> dict[str, Any] | None:
        """AdamW's full state, keyed by parameter id as ``optimizer.state_dict()`` is, on the main
        process (``None`` elsewhere). Collective."""
        main = self.accelerator.is_main_process
        if not self.sharded:
            return self.optimizer.state_dict() if main else None
        if self.name == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            osd = get_optimizer_state_dict(self.live_module, self.live_optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if not main:
                return None
            pid = {n: i for i, n in enumerate(self.names)}
            saved = cast(dict[str, dict[str, Any]], osd["state"])  # a full optimizer state: name → its state
            state = {pid[n]: {k: (v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v)
                              for k, v in st.items()} for n, st in saved.items()}
            return {"state": state, "param_groups": self.live_optimizer.state_dict()["param_groups"]}
        return self._deepspeed_optimizer_state(main)

    def _deepspeed_groups(self) -> list[dict[str, Any]]:
        base = self.live_optimizer  # DeepSpeed steps this AdamW on its flat partitions
        out, k = [], 0
        for g, n in zip(base.param_groups, self.group_sizes):
            out.append({**{key: v for key, v in g.items() if key != "params"}, "params": list(range(k, k + n))})
            k += n
        return out

    def _deepspeed_step(self) -> torch.Tensor | None:
        steps = {float(st["step"]) for st in self.live_optimizer.state.values() if "step" in st}
        if not steps:
            return None
        if len(steps) != 1:
            raise TrainingError(f"DeepSpeed's optimizer partitions are at different steps {sorted(steps)}")
        return torch.tensor(steps.pop(), dtype=torch.float32)

    def _deepspeed_optimizer_state(self, main: bool) -> dict[str, Any] | None:
        from deepspeed.utils import safe_get_full_optimizer_state

        params = self._params_by_name()
        step = self._deepspeed_step()
        state: dict[int, dict[str, Any]] = {}
        if step is not None:
            for i, n in enumerate(self.names):  # collective under ZeRO-3
                st = {"step": step.clone()}
                for key in ("exp_avg", "exp_avg_sq"):
                    st[key] = safe_get_full_optimizer_state(params[n], key).detach().to("cpu", copy=True).contiguous()
                state[i] = st
        return {"state": state, "param_groups": self._deepspeed_groups()} if main else None

    def load_optimizer(self, full: dict[str, Any]) -> None:
        """Give the live optimizer the checked full state ``full`` (keyed by parameter id)."""
        if not self.sharded:
            self.optimizer.load_state_dict(full)
            return
        if self.name == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            sd: dict[str, Any] = {"state": {self.names[i]: st for i, st in full["state"].items()},
                  "param_groups": [{**g, "params": [self.names[i] for i in g["params"]]} for g in full["param_groups"]]}
            # every process read the same full file: each keeps its own shard of it. strict=False:
            # AdamW holds no state for a parameter that never had a gradient (the ViT layers after
            # the selected feature layer), and the file was checked against a probe already
            set_optimizer_state_dict(self.live_module, self.live_optimizer, optim_state_dict=sd,
                                     options=StateDictOptions(full_state_dict=True, strict=False))
            return
        from deepspeed.utils import safe_set_full_optimizer_state

        for g, saved in zip(self.live_optimizer.param_groups, full["param_groups"]):
            g.update({k: v for k, v in saved.items() if k != "params"})
        if full["state"]:
            # ZeRO-3 creates AdamW's state on its flat partitions at the first step: create it (as
            # AdamW would, zeros) so the saved moments and step have somewhere to go
            zero = self.wrapped.optimizer  # ZeRO's optimizer: its fp32 partitions are what AdamW steps
            flats = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
            for flat in flats:
                if flat.numel():
                    st = self.live_optimizer.state[flat]
                    if "exp_avg" not in st:
                        st.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(flat),
                                  exp_avg_sq=torch.zeros_like(flat))
        params = self._params_by_name()
        steps = {float(st["step"]) for st in full["state"].values()}
        if len(steps) > 1:
            raise TrainingError(f"the checkpoint's parameters are at different steps {sorted(steps)}; "
                                "DeepSpeed keeps one step per partition")
        for i, st in full["state"].items():
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(params[self.names[i]], st[key], key)
        if steps:
            step = steps.pop()
            for st in self.live_optimizer.state.values():
                st["step"] = torch.tensor(step, dtype=torch.float32)

    def parts(self, scheduler: Any, scaler: Any) -> ckpt_io.Parts:
        """The checkpoint's view of this engine's live objects."""
        return ckpt_io.Parts(self.live_module, self.optimizer, scheduler, scaler, model_state=self.model_state,
                             optimizer_state=self.optimizer_state, load_optimizer=self.load_optimizer)


def setup(grad_accum: int, mixed_precision_flag: str) -> Engine:
    """The accelerator and engine the launch asked for, checked (:meth:`Engine.check_launch`)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs, InitProcessGroupKwargs

    name = requested_engine()
    mp = resolve_mixed_precision(mixed_precision_flag)
    gpu = torch.cuda.is_available()
    handlers: list[Any] = [DistributedDataParallelKwargs(find_unused_parameters=True)]
    if name.startswith("deepspeed") and _flag("ACCELERATE_USE_CPU"):
        # accelerate would quietly run without DeepSpeed (or fail deep inside)
        raise DistributedError(f"{name} was asked for but accelerate runs without it: use_cpu: true (--cpu) turns "
                               "DeepSpeed off; remove it (DeepSpeed runs on CPUs over gloo without it)")
    try:
        if name.startswith("deepspeed"):
            if not gpu:  # accelerate picks no backend without an accelerator device: one process each
                handlers.append(InitProcessGroupKwargs(backend="gloo"))
            acc = Accelerator(gradient_accumulation_steps=grad_accum, mixed_precision=mp, kwargs_handlers=handlers)
        elif name == "fsdp":
            # a plain multi-process accelerator: the model is sharded by Engine._shard, not wrapped
            # by accelerate (see the module docstring); FSDP's policy does the mixed precision
            with _hidden_env("ACCELERATE_USE_FSDP"):
                acc = Accelerator(gradient_accumulation_steps=grad_accum, mixed_precision="no", cpu=not gpu,
                                  kwargs_handlers=handlers)
        else:
            # cpu=True only where there is no GPU: accelerate then runs torchrun's processes over gloo
            acc = Accelerator(gradient_accumulation_steps=grad_accum, mixed_precision=mp, cpu=not gpu,
                              kwargs_handlers=handlers)
    except ValueError as e:  # e.g. fp16 on a machine without a GPU
        raise DistributedError(f"cannot set up {name} with mixed_precision {mp}: {' '.join(str(e).split())[:300]}") from None
    engine = Engine(name, acc, mp, grad_accum, FSDPSettings.from_env() if name == "fsdp" else None)
    engine.check_launch()
    return engine
