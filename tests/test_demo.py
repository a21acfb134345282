"""The demo's parts: whole-word tokenizer, 672-px synthetic data, frozen-encoder stage, dense
encoder pretraining, viewing scales, and a miniature end-to-end demo run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hires_lmm.data import synth
from hires_lmm.data.templates import get_template
from hires_lmm.demo.pretrain import view_scale, viewing_scales
from hires_lmm.demo.run import DEMO_SIZES, DemoConfig, run_demo, vocabulary
from hires_lmm.methods import TINY_VISION, build_model
from hires_lmm.plan import plan_image
from hires_lmm.text import build_byte_tokenizer, separator_id
from hires_lmm.train.dense import cell_labels, pretrain_dense
from hires_lmm.train.stages import apply_stage, get_stage
from hires_lmm.train.trainer import SCHEDULES
from hires_lmm.vision.vit import ViT

# --- tokenizer --------------------------------------------------------------------------------------

def test_word_tokenizer_makes_answers_single_tokens():
    tok = build_byte_tokenizer(["red", "green", "What", "color"])
    assert len(tok.encode("red", add_special_tokens=False)) == 1
    assert len(tok.encode(" green", add_special_tokens=False)) == 1
    ids = tok.encode("What colored reds?", add_special_tokens=False)
    assert tok.decode(ids) == "What colored reds?"              # other words fall back to bytes
    assert len(ids) > 4
    assert separator_id(tok, ",") != separator_id(tok, "\n")
    # vicuna_v1: the reply " green" is one labelled token, then </s>
    ids, labels = get_template("vicuna_v1").encode(
        tok, [{"from": "human", "value": "<image>\nWhat color?"}, {"from": "gpt", "value": "green"}])
    trained = [i for i, l in zip(ids, labels) if l != -100]
    assert trained == [tok.convert_tokens_to_ids("Ġgreen"), tok.eos_token_id]


def test_default_tokenizer_unchanged():
    tok = build_byte_tokenizer()
    assert len(tok.encode(" red", add_special_tokens=False)) == 4


# --- synthetic data -----------------------------------------------------------------------------------

def test_colours_differ_in_which_channels_are_textured():
    sets = [tuple(np.array(synth._COLOR_SIGNS[c]) != 0) for c in synth.ANSWERS["color"]]
    assert len(set(sets)) == len(sets)


def test_672_canvases_subset_of_classes_and_plain_background(tmp_path):
    meta = synth.generate(tmp_path, 12, seed=3, tasks=("color",), sizes=DEMO_SIZES, target_scale=6,
                          distractors=False, classes={"color": ["red", "green", "blue"]}, progress=False)
    assert meta["answers"] == {"color": ["red", "green", "blue"]}
    sep = meta["separability"]["color"]
    assert sep["lowres_max_abs_diff"]["max"] <= synth.LOWRES_MAX_DIFF
    assert sep["highres_min_pairwise_rms"]["min"] >= synth.HIGHRES_MIN_RMS
    exs = synth.build_examples(12, seed=3, tasks=("color",), sizes=DEMO_SIZES, target_scale=6, distractors=False,
                               classes={"color": ["red", "green", "blue"]})
    assert {e.f for e in exs} == {2}
    assert {e.answer for e in exs} == {"red", "green", "blue"}
    assert all(e.box[2] - e.box[0] == 8 * 2 * 6 for e in exs)    # 8 units of f=2 px, scaled 6x
    # no distractors: outside the plate the image is the smooth field (tiny pixel steps only)
    img = np.asarray(synth.render(exs[0]), np.int16)
    x0, y0, x1, y1 = exs[0].plate
    row = img[max(0, y0 - 40)] if y0 >= 40 else img[min(img.shape[0] - 1, y1 + 40)]
    assert np.abs(np.diff(row, axis=0)).max() <= 4


def test_class_subset_errors():
    with pytest.raises(ValueError, match="classes of 'color'"):
        synth.build_examples(4, tasks=("color",), classes={"color": ["red", "mauve"]})
    with pytest.raises(ValueError, match="not generated"):
        synth.build_examples(4, tasks=("color",), classes={"shape": ["circle", "square"]})
    with pytest.raises(ValueError, match="336·f"):
        synth.build_examples(4, tasks=("color",), sizes=[(500, 400)])


# --- stages, schedules ----------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["llava-uhd", "llava-hr"])
def test_frozen_encoders_stage(method):
    model = build_model(method, tiny=True)
    groups = apply_stage(model, get_stage(method, "frozen-encoders", 1e-3))
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    encoder = [n for n, _ in model.named_parameters()
               if n.startswith(("visual.vit.", "visual.vision_tower.fast_vision_tower.", "visual.vision_tower.slow_vision_tower."))]
    assert encoder and not trained & set(encoder)
    assert any(n.startswith("llm.") for n in trained) and any(n.startswith("visual.") for n in trained)
    assert sum(len(g["params"]) for g in groups) == len(trained)


def test_constant_schedule():
    assert SCHEDULES["constant"](0, 100, 10) == pytest.approx(0.1)
    assert SCHEDULES["constant"](99, 100, 10) == 1.0
    assert SCHEDULES["cosine"](99, 100, 10) < 0.01


# --- dense pretraining, viewing scales ------------------------------------------------------------------------

def test_cell_labels():
    lab = cell_labels((14, 0, 42, 14), 3, (2, 4), 14)
    assert lab.tolist() == [[0, 3, 3, 0], [0, 0, 0, 0]]


def test_dense_pretraining_learns_a_visible_cell_task():
    """Cells of a bright square are class 1: a tiny ViT learns it in a few dozen steps."""
    torch.manual_seed(0)
    cfg = dict(TINY_VISION, image_size=56, num_hidden_layers=2)
    vit = ViT.from_config(cfg)

    def sampler(rng, n):
        x = torch.full((n, 3, 56, 56), -1.0)
        y = torch.zeros(n, 4, 4, dtype=torch.long)
        for i in range(n):
            r, c = (int(v) for v in rng.integers(0, 4, size=2))
            x[i, :, r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] = 1.0
            y[i, r, c] = 1
        return x, y

    res = pretrain_dense(vit, sampler, 1, steps=40, batch_size=16, lr=1e-2, warmup=5, progress=False)
    assert res.fg_acc > 0.9 and res.bg_acc > 0.9, res
    assert not vit.training


def test_viewing_scales_follow_the_plans():
    assert view_scale(plan_image("inf-llava", (672, 672)), plan_image("inf-llava", (672, 672)).views[0]) == pytest.approx(1.5)
    assert viewing_scales(["llava-1.5"], DEMO_SIZES) == []                       # 336 of 672: shrunk
    assert 1.0 in viewing_scales(["llava-next"], DEMO_SIZES)
    assert viewing_scales(["llava-hr"], DEMO_SIZES, role="highres") == [1.52]
    # every high-resolution method sees the demo's images at scale >= 1 somewhere
    for m in ("llava-next", "llava-uhd", "inf-llava", "slime"):
        for size in DEMO_SIZES:
            plan = plan_image(m, size)
            assert max(s for v in plan.views if (s := view_scale(plan, v)) is not None) >= 1.0, (m, size)


def test_tiny_model_with_a_pretrained_tiny_llm(tmp_path):
    """``build_model(tiny=True, llm=DIR)``: the LLM's weights and tokenizer come from DIR (a tiny
    LLM trained elsewhere), the encoders and connector are the tiny preset's."""
    src = build_model("llava-1.5", tiny=True, words=["red", "green", "blue"], seed=3)
    src.llm.save_pretrained(tmp_path / "llm")
    src.tokenizer.save_pretrained(tmp_path / "llm")
    m = build_model("llava-uhd", tiny=True, llm=tmp_path / "llm", seed=4)
    assert m.tokenizer.get_vocab() == src.tokenizer.get_vocab()
    for (n, a), (_, b) in zip(src.llm.state_dict().items(), m.llm.state_dict().items()):
        assert torch.equal(a, b), n
    assert m.config.text_config["hidden_size"] == src.llm.config.hidden_size
    fresh = build_model("llava-uhd", tiny=True, words=["red", "green", "blue"], seed=4)
    assert not torch.equal(fresh.llm.get_input_embeddings().weight, m.llm.get_input_embeddings().weight)
    m.save_pretrained(tmp_path / "uhd")  # and it round-trips like any model
    back = type(m).from_pretrained(tmp_path / "uhd")
    assert torch.equal(back.llm.get_input_embeddings().weight, m.llm.get_input_embeddings().weight)


