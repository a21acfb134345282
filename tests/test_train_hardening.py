"""Hardening of training (issue 14): ``--resume`` never unpickles, refuses other arguments or
data, continues ``metrics.jsonl`` without repeats, and every foreseeable failure is one line."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import one_line_error, write_colour_dataset
from safetensors.torch import load_file, save_file

from hires_lmm.data.records import DataError
from hires_lmm.train import TrainConfig, train
from hires_lmm.train import checkpoint as ckpt_io
from hires_lmm.train.errors import CheckpointError, ConfigMismatchError, TrainingError
from hires_lmm.train.resume import truncate_metrics
from hires_lmm.train.trainer import check_config

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0"}
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "white": (250, 250, 250)}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """8 small images of one colour each, question → colour word."""
    return write_colour_dataset(tmp_path_factory.mktemp("data"), 8, (200, 150))


def config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(method="llava-1.5", tiny=True, data_path=str(data / "train.json"), image_folder=str(data / "images"),
                output_dir=str(out), max_steps=2, batch_size=2, save_steps=2, keep_last=3, progress=False)
    return TrainConfig(**{**base, **kw})


def hires(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hires_lmm.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


def cli_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "-m", "llava-1.5", "--tiny", "--data-path", str(data / "train.json"), "--image-folder",
            str(data / "images"), "--output-dir", str(out), "--batch-size", "2", "--max-steps", "2",
            "--save-steps", "2", "--no-progress", *extra]


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> Path:
    """A finished 2-step run with its checkpoint ``step-0000002``."""
    out = tmp_path_factory.mktemp("runs") / "base"
    train(config(data, out))
    return out


def copy_run(trained: Path, dest: Path) -> Path:
    shutil.copytree(trained, dest)
    return dest


# --- 1. no code execution on --resume ------------------------------------------------------------

class _Payload:
    """Unpickling this writes ``marker``: what a tampered checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def _payload_file(path: Path, marker: Path) -> None:
    torch.save({"state": _Payload(marker)}, path)  # torch's zip-of-pickles, as accelerate wrote


def test_the_payload_is_live(tmp_path):
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_Payload(marker)))
    assert marker.read_text() == "pwned"  # so the tests below would see an unpickling


CHECKPOINT_FILES = sorted(ckpt_io.expected_files(1))


@pytest.mark.parametrize("name", CHECKPOINT_FILES)
def test_resume_refuses_a_pickle_in_any_checkpoint_file(data, trained, tmp_path, name):
    out = copy_run(trained, tmp_path / "run")
    marker = tmp_path / "marker"
    _payload_file(out / "checkpoints" / "step-0000002" / name, marker)
    with pytest.raises(CheckpointError) as e:
        train(config(data, out, resume=True))
    assert name in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_resume_refuses_an_old_pickle_checkpoint_and_foreign_files(data, trained, tmp_path):
    out = copy_run(trained, tmp_path / "run")
    marker = tmp_path / "marker"
    step = out / "checkpoints" / "step-0000002"
    _payload_file(step / "random_states_0.pkl", marker)  # a foreign file in a current checkpoint
    with pytest.raises(CheckpointError, match="unexpected file.*random_states_0.pkl"):
        train(config(data, out, resume=True))
    for f in step.iterdir():  # accelerate's layout: pickles, and its own trainer_state.json
        f.unlink()
    for name in ("optimizer.bin", "scheduler.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl"):
        _payload_file(step / name, marker)
    (step / "trainer_state.json").write_text(json.dumps({"step": 2, "epoch": 0, "batch_in_epoch": 2}))
    with pytest.raises(CheckpointError, match="old pickle format"):
        train(config(data, out, resume=True))
    assert not marker.exists()


def test_cli_resume_of_a_tampered_checkpoint_is_one_line(data, trained, tmp_path):
    out = copy_run(trained, tmp_path / "run")
    marker = tmp_path / "marker"
    _payload_file(out / "checkpoints" / "step-0000002" / "optimizer.safetensors", marker)
    line = one_line_error(hires(*cli_args(data, out, "--resume")))
    assert "optimizer.safetensors" in line and "not a valid safetensors file" in line
    assert not marker.exists()


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


@pytest.mark.parametrize("tamper, message", [
    (lambda d: _edit_json(d / "scheduler.json", lambda o: o["scheduler"].update(last_epoch="0; import os")),
     "scheduler last_epoch"),
    (lambda d: _edit_json(d / "scheduler.json", lambda o: o["scheduler"].update(get_lr=1)), "scheduler state"),
    (lambda d: _edit_json(d / "rng-0.json", lambda o: o["python"][1].pop()), "not a valid RNG state"),
    (lambda d: _edit_json(d / "optimizer.json", lambda o: o["param_groups"][0].update(lr="high")), "lr is 'high'"),
    (lambda d: save_file({k: torch.zeros(3) for k in load_file(d / "model.safetensors")}, d / "model.safetensors"),
     "model.safetensors"),
    (lambda d: _edit_json(d / "trainer_state.json", lambda o: o["state"].update(step=-3)), "no valid step"),
])
def test_resume_refuses_well_formed_files_with_wrong_contents(data, trained, tmp_path, tamper, message):
    out = copy_run(trained, tmp_path / "run")
    tamper(out / "checkpoints" / "step-0000002")
    with pytest.raises(CheckpointError, match=message) as e:
        train(config(data, out, resume=True))
    assert "\n" not in str(e.value)


