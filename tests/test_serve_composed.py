"""``hires serve`` of a composed method (docs/adding-a-method.md): the visual-token count the server
announces before encoding (``prompt_tokens_est``, ``/v1/plan``) and the images it prepares are the
model's own plan (``config.method_spec``), so the count equals what the forward splices, with and
without a per-request budget (``max_visual_tokens`` / ``mm_processor_kwargs``).

The two composed methods: LLaVA-NeXT's tiles through UHD's spatial resampler (the planner alone
over-counts it ~4x, and its budget would refuse images the composed count fits), and LLaVA-UHD with
SliME's text-guided selector kept whole (``selector_p: 1.0``, so its announced bound is exact).
"""

from __future__ import annotations

import base64
import io
import json

import pytest
import torch
from PIL import Image

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from hires_lmm.methods import build_model  # noqa: E402
from hires_lmm.model import HiresLMM  # noqa: E402
from hires_lmm.parts import spec_from_config  # noqa: E402
from hires_lmm.plan import plan_image  # noqa: E402
from hires_lmm.plan.budget import BudgetError  # noqa: E402
from hires_lmm.serve import ServeConfig  # noqa: E402
from hires_lmm.serve.app import BackgroundServer, create_app  # noqa: E402
from hires_lmm.serve.errors import APIError  # noqa: E402
from hires_lmm.serve.protocol import parse_chat_request, parse_plan_request  # noqa: E402
from hires_lmm.serve.service import Service  # noqa: E402

NAME = "tiny-composed"
COMPOSED = {"next-uhd": {"base": "llava-next", "compressor": "uhd-spatial"},
            "uhd-select": {"base": "llava-uhd", "selector": "text-guided", "selector_options": {"selector_p": 1.0}}}
SIZES = [(336, 336), (1000, 700), (300, 1200)]


