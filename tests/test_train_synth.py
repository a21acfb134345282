"""A tiny model of each method learns on the synthetic fine-detail data on the CPU: its loss falls
well below its start within a few dozen steps (the demo trains for longer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hires_lmm.data.synth import generate
from hires_lmm.train import TrainConfig, train

METHODS = ["llava-1.5", "llava-next", "llava-uhd", "llava-hr", "inf-llava", "slime"]


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    generate(root, 48, seed=0, progress=False)
    return root


@pytest.mark.parametrize("method", METHODS)
def test_tiny_model_loss_falls_on_synthetic_data(synth, tmp_path, method):
    res = train(TrainConfig(method=method, tiny=True, data_path=str(synth / "stage2.json"),
                            image_folder=str(synth / "images"), output_dir=str(tmp_path / "out"), max_steps=40,
                            batch_size=2, lr=2e-3, warmup_ratio=0.1, save_steps=1000, progress=False))
    assert res.steps == 40
    losses = [json.loads(l)["loss"] for l in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    start, end = losses[0], sum(losses[-5:]) / 5
    assert end < 0.6 * start, (method, start, end)
    assert (tmp_path / "out" / "model.safetensors").exists()
