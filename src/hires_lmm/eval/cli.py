"""``hires predict``, ``hires eval`` and ``hires chat`` (registered by :func:`register`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# from the leaf module: the same class however the CLI was started (python -m loads it twice)
from ..errors import CLIError, ModelLoadError, one_line

METRIC_NAMES = ("vqa", "anls", "relaxed", "exact", "mc")


def cmd_predict(args: argparse.Namespace) -> int:
    from ..image import ImageLoadError
    from .predict import predict, resolve_shard, shard_path

    if args.shard is not None and args.num_shards is None:
        raise CLIError("--shard needs --num-shards")
    try:
        num_shards, shard = resolve_shard(args.num_shards, args.shard)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if not (Path(args.model) / "config.json").exists():
        raise CLIError(f"--model {args.model}: no config.json; not a hires-lmm model directory")
    out = shard_path(args.answers_file, num_shards, shard)
    try:
        res = predict(args.model, args.question_file, args.image_folder, out, batch_size=args.batch_size,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                      template=args.template, num_shards=num_shards, shard=shard, progress=not args.no_progress,
                      model_id=args.model_id, seed=args.seed, retry_errors=args.retry_errors, device=args.device,
                      fast_decode=args.fast_decode, max_visual_tokens=args.max_visual_tokens,
                      group_by_length=not args.file_order)
    except (FileNotFoundError, ImageLoadError, ModelLoadError) as e:
        raise CLIError(one_line(e)) from None
    except ValueError as e:  # a malformed question file, an unknown template
        raise CLIError(one_line(e)) from None
    print(json.dumps(res.to_json()))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate, format_report

    try:
        rep = evaluate(args.answers_file, args.ground_truth, args.metric, question_file=args.question_file)
    except (FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from None
    print(json.dumps(rep) if args.json else format_report(rep))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from ..image import ImageLoadError
    from .chat import ChatBot, chat_session

    if not (Path(args.model) / "config.json").exists():
        raise CLIError(f"--model {args.model}: no config.json; not a hires-lmm model directory")
    try:
        bot = ChatBot(args.model, args.image, template=args.template, max_new_tokens=args.max_new_tokens,
                      temperature=args.temperature, top_p=args.top_p, device=args.device)
    except (ImageLoadError, ModelLoadError) as e:  # a bad --image; a broken model directory
        raise CLIError(one_line(e)) from None
    if args.question:
        try:
            print(bot.ask(" ".join(args.question)))
        except ValueError as e:
            raise CLIError(str(e)) from None
        return 0
    chat_session(bot, sys.stdin, sys.stdout)
    return 0


def _add_decoding(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--template", help="chat template (default: the model's training template, else vicuna_v1)")
    p.add_argument("--device", help="default: cuda (cuda:LOCAL_RANK under torchrun) when available, else cpu")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``predict``, ``eval`` and ``chat`` to the ``hires`` command."""
    p = subparsers.add_parser("predict", help="answer a LLaVA question file (batched, resumable, shardable)")
    p.add_argument("--model", required=True, help="a model directory (save_pretrained)")
    p.add_argument("--question-file", required=True, help='JSONL of {"question_id", "image", "text"}')
    p.add_argument("--image-folder", default=".", help="the directory image paths are relative to")
    p.add_argument("--answers-file", required=True,
                   help="JSONL output, resumed when it exists; with several shards each writes "
                        "A.shard{k}-of-{n}.jsonl unless the name holds {shard}")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--file-order", action="store_true",
                   help="batch and write questions in file order (default: questions of one spliced length are "
                        "batched together, which avoids padding and is faster; answers are keyed by question_id)")
    _add_decoding(p, 32)
    p.add_argument("--num-shards", type=int, help="split the questions into N shards (default: torchrun's WORLD_SIZE, else 1)")
    p.add_argument("--shard", type=int, help="which shard to answer, 0-based (default: torchrun's RANK)")
    p.add_argument("--model-id", help="the answers' model_id (default: the model directory's name)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--retry-errors", action="store_true", help="ask questions whose earlier answer was an error again")
    p.add_argument("--fast-decode", action="store_true", help="plan from the header and decode large JPEGs reduced "
                   "(2-4x faster preprocessing, within a few grey levels of the exact pixels)")
    p.add_argument("--max-visual-tokens", type=int, metavar="B",
                   help="plan every image within B visual tokens (the planners' budget; default: the saved "
                        "config's); an image no plan fits is recorded as an error answer")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_predict)

    e = subparsers.add_parser("eval", help="score an answers file against ground truth")
    e.add_argument("--answers-file", required=True, nargs="+", help="one or more JSONL files (e.g. all shards)")
    e.add_argument("--ground-truth", required=True, help='JSONL of {"question_id", "text" | "answers"}')
    e.add_argument("--metric", required=True, choices=METRIC_NAMES)
    e.add_argument("--question-file", help="questions, for their category (and mc options) when the ground truth lacks them")
    e.add_argument("--json", action="store_true", help="print the report as one JSON object")
    e.set_defaults(func=cmd_eval)

    c = subparsers.add_parser("chat", help="ask a saved model about an image (interactive without a question)")
    c.add_argument("--model", required=True)
    c.add_argument("--image", help="the image to talk about (/image PATH switches in a session)")
    c.add_argument("question", nargs="*", help="a question to answer once; without one, read questions from stdin")
    _add_decoding(c, 256)
    c.set_defaults(func=cmd_chat)


__all__ = ["register"]
