"""lmms-eval: the ``hires_lmm`` adapter (``hires_lmm.eval.lmms_eval``) on request objects shaped
like lmms-eval's, and — with lmms-eval installed (``requirements/lmms-eval.txt``, see
docs/evaluation.md) — ``lmms-eval --model hires_lmm`` run end to end as a subprocess on two local
tasks whose scores are known in advance:

* ``toy_gen`` (``generate_until``, ``exact_match``): the answers of half the 4 documents are the
  tiny model's own greedy answers (computed here with ``model.generate``), the others answers it
  does not give, so lmms-eval must report exactly 0.5, and each logged response must be the
  answer ``model.generate`` gives to the same prompt;
* ``toy_mc`` (``multiple_choice``, ``acc`` / ``acc_norm``): the gold choice of some documents is
  the choice of lowest loss (computed here, one forward per token prefix), of the others one of
  higher loss, so both accuracies are known; each logged loss must equal the one computed here.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from hires_lmm.data.templates import get_template
from hires_lmm.eval.lmms_eval import HiresLMMEval, LoglikelihoodResult
from hires_lmm.methods import build_model
from hires_lmm.model import IGNORE_INDEX

TEMPLATE = "vicuna_v1"  # the adapter's default for a model without a recorded training template

# Evaluated before any fixture runs, so the end-to-end test builds nothing when it cannot run.
# HIRES_REQUIRE_LMMS_EVAL=1 (`make test-lmms-eval`, CI) turns the skip into a failure.
needs_lmms_eval = pytest.mark.skipif(
    importlib.util.find_spec("lmms_eval") is None and os.environ.get("HIRES_REQUIRE_LMMS_EVAL") != "1",
    reason="lmms-eval is not installed (see requirements/lmms-eval.txt)")


def _image(path: Path, size: tuple[int, int], seed: int) -> None:
    w, h = size
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(path)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny LLaVA-1.5 saved to disk and 6 images of different sizes."""
    root = tmp_path_factory.mktemp("lmms")
    model = build_model("llava-1.5", tiny=True, seed=0)
    model.save_pretrained(root / "tiny-llava")
    images = root / "images"
    images.mkdir()
    for k, size in enumerate([(64, 48), (40, 80), (100, 30), (50, 50), (70, 20), (33, 66)]):
        _image(images / f"im{k}.png", size, seed=k)
    return {"root": root, "model_dir": root / "tiny-llava", "model": model.eval(), "images": images}


def _reply_nll(model: Any, question: str, image: Image.Image, reply: str,
               memo: dict[tuple, torch.Tensor] | None = None) -> tuple[float, bool]:
    """Mean NLL of ``reply``'s tokens (and whether greedy yields them all) after the user turn
    ``question`` with ``image``: one forward per prefix, the last position's distribution scored —
    independent of the adapter's single forward and its shifted gather. ``memo`` keeps each
    prefix's distribution (replies to one question share their first prefix, the prompt)."""
    tok = model.tokenizer
    ids, labels = get_template(TEMPLATE).encode(tok, [{"from": "human", "value": question}, {"from": "gpt", "value": reply}])
    where = [p for p, lab in enumerate(labels) if lab != IGNORE_INDEX]
    assert where and where == list(range(where[0], where[-1] + 1)), "the reply is one contiguous span"
    memo = {} if memo is None else memo
    im = None
    nll, greedy = [], []
    for p in where:
        key = (id(image), tuple(ids[:p]))
        if key not in memo:
            if im is None:
                im = model.prepare_image(image)
            with torch.no_grad():
                memo[key] = torch.log_softmax(model([torch.tensor(ids[:p])], [[im]]).logits[0, -1].float(), -1)
        logp = memo[key]
        nll.append(-float(logp[ids[p]]))
        greedy.append(int(logp.argmax()) == ids[p])
    return sum(nll) / len(nll), all(greedy)


# --- the adapter on lmms-eval-shaped requests -----------------------------------------------------