# --- the whole demo, miniature ---------------------------------------------------------------------------

def test_demo_end_to_end_miniature(tmp_path, capsys):
    """The demo is data + encoders + ``hires compare``: its results.json is the comparison's, with
    the demo's settings added, and a second run reuses every finished stage."""
    from hires_lmm.compare.figure import have_matplotlib

    cfg = DemoConfig(n=20, vit_steps=2, vit_batch=2, convnext_steps=1, convnext_batch=1, pretrain_images=4,
                     methods=("llava-1.5", "llava-uhd"), steps=2, batch_size=2, eval_batch=4, workers=1)
    res = run_demo(tmp_path, config=cfg, progress=False)
    assert list(res["methods"]) == ["llava-1.5", "llava-uhd"]
    for key, m in res["methods"].items():
        assert 0.0 <= m["accuracy"] <= 100.0 and m["count"] == 4 and m["seeds"] == [0]
        assert m["visual_tokens"] > 0 and m["tflops"] > 0 and m["train_seconds"] > 0
        run = tmp_path / "runs" / key / "seed-0"
        assert (run / "model" / "config.json").exists() and (run / "answers.jsonl").exists()
    assert res["methods"]["llava-1.5"]["visual_tokens"] == 576
    # UHD's slices cost more than LLaVA-1.5's one view
    assert res["methods"]["llava-uhd"]["tflops"] > res["methods"]["llava-1.5"]["tflops"]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["chance"] == pytest.approx(100 / 3) and "llava-uhd" in saved["margin_over_llava15"]
    assert saved["settings"]["steps"] == 2 and saved["settings"]["vision"].endswith("vit")
    assert saved["demo"]["config"]["n"] == 20 and "vit" in saved["demo"]["encoders"]
    files = ["results.md", "plan-llava-uhd.png", "plan-llava-1.5.png"] + (["accuracy-tflops.png"] if have_matplotlib() else [])
    for f in files:
        assert (tmp_path / f).exists(), f
    assert "| llava-uhd" in (tmp_path / "results.md").read_text()
    out = capsys.readouterr().out
    assert "| llava-uhd" in out
    # the tokenizer knows the answers as words
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    assert {"red", "green", "blue", "color"} <= set(vocabulary(meta))
    # a second run reuses every finished stage: data, encoders and both methods' runs
    res2 = run_demo(tmp_path, config=cfg, progress=False)
    assert res2["methods"] == res["methods"]
    assert capsys.readouterr().out.count("reusing") == 4