def jpeg_url(size: tuple[int, int], seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    w, h = size
    small = (torch.rand(h // 8 + 1, w // 8 + 1, 3, generator=g) * 255).to(torch.uint8).numpy()
    img = Image.fromarray(small).resize(size, Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def body(url: str, budget: int | None = None, how: str = "top") -> dict:
    out = {"model": NAME, "max_tokens": 1,
           "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                    {"type": "text", "text": "What is small?"}]}]}
    if budget is not None:
        out.update({"max_visual_tokens": budget} if how == "top" else {"mm_processor_kwargs": {"max_visual_tokens": budget}})
    return out


@pytest.fixture(scope="module")
def composed(tmp_path_factory) -> dict[str, tuple[HiresLMM, object]]:
    """Each composed method tiny, saved and loaded back (as ``hires serve`` loads it), with its dir."""
    out = {}
    for name, spec in COMPOSED.items():
        d = tmp_path_factory.mktemp(name) / name
        build_model(spec, tiny=True, seed=0).save_pretrained(d)
        out[name] = (HiresLMM.from_pretrained(d), d)
    return out


def spliced(model: HiresLMM, gen) -> tuple[list[int], int]:  # noqa: ANN001 - a GenRequest
    """The visual tokens the forward splices for a prepared request, and its prompt length."""
    with torch.no_grad():
        batch = model.build_inputs([torch.tensor(gen.input_ids)], [gen.images], padding_side="left")
    return list(batch.num_visual_tokens), int(batch.attention_mask.sum())


def budgets(model: HiresLMM, size: tuple[int, int]) -> list[int | None]:
    full = model.plan(size).num_visual_tokens
    return [None, full, full - 1]


@pytest.mark.parametrize("fast", [False, True], ids=["exact", "fast-decode"])
@pytest.mark.parametrize("name", COMPOSED)
def test_announced_count_is_the_spliced_count(composed, name, fast):
    model, _ = composed[name]
    spec = spec_from_config(model.config)
    svc = Service(model, ServeConfig(served_model_name=NAME, fast_decode=fast))
    refused = 0
    for k, size in enumerate(SIZES):
        url = jpeg_url(size, k)
        for budget in budgets(model, size):
            for how in ("top", "mm") if budget is not None else ("top",):
                req = parse_chat_request(body(url, budget, how), NAME)
                try:
                    want = spec.plan(size, **({} if budget is None else {"max_visual_tokens": budget}))
                except BudgetError:  # below the smallest configuration: a 400 naming the request's budget
                    with pytest.raises(APIError) as e:
                        svc.prepare_chat(req)
                    assert e.value.status == 400 and e.value.param == req.budget_param
                    refused += 1
                    continue
                gen = svc.prepare_chat(req)
                assert [im.plan.num_visual_tokens for im in gen.images] == [want.num_visual_tokens]
                assert gen.images[0].plan.views == want.views  # the views the composed budget chose
                n, prompt = spliced(model, gen)
                assert n == [want.num_visual_tokens], (name, size, budget, fast)
                assert prompt == gen.prompt_tokens_est, (name, size, budget, fast)
                if budget is not None:
                    assert n[0] <= budget
                # /v1/plan answers the same plan (and its cost by the parts)
                plan = svc.prepare_plan(parse_plan_request(
                    {"image": url, "overlay": False, **({} if budget is None else {"max_visual_tokens": budget})},
                    (model.config.method, "llava-1.5")), with_cost=True)
                assert plan["plan"]["num_visual_tokens"] == n[0] and plan["plan"] == want.to_json()
                assert plan["cost"]["num_visual_tokens"] == n[0]
    assert refused  # the smallest image's smallest plan: every budget below it is refused


def test_next_uhd_budget_the_planner_alone_refuses(composed):
    """A budget between the composed count and the planner's: served within it (the planner alone
    would refuse the image, or render other views than the model counts)."""
    model, _ = composed["next-uhd"]
    svc = Service(model, ServeConfig(served_model_name=NAME))
    size, budget = (1000, 700), 600
    with pytest.raises(BudgetError):
        plan_image("llava-next", size, max_visual_tokens=budget)
    assert plan_image("llava-next", size).num_visual_tokens > 4 * model.plan(size).num_visual_tokens - 100
    gen = svc.prepare_chat(parse_chat_request(body(jpeg_url(size, 7), budget), NAME))
    n, prompt = spliced(model, gen)
    assert n == [gen.images[0].plan.num_visual_tokens] == [model.plan(size, max_visual_tokens=budget).num_visual_tokens]
    assert n[0] <= budget and prompt == gen.prompt_tokens_est


def test_plan_of_other_methods_is_the_planners(composed):
    """``/v1/plan`` of another method than the model's is the planner's plan with its defaults; the
    model's method (asked by name or not) is the model's composed plan."""
    model, _ = composed["next-uhd"]
    svc = Service(model, ServeConfig(served_model_name=NAME))
    url, size = jpeg_url((1000, 700), 3), (1000, 700)
    methods = ("llava-next", "llava-1.5")
    other = svc.prepare_plan(parse_plan_request({"image": url, "method": "llava-1.5", "overlay": False}, methods))
    assert other["plan"] == plan_image("llava-1.5", size).to_json()
    named = svc.prepare_plan(parse_plan_request({"image": url, "method": "llava-next", "overlay": False}, methods))
    assert named["plan"] == model.plan(size).to_json() and named["model_method"] == "llava-next"
    assert svc.model_card()["method_spec"]["compressor"] == "uhd-spatial"


@pytest.mark.parametrize("name", COMPOSED)
def test_served_counts_over_http(composed, name):
    """Through a real server: usage.prompt_tokens is the announced count (text + the model's plan),
    the forward splices ``/v1/plan``'s count, with and without a budget (both request forms)."""
    from test_serve import request

    model, d = composed[name]
    served_model = HiresLMM.from_pretrained(d)
    seen: list[list[int]] = []
    build = served_model.build_inputs

    def spy(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        batch = build(*a, **kw)
        seen.append(list(batch.num_visual_tokens))
        return batch

    served_model.build_inputs = spy  # type: ignore[method-assign]
    ref = Service(model, ServeConfig(served_model_name=NAME))
    server = BackgroundServer(create_app(served_model, ServeConfig(served_model_name=NAME))).start()
    try:
        size = (1000, 700)
        url = jpeg_url(size, 5)
        full = model.plan(size).num_visual_tokens
        for budget, how in ((None, "top"), (full - 1, "top"), (full - 1, "mm")):
            b = body(url, budget, how)
            status, _, data = request(server.url, "POST", "/v1/chat/completions", b)
            assert status == 200, data
            usage = json.loads(data)["usage"]
            plan_body = {"image": url, "overlay": False, **({} if budget is None else {"max_visual_tokens": budget})}
            status, _, pdata = request(server.url, "POST", "/v1/plan", plan_body)
            assert status == 200, pdata
            count = json.loads(pdata)["plan"]["num_visual_tokens"]
            assert seen[-1] == [count] == [model.plan(size, **({} if budget is None else {"max_visual_tokens": budget})).num_visual_tokens]
            assert usage["prompt_tokens"] == ref.prepare_chat(parse_chat_request(b, NAME)).prompt_tokens_est
            if budget is not None:
                assert count <= budget < full
    finally:
        server.stop()