class FakeInstance:
    """The parts of lmms-eval's ``Instance`` a model reads."""

    def __init__(self, request_type: str, arguments: tuple, idx: int = 0) -> None:
        self.request_type, self.arguments, self.idx = request_type, arguments, idx

    @property
    def args(self) -> tuple:
        return self.arguments


def _docs(env: dict[str, Any]) -> list[dict]:
    return [{"image": Image.open(env["images"] / f"im{k}.png").convert("RGB"), "q": f"Question {k}?"} for k in range(3)]


def test_lmms_eval_adapter_generate_until(env):
    lm = HiresLMMEval(pretrained=str(env["model_dir"]), batch_size="2")
    assert lm.template == TEMPLATE and lm.batch_size == 2 and lm.rank == 0 and lm.world_size == 1
    docs = _docs(env)
    lm.task_dict = {"toy": {"test": docs}}
    to_visual = lambda doc: [doc["image"]]  # noqa: E731
    greedy = {"until": ["\n\n"], "max_new_tokens": 3, "temperature": 0, "do_sample": False}
    other = {"until": "###", "max_new_tokens": 2}
    reqs = [FakeInstance("generate_until", (docs[0]["q"], greedy, to_visual, 0, "toy", "test")),
            FakeInstance("generate_until", (docs[1]["q"], other, to_visual, 1, "toy", "test")),
            FakeInstance("generate_until", ("<image> " + docs[2]["q"], greedy, to_visual, 2, "toy", "test"))]
    got = lm.generate_until(reqs)
    m = lm.model

    def gen(prompt: str, doc: dict, n: int, stop: str) -> str:
        return m.generate([prompt], [[doc["image"]]], max_new_tokens=n, stop=[stop], template=TEMPLATE)[0].strip()

    want = [gen("<image>\n" + docs[0]["q"], docs[0], 3, "\n\n"), gen("<image>\n" + docs[1]["q"], docs[1], 2, "###"),
            gen("<image> " + docs[2]["q"], docs[2], 3, "\n\n")]
    assert got == want
    with pytest.raises(NotImplementedError):
        lm.generate_until_multi_round(reqs)


def test_lmms_eval_adapter_loglikelihood(env):
    from hires_lmm.data.templates import get_template

    lm = HiresLMMEval(pretrained=env["model"])
    docs = _docs(env)
    lm.task_dict = {"toy": {"test": docs}}
    m, tok = lm.model, lm.model.tokenizer
    im = m.prepare_image(docs[0]["image"])
    to_visual = lambda doc: [doc["image"]]  # noqa: E731
    # the reply " ok</s>" after the prompt: one forward per prefix, independent of the adapter's path
    prompt = get_template(TEMPLATE).prompt(tok, "<image>\n" + docs[0]["q"])
    reply = tok(" ok", add_special_tokens=False).input_ids + [tok.eos_token_id]
    nll, greedy = [], []
    for i, t in enumerate(reply):
        with torch.no_grad():
            logits = m([torch.tensor(prompt + reply[:i])], [[im]]).logits[0, -1].float()
        nll.append(-float(torch.log_softmax(logits, -1)[t]))
        greedy.append(int(logits.argmax()) == t)
    (loss, is_greedy), (loss2, _) = lm.loglikelihood([
        FakeInstance("loglikelihood", (docs[0]["q"], "ok", to_visual, 0, "toy", "test")),
        FakeInstance("loglikelihood", (docs[0]["q"], lambda doc: "no", to_visual, 0, "toy", "test"))])
    assert loss == pytest.approx(sum(nll) / len(nll), abs=1e-4) and is_greedy == all(greedy)
    assert loss2 > 0 and loss2 != pytest.approx(loss)
    # the helper the end-to-end test uses agrees with this hand-built one
    assert _reply_nll(m, "<image>\n" + docs[0]["q"], docs[0]["image"], "ok") == (pytest.approx(loss, abs=1e-4), is_greedy)


