"""The visual-token budget reaches every entry point: ``hires predict --max-visual-tokens``, the
server's per-request ``max_visual_tokens`` (chat and ``/v1/plan``), and the counts a composed
method reports (``HiresLMM.plan``, the processor) are those its forward splices."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from hires_lmm.methods import build_model
from hires_lmm.model import HiresLMM
from hires_lmm.plan import plan_image

# sizes whose unbudgeted LLaVA-UHD plans (1014 and 724 tokens) a budget of 800 lowers / keeps
SIZES = [(900, 600), (1200, 400)]
BUDGET = 800


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def uhd(tmp_path_factory):
    """A tiny LLaVA-UHD saved to disk, two large images and their questions."""
    root = tmp_path_factory.mktemp("budget")
    build_model("llava-uhd", tiny=True, seed=0).save_pretrained(root / "tiny-uhd")
    images = root / "images"
    images.mkdir()
    for k, size in enumerate(SIZES):
        Image.new("RGB", size, (30 + 60 * k, 120, 200)).save(images / f"im{k}.png")
    qfile = root / "questions.jsonl"
    qfile.write_text("".join(json.dumps({"question_id": f"q{k}", "image": f"im{k}.png", "text": "What?"}) + "\n"
                             for k in range(len(SIZES))))
    return {"model_dir": root / "tiny-uhd", "images": images, "questions": qfile}


@pytest.fixture
def spliced(monkeypatch):
    """The visual-token counts every ``HiresLMM.build_inputs`` call spliced, per image in order."""
    seen: list[int] = []
    real = HiresLMM.build_inputs

    def recording(self, *args, **kwargs):  # noqa: ANN001, ANN202
        batch = real(self, *args, **kwargs)
        seen.extend(batch.num_visual_tokens)
        return batch

    monkeypatch.setattr(HiresLMM, "build_inputs", recording)
    return seen


# --- hires predict --max-visual-tokens ------------------------------------------------------------

def test_predict_budget_sets_the_visual_tokens(uhd, tmp_path, spliced):
    from hires_lmm.eval.predict import predict

    unbudgeted = [plan_image("llava-uhd", s).num_visual_tokens for s in SIZES]
    budgeted = [plan_image("llava-uhd", s, max_visual_tokens=BUDGET).num_visual_tokens for s in SIZES]
    assert budgeted == [724, 724] and unbudgeted[0] > BUDGET  # the budget really changes the first plan
    res = predict(uhd["model_dir"], uhd["questions"], uhd["images"], tmp_path / "a.jsonl", batch_size=2,
                  max_new_tokens=2, progress=False, max_visual_tokens=BUDGET)
    assert res.errors == 0 and res.written == 2
    assert spliced == budgeted
    spliced.clear()
    predict(uhd["model_dir"], uhd["questions"], uhd["images"], tmp_path / "b.jsonl", batch_size=2,
            max_new_tokens=2, progress=False)
    assert spliced == unbudgeted  # without the option, the saved config's (no budget)


def test_predict_budget_on_a_loaded_model_is_restored(uhd, tmp_path, spliced):
    from hires_lmm.eval.predict import predict

    net = HiresLMM.from_pretrained(uhd["model_dir"])
    before = dict(net.config.plan_options)
    predict(net, uhd["questions"], uhd["images"], tmp_path / "a.jsonl", max_new_tokens=1, progress=False,
            max_visual_tokens=BUDGET)
    assert spliced == [724, 724] and net.config.plan_options == before


def test_predict_impossible_budget_is_recorded_per_question(uhd, tmp_path, spliced):
    from hires_lmm.eval.predict import predict

    out = tmp_path / "a.jsonl"
    res = predict(uhd["model_dir"], uhd["questions"], uhd["images"], out, max_new_tokens=2, progress=False,
                  max_visual_tokens=100)
    assert res.errors == res.written == 2 and spliced == []
    for rec in read_jsonl(out):
        assert rec["text"] == "" and rec["error"].startswith("BudgetError: llava-uhd cannot plan a ")
        assert "max_visual_tokens=100" in rec["error"] and "144 visual tokens" in rec["error"]
        assert "\n" not in rec["error"]


def test_cli_predict_max_visual_tokens(uhd, tmp_path, capsys, spliced):
    from hires_lmm.cli import main

    common = ["predict", "--model", str(uhd["model_dir"]), "--question-file", str(uhd["questions"]),
              "--image-folder", str(uhd["images"]), "--max-new-tokens", "1", "--no-progress"]
    assert main(common + ["--answers-file", str(tmp_path / "a.jsonl"), "--max-visual-tokens", str(BUDGET)]) == 0
    assert json.loads(capsys.readouterr().out)["errors"] == 0 and spliced == [724, 724]
    assert main(common + ["--answers-file", str(tmp_path / "b.jsonl"), "--max-visual-tokens", "50"]) == 0
    assert json.loads(capsys.readouterr().out)["errors"] == 2
    assert main(common + ["--answers-file", str(tmp_path / "c.jsonl"), "--max-visual-tokens", "0"]) == 2
    err = capsys.readouterr().err
    assert "max_visual_tokens must be a positive integer, got 0" in err and "Traceback" not in err
    assert not (tmp_path / "c.jsonl").exists()