def test_checkpoint_of_other_process_count_is_refused(trained):
    step = trained / "checkpoints" / "step-0000002"
    assert ckpt_io.read_state(step, ckpt_io.Processes())["step"] == 2
    with pytest.raises(CheckpointError, match="written by 1 process.*this run has 2"):
        ckpt_io.read_state(step, ckpt_io.Processes(rank=1, world_size=2))


def test_an_interrupted_save_is_ignored_and_an_existing_step_is_replaced(trained, tmp_path):
    root = copy_run(trained, tmp_path / "run") / "checkpoints"
    shutil.copytree(root / "step-0000002", root / ".tmp-step-0000009")
    (root / "step-0000007").mkdir()  # no trainer_state.json: incomplete
    assert ckpt_io.latest(root) == root / "step-0000002"
    ckpt_io._publish(root / ".tmp-step-0000009", root / "step-0000002")
    assert sorted(p.name for p in root.iterdir()) == ["step-0000002", "step-0000007"]


# --- 2. --resume checks the arguments and the data -----------------------------------------------

def test_resume_with_other_arguments_is_refused_naming_them(data, trained, tmp_path):
    out = copy_run(trained, tmp_path / "run")
    with pytest.raises(ConfigMismatchError) as e:
        train(config(data, out, resume=True, batch_size=4, lr=0.01, seed=3))
    msg = str(e.value)
    assert "batch_size 2 → 4" in msg and "lr None → 0.01" in msg and "seed 0 → 3" in msg and "\n" not in msg
    with pytest.raises(ConfigMismatchError, match=r"max_steps 2 → 4.*--allow-changed max_steps"):
        train(config(data, out, resume=True, max_steps=4))
    line = one_line_error(hires(*["llava-uhd" if a == "llava-1.5" else a for a in cli_args(data, out, "--resume")]))
    assert "method 'llava-1.5' → 'llava-uhd'" in line
    # settings that change nothing trained are free, spelled paths too
    res = train(config(data, out, resume=True, save_steps=5, keep_last=1, log_steps=2, num_workers=0,
                       data_path=os.path.relpath(data / "train.json")))
    assert res.steps == 2


def test_allow_changed_trains_on_to_a_new_max_steps(data, trained, tmp_path):
    out = copy_run(trained, tmp_path / "run")
    res = train(config(data, out, resume=True, max_steps=3, allow_changed=("max_steps",)))
    assert res.steps == 3 and (out / "checkpoints" / "step-0000003").is_dir()
    assert json.loads((out / "train_config.json").read_text())["max_steps"] == 3
    with pytest.raises(TrainingError, match="allow_changed.*lr.*not allowed"):
        train(config(data, out, resume=True, lr=1.0, allow_changed=("lr",)))


def test_cli_allow_changed_flag(data, trained, tmp_path):
    out = copy_run(trained, tmp_path / "run")
    r = hires(*cli_args(data, out, "--resume", "--max-steps", "3", "--allow-changed", "max_steps"))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 3


def test_resume_with_changed_data_at_the_same_path_is_refused(data, tmp_path):
    d = tmp_path / "d"
    shutil.copytree(data, d)
    train(config(d, tmp_path / "run"))
    recs = json.loads((d / "train.json").read_text())
    recs[3]["conversations"][1]["value"] = "purple"
    (d / "train.json").write_text(json.dumps(recs))
    with pytest.raises(ConfigMismatchError, match="training data differ.*8 records then, 8 now"):
        train(config(d, tmp_path / "run", resume=True))


def test_resume_without_checkpoint_checks_train_config(data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "train_config.json").write_text(json.dumps({"method": "llava-1.5", "stage": "1"}))
    with pytest.raises(ConfigMismatchError, match="stage '1' → 'scratch'"):
        train(config(data, out, resume=True))


# --- 3. metrics.jsonl continues without repeats --------------------------------------------------

@pytest.mark.parametrize("accum", [1, 2])
def test_resumed_metrics_do_not_repeat_steps_and_the_weights_match(data, tmp_path, accum):
    ref = train(config(data, tmp_path / "ref", max_steps=5, grad_accum=accum, batch_size=1))
    assert ref.steps == 5
    out = copy_run(tmp_path / "ref", tmp_path / "run")
    shutil.rmtree(out / "checkpoints" / "step-0000005")  # as if killed after step 5 was logged
    (out / "model.safetensors").unlink()
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')  # and in the middle of writing a line
    train(config(data, out, max_steps=5, grad_accum=accum, batch_size=1, resume=True))
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]
    old = [json.loads(line) for line in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in lines] == [r["loss"] for r in old]
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_truncate_metrics_keeps_earlier_lines_and_completes_the_last(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"step": 1}\n{"step": 2}\nnot json\n{"step": 3}\n{"step": 4}')
    assert truncate_metrics(f, 2) == 2
    assert f.read_text() == '{"step": 1}\n{"step": 2}\nnot json\n'
    f.write_text('{"step": 1}\n{"step": 2}')  # complete but for its newline
    assert truncate_metrics(f, 5) == 0 and f.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert truncate_metrics(tmp_path / "absent.jsonl", 3) == 0


