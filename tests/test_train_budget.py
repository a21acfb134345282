"""Training within a visual-token budget (``hires train --max-visual-tokens B``) and the trainer's
visual-token counting of composed methods (issue 16: one budget; methods as parts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import COLOURS, one_line_error
from PIL import Image

from hires_lmm.model import HiresLMM
from hires_lmm.plan import NEXT_PINPOINTS, plan_image
from hires_lmm.train import TrainConfig, train
from hires_lmm.train.errors import ConfigMismatchError, TrainingError

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0"}
NEXT_UHD = {"base": "llava-next", "compressor": "uhd-spatial"}
SIZE = (500, 400)  # llava-uhd: 434 tokens unbudgeted (2 slices), 144 at max_slices=1


def write_dataset(root: Path, sizes: list[tuple[int, int]]) -> Path:
    """One one-colour image per size (``i.png``) and ``train.json`` asking each one's colour."""
    (root / "images").mkdir(parents=True)
    recs = []
    for i, size in enumerate(sizes):
        name = list(COLOURS)[i % 4]
        Image.new("RGB", size, COLOURS[name]).save(root / "images" / f"{i}.png")
        recs.append({"id": f"r{i}", "image": f"{i}.png",
                     "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                                       {"from": "gpt", "value": name}]})
    (root / "train.json").write_text(json.dumps(recs))
    return root


@pytest.fixture(scope="module")
def same_size(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("same"), [SIZE] * 4)


def config(data: Path, out: Path, **kw) -> TrainConfig:
    base = dict(method="llava-uhd", tiny=True, data_path=str(data / "train.json"), image_folder=str(data / "images"),
                output_dir=str(out), max_steps=2, batch_size=2, save_steps=2, progress=False)
    return TrainConfig(**{**base, **kw})


def visual_per_sample(out: Path) -> list[float]:
    return [json.loads(line)["visual_tokens_per_sample"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def hires(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hires_lmm.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


# --- 1. the budget ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def budgeted(same_size, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "b300"
    train(config(same_size, out, max_visual_tokens=300))
    return out


def test_training_within_a_budget_plans_every_sample_within_it(budgeted):
    planned = plan_image("llava-uhd", SIZE, max_visual_tokens=300).num_visual_tokens
    assert planned <= 300 < plan_image("llava-uhd", SIZE).num_visual_tokens
    assert visual_per_sample(budgeted) == [planned, planned]  # the real spliced count, each step
    # the saved model carries the budget: it predicts as it was trained
    assert HiresLMM.from_pretrained(budgeted).config.plan_options["max_visual_tokens"] == 300
    assert json.loads((budgeted / "stage.json").read_text())["plan_options"]["max_visual_tokens"] == 300
    assert json.loads((budgeted / "train_config.json").read_text())["max_visual_tokens"] == 300


def test_resume_with_another_budget_is_refused_naming_it(same_size, budgeted, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(budgeted, out)
    with pytest.raises(ConfigMismatchError, match="max_visual_tokens 300 → 200"):
        train(config(same_size, out, resume=True, max_visual_tokens=200))
    with pytest.raises(ConfigMismatchError, match="max_visual_tokens 300 → None"):
        train(config(same_size, out, resume=True))
    with pytest.raises(TrainingError, match="allow_changed.*max_visual_tokens.*not allowed"):
        train(config(same_size, out, resume=True, max_visual_tokens=200, allow_changed=("max_visual_tokens",)))
    res = train(config(same_size, out, resume=True, max_visual_tokens=300))  # the same budget resumes
    assert res.steps == 2


def test_an_impossible_budget_is_one_line_naming_a_record(same_size, tmp_path):
    args = ["train", "-m", "llava-uhd", "--tiny", "--data-path", str(same_size / "train.json"), "--image-folder",
            str(same_size / "images"), "--output-dir", str(tmp_path / "o"), "--max-steps", "1", "--no-progress",
            "--max-visual-tokens", "100"]
    line = one_line_error(hires(*args))
    assert "'r0'" in line and "max_visual_tokens=100" in line and "4 of 4" in line and "--skip-bad" in line
    line = one_line_error(hires(*args, "--skip-bad"))  # every record skipped: nothing to train on
    assert "no usable records" in line
    with pytest.raises(TrainingError, match="max_visual_tokens must be a positive integer"):
        train(config(same_size, tmp_path / "z", max_visual_tokens=0))
    r = hires(*args[:-1], "0")  # argparse's refusal: usage, then the error line
    assert r.returncode == 2 and "--max-visual-tokens: must be a positive integer" in r.stderr.splitlines()[-1]


def test_skip_bad_skips_the_images_no_plan_fits(tmp_path):
    # llava-next's smallest plan: 1076 tokens for 500x400, 744 for 200x800
    smallest = {s: min(plan_image("llava-next", s, pinpoints=[p]).num_visual_tokens for p in NEXT_PINPOINTS)
                for s in (SIZE, (200, 800))}
    assert smallest[(200, 800)] <= 800 < smallest[SIZE]
    data = write_dataset(tmp_path / "mixed", [SIZE, (200, 800), (200, 800), SIZE])
    cfg = config(data, tmp_path / "o", method="llava-next", max_steps=1, max_visual_tokens=800)
    with pytest.raises(TrainingError, match=r"record 'r0'.*2 of 4 record\(s\) cannot be planned within max_visual_tokens=800"):
        train(cfg)
    cfg.skip_bad = True
    res = train(cfg)
    assert res.skipped_records == 2 and res.steps == 1
    assert visual_per_sample(tmp_path / "o") == [plan_image("llava-next", (200, 800), max_visual_tokens=800).num_visual_tokens]


# --- 2. composed methods are counted as the model splices them ------------------------------------

def test_composed_method_lengths_are_the_spliced_lengths(tmp_path):
    import torch

    from hires_lmm.data.dataset import LlavaDataset
    from hires_lmm.data.records import VisualTokenCounter
    from hires_lmm.methods import build_model
    from hires_lmm.parts import resolve_method
    from hires_lmm.train.distributed import setup
    from hires_lmm.train.trainer import _load_and_validate, _model_for_stage

    sizes = [SIZE, (300, 200), (200, 800), (1000, 200)]
    data = write_dataset(tmp_path / "d", sizes)
    spec = resolve_method(NEXT_UHD)
    cfg = config(data, tmp_path / "o", method="llava-next", connector={"method_spec": spec.to_json()},
                 max_length=1000)
    model, _, _, template = _model_for_stage(cfg, setup(1, "no"), for_training=False)
    assert model.config.method_spec["compressor"] == "uhd-spatial"
    records, lengths, skipped = _load_and_validate(cfg, model, template, main=False)
    assert skipped == 0 and len(records) == 4  # the preset planner's count (~4x) would be over max_length
    dataset = LlavaDataset(records, image_folder=cfg.image_folder, tokenizer=model.tokenizer, template=template,
                           model_prepare=VisualTokenCounter.of(model).prepare, lengths=lengths)
    with torch.no_grad():
        batch = model.build_inputs([dataset[i]["input_ids"] for i in range(4)],
                                   [dataset[i]["image_inputs"] for i in range(4)])
    assert lengths == [int(n) for n in batch.attention_mask.sum(1)]  # counted = spliced, sample by sample
    preset = [plan_image("llava-next", s).num_visual_tokens for s in sizes]
    assert all(3 * v < p for v, p in zip(batch.num_visual_tokens, preset))
    assert build_model(NEXT_UHD, tiny=True).config.method_spec == model.config.method_spec


def test_the_trainer_reads_each_image_header_once(tmp_path, monkeypatch):
    """Validation counts the lengths in the same pass: one header read per distinct image file."""
    from collections import Counter

    import hires_lmm.data.records as records
    from hires_lmm.train.distributed import setup
    from hires_lmm.train.trainer import _load_and_validate, _model_for_stage

    data = write_dataset(tmp_path / "d", [SIZE, (300, 200), SIZE])
    recs = json.loads((data / "train.json").read_text())
    (data / "train.json").write_text(json.dumps(recs + [{**recs[0], "id": "again"}]))  # 0.png used twice
    import hires_lmm.image.load as load

    reads: Counter[str] = Counter()
    image_size = load.image_size

    def counted_size(path, *a, **kw):
        reads[os.path.basename(str(path))] += 1
        return image_size(path, *a, **kw)

    for module in (records, load):
        monkeypatch.setattr(module, "image_size", counted_size)
    cfg = config(data, tmp_path / "o", max_visual_tokens=300)
    model, _, _, template = _model_for_stage(cfg, setup(1, "no"), for_training=False)
    recs_ok, lengths, skipped = _load_and_validate(cfg, model, template, main=False)
    assert skipped == 0 and len(recs_ok) == 4 and reads == {"0.png": 1, "1.png": 1, "2.png": 1}
    assert lengths[0] == lengths[3] and lengths[0] != lengths[1]


def test_composed_method_trains_within_max_length_and_a_budget_from_the_cli(tmp_path):
    data = write_dataset(tmp_path / "d", [SIZE] * 2)
    method = tmp_path / "next_uhd.json"
    method.write_text(json.dumps(NEXT_UHD))
    out = tmp_path / "o"
    r = hires("train", "-m", str(method), "--tiny", "--data-path", str(data / "train.json"), "--image-folder",
              str(data / "images"), "--output-dir", str(out), "--batch-size", "2", "--max-steps", "1",
              "--max-length", "1000", "--max-visual-tokens", "400", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["skipped_records"] == 0
    model = HiresLMM.from_pretrained(out)
    assert model.config.plan_options["max_visual_tokens"] == 400
    planned = model.plan(SIZE).num_visual_tokens
    assert planned <= 400 and visual_per_sample(out) == [planned]