def test_lmms_eval_adapter_loglikelihood_exact_values(env):
    """With the final norm zeroed every logit is 0: each token's loss is log V, ties go to token 0."""
    m = build_model("llava-1.5", tiny=True, seed=0)
    m.llm.model.norm.weight.data.zero_()
    lm = HiresLMMEval(pretrained=m)
    docs = _docs(env)
    lm.task_dict = {"toy": {"test": docs}}
    V = m.llm.get_output_embeddings().weight.shape[0]
    to_visual = lambda doc: [doc["image"]]  # noqa: E731
    out = lm.loglikelihood([FakeInstance("loglikelihood", (d["q"], c, to_visual, k, "toy", "test"))
                            for k, (d, c) in enumerate(zip(docs, ["!", "a much longer answer", lambda doc: ""]))])
    # the reply ends with </s>, which is not token 0, so never greedy here
    assert out == [(pytest.approx(math.log(V)), False)] * 3
    assert all(isinstance(r, LoglikelihoodResult) and isinstance(r, tuple) for r in out)


def test_loglikelihood_result_is_a_plain_pair():
    import pickle

    r = LoglikelihoodResult(np.float32(1.5), 1)
    loss, greedy = r
    assert (loss, greedy) == (1.5, True) and type(loss) is float and type(greedy) is bool
    assert r == (1.5, True) and hash(r) == hash((1.5, True)) and repr(r) == "(1.5, True)"
    assert r.text == (1.5, True) and type(r.text) is tuple and r.token_counts is None
    assert pickle.loads(pickle.dumps(r)) == r and json.dumps(r) == "[1.5, true]"


@needs_lmms_eval
def test_loglikelihood_result_survives_lmms_eval_unwrapping():
    """lmms-eval >= 0.7 passes each model output through ``unwrap_generation_output``, which makes
    a plain ``(float, bool)`` tuple its ``str()``; a LoglikelihoodResult comes out as the pair."""
    import lmms_eval.api.instance as instance

    if not hasattr(instance, "unwrap_generation_output"):
        pytest.skip("this lmms-eval (< 0.7) keeps model outputs as they are")
    assert isinstance(instance.unwrap_generation_output((0.5, True))[0], str)  # why the wrapper exists
    text, counts = instance.unwrap_generation_output(LoglikelihoodResult(0.5, True))
    assert text == (0.5, True) and type(text) is tuple and counts is None


def test_lmms_eval_adapter_create_from_arg_string(env):
    lm = HiresLMMEval.create_from_arg_string(f"pretrained={env['model_dir']},template=chatml,max_new_tokens=5",
                                             {"batch_size": 4, "device": "cpu"})
    assert (lm.template, lm.batch_size, lm.max_new_tokens) == ("chatml", 4, 5)


@needs_lmms_eval
def test_lmms_eval_registration_when_installed():
    from lmms_eval.api.model import lmms

    import hires_lmm.eval.lmms_eval as mod

    assert mod.HAVE_LMMS_EVAL and issubclass(mod.HiresLMMEval, lmms)
    try:
        from lmms_eval.models import get_model
    except ImportError:
        from lmms_eval.api.registry import get_model
    assert get_model("hires_lmm") is mod.HiresLMMEval


