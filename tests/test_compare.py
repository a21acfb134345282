"""``hires compare``: the Pareto front, the seed statistics, budgets (asked of the specs, refused
before training when a method cannot plan within one), one-line errors, the figure with and
without matplotlib, an end-to-end run of two tiny methods at two seeds whose results.json holds
the measured values, and end-to-end runs of a method file beside a preset and at two budgets."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
from PIL import Image

from hires_lmm.cli import main
from hires_lmm.compare import CompareConfig, CompareError, budgets_supported, words_of
from hires_lmm.compare.figure import have_matplotlib, plot_accuracy_tflops
from hires_lmm.compare.report import FIGURE, write_report
from hires_lmm.compare.run import aggregate, pareto_front
from hires_lmm.data import synth
from hires_lmm.eval.evaluate import evaluate
from hires_lmm.plan import plan_image
from hires_lmm.plan.cost import plan_cost

METHODS = ("llava-1.5", "llava-uhd")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    synth.generate(root, 10, seed=0, tasks=("color",), sizes=[(672, 504), (504, 672)], target_scale=6,
                   test_fraction=0.3, classes={"color": ["red", "green", "blue"]}, progress=False)
    return root


def data_args(root: Path) -> list[str]:
    return ["--data-path", str(root / "stage2.json"), "--image-folder", str(root / "images"),
            "--question-file", str(root / "test" / "questions.jsonl"),
            "--answers-file", str(root / "test" / "answers.jsonl")]


def config(root: Path, **kw) -> CompareConfig:
    return CompareConfig(data_path=str(root / "stage2.json"), image_folder=str(root / "images"),
                         question_file=str(root / "test" / "questions.jsonl"),
                         answers_file=str(root / "test" / "answers.jsonl"), **{"methods": METHODS, "tiny": True, **kw})


# --- pure parts ----------------------------------------------------------------------------------

def test_pareto_front():
    pts = {"a": (1.0, 30.0), "b": (2.0, 90.0), "c": (3.0, 60.0), "d": (2.0, 50.0), "e": (5.0, 95.0), "f": (1.0, 20.0)}
    assert pareto_front(pts) == ["a", "b", "e"]          # c and d cost as much or more for less
    assert pareto_front({"x": (1.0, 50.0), "y": (1.0, 50.0)}) == ["x"]  # a tie is not an improvement


def test_aggregate_reports_mean_and_spread():
    rows = [{"method": "m", "max_visual_tokens": None, "seed": s, "accuracy": a, "visual_tokens": t, "tflops": 2.0,
             "train_seconds": 10.0 + s, "count": 3} for s, a, t in ((0, 100.0, 10), (1, 66.7, 12), (2, 33.3, 14))]
    agg = aggregate(rows)
    assert agg["accuracy"] == pytest.approx(statistics.fmean([100.0, 66.7, 33.3]))
    assert agg["accuracy_spread"] == pytest.approx(statistics.stdev([100.0, 66.7, 33.3]))
    assert (agg["accuracy_min"], agg["accuracy_max"]) == (33.3, 100.0)
    assert agg["accuracy_per_seed"] == {"0": 100.0, "1": 66.7, "2": 33.3}
    assert agg["visual_tokens"] == 12 and agg["train_seconds"] == 11
    assert aggregate(rows[:1])["accuracy_spread"] == 0.0


def test_words_of_the_data(data):
    words = words_of([data / "stage2.json"], data / "test" / "questions.jsonl")
    assert {"red", "green", "blue", "What", "color", "square", "USER", "ASSISTANT"} <= set(words)
    assert words == sorted(words)
    assert len(words_of([data / "stage2.json"], limit=3)) == 3


# --- refusals ------------------------------------------------------------------------------------

def test_budgets_follow_the_planners(data, monkeypatch):
    """Budgets are asked of the specs: refused with one line while a preset's planner takes no
    ``max_visual_tokens``, accepted once it does; a composed method plans within a budget by its
    own count whatever its planner takes."""
    from hires_lmm.parts import get_part

    assert budgets_supported(METHODS) and budgets_supported([{"base": "llava-uhd", "selector": "text-guided"}])
    config(data, max_visual_tokens=(300, 600), methods=("llava-uhd",)).check()      # accepted
    views = get_part("views", "llava-uhd")
    keys = views.option_keys()
    monkeypatch.setattr(views, "option_keys", classmethod(lambda cls: tuple(k for k in keys if k != "max_visual_tokens")))
    assert not budgets_supported(METHODS)
    assert budgets_supported([{"base": "llava-uhd", "selector": "text-guided"}])
    with pytest.raises(CompareError, match="budgets are not supported yet") as e:
        config(data, max_visual_tokens=(256,)).check()
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    with pytest.raises(CompareError, match="positive"):
        config(data, max_visual_tokens=(0,)).check()
    with pytest.raises(CompareError, match="listed twice"):
        config(data, max_visual_tokens=(300, 300)).check()


def test_a_budget_no_plan_fits_is_refused_before_training(data, tmp_path, capsys):
    """LLaVA-1.5's 576 tokens do not fit 300: refused in one line, nothing trained."""
    out = tmp_path / "o"
    assert main(["compare", *data_args(data), "--methods", "llava-uhd,llava-1.5", "--tiny",
                 "--max-visual-tokens", "600,300", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "llava-1.5 at --max-visual-tokens 300" in err and "576" in err and "\n" not in err, err
    assert not (out / "runs").exists()


def test_method_files_are_resolved_and_named(data, tmp_path, capsys):
    """A method file is named by its stem or its "name"; two methods of one name are refused."""
    a = tmp_path / "uhd-select.json"
    a.write_text(json.dumps({"base": "llava-uhd", "selector": "text-guided"}))
    b = tmp_path / "other.yaml"
    b.write_text("base: llava-next\nname: uhd-select\n")
    c = tmp_path / "llava-1.5.json"
    c.write_text(json.dumps({"base": "llava-uhd"}))
    entries = config(data, methods=("llava-1.5", str(a))).check()
    assert [e.name for e in entries] == ["llava-1.5", "uhd-select"]
    assert entries[1].method == str(a.resolve()) and entries[1].file_text == a.read_text()
    assert entries[1].spec.parts["selector"] == "text-guided" and entries[0].file_text is None
    assert [e.name for e in config(data, methods=(str(b),)).check()] == ["uhd-select"]
    for methods, words in (((str(a), str(b)), "two methods are named 'uhd-select' (uhd-select.json, other.yaml)"),
                           (("llava-1.5", str(c)), "two methods are named 'llava-1.5'"),
                           ((str(tmp_path / "nope.json"),), "nope.json: not found")):
        assert main(["compare", *data_args(data), "--methods", ",".join(methods), "--tiny",
                     "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("hires compare: error: ") and words in err and "\n" not in err, err
    assert not (tmp_path / "o" / "runs").exists()


@pytest.mark.parametrize("extra, words", [
    (["--methods", "llava-1.5,nope", "--tiny"], "unknown method 'nope'"),
    (["--methods", "llava-1.5,bad.json", "--tiny"], "method file bad.json: not found"),
    (["--methods", "llava-1.5"], "give --tiny, or --vision DIR and --llm DIR"),
    (["--methods", "llava-1.5", "--tiny", "--seeds", "0,x"], "--seeds: give comma-separated integers"),
    (["--methods", "llava-1.5", "--tiny", "--seeds", "1,1"], "seeds must be distinct"),
    (["--methods", "llava-1.5", "--tiny", "--steps", "0"], "steps must be >= 1"),
    (["--methods", "llava-1.5", "--tiny", "--metric", "bleu"], "unknown metric 'bleu'"),
    (["--methods", "llava-1.5,llava-1.5", "--tiny"], "listed twice"),
    (["--methods", "llava-hr", "--vision", ".", "--llm", "."], "llava-hr needs --convnext DIR"),
    (["--methods", "llava-1.5", "--tiny", "--align-data-path", "x.json"], "needs --align-steps"),
])
def test_cli_errors_are_one_line(data, tmp_path, capsys, extra, words):
    assert main(["compare", *data_args(data), "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hires compare: error: ") and words in err and "\n" not in err, err
    assert not (tmp_path / "o" / "runs").exists()         # refused before anything trained


def test_missing_files_are_one_line(data, tmp_path, capsys):
    args = data_args(data)
    args[args.index("--question-file") + 1] = str(tmp_path / "nope.jsonl")
    assert main(["compare", *args, "--methods", "llava-1.5", "--tiny", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "question file" in err and "nope.jsonl" in err and "\n" not in err


# --- figure --------------------------------------------------------------------------------------

def _entry(method, budget, tflops, acc, spread=0.0):
    return {"method": method, "max_visual_tokens": budget, "tflops": tflops, "accuracy": acc,
            "accuracy_spread": spread, "visual_tokens": 100, "train_seconds": 1.0, "seeds": [0],
            "accuracy_per_seed": {"0": acc}, "count": 3}


def test_figure_draws_budget_curves_and_the_front(tmp_path):
    methods = {"llava-1.5": _entry("llava-1.5", None, 8.5, 33.3),
               "llava-uhd@256": _entry("llava-uhd", 256, 6.0, 60.0, 5.0),
               "llava-uhd@1024": _entry("llava-uhd", 1024, 12.0, 90.0, 2.0)}
    front = pareto_front({k: (m["tflops"], m["accuracy"]) for k, m in methods.items()})
    assert front == ["llava-uhd@256", "llava-uhd@1024"]
    assert plot_accuracy_tflops(methods, front, tmp_path / "f.png", chance=33.3)
    img = Image.open(tmp_path / "f.png")
    assert img.format == "PNG" and img.size == (960, 600)
    # the curve and front change the picture: a single point draws something else
    assert plot_accuracy_tflops({"llava-1.5": methods["llava-1.5"]}, ["llava-1.5"], tmp_path / "g.png")
    assert Image.open(tmp_path / "g.png").tobytes() != img.tobytes()


def test_report_without_matplotlib(tmp_path, monkeypatch, capsys):
    """Without matplotlib: one line says so, results.json and results.md are still written."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert not have_matplotlib()
    methods = {"llava-1.5": _entry("llava-1.5", None, 8.5, 33.3)}
    results = {"methods": methods, "pareto": ["llava-1.5"], "chance": 33.3, "margin_over_llava15": {},
               "settings": {"data_path": "d", "image_folder": "i", "metric": "exact", "question_file": "q",
                            "tiny": True, "stage": "frozen-encoders", "steps": 2, "batch_size": 2, "lr": None,
                            "align_steps": 0, "align_data_path": None, "seeds": [0], "cost_model": "c"},
               "machine": "test"}
    write_report(tmp_path, results)
    assert not (tmp_path / FIGURE).exists()
    assert json.loads((tmp_path / "results.json").read_text())["figure"] is None
    assert "matplotlib is not installed" in (tmp_path / "results.md").read_text()
    err = [line for line in capsys.readouterr().err.splitlines() if "matplotlib" in line]
    assert len(err) == 1


# --- end to end ----------------------------------------------------------------------------------

def test_compare_end_to_end(data, tmp_path, capsys):
    """Two tiny methods, two seeds, a few steps: results.json's schema, and its numbers are the
    measured ones (recomputed here from the answers, the trainer's metrics and the cost model)."""
    out = tmp_path / "cmp"
    argv = ["compare", *data_args(data), "--methods", ",".join(METHODS), "--tiny", "--steps", "2",
            "--batch-size", "2", "--seeds", "0,1", "--max-new-tokens", "3", "--eval-batch-size", "4",
            "--chance", "33.3", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert set(res) >= {"methods", "settings", "pareto", "runs", "machine", "figure", "margin_over_llava15"}
    assert list(res["methods"]) == list(METHODS)
    assert res["settings"]["steps"] == 2 and res["settings"]["seeds"] == [0, 1] and res["settings"]["metric"] == "exact"
    sizes = [Image.open(data / "images" / json.loads(q)["image"]).size
             for q in (data / "test" / "questions.jsonl").read_text().splitlines()]
    gt = data / "test" / "answers.jsonl"
    for name, m in res["methods"].items():
        assert {"accuracy", "visual_tokens", "tflops", "train_seconds"} <= set(m)
        accs = []
        for seed in (0, 1):
            run = out / "runs" / name / f"seed-{seed}"
            want = 100 * evaluate(run / "answers.jsonl", gt, "exact")["score"]
            assert m["accuracy_per_seed"][str(seed)] == pytest.approx(want)
            accs.append(want)
            metrics = [json.loads(x) for x in (run / "model" / "metrics.jsonl").read_text().splitlines()]
            assert len(metrics) == 2                       # the step budget
            row = next(r for r in res["runs"] if r["method"] == name and r["seed"] == seed)
            assert row["visual_tokens"] == pytest.approx(statistics.fmean(x["visual_tokens_per_sample"] for x in metrics))
        assert m["accuracy"] == pytest.approx(statistics.fmean(accs))
        assert m["accuracy_spread"] == pytest.approx(statistics.stdev(accs))
        # TFLOPs per image: the cost model of the model's plan of each held-out image (ViT-L, 7B)
        want = statistics.fmean(plan_cost(plan_image(name, s)).total_flops / 1e12 for s in sizes)
        assert m["tflops"] == pytest.approx(want)
        assert m["train_seconds"] > 0
    assert res["methods"]["llava-1.5"]["visual_tokens"] == 576
    assert res["methods"]["llava-uhd"]["tflops"] > res["methods"]["llava-1.5"]["tflops"]
    assert res["pareto"][0] == min(res["methods"], key=lambda k: res["methods"][k]["tflops"])
    md = (out / "results.md").read_text()
    assert "| llava-uhd" in md and "mean ± sd, 2 seeds" in md and "*chance*" in md
    assert (out / FIGURE).exists() == have_matplotlib() and res["figure"] == (FIGURE if have_matplotlib() else None)
    summary = json.loads(printed.strip().splitlines()[-1])
    assert summary["methods"]["llava-uhd"]["tflops"] == pytest.approx(res["methods"]["llava-uhd"]["tflops"])
    # a second run reuses the four finished runs and reports the same numbers
    assert main(argv) == 0
    assert capsys.readouterr().out.count("reusing") == 4
    again = json.loads((out / "results.json").read_text())
    assert again["methods"] == res["methods"]
    # a changed setting recomputes: --steps 3 trains again
    argv3 = list(argv)
    argv3[argv3.index("--steps") + 1] = "3"
    assert main(argv3) == 0
    assert "reusing" not in capsys.readouterr().out
    assert len((out / "runs" / "llava-uhd" / "seed-0" / "model" / "metrics.jsonl").read_text().splitlines()) == 3


def test_a_stopped_training_is_not_scored(data, tmp_path, monkeypatch):
    """The trainer returns normally when SIGTERM stops it (checkpoint saved): compare must stop
    there, not score the half-trained model, and redo the run next time."""
    import hires_lmm.train as train_pkg
    from hires_lmm.compare import run_compare
    from hires_lmm.train import TrainResult

    def stopped(cfg):
        return TrainResult(steps=1, final_loss=5.0, output_dir=cfg.output_dir, stopped_by="SIGTERM")

    monkeypatch.setattr(train_pkg, "train", stopped)
    with pytest.raises(CompareError, match="training stopped by SIGTERM at step 1; nothing scored") as e:
        run_compare(config(data, methods=("llava-1.5",), steps=2, batch_size=2), tmp_path, progress=False)
    assert "\n" not in str(e.value)
    run = tmp_path / "runs" / "llava-1.5" / "seed-0"
    assert not (run / "result.json").exists() and not (run / "answers.jsonl").exists()
    assert (run / "init" / "config.json").exists()           # kept: nothing was removed as if done


# --- method files and budgets, end to end --------------------------------------------------------

def _train_sizes(root: Path) -> list[tuple[int, int]]:
    return [Image.open(root / "images" / r["image"]).size for r in json.loads((root / "stage2.json").read_text())]


def _question_sizes(root: Path) -> list[tuple[int, int]]:
    return [Image.open(root / "images" / json.loads(q)["image"]).size
            for q in (root / "test" / "questions.jsonl").read_text().splitlines()]


def test_compare_a_method_file_with_a_preset(data, tmp_path, capsys):
    """``--methods llava-1.5,uhd-select.json``: both in results.json under their names, the
    composed method measured within what its spec plans (a selector: the plan is the bound) and
    costed as its spec costs; editing the file redoes its run only."""
    from hires_lmm.parts import resolve_method

    f = tmp_path / "uhd-select.json"
    f.write_text(json.dumps({"base": "llava-uhd", "selector": "text-guided"}))
    out = tmp_path / "cmp"
    argv = ["compare", *data_args(data), "--methods", f"llava-1.5,{f}", "--tiny", "--steps", "2",
            "--batch-size", "2", "--max-new-tokens", "2", "--eval-batch-size", "4", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    res = json.loads((out / "results.json").read_text())
    assert list(res["methods"]) == ["llava-1.5", "uhd-select"]
    assert res["settings"]["method_files"] == {"uhd-select": str(f.resolve())}
    spec = resolve_method(f)
    m = res["methods"]["uhd-select"]
    assert m["method"] == "uhd-select" and (out / "runs" / "uhd-select" / "seed-0" / "answers.jsonl").exists()
    planned = [spec.plan(s) for s in _train_sizes(data)]
    assert all(p.extra["bound"] for p in planned)
    overview = [p.tokens[-1].count for p in planned]   # never thinned: the selector chooses among the slices
    assert min(overview) < m["visual_tokens"] <= max(p.num_visual_tokens for p in planned)
    assert res["methods"]["llava-1.5"]["visual_tokens"] == 576
    want = statistics.fmean(spec.cost(s).total_flops / 1e12 for s in _question_sizes(data))
    assert m["tflops"] == pytest.approx(want)
    saved = json.loads((out / "runs" / "uhd-select" / "seed-0" / "model" / "config.json").read_text())
    assert saved["method_spec"]["selector"] == "text-guided" and saved["method_spec"]["name"] == "uhd-select"
    capsys.readouterr()
    # the same file again: reused; an edited file: its run again, the preset's reused
    assert main(argv) == 0
    assert capsys.readouterr().out.count("reusing") == 2
    f.write_text(json.dumps({"base": "llava-uhd", "selector": "text-guided", "selector_options": {"selector_p": 0.9}}))
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "[llava-1.5 seed 0] reusing" in printed and "[uhd-select seed 0] reusing" not in printed


def test_compare_a_method_file_at_two_budgets(data, tmp_path):
    """``--max-visual-tokens 300,600``: two points of the same method in results.json and in the
    figure's data, each trained within its budget: the measured tokens are what its spec plans at
    that budget (the selector keeps all here, so the plan is exact)."""
    from hires_lmm.compare.figure import figure_series
    from hires_lmm.compare.run import run_compare
    from hires_lmm.parts import resolve_method

    f = tmp_path / "uhd-keep.yaml"
    f.write_text("base: llava-uhd\nselector: text-guided\nselector_options: {selector_p: 1.0}\n")
    res = run_compare(config(data, methods=(str(f),), steps=2, batch_size=2, max_new_tokens=2, eval_batch=4,
                             max_visual_tokens=(300, 600)), tmp_path / "cmp", progress=False)
    assert list(res["methods"]) == ["uhd-keep@300", "uhd-keep@600"]
    spec = resolve_method(f)
    for b in (300, 600):
        m = res["methods"][f"uhd-keep@{b}"]
        assert m["method"] == "uhd-keep" and m["max_visual_tokens"] == b
        planned = [spec.plan(s, max_visual_tokens=b).num_visual_tokens for s in _train_sizes(data)]
        assert len(set(planned)) == 1 and m["visual_tokens"] == planned[0] <= b   # 144 and 434
        want = statistics.fmean(spec.cost(s, plan_options={"max_visual_tokens": b}).total_flops / 1e12
                                for s in _question_sizes(data))
        assert m["tflops"] == pytest.approx(want)
        saved = json.loads((tmp_path / "cmp" / "runs" / f"uhd-keep@{b}" / "seed-0" / "model" / "config.json").read_text())
        assert saved["plan_options"]["max_visual_tokens"] == b
    assert res["methods"]["uhd-keep@300"]["visual_tokens"] < res["methods"]["uhd-keep@600"]["visual_tokens"]
    series = figure_series(res["methods"])
    assert list(series) == ["uhd-keep"] and [k for k, _ in series["uhd-keep"]] == ["uhd-keep@300", "uhd-keep@600"]
    saved = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert figure_series(saved["methods"]) == series
