"""Sharded training on 2 CPU processes (gloo), launched as a user would: ``accelerate launch
--config_file configs/accelerate/X.yaml`` with the shipped files (``--num_processes 2
--mixed_precision no`` on the command line, as on a machine without GPUs).

* the engine the config names is the one that runs (``stage.json``'s ``distributed`` record), and
  FSDP / ZeRO-3 hold < 60 % of the trainable parameters per rank;
* per-step losses equal one process's with the same global batch. Tolerance rel 1e-5: the
  gradients are the same numbers summed in another order (a reduce-scatter or all-reduce of two
  halves instead of one process accumulating them), about 1e-7 relative per step in fp32 —
  observed: FSDP equal to the last digit, ZeRO 1e-7 — so 1e-5 leaves room over 4 steps and still
  catches any real difference (a wrong learning rate, a missing micro-batch or a doubled gradient
  moves the loss by 1e-3 or more);
* a run killed after its step-2 checkpoint resumes, with 2 processes, to the same final weights
  bit for bit as the uninterrupted run of the same engine, and its consolidated model loads in
  one process;
* a requested engine that is not what would run, and a launch that contradicts the trainer's
  flags, stop before training with one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_colour_dataset
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0"}
for _k in [k for k in ENV if k.startswith(("ACCELERATE_", "FSDP_")) or k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")]:
    del ENV[_k]  # a test run inside a launcher must not leak its settings into these launches
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "white": (250, 250, 250)}
STEPS = ["--max-steps", "4", "--save-steps", "2", "--keep-last", "2", "--no-group-by-length"]
PORTS = iter(range(29640, 29700))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_colour_dataset(tmp_path_factory.mktemp("data"), 16, (300, 200))


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "-m", "llava-1.5", "--tiny", "--data-path", str(data / "train.json"), "--image-folder",
            str(data / "images"), "--output-dir", str(out), "--batch-size", "2", "--no-progress", *extra]


def launch(config: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / config),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(next(PORTS)),
           "-m", "hires_lmm.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env or ENV, timeout=400)


def hires(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hires_lmm.cli", *args], capture_output=True, text=True,
                          env=env or ENV, timeout=300)


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(data, tmp_path_factory) -> Path:
    """One process, accumulation 2: the global batch of 2 processes × batch 2."""
    out = tmp_path_factory.mktemp("single") / "run"
    r = hires(*train_args(data, out, *STEPS, "--grad-accum", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _kill_after_step_2(src: Path, dst: Path) -> None:
    """What SIGKILL between the step-2 and step-4 checkpoints leaves: the step-2 checkpoint, the
    metrics of steps 1-3 with a torn fourth line, no final model."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step-0000004")
    for f in dst.iterdir():
        if f.is_file() and f.name not in ("metrics.jsonl", "train_config.json"):
            f.unlink()
    lines = (dst / "metrics.jsonl").read_text().splitlines(keepends=True)
    (dst / "metrics.jsonl").write_text("".join(lines[:3]) + lines[3][:20])


