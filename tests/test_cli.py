"""The ``hires`` command line: plan, cost and demo."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from hires_lmm.cli import main
from hires_lmm.plan import METHODS, plan_image

ROLES = {"slice", "overview", "base", "tile", "local", "global", "thumbnail", "highres", "lowres", "image"}


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_plan_json_one_object_per_size_in_order(capsys):
    code, out, _ = run(capsys, "plan", "--method", "llava-uhd", "--size", "672x1088", "--size", "1024x768",
                       "--size", "100x100", "--json")
    assert code == 0
    objs = [json.loads(line) for line in out.strip().splitlines()]
    assert [o["image_size"] for o in objs] == [[672, 1088], [1024, 768], [100, 100]]
    first = objs[0]
    assert set(first) == {"method", "image_size", "grid", "views", "separators", "num_visual_tokens"}
    assert first["method"] == "llava-uhd" and first["grid"] == [2, 3]
    assert first["views"][0]["size"] == [322, 336] and first["views"][-1] == {
        "role": "overview", "size": [252, 420], "box": [0.0, 0.0, 672.0, 1088.0], "stride": None}
    assert first["separators"] == [",", "\n", ",", "\n", ",", "\n"]
    assert first["num_visual_tokens"] == 144 * 7 + 6
    assert objs[2]["grid"] is None and objs[2]["separators"] == []


@pytest.mark.parametrize("method", METHODS)
def test_plan_json_roles_and_counts(capsys, method):
    code, out, _ = run(capsys, "plan", "-m", method, "--size", "1600x1200", "--json")
    o = json.loads(out)
    assert code == 0 and o["method"] == method
    assert {v["role"] for v in o["views"]} <= ROLES
    assert o["num_visual_tokens"] == plan_image(method, (1600, 1200)).num_visual_tokens
    for v in o["views"]:
        assert v["box"] is None or len(v["box"]) == 4


def test_plan_table(capsys):
    code, out, _ = run(capsys, "plan", "-m", "inf-llava", "--size", "800x600")
    assert code == 0
    assert "inf-llava  image 800x600  grid 3x3  views 19  visual tokens 576" in out
    assert "rows 2::3, cols 1::3 of the 1008x1008 canvas" in out
    assert "thumbnail" in out


def test_plan_all_methods(capsys):
    code, out, _ = run(capsys, "plan", "-m", "all", "--size", "500x375", "--json")
    assert [json.loads(l)["method"] for l in out.splitlines()] == list(METHODS)


def test_plan_image_path_uses_exif_size_and_draws(tmp_path, capsys):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 700, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: the model sees 300x700
    path = tmp_path / "photo.jpg"
    img.save(path, exif=exif)
    out_png = tmp_path / "plan.png"
    code, out, _ = run(capsys, "plan", "-m", "llava-uhd", str(path), "--json", "--out", str(out_png))
    assert code == 0
    assert json.loads(out)["image_size"] == [300, 700]
    pic = Image.open(out_png)
    assert pic.width >= 1000 and pic.height > 700  # the image plus the strip of views


def test_plan_errors(tmp_path, capsys):
    code, _, err = run(capsys, "plan", "-m", "llava-7", "--size", "10x10")
    assert code == 2 and "unknown method 'llava-7'" in err
    code, _, err = run(capsys, "plan", "-m", "slime", "--size", "10xa")
    assert code == 2 and "bad size '10xa'" in err
    code, _, err = run(capsys, "plan", "-m", "slime", "--size", "0x10")
    assert code == 2 and "positive" in err
    code, _, err = run(capsys, "plan", "-m", "slime", str(tmp_path / "nope.png"))
    assert code == 2 and "nope.png" in err and "no such file" in err
    code, _, err = run(capsys, "plan", "-m", "slime")
    assert code == 2 and "--size" in err
    code, _, err = run(capsys, "plan", "-m", "slime", "--size", "10x10", "--out", str(tmp_path / "x.png"))
    assert code == 2 and "image path" in err


def test_cost_json_and_table(capsys):
    code, out, _ = run(capsys, "cost", "-m", "llava-uhd-arxiv", "--size", "672x1008", "--llm-params", "13e9", "--json")
    o = json.loads(out)
    assert code == 0 and o["num_visual_tokens"] == 454 and o["llm_hidden"] == 5120
    assert 14.0 < o["tflops"]["total"] < 15.2
    assert len(o["vision_views"]) == 7
    code, out, _ = run(capsys, "cost", "-m", "llava-hr", "--size", "1024x1024")
    assert code == 0 and "convnext" in out and "MR-adapters" in out and "total" in out
    code, _, err = run(capsys, "cost", "-m", "llava-hr", "--size", "1024x1024", "--llm-params", "-1")
    assert code == 2 and "positive" in err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "hires_lmm.cli", "plan", "-m", "llava-next", "--size", "1000x700", "--json"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out)["grid"] == [2, 2]


def test_demo_tour(tmp_path, capsys):
    code, out, _ = run(capsys, "demo", "--tour", "--out", str(tmp_path), "--quick")
    assert code == 0
    assert (tmp_path / "plan-llava-uhd.png").exists() and (tmp_path / "plans.json").exists()
    assert len(json.loads((tmp_path / "plans.json").read_text())) == len(METHODS)
    assert "visual tokens" in out
