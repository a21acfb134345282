"""``hires serve --model DIR``: the OpenAI-compatible server (registered by :mod:`hires_lmm.cli`)."""

from __future__ import annotations

import argparse

from .config import MiB, ServeConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    d = ServeConfig()
    p = subparsers.add_parser(
        "serve", help="OpenAI-compatible HTTP API (continuous batching) and a web page for a saved model",
        description="Serve a model saved by HiresLMM.save_pretrained: POST /v1/chat/completions (OpenAI's API, "
                    "streaming included), GET /v1/models, POST /v1/plan, GET /health, and a web page at /.")
    p.add_argument("--model", required=True, help="model directory (config.json, model.safetensors, tokenizer)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    p.add_argument("--served-model-name", help="the model name clients send (default: the directory's name)")
    p.add_argument("--allowed-local-media-path", metavar="DIR",
                   help="allow images given as local paths / file:// URLs under DIR (default: none allowed)")
    p.add_argument("--chat-template", default=d.chat_template,
                   help="auto (the tokenizer's chat template when it has one, else vicuna_v1), vicuna_v1, llama3, "
                        "chatml, tokenizer, plain (default %(default)s)")
    p.add_argument("--max-batch", type=int, default=d.max_batch, metavar="N",
                   help="most requests decoding together (default %(default)s)")
    p.add_argument("--max-prefill-tokens", type=int, default=d.max_prefill_tokens, metavar="N",
                   help="most prompt tokens (text + visual) prefilled in one step (default %(default)s)")
    p.add_argument("--batch-wait-ms", type=float, default=d.batch_wait_ms, metavar="MS",
                   help="an idle server waits this long to batch arriving requests (default %(default)s)")
    p.add_argument("--max-waiting", type=int, default=d.max_waiting, metavar="N",
                   help="most queued requests before answering 503 (default %(default)s)")
    p.add_argument("--max-request-mb", type=float, default=d.max_request_bytes / MiB, metavar="MB",
                   help="largest request body in MiB (default %(default)g)")
    p.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, metavar="N",
                   help="largest image, width x height (default %(default)s)")
    p.add_argument("--fast-decode", action="store_true", help="plan from the header and decode large JPEGs reduced "
                   "(2-4x faster preprocessing, within a few grey levels of the exact pixels)")
    p.add_argument("--max-images-per-request", type=int, default=d.max_images_per_request, metavar="N",
                   help="most images in one request (default %(default)s)")
    p.add_argument("--max-model-len", type=int, metavar="N",
                   help="most prompt (text + visual) + completion tokens (default: the LLM's max_position_embeddings)")
    p.add_argument("--default-max-tokens", type=int, metavar="N",
                   help="completion length when a request sets none (default: the rest of the context)")
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="auto: bfloat16 on a GPU that supports it, else float32")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import CLIError

    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as e:
        raise CLIError(f"hires serve needs {e.name}: pip install starlette uvicorn") from None
    for flag, v in (("--max-batch", args.max_batch), ("--max-waiting", args.max_waiting),
                    ("--max-image-pixels", args.max_image_pixels), ("--max-prefill-tokens", args.max_prefill_tokens),
                    ("--max-model-len", args.max_model_len), ("--default-max-tokens", args.default_max_tokens)):
        if v is not None and v < 1:
            raise CLIError(f"{flag} must be at least 1")
    if args.max_images_per_request < 0 or args.max_request_mb <= 0 or args.batch_wait_ms < 0:
        raise CLIError("--max-images-per-request, --max-request-mb and --batch-wait-ms cannot be negative")
    model_dir = Path(args.model)
    if not (model_dir / "config.json").is_file():
        raise CLIError(f"--model {args.model}: no config.json; not a directory written by HiresLMM.save_pretrained")
    if args.allowed_local_media_path and not Path(args.allowed_local_media_path).is_dir():
        raise CLIError(f"--allowed-local-media-path {args.allowed_local_media_path}: not a directory")

    import logging

    import torch

    from ..model import HiresLMM
    from .app import create_app, limit_heap_retention
    from .service import default_served_name

    limit_heap_retention()  # large requests' memory goes back to the system (glibc; see its docstring)

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(args.dtype)
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") and torch.cuda.is_bf16_supported() else torch.float32
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        model = HiresLMM.from_pretrained(model_dir, torch_dtype=dtype, device=device)
    except (OSError, ValueError) as e:
        raise CLIError(f"cannot load {model_dir}: {e}") from None
    config = ServeConfig(
        served_model_name=args.served_model_name or default_served_name(model_dir),
        allowed_local_media_path=args.allowed_local_media_path, chat_template=args.chat_template,
        max_batch=args.max_batch, max_prefill_tokens=args.max_prefill_tokens, batch_wait_ms=args.batch_wait_ms,
        max_waiting=args.max_waiting, max_request_bytes=int(args.max_request_mb * MiB),
        max_image_pixels=args.max_image_pixels, max_images_per_request=args.max_images_per_request,
        max_model_len=args.max_model_len, default_max_tokens=args.default_max_tokens, fast_decode=args.fast_decode)
    try:
        app = create_app(model, config)
    except (ValueError, RuntimeError) as e:
        raise CLIError(str(e)) from None
    import uvicorn

    server = app.state.server
    print(f"serving {config.served_model_name!r} ({model.config.method}, template {server.service.template.name}, "
          f"{device}, {str(dtype).replace('torch.', '')}) on http://{args.host}:{args.port}/  "
          f"(API: /v1/chat/completions, /v1/models, /v1/plan, /health)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5)
    return 0
