"""Evaluation: metrics on worked examples, predict (format, resume, shards, bad images), evaluate,
chat and the CLI (the lmms-eval adapter: tests/test_lmms_eval.py)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hires_lmm.cli import main
from hires_lmm.eval.evaluate import evaluate
from hires_lmm.eval.metrics import (
    anls,
    exact_match,
    extract_choice,
    levenshtein,
    mc_accuracy,
    normalize_vqa_answer,
    relaxed_accuracy,
    vqa_accuracy,
)

# --- VQA accuracy ---------------------------------------------------------------------------------


@pytest.mark.parametrize("raw, norm", [
    # visualqa.org/evaluation.html: lower-case, number words → digits, articles removed,
    # missing apostrophes restored, periods removed except in decimals, punctuation → space,
    # no space for a comma between digits
    ("Ten", "10"), ("none", "0"), ("Two dogs", "2 dogs"),
    ("the cat", "cat"), ("A Dog", "dog"), ("an apple", "apple"),
    ("dont", "don't"), ("isnt", "isn't"), ("oclock", "o'clock"),
    ("3.5", "3.5"), ("yes.", "yes"), ("end. of it", "end of it"),
    ("100,978", "100978"), ("black/white", "black white"), ("black / white", "black white"),
    ("yes!", "yes"), ("What?", "what"), ("red-orange", "red orange"), ("t - shirt", "t shirt"),
    ("man's", "man 's"), ("  Yes\n", "yes"), ("12:30", "12:30"),
])
def test_vqa_normalisation(raw, norm):
    assert normalize_vqa_answer(raw) == norm


def test_vqa_normalisation_keeps_the_official_period_quirks():
    # (?!<=\d) is a look-ahead, so a period after a digit but before a non-digit goes too
    assert normalize_vqa_answer("1. 2") == "1 2"
    # re.UNICODE (32) passed as count: only the first 32 periods are removed
    assert normalize_vqa_answer("x" + "." * 40) == "x" + "." * 8


@pytest.mark.parametrize("humans, acc", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_accuracy_leave_one_out(humans, acc):
    # VQA: min(#humans that said ans / 3, 1) averaged over the 10 sets of 9 annotators
    refs = ["2"] * humans + ["3"] * (10 - humans)
    assert vqa_accuracy("two", refs) == pytest.approx(acc, abs=1e-12)


def test_vqa_accuracy_normalises_both_sides_and_single_reference():
    refs = ["Yes", "yes", "yes.", "no", "no", "no", "no", "no", "no", "no"]
    assert vqa_accuracy("YES", refs) == pytest.approx(0.9)
    assert vqa_accuracy("No!", refs) == 1.0
    assert vqa_accuracy("the dog", ["dog"]) == 1.0  # one reference: normalised exact match
    assert vqa_accuracy("cat", ["dog"]) == 0.0


# --- ANLS -----------------------------------------------------------------------------------------


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3
    assert levenshtein("flaw", "lawn") == 2


def test_anls_worked_examples():
    assert anls("helo", ["hello"]) == pytest.approx(0.8)             # NL = 1/5
    assert anls("abd", ["abc"]) == pytest.approx(2 / 3)              # NL = 1/3
    assert anls("Hello   World ", ["hello world"]) == 1.0             # lower-case, whitespace collapsed
    assert anls("abcd", ["wxyz"]) == 0.0                              # NL = 1 ≥ τ
    assert anls("abcdef", ["abcxyz"]) == pytest.approx(0.5)          # NL = 0.5: kept by the evaluation code
    assert anls("abcdefg", ["abcwxyz"]) == 0.0                        # NL = 4/7 > 0.5
    assert anls("kitten", ["sitting", "kitchen", "xx"]) == pytest.approx(1 - 2 / 7)  # max over references
    assert anls("", [""]) == 1.0


# --- ChartQA relaxed accuracy -----------------------------------------------------------------------


@pytest.mark.parametrize("pred, gold, ok", [
    ("47", "45", 1.0),        # |47-45|/45 = 4.4 %
    ("48", "45", 0.0),        # 6.7 %
    ("105", "100", 1.0),      # exactly 5 %
    ("105.1", "100", 0.0),
    ("95", "100", 1.0),
    ("-1.04", "-1", 1.0),
    ("0.45", "45%", 1.0),     # "45%" parses as 0.45
    ("45%", "0.46", 1.0),
    ("45", "45%", 0.0),       # 45 vs 0.45
    ("45%", "45", 0.0),
    ("0.0", "0", 0.0),        # a zero target compares as text
    ("0", "0", 1.0),
    ("Yes", "yes", 1.0),      # text: case-insensitive exact match
    ("Yes.", "yes", 0.0),
    ("1,000", "1000", 0.0),   # float() does not parse "1,000": text comparison
    (" 47 ", "45", 1.0),
])
def test_relaxed_accuracy(pred, gold, ok):
    assert relaxed_accuracy(pred, [gold]) == ok


def test_relaxed_accuracy_any_reference():
    assert relaxed_accuracy("20", ["x", "19.5"]) == 1.0


# --- exact match and multiple choice --------------------------------------------------------------


def test_exact_match():
    assert exact_match("Two.", ["2"]) == 1.0
    assert exact_match("The Red car", ["red car", "blue"]) == 1.0
    assert exact_match("red", ["red car"]) == 0.0


@pytest.mark.parametrize("text, letter", [
    ("B", "B"), ("(C)", "C"), ("D.", "D"), ("[A]", "A"),
    ("The answer is C.", "C"), ("Answer: (B)", "B"), ("The correct option is D", "D"),
    ("I think the answer is B because it is blue.", "B"), ("The answer is A, not the answer is B", "B"),
    ("A. red", "A"), ("(B) blue", "B"), ("C: twelve", "C"), ("B, because it is blue", "B"),
    ("Option A is correct", "A"), ("I would choose D here", "D"), ("**B**", "B"),
    ("A cat sits on the mat.", None),   # the article
    ("a", None), ("Both A and B are plausible", None), ("F", None), ("", None),
    ("the answer is a dog", None),
])
def test_extract_choice(text, letter):
    assert extract_choice(text) == letter


def test_extract_choice_with_option_texts():
    opts = ["red", "dark blue", "green", "yellow"]
    assert extract_choice("dark blue", options=opts) == "B"
    assert extract_choice("It is green.", options=opts) == "C"
    assert extract_choice("red or green", options=opts) is None
    assert extract_choice("E", options=opts) is None                  # only A-D exist
    assert extract_choice("The answer is E", options={"A": "x", "E": "y"}) == "E"


def test_mc_accuracy():
    assert mc_accuracy("The answer is B.", ["B"]) == 1.0
    assert mc_accuracy("(B) cat", ["(B)"]) == 1.0
    assert mc_accuracy("A", ["B"]) == 0.0
    assert mc_accuracy("no idea", ["B"]) == 0.0


# --- a tiny model, images and questions -------------------------------------------------------------


def _image(path: Path, size=(64, 48), seed=0) -> None:
    w, h = size
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny LLaVA-1.5 saved to disk, 6 images, a question file."""
    from hires_lmm.methods import build_model

    root = tmp_path_factory.mktemp("eval")
    model = build_model("llava-1.5", tiny=True, seed=0)
    model.save_pretrained(root / "tiny-llava")
    images = root / "images"
    images.mkdir()
    sizes = [(64, 48), (40, 80), (100, 30), (50, 50), (70, 20), (33, 66)]
    for k, size in enumerate(sizes):
        _image(images / f"im{k}.png", size, seed=k)
    questions = [{"question_id": f"q{k}", "image": f"im{k}.png", "text": f"What is shown? ({k})", "category": "ab"[k % 2]}
                 for k in range(len(sizes))]
    qfile = root / "questions.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return {"root": root, "model_dir": root / "tiny-llava", "model": model, "images": images, "questions": qfile,
            "ids": [q["question_id"] for q in questions]}


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# --- predict ----------------------------------------------------------------------------------------


