"""Training: stage recipes, stage chaining, exact resumption after SIGKILL/SIGTERM, data-parallel
equivalence, bad data and overwrite protection."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_colour_dataset
from safetensors.torch import load_file

from hires_lmm.methods import build_model
from hires_lmm.train.stages import STAGES, apply_stage, get_stage

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0"}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "white": (250, 250, 250)}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """16 small images of one colour each, question → colour word."""
    return write_colour_dataset(tmp_path_factory.mktemp("data"), 16, (300, 200))


def hires(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hires_lmm.cli", *args], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def train_args(data: Path, out: Path, method: str = "llava-1.5", *extra: str) -> list[str]:
    return ["train", "-m", method, "--tiny", "--data-path", str(data / "train.json"), "--image-folder",
            str(data / "images"), "--output-dir", str(out), "--batch-size", "2", "--no-progress", *extra]


# --- stage recipes ---------------------------------------------------------------------------

def trainable(model) -> set[str]:
    return {n.split(".")[0] + "." + n.split(".")[1] for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("method", list(STAGES))
def test_every_stage_trains_what_the_paper_says(method):
    for name in STAGES[method]:
        model = build_model(method, tiny=True)
        groups = apply_stage(model, get_stage(method, name))
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        assert names and sum(len(g["params"]) for g in groups) == len(names)
        assert not any(n.startswith("visual.vit.") or ".fast_vision_tower." in n for n in names) or (
            method == "llava-hr" and name == "2"), (method, name)  # CLIP frozen except LLaVA-HR stage 2
        llm = any(n.startswith("llm.") for n in names)
        assert llm == (name in ("2", "3") and not (method == "slime" and name == "2")), (method, name)
        assert not any("pos_embed" in n for n in names)  # fixed sin-cos tables never train


def test_stage_specifics():
    m = build_model("llava-hr", tiny=True)
    apply_stage(m, get_stage("llava-hr", "1"))
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert m.config.plan_options["S"] == 384 and m.plan((800, 600)).views[0].size == (384, 384)
    assert names and all(n.startswith(("visual.mm_projector.", "visual.vision_tower.align_stages.")) for n in names)
    apply_stage(m, get_stage("llava-hr", "2"))
    assert m.config.plan_options["S"] == 1024
    assert any(".align_stages_latent." in n for n, p in m.named_parameters() if p.requires_grad)

    s = build_model("slime", tiny=True)
    apply_stage(s, get_stage("slime", "1b"))
    names = {n for n, p in s.named_parameters() if p.requires_grad}
    assert names and all(n.startswith("visual.mm_projector.attn.") for n in names)
    assert s.visual.mode == "global" and s.visual.mm_projector.fixed_expert == 1
    apply_stage(s, get_stage("slime", "2"))
    assert s.visual.mode == "local" and all(n.startswith("visual.sampler.") for n, p in s.named_parameters() if p.requires_grad)
    apply_stage(s, get_stage("slime", "3"))
    assert s.visual.mode == "both" and s.visual.mm_projector.fixed_expert is None and s.visual.selector_p == 0.95
    with pytest.raises(ValueError, match="stages: 1a, 1b, 2, 3, scratch"):
        get_stage("slime", "4")


def test_stage1_saves_trainable_parts_and_stage2_starts_from_them(data, tmp_path):
    r = hires(*train_args(data, tmp_path / "s1", "llava-1.5", "--stage", "1", "--max-steps", "3"))
    assert r.returncode == 0, r.stderr
    saved = load_file(tmp_path / "s1" / "trainable.safetensors")
    assert saved and all(k.startswith("visual.mm_projector.") for k in saved)
    assert not (tmp_path / "s1" / "model.safetensors").exists()
    r = hires(*train_args(data, tmp_path / "s2", "llava-1.5", "--stage", "2", "--init", str(tmp_path / "s1"),
                          "--max-steps", "1", "--lr", "0"))
    assert r.returncode == 0, r.stderr
    full = load_file(tmp_path / "s2" / "model.safetensors")
    for k, v in saved.items():  # lr 0: stage 2 still holds stage 1's projector exactly
        assert torch.equal(full[k], v), k


# --- resumption ------------------------------------------------------------------------------

def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training ended before {path} appeared: {proc.stderr.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{path} did not appear")
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_run_resumes_to_the_same_weights(data, tmp_path, sig):
    args = ["--max-steps", "8", "--save-steps", "2", "--keep-last", "2"]
    ref = hires(*train_args(data, tmp_path / "ref", "llava-uhd", *args))
    assert ref.returncode == 0, ref.stderr
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "hires_lmm.cli", *train_args(data, out, "llava-uhd", *args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    _wait_for(out / "checkpoints" / "step-0000004", proc)
    proc.send_signal(sig)
    proc.wait(timeout=120)
    if sig == signal.SIGTERM:  # saves at the step boundary and exits cleanly
        assert proc.returncode == 0
        assert "continue with --resume" in proc.stdout.read()
    assert not (out / "model.safetensors").exists()
    again = hires(*train_args(data, out, "llava-uhd", *args))  # no --resume: refuses to overwrite
    assert again.returncode == 2 and "--resume" in again.stderr
    r = hires(*train_args(data, out, "llava-uhd", *args, "--resume"))
    assert r.returncode == 0, r.stderr
    a, b = _final_weights(tmp_path / "ref"), _final_weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # the steps redone after the checkpoint are logged once
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000006", "step-0000008"]


def test_two_processes_match_one_process_with_the_same_global_batch(data, tmp_path):
    common = ["--max-steps", "4", "--batch-size", "2", "--no-group-by-length"]
    one = hires(*train_args(data, tmp_path / "one", "llava-1.5", *common, "--grad-accum", "2"))
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29517", "-m", "hires_lmm.cli", *train_args(data, tmp_path / "two", "llava-1.5", *common)],
                         capture_output=True, text=True, env=ENV, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    l1 = [json.loads(l)["loss"] for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    l2 = [json.loads(l)["loss"] for l in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(l1) == len(l2) == 4
    assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-6)
    assert l1[0] != l1[-1]


# --- data and output protection --------------------------------------------------------------

def test_bad_data_is_reported_before_training_and_skip_bad_counts(data, tmp_path):
    recs = json.loads((data / "train.json").read_text())
    recs.append({"id": "ghost", "image": "missing.png", "conversations": recs[0]["conversations"]})
    recs.append({"id": "alien", "image": "0.png", "conversations": [{"from": "martian", "value": "<image> hi"},
                                                                    {"from": "gpt", "value": "x"}]})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(recs))
    args = ["train", "-m", "llava-1.5", "--tiny", "--data-path", str(bad), "--image-folder", str(data / "images"),
            "--output-dir", str(tmp_path / "o"), "--max-steps", "1", "--no-progress"]
    r = hires(*args)
    assert r.returncode == 2
    assert "ghost" in r.stderr and "missing.png" in r.stderr and "alien" in r.stderr and "martian" in r.stderr
    assert str(bad) in r.stderr or "bad.json" in r.stderr
    assert not (tmp_path / "o" / "model.safetensors").exists()
    r = hires(*args, "--skip-bad", "--overwrite")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["skipped_records"] == 2


def test_user_output_is_not_overwritten(data, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    r = hires(*train_args(data, out, "llava-1.5", "--max-steps", "1"))
    assert r.returncode == 2 and "--overwrite" in r.stderr
    assert (out / "precious.txt").read_text() == "keep me"


def test_gradient_checkpointing_gives_the_same_training(data, tmp_path):
    from hires_lmm.train import TrainConfig, train

    def run(name: str, gc: bool) -> list[float]:
        out = tmp_path / name
        train(TrainConfig(method="llava-hr", tiny=True, data_path=str(data / "train.json"),
                          image_folder=str(data / "images"), output_dir=str(out), max_steps=3, batch_size=2,
                          gradient_checkpointing=gc, progress=False, save_steps=100))
        return [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]

    assert run("plain", False) == pytest.approx(run("gc", True), rel=1e-5)
