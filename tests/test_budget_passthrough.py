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
    # file order (group_by_length=False), so the spliced counts line up with SIZES
    res = predict(uhd["model_dir"], uhd["questions"], uhd["images"], tmp_path / "a.jsonl", batch_size=2,
                  max_new_tokens=2, progress=False, max_visual_tokens=BUDGET, group_by_length=False)
    assert res.errors == 0 and res.written == 2
    assert spliced == budgeted
    spliced.clear()
    predict(uhd["model_dir"], uhd["questions"], uhd["images"], tmp_path / "b.jsonl", batch_size=2,
            max_new_tokens=2, progress=False, group_by_length=False)
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


# --- a composed method's counts ---------------------------------------------------------------------

COMPOSED = {"base": "llava-next", "compressor": "uhd-spatial"}


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    """LLaVA-NeXT's views through UHD's spatial resampler, tiny, saved and loaded back."""
    d = tmp_path_factory.mktemp("composed") / "next-uhd"
    build_model(COMPOSED, tiny=True, seed=0).save_pretrained(d)
    return HiresLMM.from_pretrained(d), d


def test_composed_method_counts_are_the_spliced_counts(composed):
    from hires_lmm.processing import HiresProcessor

    model, d = composed
    assert model.config.method == "llava-next" and model.config.method_spec["compressor"] == "uhd-spatial"
    saved = HiresProcessor.from_pretrained(d)
    sizes = [(336, 336), (672, 336), (500, 900)]
    ids = torch.tensor([1, model.image_token_id, 2])
    for size in sizes:
        image = model.prepare_image(Image.new("RGB", size, (90, 40, 160)))
        with torch.no_grad():
            out = model([ids], [[image]])
        n = out.batch.num_visual_tokens[0]
        planner = plan_image("llava-next", size).num_visual_tokens
        assert n < planner  # the resampler compresses: the planner's count would be wrong
        assert model.plan(size).num_visual_tokens == n
        assert model.processor().num_visual_tokens([size]) == [n] == saved.num_visual_tokens([size])
        mm = saved._get_num_multimodal_tokens(image_sizes=[(size[1], size[0])])
        assert mm["num_image_tokens"] == [n] and mm["num_image_patches"] == [len(image.plan.views)]


def test_preset_counts_are_the_planners(uhd):
    model = HiresLMM.from_pretrained(uhd["model_dir"])
    for size in SIZES:
        assert model.plan(size) == plan_image("llava-uhd", size)
        assert model.plan(size, max_visual_tokens=BUDGET) == plan_image("llava-uhd", size, max_visual_tokens=BUDGET)
    assert "method_spec" not in model.processor().image_processor.to_dict()


# --- the server: a per-request budget ------------------------------------------------------------------

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

# the tiny served LLaVA-UHD of tests/test_serve.py, its helpers and fixtures (pytest puts tests/ on the path)
from test_serve import NAME, assert_error, chat, data_url, model_dir, picture, request, served, user  # noqa: E402,F401,F811

from hires_lmm.serve.errors import APIError  # noqa: E402
from hires_lmm.serve.protocol import parse_chat_request, parse_plan_request  # noqa: E402


def _body(**extra) -> dict:
    return {"model": NAME, "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.mark.parametrize("extra, budget, param", [
    ({}, None, "max_visual_tokens"),
    ({"max_visual_tokens": 300}, 300, "max_visual_tokens"),
    ({"max_visual_tokens": 300.0}, 300, "max_visual_tokens"),
    ({"mm_processor_kwargs": {"max_visual_tokens": 64}}, 64, "mm_processor_kwargs.max_visual_tokens"),
    ({"max_visual_tokens": 64, "mm_processor_kwargs": {"max_visual_tokens": 64}}, 64, "max_visual_tokens"),
    ({"mm_processor_kwargs": {}}, None, "max_visual_tokens"),
])
def test_protocol_reads_the_budget(extra, budget, param):
    req = parse_chat_request(_body(**extra), NAME)
    assert (req.max_visual_tokens, req.budget_param) == (budget, param)
    plan = parse_plan_request({"image": "x.png", **extra}, ("llava-uhd",))
    assert (plan.max_visual_tokens, plan.budget_param) == (budget, param)