@pytest.mark.parametrize("config, engine", [("fsdp.yaml", "fsdp"), ("deepspeed_zero3.yaml", "deepspeed-zero3")])
def test_sharded_run_shards_matches_one_process_and_resumes_exactly(data, single, tmp_path, config, engine):
    out = tmp_path / "run"
    r = launch(config, *train_args(data, out, *STEPS))
    assert r.returncode == 0, r.stderr[-3000:]
    dist = json.loads((out / "stage.json").read_text())["distributed"]
    assert dist["engine"] == engine and dist["world_size"] == 2
    assert dist["trainable_params"] == _trainable_elements()
    assert dist["trainable_params_per_rank"] < 0.6 * dist["trainable_params"], dist
    assert losses(out) == pytest.approx(losses(single), rel=1e-5)
    assert losses(out)[0] != losses(out)[-1]

    # the consolidated model: a from_pretrained directory one process loads, with the weights
    # the single process reached (same numbers summed in another order). atol 2e-5: attention's
    # k_proj biases have a mathematically zero gradient (softmax ignores a shift), so their AdamW
    # updates are normalised rounding noise (~1e-6 here); a real difference (a wrong step or lr)
    # moves weights by ~lr = 1e-3
    from hires_lmm.model import HiresLMM

    model = HiresLMM.from_pretrained(out)
    ref = load_file(single / "model.safetensors")
    for k, v in model.state_dict().items():
        if k in ref:
            assert torch.allclose(v, ref[k], rtol=1e-4, atol=2e-5), k
    assert not any(p.suffix in (".bin", ".pt", ".pkl", ".pth") for p in out.rglob("*"))  # no pickles anywhere

    # killed after the step-2 checkpoint, resumed with 2 processes: the same weights bit for bit
    again = tmp_path / "again"
    _kill_after_step_2(out, again)
    r = launch(config, *train_args(data, again, *STEPS, "--resume"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout
    a, b = load_file(out / "model.safetensors"), load_file(again / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [json.loads(line)["step"] for line in (again / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert losses(again) == losses(out)


def _trainable_elements() -> int:
    """What ``--stage scratch`` trains in the tiny llava-1.5: everything but fixed tables."""
    from hires_lmm.methods import build_model
    from hires_lmm.train.stages import apply_stage, get_stage

    model = build_model("llava-1.5", tiny=True)
    apply_stage(model, get_stage("llava-1.5", "scratch"))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_zero2_and_ddp_configs_run_what_they_say(data, single, tmp_path):
    r = launch("deepspeed_zero2.yaml", *train_args(data, tmp_path / "z2", *STEPS))
    assert r.returncode == 0, r.stderr[-3000:]
    dist = json.loads((tmp_path / "z2" / "stage.json").read_text())["distributed"]
    # ZeRO-2 shards gradients and optimizer state; the weights stay whole on every rank
    assert dist["engine"] == "deepspeed-zero2" and dist["world_size"] == 2
    assert dist["trainable_params_per_rank"] == dist["trainable_params"]
    assert losses(tmp_path / "z2") == pytest.approx(losses(single), rel=1e-5)

    r = launch("ddp_cpu.yaml", *train_args(data, tmp_path / "ddp", *STEPS))
    assert r.returncode == 0, r.stderr[-3000:]
    dist = json.loads((tmp_path / "ddp" / "stage.json").read_text())["distributed"]
    assert dist["engine"] == "ddp" and dist["world_size"] == 2  # two processes, not one
    assert losses(tmp_path / "ddp") == pytest.approx(losses(single), rel=1e-5)


@pytest.mark.parametrize("env, flags, message", [
    ({"ACCELERATE_MIXED_PRECISION": "bf16"}, ["--mixed-precision", "no"], "the launch decides"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}, [], "runs stages 2 and 3"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3", "ACCELERATE_USE_CPU": "true"}, [],
     "deepspeed-zero3 was asked for but accelerate runs without it"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, [], "set fsdp_version: 2"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, [],
     "wraps by layer class"),
    ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, [], "--grad-accum is 1"),
])
def test_a_launch_that_cannot_run_as_asked_stops_in_one_line(data, tmp_path, env, flags, message):
    r = hires(*train_args(data, tmp_path / "o", "--max-steps", "1", *flags), env={**ENV, **env})
    assert r.returncode == 2, r.stderr[-2000:]
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    assert not (tmp_path / "o" / "checkpoints").exists()


def test_fsdp_wrap_policy_per_part():
    from hires_lmm.methods import build_model
    from hires_lmm.train.distributed import DistributedError, FSDPSettings, default_wrap_classes, fsdp_units

    hr = build_model("llava-hr", tiny=True)
    assert default_wrap_classes(hr) == {"LlamaDecoderLayer", "CLIPEncoderLayer", "ConvNeXtStage"}
    units = fsdp_units(hr, FSDPSettings())
    names = [n for n, _ in units]
    assert sum(n.startswith("llm.") for n in names) == hr.llm.config.num_hidden_layers
    assert any(".slow_vision_tower.stages." in n for n in names) and any("encoder.layers" in n for n in names)
    # children before parents: fully_shard needs the inner units first
    assert all(not b.startswith(a + ".") for i, (a, _) in enumerate(units) for b, _ in units[i + 1:])
    # embeddings stay in the root unit (the ViT calls the patch convolution and the position table itself)
    assert not any("embeddings" in n for n in names)
    assert fsdp_units(hr, FSDPSettings(wrap_policy="NO_WRAP")) == []
    assert [n for n, _ in fsdp_units(hr, FSDPSettings(wrap_classes=("ConvNeXtStage", "Qwen2DecoderLayer")))] == [
        n for n, m in reversed(list(hr.named_modules())) if type(m).__name__ == "ConvNeXtStage"]
    with pytest.raises(DistributedError, match="no such layer in this model"):
        fsdp_units(hr, FSDPSettings(wrap_classes=("Qwen2DecoderLayer",)))
