"""``hires serve``: a real server on a loopback port, a tiny model saved to a temporary directory.

* the official ``openai`` client: plain and streaming completions with an image data URL, models,
  usage, stop strings;
* raw HTTP: every malformed request answered with an OpenAI-shaped 4xx error, while a long
  generation streams undisturbed;
* concurrency: requests are batched into one step loop and greedy outputs equal the one-at-a-time
  outputs (and ``HiresLMM.generate``);
* the web page in headless Chromium (Debian's ``chromium`` driven by Playwright).
"""

from __future__ import annotations

import base64
import functools
import http.client
import io
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
import torch
from PIL import Image, ImageDraw

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from hires_lmm.data.templates import get_template  # noqa: E402
from hires_lmm.methods import build_model  # noqa: E402
from hires_lmm.model import HiresLMM  # noqa: E402
from hires_lmm.serve import ServeConfig  # noqa: E402
from hires_lmm.serve.app import BackgroundServer, create_app  # noqa: E402
from hires_lmm.serve.engine import _stop_holdback  # noqa: E402
from hires_lmm.serve.service import Service  # noqa: E402

NAME = "tiny-uhd"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "out" / "test-artifacts"  # out/ is ignored by git


# --- helpers -------------------------------------------------------------------------------------

def picture(w: int, h: int, seed: int = 0) -> Image.Image:
    img = Image.new("RGB", (w, h), (40 + 20 * seed % 200, 90, 160))
    d = ImageDraw.Draw(img)
    for k in range(6):
        x, y = (k * 37 + seed * 11) % max(1, w - 20), (k * 23 + seed * 7) % max(1, h - 20)
        d.rectangle((x, y, x + w // 5, y + h // 6), fill=((k * 50 + seed * 30) % 256, 200 - 20 * k, 30 * k))
    return img


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(img: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def user(text: str, *images: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


def request(url: str, method: str, path: str, body: bytes | dict | None = None,
            headers: dict | None = None, timeout: float = 60) -> tuple[int, dict, bytes]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    try:
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


def chat(url: str, body: dict, **kw) -> tuple[int, dict]:
    status, _, data = request(url, "POST", "/v1/chat/completions", body, **kw)
    return status, json.loads(data)


def stream_events(url: str, body: dict, on_first=None) -> list:  # noqa: ANN001
    """The parsed ``data:`` events of a streamed completion ("[DONE]" kept as the string)."""
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps({**body, "stream": True}),
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200, r.read()
        assert r.getheader("content-type").startswith("text/event-stream")
        events = []
        for raw in r:
            line = raw.decode().rstrip("\n")
            if not line.startswith("data: "):
                continue
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
            if on_first is not None and len(events) == 2:
                on_first()
        return events
    finally:
        conn.close()


def streamed_text(events: list) -> str:
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if isinstance(e, dict) and e.get("choices"))


def health(url: str) -> dict:
    status, _, data = request(url, "GET", "/health")
    assert status == 200
    return json.loads(data)


def assert_error(status: int, body: dict, want_status: int, code: str | None, *words: str) -> None:
    assert status == want_status, body
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] in ("invalid_request_error", "not_found_error", "permission_error"), err
    if code is not None:
        assert err["code"] == code, err
    for w in words:
        assert w.lower() in err["message"].lower(), (w, err["message"])


# --- fixtures ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("model") / NAME
    build_model("llava-uhd", tiny=True).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ref(model_dir):
    """A second copy of the model, for reference outputs (the server's copy runs on its own thread)."""
    return HiresLMM.from_pretrained(model_dir)


def start_server(model_dir: Path, **config) -> BackgroundServer:
    model = HiresLMM.from_pretrained(model_dir)
    return BackgroundServer(create_app(model, ServeConfig(**{"served_model_name": NAME, **config}))).start()


@pytest.fixture(scope="module")
def served(model_dir, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    picture(120, 90, 3).save(media / "local.png")
    server = start_server(model_dir, allowed_local_media_path=str(media), max_request_bytes=512 * 1024,
                          max_image_pixels=1_000_000, max_images_per_request=2, max_batch=8)
    try:
        yield SimpleNamespace(url=server.url, media=media, server=server)
    finally:
        server.stop()


def greedy(ref: HiresLMM, question: str, images: list, n: int, stop=()) -> str:  # noqa: ANN001
    """What the server answers: ``HiresLMM.generate``'s text, less a trailing U+FFFD (a character
    the cut left incomplete, which the server drops instead of sending; the tiny model's bytes are
    random, so its replies often end inside a multi-byte character)."""
    return ref.generate([question], [images], max_new_tokens=n, template="tokenizer", stop=stop)[0].rstrip("\ufffd")


# --- the OpenAI client ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def client(served):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_and_health(client, served):
    models = client.models.list()
    assert [m.id for m in models.data] == [NAME]
    assert client.models.retrieve(NAME).id == NAME
    h = health(served.url)
    assert h["status"] == "ok" and h["model"] == NAME and h["engine"]["max_batch"] == 8


def test_openai_plain_completion_with_image(client, ref):
    img = picture(200, 150, 1)
    out = client.chat.completions.create(model=NAME, messages=user("What is this?", data_url(img)), max_tokens=12,
                                         temperature=0)
    assert out.object == "chat.completion" and out.model == NAME and len(out.choices) == 1
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == greedy(ref, "<image>\nWhat is this?", [img], 12)
    # usage: prompt = template text tokens + the plan's visual tokens (placeholder replaced)
    text_ids = get_template("tokenizer").prompt(ref.tokenizer, "<image>\nWhat is this?")
    visual = ref.plan(img.size).num_visual_tokens
    assert out.usage.prompt_tokens == len(text_ids) - 1 + visual
    assert visual == 144
    if choice.finish_reason == "length":
        assert out.usage.completion_tokens == 12
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens
    # max_completion_tokens is the newer name of max_tokens
    again = client.chat.completions.create(model=NAME, messages=user("What is this?", data_url(img)),
                                           max_completion_tokens=12, temperature=0)
    assert again.choices[0].message.content == choice.message.content


def test_openai_streaming_with_usage(client, ref):
    img = picture(640, 480, 2)  # big enough for LLaVA-UHD to slice it
    chunks = list(client.chat.completions.create(
        model=NAME, messages=user("Describe the picture.", data_url(img)), max_tokens=20, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == greedy(ref, "<image>\nDescribe the picture.", [img], 20)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    usage = chunks[-1].usage
    visual = ref.plan(img.size).num_visual_tokens
    assert visual > 144  # slices + separators + overview
    text_ids = get_template("tokenizer").prompt(ref.tokenizer, "<image>\nDescribe the picture.")
    assert usage.prompt_tokens == len(text_ids) - 1 + visual
    assert usage.completion_tokens == (20 if finals[0].choices[0].finish_reason == "length" else usage.completion_tokens)
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_ends_with_done(served):
    events = stream_events(served.url, {"model": NAME, "messages": user("hi"), "max_tokens": 5, "temperature": 0})
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert "usage" not in events[0]  # only with stream_options.include_usage


def test_stop_strings(client, ref):
    img = picture(100, 80, 4)
    q = "<image>\nWhat colour?"
    full = greedy(ref, q, [img], 24)
    # a stop string from the middle of the unstopped answer (the tiny model's bytes are random)
    k = next(i for i in range(3, len(full) - 2) if "\ufffd" not in full[i:i + 2] and full[i:i + 2].strip())
    stop = full[k:k + 2]
    want = greedy(ref, q, [img], 24, stop=[stop])
    assert want == full[:full.find(stop)].rstrip("\ufffd")  # the reply never ends in a broken character
    out = client.chat.completions.create(model=NAME, messages=user("What colour?", data_url(img)), max_tokens=24,
                                         temperature=0, stop=stop)
    assert out.choices[0].message.content == want and out.choices[0].finish_reason == "stop"
    out = client.chat.completions.create(model=NAME, messages=user("What colour?", data_url(img)), max_tokens=24,
                                         temperature=0, stop=["never-there", stop])
    assert out.choices[0].message.content == want
    chunks = list(client.chat.completions.create(model=NAME, messages=user("What colour?", data_url(img)),
                                                 max_tokens=24, temperature=0, stop=[stop], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want


def test_stop_holdback():
    assert _stop_holdback("hello wor", ["world"]) == 3
    assert _stop_holdback("hello", ["xyz"]) == 0
    assert _stop_holdback("ab", ["b!", "ab?"]) == 2


def test_sampling_is_seeded(client):
    kw = {"model": NAME, "messages": user("Tell me a story."), "max_tokens": 16, "temperature": 0.9, "top_p": 0.95}
    a = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=1234, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=99, **kw).choices[0].message.content
    assert a == b
    assert a != c


def test_local_media(served, ref):
    img = Image.open(served.media / "local.png").convert("RGB")
    want = greedy(ref, "<image>\nWhat?", [img], 8)
    for url in (str(served.media / "local.png"), (served.media / "local.png").as_uri(), "local.png"):
        status, body = chat(served.url, {"model": NAME, "messages": user("What?", url), "max_tokens": 8,
                                         "temperature": 0})
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == want
    for url in (str(served.media / ".." / "x.png"), "file:///etc/passwd", "../../etc/passwd"):
        status, body = chat(served.url, {"model": NAME, "messages": user("What?", url)})
        assert_error(status, body, 403, "local_media_not_allowed", "outside")


def test_prompt_follows_tokenizer_chat_template(model_dir, ref):
    """System, earlier turns and images in part order, rendered as the tokenizer's chat template does."""
    from hires_lmm.serve.protocol import parse_chat_request

    svc = Service(ref, ServeConfig(served_model_name=NAME))
    assert svc.template.name == "tokenizer"
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}},
                                         {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": "A box."},
            {"role": "user", "content": [{"type": "text", "text": "And this?"},
                                         {"type": "image_url", "image_url": {"url": "data:,"}}]}]
    req = parse_chat_request({"model": NAME, "messages": msgs}, NAME)
    ids = svc.prompt_ids(svc.conversation(req))
    rendered = ref.tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nWhat is it?"},
         {"role": "assistant", "content": "A box."}, {"role": "user", "content": "And this?\n<image>"}],
        tokenize=False, add_generation_prompt=True)
    assert ids == ref.tokenizer(rendered, add_special_tokens=True).input_ids
    # a named template: one user turn gives exactly the template's generation prompt
    vic = Service(ref, ServeConfig(served_model_name=NAME, chat_template="vicuna_v1"))
    req = parse_chat_request({"model": NAME, "messages": user("Why?")}, NAME)
    assert vic.prompt_ids(vic.conversation(req)) == get_template("vicuna_v1").prompt(ref.tokenizer, "Why?")
    with pytest.raises(ValueError, match="special token"):
        Service(ref, ServeConfig(chat_template="llama3"))


# --- malformed requests ----------------------------------------------------------------------------

@functools.cache
def bomb_png() -> bytes:
    """A 20000×20000 PNG (400 megapixels) that compresses to a few dozen kilobytes."""
    return png_bytes(Image.new("1", (20000, 20000), 0))


def bad_requests(served) -> list[tuple[str, bytes | dict, int, str | None, tuple[str, ...]]]:  # noqa: ANN001
    ok_img = data_url(picture(64, 48))
    good = {"model": NAME, "messages": user("hi", ok_img), "max_tokens": 4}
    b64 = lambda b, mime="image/png": f"data:{mime};base64," + base64.b64encode(b).decode()  # noqa: E731
    big = png_bytes(picture(1200, 1000))  # 1.2 MP > the 1 MP limit
    return [
        ("malformed JSON", b'{"model": "tiny-uhd", "messages": [', 400, "invalid_json", ("not valid json",)),
        ("empty body", b"", 400, "invalid_json", ("empty",)),
        ("JSON array", b"[1, 2]", 400, "invalid_json", ("object",)),
        ("NaN", b'{"model": "tiny-uhd", "messages": [], "temperature": NaN}', 400, "invalid_json", ()),
        ("not UTF-8", b'{"model": "\xff\xfe"}', 400, "invalid_json", ()),
        ("missing messages", {"model": NAME}, 400, "missing_required_parameter", ("messages",)),
        ("missing model", {"messages": user("hi")}, 400, "missing_required_parameter", ("model",)),
        ("missing content", {"model": NAME, "messages": [{"role": "user"}]}, 400, "missing_required_parameter",
         ("content",)),
        ("missing url", {"model": NAME, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {}}]}]}, 400, "missing_required_parameter", ("url",)),
        ("unknown model", {**good, "model": "gpt-4o"}, 404, "model_not_found", ("gpt-4o",)),
        ("messages not a list", {"model": NAME, "messages": "hi"}, 400, "invalid_type", ("messages",)),
        ("empty messages", {"model": NAME, "messages": []}, 400, "invalid_value", ("empty",)),
        ("max_tokens a string", {**good, "max_tokens": "10"}, 400, "invalid_type", ("max_tokens", "integer")),
        ("max_tokens zero", {**good, "max_tokens": 0}, 400, "invalid_value", ("max_tokens",)),
        ("temperature a string", {**good, "temperature": "hot"}, 400, "invalid_type", ("temperature",)),
        ("temperature too high", {**good, "temperature": 3}, 400, "invalid_value", ("temperature",)),
        ("top_p zero", {**good, "top_p": 0}, 400, "invalid_value", ("top_p",)),
        ("stream not a bool", {**good, "stream": "yes"}, 400, "invalid_type", ("stream",)),
        ("stop a number", {**good, "stop": 5}, 400, "invalid_type", ("stop",)),
        ("seed a float", {**good, "seed": 1.5}, 400, "invalid_type", ("seed",)),
        ("n = 2", {**good, "n": 2}, 400, "invalid_value", ("'n'",)),
        ("stream_options without stream", {**good, "stream_options": {"include_usage": True}}, 400, "invalid_value",
         ("stream_options",)),
        ("unknown role", {"model": NAME, "messages": [{"role": "robot", "content": "hi"}]}, 400, "invalid_value",
         ("robot",)),
        ("content a number", {"model": NAME, "messages": [{"role": "user", "content": 5}]}, 400, "invalid_type",
         ("content",)),
        ("url a number", {"model": NAME, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": 123}}]}]}, 400, "invalid_type", ("url",)),
        ("unknown part type", {"model": NAME, "messages": [{"role": "user", "content": [
            {"type": "audio", "audio": "x"}]}]}, 400, "invalid_value", ("audio",)),
        ("placeholder in text", {"model": NAME, "messages": user("look: <image>")}, 400, "invalid_value",
         ("<image>",)),
        ("ends with assistant", {"model": NAME, "messages": user("hi") + [{"role": "assistant", "content": "yo"}]},
         400, "invalid_value", ("last message",)),
        ("bad base64", {"model": NAME, "messages": user("hi", "data:image/png;base64,@@@not-base64@@@")}, 400,
         "invalid_image", ("base64",)),
        ("not an image", {"model": NAME, "messages": user("hi", b64(b"hello, I am text, not a picture"))}, 400,
         "invalid_image", ("not a recognised image",)),
        ("truncated image", {"model": NAME, "messages": user("hi", b64(png_bytes(picture(64, 48))[:120]))}, 400,
         "invalid_image", ()),
        ("text media type", {"model": NAME, "messages": user("hi", b64(b"abc", "text/plain"))}, 400, "invalid_image",
         ("text/plain",)),
        ("remote URL", {"model": NAME, "messages": user("hi", "https://example.com/cat.png")}, 400,
         "remote_media_not_supported", ("remote", "data url")),
        ("too many pixels", {"model": NAME, "messages": user("hi", b64(big))}, 400,
         "image_too_large", ("1200x1000", "limit")),
        ("decompression bomb", {"model": NAME, "messages": user("hi", b64(bomb_png()))}, 400, "image_too_large",
         ("20000x20000",)),
        ("too many images", {"model": NAME, "messages": user("hi", ok_img, ok_img, ok_img)}, 400, "too_many_images",
         ("3 images", "at most 2")),
        ("prompt too long", {"model": NAME, "messages": user("x" * 9000)}, 400, "context_length_exceeded",
         ("8192",)),
        ("visual tokens make it too long", {"model": NAME, "messages": user("x" * 8000, ok_img)}, 400,
         "context_length_exceeded", ("144 visual",)),
        ("max_tokens past the context", {**good, "max_tokens": 8100}, 400, "context_length_exceeded",
         ("max_tokens",)),
        ("body too large", {"model": NAME, "messages": user("x" * 600_000)}, 413, "request_too_large",
         ("limit", "0.5 MB", "--max-request-mb")),
        ("response_format json", {**good, "response_format": {"type": "json_object"}}, 400, "unsupported_parameter",
         ("response_format", "json_object")),
        ("NUL in an image path", {"model": NAME, "messages": user("hi", "a\x00.png")}, 400, "invalid_image_url",
         ("NUL byte",)),
        ("6000-character image path", {"model": NAME, "messages": user("hi", "a" * 6000 + ".png")}, 400,
         "invalid_image_url", ("too long",)),
    ]


def test_malformed_requests(served):
    for name, body, status, code, words in bad_requests(served):
        t0 = time.monotonic()
        got, _, data = request(served.url, "POST", "/v1/chat/completions", body)
        assert_error(got, json.loads(data), status, code, *words)
        assert time.monotonic() - t0 < 10, name  # the bomb is refused from its header
    assert health(served.url)["status"] == "ok"


def test_body_limit_without_content_length(served):
    def chunks():
        yield b'{"model": "tiny-uhd", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"x" * 16384
        yield b'"}]}'

    # an iterable body without a length: http.client sends it with chunked transfer encoding
    status, _, data = request(served.url, "POST", "/v1/chat/completions", chunks())
    assert_error(status, json.loads(data), 413, "request_too_large")


def test_routes_answer_openai_errors(served):
    status, _, data = request(served.url, "GET", "/v1/nope")
    assert status == 404 and json.loads(data)["error"]["message"]
    status, _, data = request(served.url, "GET", "/v1/chat/completions")
    assert status == 405 and json.loads(data)["error"]["message"]
    status, _, data = request(served.url, "GET", "/v1/models/other")
    assert_error(status, json.loads(data), 404, "model_not_found")


def test_bad_requests_do_not_disturb_a_stream(served, ref):
    """Every malformed request, sent while a long generation streams, is refused; the stream finishes
    intact, and the server stays responsive."""
    img = picture(160, 120, 5)
    n = 480
    first = threading.Event()
    result: dict = {}

    def run() -> None:
        result["events"] = stream_events(served.url, {"model": NAME, "messages": user("Go on.", data_url(img)),
                                                      "max_tokens": n, "temperature": 0,
                                                      "stream_options": {"include_usage": True}},
                                         on_first=first.set)

    t = threading.Thread(target=run)
    t.start()
    assert first.wait(60)
    latencies = []
    for _name, body, status, code, words in bad_requests(served):
        got, _, data = request(served.url, "POST", "/v1/chat/completions", body)
        assert_error(got, json.loads(data), status, code, *words)
        t0 = time.monotonic()
        assert health(served.url)["engine"]["running"] >= 0
        latencies.append(time.monotonic() - t0)
    still_running = health(served.url)["engine"]["running"]
    t.join(120)
    events = result["events"]
    assert still_running == 1, "the stream should still have been running while the bad requests were refused"
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == n
    assert streamed_text(events) == greedy(ref, "<image>\nGo on.", [img], n)
    assert max(latencies) < 2.0  # the event loop stays responsive while the model works


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_cancels_generation(served, stream):
    u = urlsplit(served.url)
    before = health(served.url)["engine"]["requests_cancelled"]
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(
        {"model": NAME, "messages": user("hi"), "max_tokens": 5000, "stream": stream}),
        headers={"Content-Type": "application/json"})
    if stream:
        r = conn.getresponse()
        assert r.status == 200
        r.readline()
    else:
        deadline = time.monotonic() + 30
        while health(served.url)["engine"]["running"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
    conn.sock.close()
    conn.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        e = health(served.url)["engine"]
        if e["running"] == 0 and e["requests_cancelled"] > before:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the generation went on after the client left: {e}")


def test_model_failures_are_contained(model_dir):
    """A failing prefill fails only its request (500); a failing decode step ends the running stream
    with an error event; the server goes on serving."""
    server = start_server(model_dir)
    try:
        engine = server.app.state.server.engine
        real_build, real_llm = engine.model.build_inputs, engine._llm
        calls = {"build": 0, "decode": 0}

        def flaky_build(*a, **kw):  # noqa: ANN002, ANN003, ANN202
            calls["build"] += 1
            if calls["build"] == 1:
                raise RuntimeError("injected prefill failure")
            return real_build(*a, **kw)

        def flaky_llm(**kw):  # noqa: ANN003, ANN202
            if "input_ids" in kw:
                calls["decode"] += 1
                if calls["decode"] == 3:
                    raise RuntimeError("injected decode failure")
            return real_llm(**kw)

        engine.model.build_inputs, engine._llm = flaky_build, flaky_llm
        body = {"model": NAME, "messages": user("hi"), "max_tokens": 6, "temperature": 0}
        status, out = chat(server.url, body)
        assert status == 500 and out["error"]["type"] == "server_error" and "injected" in out["error"]["message"]
        events = stream_events(server.url, body)
        assert events[-1] == "[DONE]"
        assert any(isinstance(e, dict) and "error" in e and "injected decode" in e["error"]["message"] for e in events)
        status, out = chat(server.url, body)
        assert status == 200 and out["usage"]["completion_tokens"] == 6
        assert health(server.url)["engine"]["requests_failed"] == 2
    finally:
        server.stop()


# --- the plan endpoint -------------------------------------------------------------------------------

def test_plan_endpoint(served, ref):
    img = picture(800, 600, 6)
    status, _, data = request(served.url, "POST", "/v1/plan", {"image": data_url(img)})
    assert status == 200
    out = json.loads(data)
    assert out["plan"] == ref.plan(img.size).to_json()
    assert out["method"] == "llava-uhd" and len(out["plan"]["views"]) > 1
    assert out["overlay"].startswith("data:image/png;base64,")
    pic = Image.open(io.BytesIO(base64.b64decode(out["overlay"].split(",", 1)[1])))
    assert pic.size == tuple(out["overlay_size"])
    status, headers, png = request(served.url, "POST", "/v1/plan?format=png", {"image": data_url(img), "method": "llava-next"})
    assert status == 200 and headers["content-type"] == "image/png" and png.startswith(b"\x89PNG")
    status, _, data = request(served.url, "POST", "/v1/plan", {"image": data_url(img), "method": "nope"})
    assert_error(status, json.loads(data), 400, "invalid_value", "unknown method")
    status, _, data = request(served.url, "POST", "/v1/plan", {"image": "data:image/png;base64,!!"})
    assert_error(status, json.loads(data), 400, "invalid_image")


# --- concurrency -------------------------------------------------------------------------------------

def test_concurrent_requests_are_batched_and_match_one_at_a_time(model_dir, ref):
    server = start_server(model_dir, max_batch=8)
    try:
        sizes = [(64, 48), (300, 200), (120, 400), (700, 500), (90, 90), (500, 260), (48, 300), (260, 260)]
        cases = [(f"Question {i}: what is in picture {i}?" + " more" * i, picture(w, h, i), 10 + 2 * i)
                 for i, (w, h) in enumerate(sizes)]

        def ask(case) -> tuple[str, dict]:  # noqa: ANN001
            q, img, n = case
            status, body = chat(server.url, {"model": NAME, "messages": user(q, data_url(img)), "max_tokens": n,
                                             "temperature": 0})
            assert status == 200, body
            return body["choices"][0]["message"]["content"], body["usage"]

        alone = [ask(c) for c in cases]
        assert health(server.url)["engine"]["max_batch_size_seen"] == 1
        with ThreadPoolExecutor(len(cases)) as pool:
            together = list(pool.map(ask, cases))
        engine = health(server.url)["engine"]
        assert engine["max_batch_size_seen"] > 1, engine
        assert engine["running"] == 0 and engine["waiting"] == 0
        assert [t for t, _ in together] == [t for t, _ in alone]
        assert [u for _, u in together] == [u for _, u in alone]
        # and both are what HiresLMM.generate answers
        for (q, img, n), (text, _) in zip(cases, alone):
            assert text == greedy(ref, "<image>\n" + q, [img], n)
        # seeded sampling does not depend on what else is in the batch
        sample = {"model": NAME, "messages": user("Sample."), "max_tokens": 12, "temperature": 1.0, "seed": 7}
        solo = chat(server.url, sample)[1]["choices"][0]["message"]["content"]
        with ThreadPoolExecutor(6) as pool:
            futs = [pool.submit(ask, c) for c in cases[:5]] + [pool.submit(chat, server.url, sample)]
            batched = futs[-1].result()[1]["choices"][0]["message"]["content"]
        assert batched == solo
    finally:
        server.stop()


# --- the command line --------------------------------------------------------------------------------

def serve_parser():  # noqa: ANN201
    """A parser with only the ``serve`` subcommand (what ``hires`` adds through ``register``)."""
    import argparse

    from hires_lmm.serve.cli import register

    ap = argparse.ArgumentParser(prog="hires")
    register(ap.add_subparsers(dest="command", required=True))
    return ap


def test_cli_registers_serve(tmp_path):
    from hires_lmm.cli import EXTENSIONS, CLIError

    assert "hires_lmm.serve.cli" in EXTENSIONS
    args = serve_parser().parse_args(["serve", "--model", str(tmp_path), "--max-batch", "4", "--port", "0"])
    assert args.func.__name__ == "cmd_serve" and args.max_batch == 4 and args.host == "127.0.0.1"
    with pytest.raises(CLIError, match="no config.json"):
        args.func(args)
    args = serve_parser().parse_args(["serve", "--model", str(tmp_path), "--max-batch", "0"])
    with pytest.raises(CLIError, match="--max-batch"):
        args.func(args)


def test_hires_serve_command(model_dir):
    """``hires serve`` as a process: it starts, answers, and stops on SIGINT."""
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # what `hires serve ...` runs (the serve subcommand alone, so that this test does not depend on
    # the other extension modules of the command line)
    launcher = ("import argparse, sys\n"
                "from hires_lmm.serve.cli import register\n"
                "ap = argparse.ArgumentParser(prog='hires')\n"
                "register(ap.add_subparsers(dest='command', required=True))\n"
                "args = ap.parse_args(sys.argv[1:])\n"
                "sys.exit(args.func(args))\n")
    proc = subprocess.Popen([sys.executable, "-c", launcher, "serve", "--model", str(model_dir), "--port",
                             str(port), "--max-batch", "4", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if health(url)["status"] == "ok":
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "hires serve did not come up"
            time.sleep(0.2)
        status, body = chat(url, {"model": model_dir.name, "messages": user("hi"), "max_tokens": 3})
        assert status == 200 and body["usage"]["completion_tokens"] <= 3
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert f"serving '{model_dir.name}'" in out


# --- the web page ------------------------------------------------------------------------------------

def test_web_page_in_chromium(served, ref, tmp_path):
    """The page: the served method's plan drawn once over the image; every method's plan overlay
    side by side with the visual tokens and TFLOPs of the plan and the cost model; a two-turn chat
    whose second request carries the first turn and its answer."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    from hires_lmm.plan import METHODS, plan_image
    from hires_lmm.plan.cost import plan_cost

    photo = tmp_path / "photo.png"
    picture(800, 600, 7).save(photo)
    img = Image.open(photo).convert("RGB")
    plan = ref.plan(img.size)
    want = greedy(ref, "<image>\nWhat is in the image?", [img], 24)
    all_done = "[...document.querySelectorAll('#compare .card')].every((c) => c.dataset.state === 'done')"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            sent: list[dict] = []
            page.on("request", lambda r: sent.append(r.post_data_json) if r.url.endswith("/v1/chat/completions") else None)
            page.goto(served.url + "/")
            page.wait_for_function(f"document.getElementById('model').textContent.includes('{NAME}')")
            page.set_input_files("#file", str(photo))
            page.wait_for_function("document.getElementById('plan-summary').textContent.includes('visual tokens')")
            assert page.locator("#boxes rect").count() == sum(v.box is not None for v in plan.views)
            assert f"{plan.num_visual_tokens} visual tokens" in page.inner_text("#plan-summary")
            # the image is shown once (the overlay pictures are the comparison's)
            assert page.locator("main > section:first-child img").count() == 1
            # the comparison: every method's overlay, visual tokens and TFLOPs
            page.wait_for_function(all_done, timeout=120_000)
            assert page.locator("#compare .card").count() == len(METHODS)
            for m in METHODS:
                mp = plan_image(m, img.size, **(ref.config.plan_options if m == ref.config.method else {}))
                card = page.locator(f"#compare .card[data-method='{m}']")
                assert card.get_attribute("data-tokens") == str(mp.num_visual_tokens), m
                assert card.locator(".tflops").inner_text() == f"{plan_cost(mp).total_flops / 1e12:.2f}", m
                assert card.locator("img").get_attribute("src").startswith("data:image/png;base64,"), m
                assert ("served" in card.get_attribute("class")) == (m == ref.config.method)
            # the chat: a first turn, streamed ...
            page.fill("#question", "What is in the image?")
            page.fill("#max-tokens", "24")
            page.click("#ask")
            page.wait_for_function("document.getElementById('status').dataset.state === 'done'", timeout=60_000)
            assert page.evaluate("window.lastAnswer") == want
            assert int(page.get_attribute("#status", "data-chunks")) >= 2  # it arrived in pieces
            assert "prompt tokens" in page.inner_text("#status")
            # ... and a second, sent with the first turn and its answer
            page.fill("#question", "And what else?")
            page.click("#ask")
            page.wait_for_function("document.getElementById('status').dataset.state === 'done' && "
                                   "document.querySelectorAll('#chat .msg.assistant').length === 2", timeout=60_000)
            assert len(sent) == 2
            msgs = sent[1]["messages"]
            assert [m["role"] for m in msgs] == ["user", "assistant", "user"]
            assert msgs[0]["content"][0]["type"] == "image_url" and msgs[1]["content"] == want
            assert msgs[2]["content"] == [{"type": "text", "text": "And what else?"}]  # the image went once
            body = {k: v for k, v in sent[1].items() if k not in ("stream", "stream_options")}
            status, reply = chat(served.url, body)
            assert status == 200
            assert page.evaluate("window.lastAnswer") == reply["choices"][0]["message"]["content"]
            assert page.locator("#chat .msg.user").count() == 2 and page.locator("#chat .msg .thumb").count() == 1
            assert page.locator("#chat .msg.assistant").nth(0).inner_text() == want
            shot = tmp_path / "serve-page.png"
            page.screenshot(path=str(shot), full_page=True)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, ARTIFACTS / "serve-page.png")
            page.click("#new-chat")
            assert page.locator("#chat .msg").count() == 0
            # dropping a file works as well as picking one; the comparison follows the new image
            small = base64.b64encode(png_bytes(picture(300, 200, 8))).decode()
            page.evaluate("""(b64) => {
                const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
                const dt = new DataTransfer();
                dt.items.add(new File([bytes], "drop.png", { type: "image/png" }));
                document.getElementById("drop").dispatchEvent(new DragEvent("drop", { dataTransfer: dt, bubbles: true }));
            }""", small)
            page.wait_for_function("document.getElementById('plan-summary').textContent.includes('300×200')")
            page.wait_for_function(all_done, timeout=120_000)
            nxt = page.locator("#compare .card[data-method='llava-next']").get_attribute("data-tokens")
            assert nxt == str(plan_image("llava-next", (300, 200)).num_visual_tokens)
            assert not errors, errors
        finally:
            browser.close()


def test_fast_decode_renders_close_to_exact_and_refuses_bad_images(ref):
    """--fast-decode: a large JPEG is planned from its header and decoded reduced; the views keep the
    exact path's plan and sizes and differ by a few grey levels; a truncated file is still a 400."""
    from hires_lmm.serve.errors import APIError
    from hires_lmm.serve.protocol import parse_chat_request

    buf = io.BytesIO()
    picture(5000, 3750, 5).save(buf, format="JPEG", quality=90)  # reduced 2x: 2500 px >= 2 x the 1008-px canvas
    url = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()
    req = parse_chat_request({"model": NAME, "messages": user("What?", url)}, NAME)
    exact = Service(ref, ServeConfig(served_model_name=NAME)).prepare_chat(req).images[0]
    fast = Service(ref, ServeConfig(served_model_name=NAME, fast_decode=True)).prepare_chat(req).images[0]
    assert fast.plan == exact.plan
    assert [v.shape for v in fast.views] == [v.shape for v in exact.views]
    diff = torch.cat([(a - b).abs().flatten() for a, b in zip(fast.views, exact.views)])
    assert 0 < float(diff.max()) < 0.3 and float(diff.mean()) < 0.01
    cut = "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()[:2000]).decode()
    bad = parse_chat_request({"model": NAME, "messages": user("What?", cut)}, NAME)
    with pytest.raises(APIError) as e:
        Service(ref, ServeConfig(served_model_name=NAME, fast_decode=True)).prepare_chat(bad)
    assert e.value.status == 400 and e.value.code == "invalid_image"
