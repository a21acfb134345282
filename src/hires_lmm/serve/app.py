"""The HTTP side (Starlette on uvicorn): OpenAI's chat-completions API, the plan endpoint, the page.

Endpoints:

* ``POST /v1/chat/completions``: OpenAI's request and response shapes, ``stream`` as server-sent
  ``chat.completion.chunk`` events ending with ``data: [DONE]``.
* ``GET /v1/models``, ``GET /v1/models/{id}``: the one served model.
* ``POST /v1/plan``: ``{"image": data URL, "method"?, "overlay"?, "max_visual_tokens"?}`` → the plan JSON, its cost
  (``hires cost``'s JSON: visual tokens and TFLOPs per image with full-size encoders and a 7B LLM,
  for the page's comparison) and the overlay picture (a PNG data URL); ``?format=png`` answers
  the PNG itself. ``max_visual_tokens`` (also as ``mm_processor_kwargs.max_visual_tokens``) plans
  within that budget, as it does for a chat request.
* ``GET /health``: ``{"status": "ok", ...}`` with the engine's counters (running, waiting,
  ``max_batch_size_seen``, ...).
* ``GET /``: the web page (:mod:`.page`: the plan, every method's plan and cost side by side, a chat).

The event loop only moves bytes: bodies are parsed and images decoded, planned and rendered on a
small thread pool, and the model runs on the engine's own thread (:mod:`.engine`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import functools
import json
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..model import HiresLMM
from ..plan import METHODS
from .config import MiB
from .engine import Engine, GenRequest
from .errors import APIError
from .page import render_page
from .protocol import parse_chat_request, parse_json_body, parse_plan_request
from .service import ServeConfig, Service

log = logging.getLogger("hires_lmm.serve")


def _error(e: APIError) -> JSONResponse:
    return JSONResponse(e.to_json(), status_code=e.status)


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    # name the flag an operator actually has (--max-request-mb), in its unit
    too_large = APIError(413, f"the request body exceeds the limit of {limit / MiB:g} MB ({limit:,} bytes; "
                              "raise it with --max-request-mb); send smaller images", code="request_too_large")
    cl = request.headers.get("content-length")
    if cl is not None:
        try:
            if int(cl) > limit:
                raise too_large
        except ValueError:
            raise APIError(400, "invalid Content-Length header", code="invalid_request") from None
    chunks, n = [], 0
    try:
        async for chunk in request.stream():
            n += len(chunk)
            if n > limit:
                raise too_large
            chunks.append(chunk)
    except ClientDisconnect:
        raise APIError(400, "the client disconnected while sending the request", code="client_disconnected") from None
    return b"".join(chunks)


#: allocations at least this large always get their own mapping (see :func:`limit_heap_retention`)
MMAP_THRESHOLD_BYTES = 4 * MiB
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


@functools.cache
def limit_heap_retention() -> bool:
    """Pin glibc's mmap threshold at :data:`MMAP_THRESHOLD_BYTES`, so that the memory of a large
    request goes back to the system when the request is done. True when set (glibc), else False.

    Why: a large body (a 20 MB prompt, big images) is read, parsed and joined into strings of tens
    of megabytes on the preparation threads. When such a block is freed, glibc raises its mmap
    threshold to the block's size (the "dynamic mmap threshold") and its trim threshold to twice
    that, so the next ones come from the thread's heap arena, whose top is never returned
    (``malloc_trim`` does not trim the top of a thread's arena either). Measured with ``hires serve``
    and the tiny model: RSS grew 433 -> 483 MB over 2.5 / 5 / 20 / 20 / 5 MB prompts and stayed there;
    with the threshold pinned it stays at 433 MB. Blocks under 4 MiB (the model's per-step tensors,
    small requests) keep glibc's fast heap allocation. Process-wide, so called by ``hires serve``.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded into this process
    except (OSError, AttributeError):  # not glibc (macOS, Windows)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))


class Server:
    """The application state: the service (model, settings), the engine and the preparation pool."""

    def __init__(self, model: HiresLMM, config: ServeConfig) -> None:
        self.service = Service(model, config)
        self.config = config
        self.engine = Engine(model, stop_token_ids=self.service.stop_token_ids, max_batch=config.max_batch,
                             max_prefill_tokens=config.max_prefill_tokens, batch_wait_s=config.batch_wait_ms / 1000,
                             max_waiting=config.max_waiting)  # the engine's tokenizer is its own (see Service)
        self.pool: ThreadPoolExecutor | None = None
        self.started = time.time()
        self.page_html = render_page(METHODS)

    async def run(self, fn: Any, *args: Any) -> Any:
        assert self.pool is not None
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def json_body(self, request: Request) -> dict[str, Any]:
        body = await _read_body(request, self.config.max_request_bytes)
        if len(body) > 256 * 1024:  # a large body (images): parse it off the event loop
            return await self.run(parse_json_body, body)
        return parse_json_body(body)

    # --- routes -------------------------------------------------------------------------------------
    async def page(self, request: Request) -> Response:
        return HTMLResponse(self.page_html)

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.config.served_model_name,
                             "uptime_s": round(time.time() - self.started, 3), "engine": self.engine.snapshot()})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self.service.model_card()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name != self.config.served_model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.config.served_model_name!r}", type="not_found_error", param="model",
                           code="model_not_found")
        return JSONResponse(self.service.model_card())

    async def plan(self, request: Request) -> Response:
        data = await self.json_body(request)
        req = parse_plan_request(data, METHODS)
        if request.query_params.get("format") == "png":
            req.overlay = True
            out = await self.run(self.service.prepare_plan, req)
            png = base64.b64decode(out["overlay"].split(",", 1)[1])
            return Response(png, media_type="image/png")
        return JSONResponse(await self.run(self._plan_with_cost, req))

    def _plan_with_cost(self, req: Any) -> dict[str, Any]:
        """The plan answer plus the plan's cost (the page compares methods by it)."""
        return self.service.prepare_plan(req, with_cost=True)  # the cost of the plan it answers

    async def chat(self, request: Request) -> Response:
        data = await self.json_body(request)
        req = parse_chat_request(data, self.config.served_model_name)
        gen: GenRequest = await self.run(self.service.prepare_chat, req)
        gen.bind(asyncio.get_running_loop())
        self.engine.submit(gen)
        created = int(time.time())
        if req.stream:
            return StreamingResponse(self._stream(gen, created, req.include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await self._complete(request, gen, created)

    async def _complete(self, request: Request, gen: GenRequest, created: int) -> Response:
        async def collect() -> dict[str, Any]:
            async for kind, payload in gen.events():
                if kind == "error":
                    raise payload
                if kind == "done":
                    return payload
            raise APIError(500, "the generation ended without a result", type="server_error")

        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        task = asyncio.ensure_future(collect())
        watch = asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
        if not task.done():  # the client went away: stop generating for it
            gen.cancel()
            task.cancel()
            return Response(status_code=499)
        done = task.result()
        return JSONResponse({
            "id": gen.id, "object": "chat.completion", "created": created, "model": self.config.served_model_name,
            "system_fingerprint": None,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": done["text"], "refusal": None},
                         "logprobs": None, "finish_reason": done["finish_reason"]}],
            "usage": _usage(done),
        })

    async def _stream(self, gen: GenRequest, created: int, include_usage: bool):  # noqa: ANN201
        name = self.config.served_model_name

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            obj: dict[str, Any] = {"id": gen.id, "object": "chat.completion.chunk", "created": created, "model": name,
                                   "system_fingerprint": None,
                                   "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if include_usage:
                obj["usage"] = None
            return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            async for kind, payload in gen.events():
                if kind == "delta":
                    yield chunk({"content": payload})
                elif kind == "done":
                    yield chunk({}, payload["finish_reason"])
                    if include_usage:
                        yield "data: " + json.dumps({"id": gen.id, "object": "chat.completion.chunk", "created": created,
                                                     "model": name, "system_fingerprint": None, "choices": [],
                                                     "usage": _usage(payload)}) + "\n\n"
                else:  # an error after the stream began: report it in the stream
                    yield f"data: {json.dumps(payload.to_json())}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            gen.cancel()  # a no-op when finished; stops the generation when the client left early

    # --- application --------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette):  # noqa: ANN201
        self.pool = ThreadPoolExecutor(max_workers=self.config.prep_workers, thread_name_prefix="hires-serve-prep")
        self.engine.start()
        try:
            yield
        finally:
            self.engine.stop()
            self.pool.shutdown(wait=False, cancel_futures=True)


def _usage(done: dict[str, Any]) -> dict[str, int]:
    p, c = done["prompt_tokens"], done["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return _error(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    kind = {404: "not_found_error", 405: "invalid_request_error"}.get(exc.status_code, "invalid_request_error")
    msg = {404: f"no route {request.method} {request.url.path}",
           405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return _error(APIError(exc.status_code, msg, type=kind, code=None))


async def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return _error(APIError(500, f"internal server error: {type(exc).__name__}", type="server_error"))


def create_app(model: HiresLMM, config: ServeConfig | None = None) -> Starlette:
    """The ASGI application serving ``model`` (checks that the model can be batched first)."""
    server = Server(model, config or ServeConfig())
    server.engine.check_model()
    routes = [
        Route("/", server.page, methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/v1/models", server.models, methods=["GET"]),
        Route("/v1/models/{name:path}", server.model, methods=["GET"]),
        Route("/v1/chat/completions", server.chat, methods=["POST"]),
        Route("/v1/plan", server.plan, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=server.lifespan,
                    exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _server_error})
    app.state.server = server
    return app


class BackgroundServer:
    """uvicorn serving ``app`` on a thread, on a socket bound before it starts (port 0 = a free one):
    for tests and benchmarks. ``with BackgroundServer(app) as s: s.url``."""

    def __init__(self, app: Starlette, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="hires-serve-http")

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 60.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