def test_demo_command_line_overrides_reach_the_config(monkeypatch, tmp_path):
    """`hires demo --target-scale 6 --steps 120 --seed 1` runs the demo with those settings (the
    2026-11-22 setting is one command away) and the rest of the defaults."""
    import hires_lmm.demo as demo_pkg
    from hires_lmm import cli
    from hires_lmm.demo import run as demo_run

    seen = {}
    monkeypatch.setattr(demo_pkg, "run_demo", lambda out, config, **kw: seen.update(out=out, cfg=config))
    assert cli.main(["demo", "--out", str(tmp_path), "--target-scale", "6", "--steps", "120", "--seed", "1"]) == 0
    cfg = seen["cfg"]
    assert (cfg.target_scale, cfg.steps, cfg.seed) == (6.0, 120, 1)
    assert cfg.batch_size == demo_run.DemoConfig().batch_size and demo_run.DemoConfig().target_scale == 10.0


# --- the demo at several seeds ----------------------------------------------------------------------

def _seed_results(accs: dict[str, float]) -> dict:
    """A demo result as run_demo returns it, with these accuracies."""
    return {"chance": 100 / 3, "methods": {m: {"accuracy": a, "visual_tokens": 576.0 if m == "llava-1.5" else 1000.0,
                                               "tflops": 8.5 if m == "llava-1.5" else 16.0} for m, a in accs.items()}}