def test_predict_output_format(env, tmp_path):
    from hires_lmm.eval.predict import predict

    out = tmp_path / "answers.jsonl"
    res = predict(env["model_dir"], env["questions"], env["images"], out, batch_size=4, max_new_tokens=3, progress=False)
    recs = read_jsonl(out)
    assert [r["question_id"] for r in recs] == env["ids"]
    qs = read_jsonl(env["questions"])
    for r, q in zip(recs, qs):
        assert set(r) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
        assert r["prompt"] == q["text"] and isinstance(r["text"], str)
        assert r["model_id"] == "tiny-llava" and r["metadata"] == {}
    assert len({r["answer_id"] for r in recs}) == len(recs)
    assert (res.total, res.skipped, res.written, res.errors, res.template) == (6, 0, 6, 0, "vicuna_v1")


def test_predict_prompt_matches_llava_loader(env):
    """The answer is what generate gives for "<image>\\n" + question in the template."""
    from hires_lmm.eval.predict import build_prompt, predict

    assert build_prompt({"text": "Q?", "image": "x.png"}) == "<image>\nQ?"
    assert build_prompt({"text": "Look <image> Q?", "image": "x.png"}) == "Look <image> Q?"
    assert build_prompt({"text": "Q?"}) == "Q?"
    model = env["model"]
    q = read_jsonl(env["questions"])[0]
    want = model.generate(["<image>\n" + q["text"]], [[env["images"] / q["image"]]], max_new_tokens=3,
                          template="vicuna_v1")[0].strip()
    recs = []
    predict(model, env["questions"], env["images"], env["root"] / "one.jsonl", batch_size=1, max_new_tokens=3,
            progress=False, on_batch=recs.extend)
    assert recs[0]["text"] == want and recs[0]["model_id"] == "llava-1.5"


