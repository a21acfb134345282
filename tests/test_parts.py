"""The registry of parts and methods (issue 16, items 1-2): stages, typed options, shape checks,
the seven presets as specs, method files, and two composed methods end to end (LLaVA-UHD's slices
with SliME's text-guided selector; LLaVA-NeXT's tiles compressed by UHD's spatial resampler)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from hires_lmm.cli import main
from hires_lmm.errors import HiresError
from hires_lmm.methods import PRESETS, build_model
from hires_lmm.parts import METHOD_SPECS, PARTS, STAGES, PartError, resolve_method, spec_from_config, spec_from_dict
from hires_lmm.plan import METHODS, plan_image
from hires_lmm.plan.cost import plan_cost

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONHASHSEED": "0"}
SIZES = [(336, 336), (672, 336), (336, 672), (1000, 700), (700, 1000), (1088, 672), (2000, 300), (300, 2000),
         (1600, 1200), (500, 501), (100, 80), (3000, 3000), (1008, 336), (640, 480), (1280, 720)]
UHD_SELECT = {"base": "llava-uhd", "selector": "text-guided"}
NEXT_UHD = {"base": "llava-next", "compressor": "uhd-spatial"}

#: the connector dicts presets have always saved in config.json (old directories hold exactly these)
OLD_CONNECTORS = {
    "llava-1.5": {"projector": "mlp2x_gelu"},
    "llava-next": {"projector": "mlp2x_gelu"},
    "llava-uhd": {"resampler": "spatial", "grid": 12, "heads": None},
    "llava-uhd-arxiv": {"resampler": "perceiver", "queries": 64, "heads": None},
    "llava-hr": {"projector": "mlp2x_gelu", "gate": "scalar", "adapters": True},
    "inf-llava": {"projector": "mlp2x_gelu", "heads": 8, "bottleneck": 64, "variant": "code"},
    "slime": {"projector": "mlp2x_gelu", "global_queries": 576, "local_queries": 144, "heads": 8,
              "selector_p": 0.95, "selector_variant": "spec"},
}


# --- registry ----------------------------------------------------------------------------------
def test_stages_parts_and_presets_are_registered():
    assert STAGES == ("views", "encoder", "fusion", "compressor", "layout", "selector")
    assert set(PARTS["views"]) == set(METHODS)
    assert {"mlp", "uhd-spatial", "perceiver", "slime"} <= set(PARTS["compressor"])
    assert {"none", "text-guided"} <= set(PARTS["selector"])
    assert {"flat", "anyres", "spatial", "slime"} <= set(PARTS["layout"])
    assert list(METHOD_SPECS)[:7] == list(METHODS)
    assert METHOD_SPECS["slime"].parts == {"views": "slime", "encoder": "vit", "fusion": "none",
                                           "compressor": "slime", "layout": "slime", "selector": "text-guided"}
    assert METHOD_SPECS["llava-hr"].parts["encoder"] == "convnext-vit"
    assert METHOD_SPECS["inf-llava"].parts["fusion"] == "dem"
    assert METHOD_SPECS["slime"].recipes == "slime" and "slime" in METHOD_SPECS["slime"].formats


def test_hires_methods_json_lists_stages_parts_options_presets(capsys):
    assert main(["methods", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["stages"] == list(STAGES)
    assert d["parts"]["compressor"] == list(PARTS["compressor"])
    assert d["presets"]["llava-next"]["layout"] == "anyres" and set(METHODS) <= set(d["presets"])
    assert d["options"]["selector"]["text-guided"] == {"selector_p": 0.95, "selector_variant": "spec"}
    assert d["options"]["views"]["llava-hr"]["S"] == 1024  # the planner's default, read from its signature
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    assert "uhd-spatial" in text and "selector_p=0.95" in text


def test_presets_save_the_connector_dicts_old_directories_hold():
    for m, old in OLD_CONNECTORS.items():
        assert PRESETS[m].connector == old, m
        assert list(PRESETS[m].connector) == list(old), m  # same keys, same order in config.json
    assert PRESETS["inf-llava"].tiny_connector == {"heads": 4, "bottleneck": 8}
    assert PRESETS["slime"].tiny_connector == {"heads": 4}
    assert PRESETS["llava-hr"].plan_options == {"S": 1024} and PRESETS["llava-hr"].needs_convnext


@pytest.mark.parametrize("method", METHODS)
def test_parts_count_what_the_planner_counts(method):
    """The layouts' token count (from the parts' shapes) is the planners' count for every preset,
    so a composed method's count is computed by the same code that is right for the presets."""
    spec = METHOD_SPECS[method]
    parts = spec.build_parts()
    for size in SIZES:
        plan = plan_image(method, size, **spec.options.get("views", {}))
        n, groups = parts["layout"].count(plan, spec.token_shapes(plan, parts))
        assert n == plan.num_visual_tokens, (method, size)
        assert sum(g.count for g in groups) == n
        assert spec.plan(size) == plan  # a preset's plan is the planner's, unchanged