# --- 4. every foreseeable failure is a one-line TrainingError ------------------------------------

def test_bad_argument_values_are_named_together(data, tmp_path):
    with pytest.raises(TrainingError) as e:
        check_config(config(data, tmp_path, batch_size=0, lr=-1.0, warmup_ratio=2.0, lr_schedule="linear",
                            max_steps=0, mixed_precision="fp8"))
    msg = str(e.value)
    for name in ("batch_size", "lr must", "warmup_ratio", "lr_schedule", "max_steps", "mixed_precision"):
        assert name in msg, name
    assert "\n" not in msg
    line = one_line_error(hires(*cli_args(data, tmp_path / "o", "--batch-size", "0")))
    assert "batch_size must be an integer ≥ 1, got 0" in line


@pytest.mark.parametrize("case", ["data is a directory", "output is a file", "output under a file", "bad llm dir",
                                  "corrupt init", "unknown stage", "unknown template"])
def test_foreseeable_failures_are_training_errors(data, tmp_path, case):
    (tmp_path / "file").write_text("x")
    (tmp_path / "llm").mkdir()
    (tmp_path / "llm" / "config.json").write_text("{not json")
    (tmp_path / "init").mkdir()
    (tmp_path / "init" / "trainable.safetensors").write_bytes(b"\x00" * 64)
    kw = {"data is a directory": dict(data_path=str(data / "images")),
          "output is a file": dict(output_dir=str(tmp_path / "file")),
          "output under a file": dict(output_dir=str(tmp_path / "file" / "out")),
          "bad llm dir": dict(llm=str(tmp_path / "llm")),
          "corrupt init": dict(init=str(tmp_path / "init")),
          "unknown stage": dict(stage="9"),
          "unknown template": dict(template="klingon")}[case]
    cfg = config(data, tmp_path / "out", **kw)
    expect = {"data is a directory": "is a directory", "output is a file": "is a file",
              "output under a file": "--output-dir", "bad llm dir": "cannot build the llava-1.5 model from --llm",
              "corrupt init": "cannot build the llava-1.5 model from --init", "unknown stage": "no stage '9'",
              "unknown template": "unknown chat template"}[case]
    # the data module reports a directory itself (a DataError, also one line in the CLI)
    with pytest.raises(DataError if case == "data is a directory" else TrainingError, match=expect) as e:
        train(cfg)
    assert "\n" not in str(e.value)


def test_unreadable_data_is_a_training_error(data, tmp_path, monkeypatch):
    import hires_lmm.data.records as records

    def unreadable(*_a, **_k):
        raise PermissionError(13, "Permission denied", str(data / "train.json"))

    monkeypatch.setattr(records, "load_records", unreadable)  # root reads any file: simulate it
    with pytest.raises(TrainingError, match="cannot read the training data .*Permission denied"):
        train(config(data, tmp_path / "out"))


def test_cli_prints_a_model_dir_failure_in_one_line(data, tmp_path):
    (tmp_path / "llm").mkdir()
    line = one_line_error(hires(*cli_args(data, tmp_path / "o", "--llm", str(tmp_path / "llm"))))
    assert "cannot build the llava-1.5 model from --llm" in line


# --- data parallel -------------------------------------------------------------------------------

def test_two_processes_resume_to_the_same_weights(data, tmp_path):
    def torchrun(out: Path, *extra: str) -> None:
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            "29531", "-m", "hires_lmm.cli", *cli_args(data, out, "--max-steps", "4",
                                                                      "--keep-last", "3", *extra)],
                           capture_output=True, text=True, env=ENV, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]

    torchrun(tmp_path / "ref")
    step2 = tmp_path / "ref" / "checkpoints" / "step-0000002"
    assert {p.name for p in step2.iterdir()} == ckpt_io.expected_files(2)  # one RNG file per process
    out = copy_run(tmp_path / "ref", tmp_path / "run")
    shutil.rmtree(out / "checkpoints" / "step-0000004")
    (out / "model.safetensors").unlink()
    torchrun(out, "--resume")
    a, b = load_file(tmp_path / "ref" / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    line = one_line_error(hires(*cli_args(data, out, "--max-steps", "4", "--keep-last", "3", "--resume")))
    assert "written by 2 process(es), this run has 1" in line


def test_training_errors_are_the_packages_user_errors():
    from hires_lmm.errors import HiresError

    assert all(issubclass(c, HiresError) for c in (TrainingError, CheckpointError, ConfigMismatchError))