@pytest.mark.parametrize("extra, param, code", [
    ({"max_visual_tokens": 0}, "max_visual_tokens", "invalid_value"),
    ({"max_visual_tokens": -5}, "max_visual_tokens", "invalid_value"),
    ({"max_visual_tokens": "100"}, "max_visual_tokens", "invalid_type"),
    ({"max_visual_tokens": True}, "max_visual_tokens", "invalid_type"),
    ({"max_visual_tokens": 1.5}, "max_visual_tokens", "invalid_type"),
    ({"mm_processor_kwargs": {"max_visual_tokens": 0}}, "mm_processor_kwargs.max_visual_tokens", "invalid_value"),
    ({"mm_processor_kwargs": [1]}, "mm_processor_kwargs", "invalid_type"),
    ({"mm_processor_kwargs": {"num_crops": 4}}, "mm_processor_kwargs.num_crops", "unsupported_parameter"),
    ({"max_visual_tokens": 64, "mm_processor_kwargs": {"max_visual_tokens": 65}}, "max_visual_tokens", "invalid_value"),
])
def test_protocol_refuses_bad_budgets(extra, param, code):
    for parse in (lambda: parse_chat_request(_body(**extra), NAME),
                  lambda: parse_plan_request({"image": "x.png", **extra}, ("llava-uhd",))):
        with pytest.raises(APIError) as e:
            parse()
        assert (e.value.status, e.value.param, e.value.code) == (400, param, code)
        assert "\n" not in str(e.value.to_json()["error"]["message"])


def test_served_chat_budget_sets_the_prompt_tokens(served):  # noqa: F811  (the imported fixture)
    img = picture(*SIZES[0], seed=2)
    url = data_url(img)
    msgs = user("What is it?", url)
    status, plain = chat(served.url, {"model": NAME, "messages": msgs, "max_tokens": 2, "temperature": 0})
    assert status == 200, plain
    full = plan_image("llava-uhd", img.size).num_visual_tokens
    low = plan_image("llava-uhd", img.size, max_visual_tokens=BUDGET).num_visual_tokens
    text_tokens = plain["usage"]["prompt_tokens"] - full
    assert text_tokens > 0 and low < full
    for extra in ({"max_visual_tokens": BUDGET}, {"mm_processor_kwargs": {"max_visual_tokens": BUDGET}}):
        status, out = chat(served.url, {"model": NAME, "messages": msgs, "max_tokens": 2, "temperature": 0, **extra})
        assert status == 200, out
        assert out["usage"]["prompt_tokens"] == text_tokens + low
    # the official client's extra_body sends the same top-level field
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=2, temperature=0,
                                       extra_body={"max_visual_tokens": BUDGET})
    assert r.usage.prompt_tokens == text_tokens + low
    # no plan fits: a 400 naming the budget, before anything is encoded
    status, err = chat(served.url, {"model": NAME, "messages": msgs, "max_tokens": 2, "max_visual_tokens": 100})
    assert_error(status, err, 400, "invalid_value", "max_visual_tokens=100", "144 visual tokens")
    assert err["error"]["param"] == "max_visual_tokens"
    status, err = chat(served.url, {"model": NAME, "messages": msgs, "mm_processor_kwargs": {"max_visual_tokens": 0}})
    assert_error(status, err, 400, "invalid_value", "at least 1")
    assert err["error"]["param"] == "mm_processor_kwargs.max_visual_tokens"


def test_served_plan_budget(served):  # noqa: F811  (the imported fixture)
    img = picture(*SIZES[0], seed=4)
    status, _, data = request(served.url, "POST", "/v1/plan", {"image": data_url(img), "overlay": False,
                                                                 "max_visual_tokens": BUDGET})
    assert status == 200, data
    out = json.loads(data)
    want = plan_image("llava-uhd", img.size, max_visual_tokens=BUDGET)
    assert out["plan"] == want.to_json() and out["plan"]["num_visual_tokens"] == 724
    assert out["cost"]["num_visual_tokens"] == 724
    status, _, data = request(served.url, "POST", "/v1/plan", {"image": data_url(img), "method": "llava-hr",
                                                                 "overlay": False, "max_visual_tokens": 1000})
    assert status == 200 and json.loads(data)["plan"] == plan_image("llava-hr", img.size, max_visual_tokens=1000).to_json()
    status, _, data = request(served.url, "POST", "/v1/plan", {"image": data_url(img), "max_visual_tokens": 100})
    assert_error(status, json.loads(data), 400, "invalid_value", "max_visual_tokens=100")
    status, _, data = request(served.url, "POST", "/v1/plan", {"image": data_url(img), "max_visual_tokens": "many"})
    assert_error(status, json.loads(data), 400, "invalid_type", "max_visual_tokens")