@pytest.mark.parametrize("method", METHODS)
def test_compressor_flops_are_the_cost_models(method):
    spec = METHOD_SPECS[method]
    parts = spec.build_parts()
    comp = parts["compressor"]
    for size in SIZES[:8]:
        plan = spec.plan(size)
        rep = plan_cost(plan)
        units = parts["fusion"].units(plan, parts["encoder"].units(plan))
        mine = comp.flops(units, 1024, rep.llm_hidden)
        assert set(mine) == set(comp.cost_keys) <= set(rep.connector_parts), method
        for k, v in mine.items():
            assert v == pytest.approx(rep.connector_parts[k], rel=1e-12), (method, size, k)


# --- options -----------------------------------------------------------------------------------
def test_typos_and_wrong_types_are_refused_not_saved():
    with pytest.raises(PartError, match="unknown option 'selectr_p'.*selector_p"):
        build_model("slime", tiny=True, selectr_p=1.0)
    with pytest.raises(PartError, match="selector_p='high' must be a number"):
        build_model("slime", tiny=True, selector_p="high")
    with pytest.raises(PartError, match="variant='papr' is not one of 'code', 'paper'"):
        build_model("inf-llava", tiny=True, variant="papr")
    with pytest.raises(PartError, match="local_queries=140 is not a square"):
        build_model("slime", tiny=True, local_queries=140)
    with pytest.raises(PartError, match="unknown option 'sid'"):
        resolve_method({"base": "llava-next", "views_options": {"sid": 336}})
    assert issubclass(PartError, HiresError) and issubclass(PartError, ValueError)


def test_a_tag_of_an_old_config_picks_the_part():
    """Old llava-uhd directories choose the resampler with connector["resampler"]."""
    cfg = SimpleNamespace(method="llava-uhd", plan_options={}, connector={"resampler": "perceiver", "queries": 64, "heads": None})
    assert spec_from_config(cfg).parts["compressor"] == "perceiver"
    cfg = SimpleNamespace(method="inf-llava", plan_options={}, connector={"projector": "linear", "heads": 8, "variant": "paper",
                                                     "separator_ids": {",": 5}})
    spec = spec_from_config(cfg)  # a converted checkpoint's connector (no bottleneck, separator ids)
    assert spec.build_parts()["fusion"].options.variant == "paper"
    assert spec.build_parts()["compressor"].options.projector == "linear"
    with pytest.raises(PartError, match="unknown option 'grdi'"):
        spec_from_config(SimpleNamespace(method="llava-uhd", plan_options={}, connector={"grdi": 12}))