def test_predict_resumes(env, tmp_path):
    from hires_lmm.eval.predict import predict

    out = tmp_path / "answers.jsonl"
    predict(env["model"], env["questions"], env["images"], out, batch_size=4, max_new_tokens=2, progress=False)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][: len(lines[2]) // 2])  # 2 answers + a line cut mid-write
    generated = []
    res = predict(env["model"], env["questions"], env["images"], out, batch_size=2, max_new_tokens=2, progress=False,
                  on_batch=lambda recs: generated.extend(r["question_id"] for r in recs))
    assert generated == env["ids"][2:]
    assert (res.skipped, res.written) == (2, 4)
    ids = [r["question_id"] for r in read_jsonl(out)]
    assert sorted(ids) == sorted(env["ids"]) and len(ids) == len(set(ids))
    # a complete file: nothing left to do
    again = predict(env["model"], env["questions"], env["images"], out, progress=False)
    assert (again.skipped, again.written) == (6, 0)
    assert len(read_jsonl(out)) == 6


def test_predict_batches_questions_of_one_length_and_answers_as_one_at_a_time(tmp_path):
    """llava-next plans 2 image sizes to 2 visual-token counts; questions alternate between them.
    Grouped, each batch of 2 holds one size (no padding); the answers are those of batch size 1."""
    from hires_lmm.data.records import VisualTokenCounter
    from hires_lmm.eval.predict import group_by_length_order, predict
    from hires_lmm.methods import build_model

    model = build_model("llava-next", tiny=True, seed=0)
    images = tmp_path / "images"
    images.mkdir()
    sizes = [(336, 336), (672, 336)] * 3
    for k, size in enumerate(sizes):
        _image(images / f"im{k}.png", size, seed=k)
    qfile = _write(tmp_path / "q.jsonl", [{"question_id": f"q{k}", "image": f"im{k}.png", "text": "What?"}
                                           for k in range(len(sizes))]
                   + [{"question_id": "bad", "image": "missing.png", "text": "What?"}])
    counter = VisualTokenCounter.of(model)
    assert counter((336, 336)) != counter((672, 336))
    order = group_by_length_order(model, [json.loads(x) for x in qfile.read_text().splitlines()], images)
    assert [q["question_id"] for q in order] == ["bad", "q0", "q2", "q4", "q1", "q3", "q5"]
    batches: list[list[str]] = []
    predict(model, qfile, images, tmp_path / "grouped.jsonl", batch_size=2, max_new_tokens=3, progress=False,
            on_batch=lambda recs: batches.append([r["question_id"] for r in recs]))
    assert batches == [["bad", "q0"], ["q2", "q4"], ["q1", "q3"], ["q5"]]
    one = tmp_path / "one.jsonl"
    predict(model, qfile, images, one, batch_size=1, max_new_tokens=3, progress=False)
    grouped = {r["question_id"]: r for r in read_jsonl(tmp_path / "grouped.jsonl")}
    single = {r["question_id"]: r for r in read_jsonl(one)}
    assert {k: r["text"] for k, r in grouped.items()} == {k: r["text"] for k, r in single.items()}
    assert "error" in grouped["bad"] and "missing.png" in grouped["bad"]["error"]
    # file order when asked
    predict(model, qfile, images, tmp_path / "ordered.jsonl", batch_size=2, max_new_tokens=3, progress=False,
            group_by_length=False)
    assert [r["question_id"] for r in read_jsonl(tmp_path / "ordered.jsonl")] == [f"q{k}" for k in range(6)] + ["bad"]


def test_predict_shards_partition_the_questions(env, tmp_path):
    from hires_lmm.eval.predict import predict, resolve_shard, shard_path

    parts = []
    for k in range(2):
        out = tmp_path / f"s{k}.jsonl"
        predict(env["model"], env["questions"], env["images"], out, batch_size=8, max_new_tokens=1,
                num_shards=2, shard=k, progress=False)
        parts.append([r["question_id"] for r in read_jsonl(out)])
    assert parts[0] == env["ids"][0::2] and parts[1] == env["ids"][1::2]
    assert not set(parts[0]) & set(parts[1]) and set(parts[0]) | set(parts[1]) == set(env["ids"])
    assert resolve_shard(None, None, {"RANK": "1", "WORLD_SIZE": "2"}) == (2, 1)
    assert resolve_shard(None, None, {}) == (1, 0)
    assert resolve_shard(4, 3, {"RANK": "0", "WORLD_SIZE": "2"}) == (4, 3)
    with pytest.raises(ValueError):
        resolve_shard(2, 2, {})
    assert shard_path("a/ans.jsonl", 2, 1) == Path("a/ans.shard1-of-2.jsonl")
    assert shard_path("a/ans.jsonl", 1, 0) == Path("a/ans.jsonl")
    assert shard_path("a/ans-{shard}.jsonl", 4, 3) == Path("a/ans-3.jsonl")


def test_predict_bad_image_is_an_error_record(env, tmp_path):
    from hires_lmm.eval.predict import predict

    (tmp_path / "broken.png").write_bytes(b"this is not a png")
    (tmp_path / "empty.png").write_bytes(b"")
    _image(tmp_path / "ok.png")
    qs = [{"question_id": 1, "image": "ok.png", "text": "a?"},
          {"question_id": 2, "image": "broken.png", "text": "b?"},
          {"question_id": 3, "image": "missing.png", "text": "c?"},
          {"question_id": 4, "image": "empty.png", "text": "d?"},
          {"question_id": 5, "image": "ok.png", "text": "<image> and <image>?"},
          {"question_id": 6, "text": "text only?"}]
    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps(q) + "\n" for q in qs))
    out = tmp_path / "a.jsonl"
    res = predict(env["model"], qfile, tmp_path, out, batch_size=8, max_new_tokens=2, progress=False)
    recs = {r["question_id"]: r for r in read_jsonl(out)}
    assert sorted(recs) == [1, 2, 3, 4, 5, 6]
    assert "error" not in recs[1] and "error" not in recs[6]
    for k, word in [(2, "NotAnImage"), (3, "NotFound"), (4, "Empty"), (5, "Placeholder")]:
        assert word in recs[k]["error"] and recs[k]["text"] == "", recs[k]
    assert res.errors == 4
    # errors are answers: not redone, unless asked
    assert predict(env["model"], qfile, tmp_path, out, progress=False).written == 0
    (tmp_path / "broken.png").write_bytes((tmp_path / "ok.png").read_bytes())
    res = predict(env["model"], qfile, tmp_path, out, max_new_tokens=2, progress=False, retry_errors=True)
    assert (res.written, res.errors) == (4, 3)
    recs = {r["question_id"]: r for r in read_jsonl(out)}
    assert len(recs) == 6 and "error" not in recs[2]