def test_summarize_seeds_checks_every_method_at_every_seed():
    from hires_lmm.demo.seeds import format_seeds_table, summarize_seeds

    per_seed = {0: _seed_results({"llava-1.5": 33.3, "llava-uhd": 100.0, "inf-llava": 66.7}),
                2: _seed_results({"llava-1.5": 33.75, "llava-uhd": 90.0, "inf-llava": 100.0})}
    s = summarize_seeds(per_seed)
    uhd, inf = s["methods"]["llava-uhd"], s["methods"]["inf-llava"]
    assert s["seeds"] == [0, 2] and uhd["accuracy_per_seed"] == {"0": 100.0, "2": 90.0}
    assert uhd["accuracy"] == pytest.approx(95.0) and uhd["accuracy_spread"] == pytest.approx(7.0711, abs=1e-4)
    assert inf["margin_per_seed"] == {"0": pytest.approx(33.4), "2": pytest.approx(66.25)}
    assert s["weakest"] == {"method": "inf-llava", "seed": 0, "margin": pytest.approx(33.4)}
    assert s["baseline_at_chance"] and s["holds"]
    table = format_seeds_table(s)
    assert "| inf-llava | 1000 | 16.00 | 66.7 % | 100.0 % | 83.3 ± 23.5 | +33.4 |" in table
    assert "**yes** (smallest margin: inf-llava at seed 0, +33.4)" in table
    # one method 29.9 points above at one seed, or the baseline off chance: the claim fails
    per_seed[2]["methods"]["llava-uhd"]["accuracy"] = 63.65
    assert not summarize_seeds(per_seed)["holds"] and summarize_seeds(per_seed)["weakest"]["method"] == "llava-uhd"
    per_seed[2]["methods"]["llava-uhd"]["accuracy"] = 90.0
    per_seed[2]["methods"]["llava-1.5"]["accuracy"] = 36.0
    s = summarize_seeds(per_seed)
    assert not s["baseline_at_chance"] and not s["holds"] and "llava-1.5 is not at chance" in format_seeds_table(s)
    with pytest.raises(ValueError, match="no seeds"):
        summarize_seeds({})
    # without the baseline there is no claim: holds is None, not False, and the table says why
    s = summarize_seeds({0: _seed_results({"llava-uhd": 100.0})})
    assert s["holds"] is None and s["weakest"] is None
    assert "llava-1.5 was not run" in format_seeds_table(s)


def test_demo_seeds_runs_the_whole_demo_at_each_seed(monkeypatch, tmp_path, capsys):
    """`hires demo --seeds 0,1 --steps 7`: one demo per seed into OUT/seed-S with that seed and the
    other settings, then OUT/seeds.json and seeds.md; exit 1 when a method is under the bar."""
    from hires_lmm import cli
    from hires_lmm.demo import seeds as demo_seeds

    ran = []
    accs = {0: {"llava-1.5": 33.3, "llava-hr": 100.0}, 1: {"llava-1.5": 33.3, "llava-hr": 100.0}}

    def fake_run_demo(out, config, **kw):
        ran.append((out, config.seed, config.steps))
        return _seed_results(accs[config.seed])

    monkeypatch.setattr(demo_seeds, "run_demo", fake_run_demo)
    assert cli.main(["demo", "--out", str(tmp_path), "--seeds", "0,1", "--steps", "7", "--no-progress"]) == 0
    assert ran == [(tmp_path / "seed-0", 0, 7), (tmp_path / "seed-1", 1, 7)]
    saved = json.loads((tmp_path / "seeds.json").read_text())
    assert saved["holds"] and saved["methods"]["llava-hr"]["margin_min"] == pytest.approx(66.7)
    assert "| llava-hr |" in (tmp_path / "seeds.md").read_text() and "| llava-hr |" in capsys.readouterr().out
    accs[1]["llava-hr"] = 40.0
    assert cli.main(["demo", "--out", str(tmp_path), "--seeds", "0,1", "--no-progress"]) == 1
    assert not json.loads((tmp_path / "seeds.json").read_text())["holds"]
    ran.clear()
    assert cli.main(["demo", "--out", str(tmp_path), "--seeds", "0,0"]) == 2 and ran == []
    err = capsys.readouterr().err
    assert "each seed once" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # no llava-1.5 among the methods: nothing to fail, exit 0
    accs[1]["llava-hr"], accs[1]["llava-1.5"] = 40.0, 33.3
    accs[0].pop("llava-1.5"), accs[1].pop("llava-1.5")
    assert cli.main(["demo", "--out", str(tmp_path), "--seeds", "0,1", "--methods", "llava-hr", "--no-progress"]) == 0
    assert json.loads((tmp_path / "seeds.json").read_text())["holds"] is None