# --- shapes ------------------------------------------------------------------------------------
@pytest.mark.parametrize("combo, stages", [
    ({"base": "llava-uhd", "layout": "anyres"}, ("views", "layout")),
    ({"base": "llava-next", "selector": "text-guided"}, ("layout", "selector")),
    ({"base": "slime", "compressor": "perceiver"}, ("compressor", "layout")),
    ({"base": "llava-hr", "encoder": "vit"}, ("views", "encoder")),
    ({"base": "llava-uhd", "fusion": "dem"}, ("views", "fusion")),
    ({"base": "llava-next", "compressor": "slime", "views": "llava-uhd", "layout": "flat"}, ("views", "compressor")),
])
def test_impossible_combinations_are_refused_naming_the_stages(combo, stages, monkeypatch):
    from hires_lmm.vision import vit as vit_module

    def no_weights(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("a weight was built before the combination was checked")

    monkeypatch.setattr(vit_module.ViT, "from_config", no_weights)
    with pytest.raises(PartError, match=f"stages {stages[0]} and {stages[1]} clash"):
        build_model(combo, tiny=True)


# --- method files ------------------------------------------------------------------------------
def test_method_files_json_and_yaml(tmp_path):
    j = tmp_path / "uhd-select.json"
    j.write_text(json.dumps({**UHD_SELECT, "selector_options": {"selector_p": 0.9}}))
    y = tmp_path / "next-uhd.yaml"
    y.write_text("base: llava-next\ncompressor: uhd-spatial\ncompressor_options:\n  grid: 12\n")
    a, b = resolve_method(str(j)), resolve_method(y)
    assert a.name == "uhd-select" and a.parts["selector"] == "text-guided" and a.parts["compressor"] == "uhd-spatial"
    assert a.options["selector"] == {"selector_p": 0.9} and a.recipes == "llava-uhd"
    assert b.parts["compressor"] == "uhd-spatial" and b.parts["layout"] == "anyres" and b.base == "llava-next"
    # a kept part keeps the base's options; a changed one starts from its defaults
    assert spec_from_dict({"base": "llava-hr", "views_options": {"S": 1536}}).options["views"] == {"S": 1536}
    assert "views" in spec_from_dict({"base": "llava-hr", "compressor": "uhd-spatial"}).options
    for bad, msg in [({"base": "llava-next", "compresor": "mlp"}, "unknown key 'compresor'"),
                     ({"base": "llava-nxt"}, "unknown base 'llava-nxt'"),
                     ({"views": "llava-1.5"}, "missing: encoder"),
                     ({"base": "slime", "selector": "topk"}, "unknown selector part 'topk'"),
                     ({"base": "slime", "selector_options": [1]}, "selector_options must be a mapping")]:
        with pytest.raises(PartError, match=msg):
            spec_from_dict(bad)
    (tmp_path / "broken.yaml").write_text("base: [unclosed\n")
    with pytest.raises(PartError, match="broken.yaml: not valid YAML"):
        resolve_method(str(tmp_path / "broken.yaml"))
    with pytest.raises(PartError, match="not found"):
        resolve_method(str(tmp_path / "missing.json"))


def test_plan_and_cost_commands_take_a_method_file(tmp_path, capsys):
    f = tmp_path / "next-uhd.json"
    f.write_text(json.dumps(NEXT_UHD))
    assert main(["plan", "--method", str(f), "--size", "1000x700", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["method"] == "next-uhd"
    cols, rows = plan["grid"]
    # 144 base tokens + the 12-per-tile compressed map unpadded (1000x700 on 2x2 tiles of 12: 24x16) + newlines
    assert plan["num_visual_tokens"] == 144 + 24 * 16 + 16 and (cols, rows) == (2, 2)
    assert main(["cost", "--method", f"{f},llava-next", "--size", "1000x700", "--json"]) == 0
    mine, native = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert mine["num_visual_tokens"] == plan["num_visual_tokens"] < native["num_visual_tokens"]
    assert set(mine["connector_parts_tflops"]) == {"resampler kv_proj", "resampler attention"}
    assert mine["tflops"]["vision"] == native["tflops"]["vision"]  # the same views
    assert mine["tflops"]["llm_prefill"] < native["tflops"]["llm_prefill"]
    assert main(["plan", "--method", str(tmp_path / "nope.json"), "--size", "10x10"]) == 2
    assert "nope.json: not found" in capsys.readouterr().err


# --- composed methods end to end ---------------------------------------------------------------
def _images() -> list[Image.Image]:
    g = torch.Generator().manual_seed(0)
    return [Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy(), "RGB")
            for w, h in ((1000, 700), (500, 900))]


def _ids(model, text: str) -> torch.Tensor:
    return torch.tensor(model.tokenizer(f"{model.config.image_token}\n{text}", add_special_tokens=False).input_ids)


@pytest.mark.parametrize("combo", [UHD_SELECT, NEXT_UHD], ids=["uhd+selector", "next+uhd-resampler"])
def test_composed_method_trains_counts_saves_and_reloads(combo, tmp_path):
    spec = resolve_method(combo)
    model = build_model(combo, tiny=True, seed=0)
    assert type(model.visual).__name__ == "ComposedVisual"
    assert model.config.method == combo["base"] and model.config.method_spec["name"] == spec.name
    images = [model.prepare_image(im) for im in _images()]
    ids = [_ids(model, "What is it? red"), _ids(model, "Describe the picture.")]
    labels = [torch.where(torch.arange(len(t)) >= len(t) - 1, t, torch.full_like(t, -100)) for t in ids]

    # train a few steps: the loss falls
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        out = model(ids, [[im] for im in images], labels=labels)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < losses[0]
    model.eval()

    with torch.no_grad():
        out = model(ids, [[im] for im in images])
    planned = [spec.plan(im.plan.image_size).num_visual_tokens for im in images]
    if combo == NEXT_UHD:
        assert out.batch.num_visual_tokens == planned  # exact: 144 per view, the compressed grid unpadded
        base = spec.plan((1000, 700)).tokens[0]
        assert (base.source, base.count) == ("base", 144)
    else:  # the selector keeps a text-dependent share: the plan's count is the upper bound
        assert spec.plan((1000, 700)).extra["bound"] is True
        assert all(0 < n < p for n, p in zip(out.batch.num_visual_tokens, planned))
        model.visual.selector_p = 1.0  # keep all: the bound is reached exactly
        with torch.no_grad():
            assert model(ids, [[im] for im in images]).batch.num_visual_tokens == planned
        model.visual.selector_p = 0.95

    # save / load: the spec travels in config.json and rebuilds the same model
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["method_spec"]["compressor"] == spec.parts["compressor"]
    assert saved["method_spec"]["selector"] == spec.parts["selector"]
    from hires_lmm.model import HiresLMM

    loaded = HiresLMM.from_pretrained(tmp_path / "m")
    assert type(loaded.visual).__name__ == "ComposedVisual"
    reloaded_images = [loaded.prepare_image(im) for im in _images()]
    with torch.no_grad():
        again = loaded(ids, [[im] for im in reloaded_images])
    assert again.batch.num_visual_tokens == out.batch.num_visual_tokens
    torch.testing.assert_close(again.logits, out.logits, rtol=0, atol=0)
    texts = loaded.generate([f"{loaded.config.image_token}\nWhat is it?"], [[_images()[0]]], max_new_tokens=3)
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_hires_train_predict_and_inspect_with_a_method_file(tmp_path):
    """``hires train --method FILE`` trains a composed model whose saved config carries the
    spec; ``hires predict`` answers with it; ``hires inspect`` counts what it plans."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    recs, qs = [], []
    for i, (name, rgb) in enumerate([("red", (220, 30, 30)), ("blue", (30, 30, 220))] * 2):
        Image.new("RGB", (700 + 40 * i, 500), rgb).save(data / "images" / f"{i}.png")
        recs.append({"id": f"r{i}", "image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is it?"}, {"from": "gpt", "value": name}]})
        qs.append({"question_id": i, "image": f"{i}.png", "text": "What colour is it?"})
    (data / "train.json").write_text(json.dumps(recs))
    (data / "q.jsonl").write_text("\n".join(json.dumps(q) for q in qs) + "\n")
    f = tmp_path / "uhd-select.yaml"
    f.write_text("base: llava-uhd\nselector: text-guided\nselector_options: {selector_p: 0.9}\n")

    def hires(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hires_lmm.cli", *args], capture_output=True, text=True,
                              env=ENV, timeout=600)

    r = hires("train", "-m", str(f), "--tiny", "--data-path", str(data / "train.json"), "--image-folder",
              str(data / "images"), "--output-dir", str(tmp_path / "out"), "--batch-size", "2", "--max-steps", "2",
              "--no-progress")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["steps"] == 2
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["method"] == "llava-uhd" and cfg["method_spec"]["selector"] == "text-guided"
    assert cfg["method_spec"]["selector_options"]["selector_p"] == 0.9
    r = hires("predict", "--model", str(tmp_path / "out"), "--question-file", str(data / "q.jsonl"),
              "--image-folder", str(data / "images"), "--answers-file", str(tmp_path / "a.jsonl"),
              "--max-new-tokens", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    answers = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(answers) == 4 and all("error" not in a for a in answers)
    g = tmp_path / "next-uhd.json"
    g.write_text(json.dumps(NEXT_UHD))
    r = hires("inspect", "--method", str(g), "--tiny", "--size", "1000x700", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["method"] == "next-uhd" and info["planned_visual_tokens"] == info["num_visual_tokens"] == 544
    r = hires("inspect", "--method", str(tmp_path / "bad.json"), "--tiny")
    assert r.returncode == 2 and "bad.json: not found" in r.stderr and "Traceback" not in r.stderr


def test_the_worked_example_of_adding_a_method_runs():
    """docs/adding-a-method.md's one-file compressor registers, composes and counts right."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "adding-a-method.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    if "llava-next-pooled" not in METHOD_SPECS:  # once per process (the registry refuses twins)
        import types

        mod = types.ModuleType("my_methods_pooled")  # a real module: dataclasses resolve annotations in it
        sys.modules[mod.__name__] = mod
        exec(compile(code, "adding-a-method.md", "exec"), mod.__dict__)
    assert "pooled-mlp" in PARTS["compressor"]
    # its recipe is in the same file: LLaVA's two stages on the pooled projector and the newline
    from hires_lmm.parts import two_stage
    from hires_lmm.train.stages import STAGES, apply_stage, get_stage

    pooled = METHOD_SPECS["llava-next-pooled"]
    assert pooled.recipe() == two_stage(("visual.mm_projector.", "visual.image_newline")) == dict(STAGES["llava-next-pooled"])
    assert pooled.to_json()["recipes"] == "llava-next-pooled"
    model = build_model("llava-next-pooled", tiny=True)
    groups = apply_stage(model, get_stage("llava-next-pooled", "1"))
    assert {g["name"] for g in groups} == {"visual.mm_projector.", "visual.image_newline"}
    assert get_stage({"base": "llava-next", "compressor": "pooled-mlp"}, "2") == get_stage("llava-next", "2")
    model.eval()
    image = model.prepare_image(_images()[0])
    with torch.no_grad():
        out = model([_ids(model, "What is it?")], [[image]])
    plan = METHOD_SPECS["llava-next-pooled"].plan((1000, 700))
    assert plan.tokens[0].count == 144  # the base view's 24×24 patches pooled 2×2
    assert out.batch.num_visual_tokens == [plan.num_visual_tokens]
    spec = resolve_method({"base": "llava-next", "compressor": "pooled-mlp", "compressor_options": {"stride": 3}})
    assert spec.plan((1000, 700)).tokens[0].count == 64


# --- a visual-token budget on a composed method ---------------------------------------------------

#: sizes where LLaVA-NeXT's best-resolution rule picks the fitting pinpoint with the most tokens
#: (a small image fits whole in every pinpoint, and the rule then takes the least padding instead)
LARGE_SIZES = [(1000, 700), (700, 1000), (1600, 1200), (2000, 300), (300, 2000), (1280, 720), (3000, 3000)]


def test_a_budget_applies_to_the_composed_count_not_the_planners():
    from hires_lmm.plan.anyres import NEXT_PINPOINTS
    from hires_lmm.plan.budget import BudgetError

    spec = resolve_method(NEXT_UHD)
    assert spec.plan((336, 336)).num_visual_tokens == 300  # the planner alone plans 1176
    plan = spec.plan((336, 336), max_visual_tokens=400)
    assert plan.num_visual_tokens == 300 and plan.extra["max_visual_tokens"] == 400
    for size in LARGE_SIZES + [(336, 336), (100, 80), (500, 501), (640, 480)]:
        counts = {p: spec.plan(size, pinpoints=[p]).num_visual_tokens for p in NEXT_PINPOINTS}
        for budget in sorted({*counts.values(), min(counts.values()) - 1, max(counts.values()) + 7, 400, 700}):
            fitting = [p for p in NEXT_PINPOINTS if counts[p] <= budget]
            if not fitting:
                with pytest.raises(BudgetError, match=rf"^{re.escape(spec.name)} cannot plan .*max_visual_tokens={budget}: "
                                                      rf"its smallest plan has {min(counts.values())} visual"):
                    spec.plan(size, max_visual_tokens=budget)
                continue
            got = spec.plan(size, max_visual_tokens=budget)
            assert got.num_visual_tokens <= budget and got.method == spec.name
            assert got.extra["budget_choice"] == {"pinpoints": [list(p) for p in fitting]}
            expected = spec.plan(size, pinpoints=fitting)  # the faithful choice among those that fit
            assert (got.grid, got.num_visual_tokens, got.tokens) == (expected.grid, expected.num_visual_tokens,
                                                                      expected.tokens)
            if size in LARGE_SIZES:
                assert got.num_visual_tokens == max(counts[p] for p in fitting)

    # slices through a selector: the budget moves the slice limit, the largest bound that fits wins
    uhd = resolve_method(UHD_SELECT)
    for size in SIZES:
        configs = [({"max_slices": k}, uhd.plan(size, max_slices=k)) for k in range(7, 0, -1)]
        for budget in (200, 500, 800, 1200, 2000):
            fits = [(c, p) for c, p in configs if p.num_visual_tokens <= budget]
            if not fits:
                with pytest.raises(BudgetError, match=f"max_visual_tokens={budget}"):
                    uhd.plan(size, max_visual_tokens=budget)
                continue
            got = uhd.plan(size, max_visual_tokens=budget)
            most = max(p.num_visual_tokens for _, p in fits)
            assert got.num_visual_tokens == most <= budget and got.extra["bound"] is True
            assert got.extra["budget_choice"] == next(c for c, p in fits if p.num_visual_tokens == most)

    # the model: its plan under a budget is what its forward splices
    from hires_lmm.image.render import render
    from hires_lmm.processing import ImageInput

    model = build_model(NEXT_UHD, tiny=True, seed=0).eval()
    img = _images()[0]
    unbudgeted = model.plan(img.size).num_visual_tokens
    plan = model.plan(img.size, max_visual_tokens=unbudgeted - 1)
    assert plan.num_visual_tokens < unbudgeted
    with torch.no_grad():
        out = model([_ids(model, "What is it?")], [[ImageInput(plan, render(img, plan))]])
    assert out.batch.num_visual_tokens == [plan.num_visual_tokens]
