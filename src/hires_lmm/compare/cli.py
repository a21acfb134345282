"""``hires compare``: the command line of :func:`hires_lmm.compare.run_compare`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import CLIError, HiresError, one_line

__all__ = ["cmd_compare", "parse_ints", "register"]


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    """``"0,1,2"`` → ``(0, 1, 2)``; a one-line :class:`CLIError` otherwise."""
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise CLIError(f"{what}: give comma-separated integers, got {text!r}") from None
    if not values:
        raise CLIError(f"{what}: give at least one integer")
    return values


def cmd_compare(args: argparse.Namespace) -> int:
    from ..plan import METHODS
    from .run import CompareConfig, run_compare

    methods = tuple(METHODS) if args.methods == "all" else tuple(m.strip() for m in args.methods.split(",") if m.strip())
    seeds = parse_ints(args.seeds, "--seeds") if args.seeds is not None else (args.seed,)
    budgets = parse_ints(args.max_visual_tokens, "--max-visual-tokens") if args.max_visual_tokens else ()
    cfg = CompareConfig(
        data_path=args.data_path, image_folder=args.image_folder, question_file=args.question_file,
        answers_file=args.answers_file, methods=methods, tiny=args.tiny, vision=args.vision, llm=args.llm,
        convnext=args.convnext, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
        lr_schedule=args.lr_schedule, warmup_ratio=args.warmup_ratio, stage=args.stage, template=args.template,
        align_steps=args.align_steps, align_data_path=args.align_data_path, align_lr=args.align_lr, seeds=seeds,
        max_visual_tokens=budgets, metric=args.metric, max_new_tokens=args.max_new_tokens,
        eval_batch=args.eval_batch_size, llm_params=args.llm_params, chance=args.chance)
    try:
        res = run_compare(cfg, args.out, fresh=args.fresh, progress=not args.no_progress)
    except HiresError:
        raise  # typed: printed as one line by the command line
    except (OSError, ValueError) as e:  # an unreadable file or a bad value met while training
        raise CLIError(one_line(e)) from None
    summary: dict[str, Any] = {k: {f: m[f] for f in ("accuracy", "accuracy_spread", "visual_tokens", "tflops")}
                               for k, m in res["methods"].items()}
    print(json.dumps({"out": str(args.out), "methods": summary, "pareto": res["pareto"]}))
    return 0


def register(sub: Any) -> None:
    """Add ``hires compare`` to the command line's subparsers."""
    p = sub.add_parser("compare", help="train several methods with the same budget on LLaVA-format data, score "
                                       "them and plot accuracy against TFLOPs per image")
    p.add_argument("--data-path", required=True, help="training data: LLaVA JSON/JSONL or a LLaVA-NeXT YAML")
    p.add_argument("--image-folder", required=True)
    p.add_argument("--question-file", required=True, help="held-out questions (JSONL: question_id, image, text)")
    p.add_argument("--answers-file", required=True, help="their ground truth (JSONL: question_id, text or answers)")
    p.add_argument("--methods", required=True, help="comma-separated presets and method files (JSON/YAML, "
                   "named by their stem or \"name\"), or 'all' (the presets)")
    p.add_argument("--out", required=True, help="where results.json, results.md, the figure and the runs go")
    p.add_argument("--tiny", action="store_true", help="tiny models (whole-word tokens of the data's words); "
                   "--vision / --convnext / --llm then replace its random encoders / LLM")
    p.add_argument("--vision", help="CLIP/SigLIP directory (with --tiny: a tiny pretrained ViT)")
    p.add_argument("--llm", help="causal LM directory")
    p.add_argument("--convnext", help="ConvNeXt weights (llava-hr)")
    p.add_argument("--steps", type=int, default=100, help="training steps of the main stage, every method")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, help="one learning rate for every method (default: the stage's)")
    p.add_argument("--lr-schedule", choices=("cosine", "constant"), default="cosine")
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--stage", default="frozen-encoders", help="the main stage (see hires train --stage)")
    p.add_argument("--template", help="chat template of the main stage (default: the stage's)")
    p.add_argument("--align-steps", type=int, default=0, help="first train each method's first paper stage "
                   "(projector alignment, connector only) for N steps")
    p.add_argument("--align-data-path", help="its data (default: --data-path), e.g. captions")
    p.add_argument("--align-lr", type=float, help="its learning rate (default: the paper's)")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0)
    seeds.add_argument("--seeds", help="comma-separated seeds: each runs, the table reports mean ± spread")
    p.add_argument("--max-visual-tokens", metavar="B[,B...]", help="visual-token budgets: each method is trained "
                   "and scored at each (a curve in the figure); a method that cannot plan a held-out image "
                   "within one is refused before training")
    p.add_argument("--metric", default="exact", help="exact (default), vqa, anls, relaxed or mc")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--llm-params", type=float, default=7e9, help="the LLM size tiny models are costed at")
    p.add_argument("--chance", type=float, help="accuracy of guessing in percent, drawn and tabled when given")
    p.add_argument("--fresh", action="store_true", help="start over instead of reusing finished runs in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_compare)