def test_training_template_is_the_default(env, tmp_path):
    import shutil

    from hires_lmm.eval.predict import training_template

    d = tmp_path / "m"
    shutil.copytree(env["model_dir"], d)
    assert training_template(d) is None
    (d / "train_config.json").write_text(json.dumps({"method": "llava-1.5", "stage": "2", "template": None}))
    assert training_template(d) == "vicuna_v1"
    (d / "train_config.json").write_text(json.dumps({"method": "llava-1.5", "stage": "scratch", "template": "chatml"}))
    assert training_template(d) == "chatml"
    (d / "train_config.json").write_text(json.dumps({"method": "llava-1.5", "stage": "1", "template": "plain"}))
    from hires_lmm.eval.predict import predict

    res = predict(d, env["questions"], env["images"], tmp_path / "a.jsonl", max_new_tokens=1, progress=False)
    assert res.template == "plain"


# --- evaluate ---------------------------------------------------------------------------------------


def _write(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def test_evaluate_vqa_with_categories_missing_extra_errors(tmp_path):
    gt = _write(tmp_path / "gt.jsonl", [
        {"question_id": 1, "answers": ["2"] * 3 + ["3"] * 7, "category": "count"},   # "two" → 0.9
        {"question_id": 2, "answers": [{"answer": "red"}] * 10, "category": "color"},  # "Red." → 1
        {"question_id": 3, "text": "blue", "category": "color"},                       # "green" → 0
        {"question_id": 4, "text": "cat", "category": "shape"},                        # error → 0
        {"question_id": 5, "text": "dog", "category": "shape"},                        # missing → 0
    ])
    ans = _write(tmp_path / "ans.jsonl", [
        {"question_id": 1, "text": "two"}, {"question_id": 2, "text": "Red."}, {"question_id": 3, "text": "green"},
        {"question_id": 4, "text": "", "error": "NotAnImageError: ..."}, {"question_id": 99, "text": "x"}])
    rep = evaluate(ans, gt, "vqa")
    assert rep["score"] == pytest.approx(1.9 / 5)
    assert rep["answered_score"] == pytest.approx(1.9 / 4)
    assert (rep["count"], rep["answered"], rep["errors"], rep["missing"], rep["extra"]) == (5, 4, 1, 1, 1)
    assert rep["missing_ids"] == ["5"] and rep["extra_ids"] == ["99"]
    assert rep["categories"] == {"color": {"score": 0.5, "count": 2}, "count": {"score": pytest.approx(0.9), "count": 1},
                                 "shape": {"score": 0.0, "count": 2}}


def test_evaluate_other_metrics_and_question_categories(tmp_path):
    gt = _write(tmp_path / "gt.jsonl", [{"question_id": "a", "text": "hello"}, {"question_id": "b", "answers": ["45%", "x"]},
                                        {"question_id": "c", "text": "B"}])
    ans = _write(tmp_path / "ans.jsonl", [{"question_id": "a", "text": "helo"}, {"question_id": "b", "text": "0.46"},
                                          {"question_id": "c", "text": "The answer is B."}])
    qs = _write(tmp_path / "q.jsonl", [{"question_id": "a", "text": "?", "category": "doc"},
                                       {"question_id": "b", "text": "?", "category": "chart"},
                                       {"question_id": "c", "text": "?", "category": "doc"}])
    assert evaluate(ans, gt, "anls")["score"] == pytest.approx((0.8 + 0.0 + 0.0) / 3)
    assert evaluate(ans, gt, "relaxed")["score"] == pytest.approx(1 / 3)
    assert evaluate(ans, gt, "exact")["score"] == 0.0
    rep = evaluate(ans, gt, "mc", question_file=qs)
    assert rep["score"] == pytest.approx(1 / 3)
    assert rep["categories"] == {"chart": {"score": 0.0, "count": 1}, "doc": {"score": 0.5, "count": 2}}


def test_evaluate_mc_options_from_ground_truth(tmp_path):
    gt = _write(tmp_path / "gt.jsonl", [{"question_id": 1, "text": "C", "options": ["red", "blue", "green"]},
                                        {"question_id": 2, "text": "A", "options": {"A": "cat", "B": "dog"}}])
    ans = _write(tmp_path / "ans.jsonl", [{"question_id": 1, "text": "It is green."}, {"question_id": 2, "text": "dog"}])
    rep = evaluate(ans, gt, "mc")
    assert rep["score"] == 0.5


def test_evaluate_shards_and_bad_input(tmp_path):
    gt = _write(tmp_path / "gt.jsonl", [{"question_id": k, "text": "x"} for k in range(4)])
    a = _write(tmp_path / "a.shard0-of-2.jsonl", [{"question_id": 0, "text": "x"}, {"question_id": 2, "text": "y"}])
    b = _write(tmp_path / "a.shard1-of-2.jsonl", [{"question_id": 1, "text": "x"}, {"question_id": 3, "text": "x"}])
    rep = evaluate([a, b], gt, "exact")
    assert rep["score"] == 0.75 and rep["missing"] == 0
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(a, gt, "bleu")
    (tmp_path / "bad.jsonl").write_text('{"question_id": 1, "text": "x"}\n{oops\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        evaluate(tmp_path / "bad.jsonl", gt, "exact")


# --- chat -------------------------------------------------------------------------------------------


def test_chat_session_on_streams(env, tmp_path):
    from hires_lmm.eval.chat import ChatBot, chat_session

    img0, img1 = env["images"] / "im0.png", env["images"] / "im1.png"
    bot = ChatBot(env["model_dir"], img0, max_new_tokens=3)
    model = bot.model
    want0 = model.generate(["<image>\nWhat is it?"], [[img0]], max_new_tokens=3, template="vicuna_v1", seed=0)[0].strip()
    want1 = model.generate(["<image>\nAnd now?"], [[img1]], max_new_tokens=3, template="vicuna_v1", seed=0)[0].strip()
    inp = io.StringIO(f"What is it?\n\n/image {tmp_path / 'nope.png'}\n/image {img1}\nAnd now?\n/quit\nNot read\n")
    out = io.StringIO()
    assert chat_session(bot, inp, out) == 2
    lines = out.getvalue().split("\n")
    assert lines[0] == want0
    assert lines[1].startswith("error: ") and "nope.png" in lines[1]
    assert lines[2] == f"image: {img1}"
    assert lines[3] == want1
    assert "Not read" not in out.getvalue()
    # end of input ends the session too; a prompt is written before each read when asked
    out = io.StringIO()
    assert chat_session(bot, io.StringIO("hi\n"), out, prompt="> ") == 1
    assert out.getvalue().startswith("> ") and out.getvalue().endswith("> ")


# --- CLI --------------------------------------------------------------------------------------------


def test_cli_predict_eval_chat(env, tmp_path, capsys, monkeypatch):
    ans = tmp_path / "ans.jsonl"
    code = main(["predict", "--model", str(env["model_dir"]), "--question-file", str(env["questions"]),
                 "--image-folder", str(env["images"]), "--answers-file", str(ans), "--batch-size", "3",
                 "--max-new-tokens", "2", "--no-progress"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["written"] == 6 and out["answers_file"] == str(ans)
    # shards: --num-shards/--shard, and torchrun's RANK/WORLD_SIZE when not given
    code = main(["predict", "--model", str(env["model_dir"]), "--question-file", str(env["questions"]),
                 "--image-folder", str(env["images"]), "--answers-file", str(tmp_path / "sh.jsonl"),
                 "--max-new-tokens", "1", "--num-shards", "2", "--shard", "1", "--no-progress"])
    assert code == 0 and json.loads(capsys.readouterr().out)["written"] == 3
    assert [r["question_id"] for r in read_jsonl(tmp_path / "sh.shard1-of-2.jsonl")] == env["ids"][1::2]
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["predict", "--model", str(env["model_dir"]), "--question-file", str(env["questions"]),
                 "--image-folder", str(env["images"]), "--answers-file", str(tmp_path / "sh.jsonl"),
                 "--max-new-tokens", "1", "--no-progress"])
    assert code == 0 and json.loads(capsys.readouterr().out)["shard"] == 0
    monkeypatch.delenv("RANK")
    monkeypatch.delenv("WORLD_SIZE")

    gt = _write(tmp_path / "gt.jsonl", [{"question_id": q, "text": r["text"]} for q, r in
                                        zip(env["ids"], read_jsonl(ans))])
    code = main(["eval", "--answers-file", str(ans), "--ground-truth", str(gt), "--metric", "exact",
                 "--question-file", str(env["questions"]), "--json"])
    rep = json.loads(capsys.readouterr().out)
    assert code == 0 and rep["score"] == 1.0 and rep["categories"]["a"]["count"] == 3
    code = main(["eval", "--answers-file", str(tmp_path / "sh.shard0-of-2.jsonl"), str(tmp_path / "sh.shard1-of-2.jsonl"),
                 "--ground-truth", str(gt), "--metric", "vqa"])
    text = capsys.readouterr().out
    assert code == 0 and text.startswith("vqa: ") and "6/6 answered" in text

    img = env["images"] / "im2.png"
    want = env["model"].generate(["<image>\nWhat is it?"], [[img]], max_new_tokens=4, template="vicuna_v1", seed=0)[0].strip()
    code = main(["chat", "--model", str(env["model_dir"]), "--image", str(img), "--max-new-tokens", "4", "What is it?"])
    assert code == 0 and capsys.readouterr().out == want + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO("What is it?\n/quit\n"))
    code = main(["chat", "--model", str(env["model_dir"]), "--image", str(img), "--max-new-tokens", "4"])
    assert code == 0 and capsys.readouterr().out == want + "\n"


def test_cli_errors(env, tmp_path, capsys):
    code = main(["predict", "--model", str(tmp_path), "--question-file", str(env["questions"]),
                 "--answers-file", str(tmp_path / "a.jsonl")])
    assert code == 2 and "not a hires-lmm model directory" in capsys.readouterr().err
    code = main(["predict", "--model", str(env["model_dir"]), "--question-file", str(tmp_path / "none.jsonl"),
                 "--answers-file", str(tmp_path / "a.jsonl"), "--no-progress"])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    code = main(["predict", "--model", str(env["model_dir"]), "--question-file", str(env["questions"]),
                 "--answers-file", str(tmp_path / "a.jsonl"), "--num-shards", "2", "--shard", "2"])
    assert code == 2 and "shard 2 of 2" in capsys.readouterr().err
    code = main(["eval", "--answers-file", str(tmp_path / "x.jsonl"), "--ground-truth", str(env["questions"]),
                 "--metric", "vqa"])
    assert code == 2 and "x.jsonl does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--answers-file", "a", "--ground-truth", "b", "--metric", "bleu"])
    code = main(["chat", "--model", str(env["model_dir"]), "--image", str(tmp_path / "missing.png"), "hi"])
    assert code == 2 and "missing.png" in capsys.readouterr().err