@needs_lmms_eval
def test_lmms_eval_finds_hires_lmm_through_the_entry_point():
    """In a fresh interpreter that never imported hires_lmm, lmms-eval's registry knows the model
    (the ``lmms_eval.models`` entry point of pyproject.toml) and resolves it to the adapter."""
    code = ("import sys\n"
            "from lmms_eval.models import MODEL_REGISTRY_V2 as R, get_model\n"
            "assert 'hires_lmm' in R.list_model_names(), 'hires_lmm not registered'\n"
            "cls = get_model('hires_lmm')\n"
            "print(cls.__module__ + '.' + cls.__qualname__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "hires_lmm.eval.lmms_eval.HiresLMMEval"


# --- lmms-eval end to end ---------------------------------------------------------------------------

POST_PROMPT = "\nAnswer with one word."
CHOICES = ["red", "green", "violet"]

UTILS_PY = '''"""doc_to_* functions of the toy tasks (lmms-eval loads them with !function utils.NAME)."""


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kw = lmms_eval_specific_kwargs or {}
    return kw.get("pre_prompt", "") + doc["question"] + kw.get("post_prompt", "")
'''

TASK_COMMON = """dataset_path: imagefolder
dataset_kwargs:
  data_dir: {data}
test_split: train
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
lmms_eval_specific_kwargs:
  default:
    pre_prompt: ""
    post_prompt: {post}
metadata:
  version: 0.0
"""

GEN_TASK = """task: toy_gen
output_type: generate_until
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
  temperature: 0
  do_sample: false
  until: ["\\n\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

MC_TASK = """task: toy_mc
output_type: multiple_choice
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def _lmms_eval_command() -> list[str]:
    """The ``lmms-eval`` console script of this interpreter's environment (CI may not activate it)."""
    script = Path(sys.executable).with_name("lmms-eval")
    if script.exists():
        return [str(script)]
    found = shutil.which("lmms-eval")
    assert found, "lmms_eval is importable but its lmms-eval script is not installed"
    return [found]


@pytest.fixture(scope="module")
def toy_tasks(env: dict[str, Any]) -> dict[str, Any]:
    """Four documents (an image, a question) with answers and gold choices set from the tiny model's
    own greedy answers and losses, as an ``imagefolder`` dataset (``metadata.jsonl``) and two task
    YAMLs beside a utils.py; the scores lmms-eval must report."""
    model = env["model"]
    n = 4
    lengths = np.array([len(c) for c in CHOICES], dtype=float)  # acc_norm: loss / len(choice) in characters
    data = env["root"] / "toy_data"
    data.mkdir()
    tasks = env["root"] / "toy_tasks"
    tasks.mkdir()
    rows, want_resps, want_lls = [], [], []
    for k in range(n):
        shutil.copy(env["images"] / f"im{k}.png", data / f"im{k}.png")
        question = f"What is in picture {k}?"
        image = Image.open(data / f"im{k}.png").convert("RGB")
        prompt = "<image>\n" + question + POST_PROMPT  # what the adapter makes of lmms-eval's context
        own = model.generate([prompt], [[image]], max_new_tokens=6, stop=["\n\n"], template=TEMPLATE, seed=0)[0].strip()
        wrong = f"not the model's answer {k}"
        assert own != wrong
        memo: dict[tuple, torch.Tensor] = {}
        lls = [_reply_nll(model, prompt, image, " " + c, memo) for c in CHOICES]  # lmms-eval: target_delimiter + choice
        losses = np.array([loss for loss, _ in lls])
        ranked = np.argsort(losses)
        for scores in (losses, losses / lengths):  # acc's and acc_norm's argmin must be clear-cut
            low = np.sort(scores)
            assert low[1] - low[0] > 1e-3, f"choices of doc {k} too close to rank reliably: {scores}"
        # docs 0, 2: the gold choice is the likeliest one; 1, 3: the least likely one
        label = int(ranked[0] if k % 2 == 0 else ranked[-1])
        rows.append({"file_name": f"im{k}.png", "question": question, "answer": own if k < n // 2 else wrong,
                     "choices": CHOICES, "label": label})
        want_resps.append(own)
        want_lls.append(lls)
    # the tiny model's answers differ between images, so the logged responses show each document's
    # image reached it (its answers hardly depend on the words of the prompt: the logged inputs and
    # the losses of toy_mc check those)
    assert len(set(want_resps)) > 1, want_resps
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tasks / "utils.py").write_text(UTILS_PY)
    common = TASK_COMMON.format(data=json.dumps(str(data)), post=json.dumps(POST_PROMPT))  # JSON strings are YAML
    (tasks / "toy_gen.yaml").write_text(GEN_TASK + common)
    (tasks / "toy_mc.yaml").write_text(MC_TASK + common)
    acc = [float(np.argmin([loss for loss, _ in lls]) == r["label"]) for lls, r in zip(want_lls, rows)]
    acc_norm = [float(np.argmin(np.array([loss for loss, _ in lls]) / lengths) == r["label"]) for lls, r in zip(want_lls, rows)]
    assert acc == [1.0, 0.0] * (n // 2)
    return {"tasks": tasks, "rows": rows, "resps": want_resps, "lls": want_lls,
            "exact_match": 0.5, "acc": 0.5, "acc_norm": sum(acc_norm) / n, "acc_norm_per_doc": acc_norm}


def _read_samples(out_dir: Path, task: str) -> list[dict]:
    files = sorted(out_dir.rglob(f"*_samples_{task}.jsonl"))
    assert len(files) == 1, f"samples of {task}: {files}"
    return sorted((json.loads(line) for line in files[0].read_text().splitlines() if line.strip()), key=lambda s: s["doc_id"])


@needs_lmms_eval
def test_lmms_eval_cli_scores_local_tasks(env, toy_tasks, tmp_path):
    """``lmms-eval --model hires_lmm`` on the toy tasks reports the scores computed above, and
    logs per document the response / losses the model gives here."""
    out_dir = tmp_path / "out"
    environ = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
               "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        environ.pop(var, None)
    cmd = _lmms_eval_command() + [
        "--model", "hires_lmm", "--model_args", f"pretrained={env['model_dir']}", "--tasks", "toy_gen,toy_mc",
        "--include_path", str(toy_tasks["tasks"]), "--output_path", str(out_dir), "--batch_size", "2",
        "--log_samples", "--device", "cpu"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=environ, cwd=tmp_path, timeout=900)
    elapsed = time.perf_counter() - t0
    log = (proc.stdout + proc.stderr)[-6000:]
    assert proc.returncode == 0, log
    results_files = sorted(out_dir.rglob("*_results.json"))
    assert len(results_files) == 1, log
    report = json.loads(results_files[0].read_text())
    res = report["results"]
    assert res["toy_gen"]["exact_match,none"] == pytest.approx(toy_tasks["exact_match"])
    assert res["toy_mc"]["acc,none"] == pytest.approx(toy_tasks["acc"])
    assert res["toy_mc"]["acc_norm,none"] == pytest.approx(toy_tasks["acc_norm"])
    assert report["n-samples"]["toy_gen"]["effective"] == report["n-samples"]["toy_mc"]["effective"] == 4
    # the printed table carries the same numbers
    table = [line for line in proc.stdout.splitlines() if line.startswith("|toy_")]
    assert any("exact_match" in line and "|  0.5|" in line for line in table), proc.stdout[-3000:]
    assert any(line.startswith("|toy_mc") and "|acc " in line and "|  0.5|" in line for line in table), proc.stdout[-3000:]

    gen = _read_samples(out_dir, "toy_gen")
    assert [s["doc_id"] for s in gen] == list(range(4))
    assert [s["input"] for s in gen] == [r["question"] + POST_PROMPT for r in toy_tasks["rows"]]
    assert [s["filtered_resps"] for s in gen] == toy_tasks["resps"]  # what model.generate answers here
    assert [s["exact_match"] for s in gen] == [1.0, 1.0, 0.0, 0.0]

    mc = _read_samples(out_dir, "toy_mc")
    for s, lls, row in zip(mc, toy_tasks["lls"], toy_tasks["rows"]):
        got = [(float(loss), str(greedy) == "True") for loss, greedy in s["filtered_resps"]]
        assert [g for _, g in got] == [g for _, g in lls]
        assert [loss for loss, _ in got] == pytest.approx([loss for loss, _ in lls], abs=1e-4)
        assert int(s["target"]) == row["label"]
    assert [s["acc"] for s in mc] == [1.0, 0.0] * 2
    assert [s["acc_norm"] for s in mc] == toy_tasks["acc_norm_per_doc"]
    print(f"lmms-eval run: {elapsed:.1f} s (its own total_evaluation_time_seconds: {report.get('total_evaluation_time_seconds')})")
