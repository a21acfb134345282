"""The ``hires`` command line.

Subcommands: ``plan`` (how a method looks at an image), ``cost`` (visual tokens and TFLOPs per
image), ``demo`` (the main job: every method trained and compared on the synthetic task).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

# the error classes live in a leaf module: under ``python -m hires_lmm.cli`` this file is loaded
# twice, and classes defined here would exist twice (one copy's raise escaping the other's except)
from .errors import CLIError, HiresError, one_line
from .plan import METHODS, Plan, parse_size, plan_image
from .plan.budget import parse_budget
from .plan.format import format_budget, format_plan  # noqa: F401  (format_plan: re-exported, its old home)

if TYPE_CHECKING:
    from .vision.vit import ViT

#: modules that add subcommands through ``register(subparsers)`` (each parser sets ``func``;
#: raising :class:`CLIError`, or any :class:`~hires_lmm.errors.HiresError`, prints a clean
#: one-line error with exit status 2)
EXTENSIONS = ("hires_lmm.eval.cli", "hires_lmm.serve.cli", "hires_lmm.convert.cli", "hires_lmm.bench.cli",
              "hires_lmm.compare.cli", "hires_lmm.parts.cli")

__all__ = ["CLIError", "EXTENSIONS", "HiresError", "build_parser", "format_cost", "format_plan", "main"]


def _methods(text: str) -> list[str]:
    """Preset names (comma-separated, or 'all') and method files (JSON/YAML paths), checked."""
    from .parts.files import is_method_file

    if "," in text and Path(text).is_file():  # one file whose name holds a comma
        names = [text]
    else:
        names = list(METHODS) if text == "all" else [m.strip() for m in text.split(",") if m.strip()]
    for m in names:
        if m in METHODS:
            continue
        if not is_method_file(m):
            raise CLIError(f"unknown method {m!r}; choose from {', '.join(METHODS)} or 'all', or give a method file")
        from .parts import resolve_method

        resolve_method(m)  # a bad file fails here, as one line (PartError is a HiresError)
    return names


def _plan_of(method: str, size: tuple[int, int], **options: Any) -> Plan:
    """A preset's plan, or a method file's (its views part's plan with its parts' token count)."""
    if method in METHODS:
        return plan_image(method, size, **options)
    from .parts import resolve_method

    return resolve_method(method).plan(size, **options)


def _sizes(texts: Sequence[str]) -> list[tuple[int, int]]:
    try:
        return [parse_size(t) for t in texts]
    except ValueError as e:
        raise CLIError(str(e)) from None


def _plan_or_refuse(command: str, method: str, size: tuple[int, int], budget: int | None) -> Plan | None:
    """The plan, or None after printing a budget refusal as one error line (the caller goes on
    with the other methods and sizes, and exits with status 2 at the end)."""
    from .plan import BudgetError

    if budget is None:
        return _plan_of(method, size)
    try:
        return _plan_of(method, size, max_visual_tokens=budget)
    except BudgetError as e:
        print(f"hires {command}: error: {one_line(e)}", file=sys.stderr)
        return None


def cmd_plan(args: argparse.Namespace) -> int:
    methods = _methods(args.method)
    targets: list[tuple[str | None, tuple[int, int]]] = [(None, s) for s in _sizes(args.size or [])]
    decoded: dict[str, Any] = {}
    if args.images:
        # imported only for image paths: planning a bare --size stays pure geometry
        from .image import ImageLoadError, load_image

        for path in args.images:
            # decoded in full, not just the header: a truncated file would be planned here and then
            # refused by predict and serve (load_image's size is the EXIF-oriented one, as planned)
            try:
                img = load_image(path, max_pixels=args.max_pixels)
            except ImageLoadError as e:
                raise CLIError(one_line(e)) from None
            targets.append((path, img.size))
            if args.out:
                decoded[path] = img  # drawn below; without --out nothing is kept
    if not targets:
        raise CLIError("give --size WxH or one or more image paths")
    if args.out and not any(p for p, _ in targets):
        raise CLIError("--out draws the plan over an image: give an image path")
    n_pictures = sum(1 for p, _ in targets if p) * len(methods)
    refused = 0
    for path, size in targets:
        for m in methods:
            plan = _plan_or_refuse("plan", m, size, args.max_visual_tokens)
            if plan is None:  # refused by the budget: said on stderr, the others still planned
                refused += 1
                continue
            if args.json:
                print(json.dumps(plan.to_json()))
            else:
                print((f"{path}\n" if path else "") + format_plan(plan) + "\n")
            if args.out and path:
                from .image.overlay import draw_plan

                out = Path(args.out)
                if n_pictures > 1:
                    out = out.with_name(f"{out.stem}-{Path(path).stem}-{m}{out.suffix or '.png'}")
                try:
                    out.parent.mkdir(parents=True, exist_ok=True)
                    draw_plan(decoded[path], plan).save(out)
                except (OSError, ValueError) as e:  # unwritable place, unknown image extension
                    raise CLIError(f"--out {out}: cannot write the picture ({one_line(e)})") from None
                print(f"wrote {out}", file=sys.stderr)
    return 2 if refused else 0


def format_cost(rep) -> str:  # noqa: ANN001 - CostReport
    t = 1e12
    w, h = rep.image_size
    lines = [f"{rep.method}  image {w}x{h}  visual tokens {rep.num_visual_tokens}  "
             f"LLM {rep.llm_params / 1e9:g}B (hidden {rep.llm_hidden})"
             + format_budget({"max_visual_tokens": rep.max_visual_tokens, "budget_choice": rep.budget_choice}
                           if rep.max_visual_tokens is not None else {})]
    for v in rep.views:
        lines.append(f"  vision  {v.role:<10} {v.size[0]}x{v.size[1]:<6} {v.encoder:<8} {v.tokens:>6} tokens  {v.flops / t:8.3f} TFLOPs")
    for k, v in rep.connector_parts.items():
        lines.append(f"  connect {k:<40} {v / t:8.3f} TFLOPs")
    lines += [f"  vision total    {rep.vision_flops / t:8.3f} TFLOPs",
              f"  connector total {rep.connector_flops / t:8.3f} TFLOPs",
              f"  LLM prefill     {rep.llm_flops / t:8.3f} TFLOPs  (2 x params x visual tokens)",
              f"  total           {rep.total_flops / t:8.3f} TFLOPs"]
    return "\n".join(lines)


def cmd_cost(args: argparse.Namespace) -> int:
    from .plan.cost import plan_cost

    if args.llm_params <= 0:
        raise CLIError("--llm-params must be positive")
    refused = 0
    for size in _sizes(args.size):
        for m in _methods(args.method):
            plan = _plan_or_refuse("cost", m, size, args.max_visual_tokens)
            if plan is None:  # refused by the budget: said on stderr, the others still costed
                refused += 1
                continue
            if m in METHODS:
                rep = plan_cost(plan, llm_params=args.llm_params, llm_hidden=args.llm_hidden)
            else:  # a method file: its compressor's FLOPs, its token count
                from .parts import resolve_method

                rep = resolve_method(m).cost_of(plan, llm_params=args.llm_params, llm_hidden=args.llm_hidden)
            print(json.dumps(rep.to_json()) if args.json else format_cost(rep) + "\n")
    return 2 if refused else 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """Build a model, run a real forward on a random image and report what it did."""
    import numpy as np
    import torch
    from PIL import Image

    from .methods import build_model

    (method,) = _methods(args.method)
    (size,) = _sizes([args.size])
    if args.tiny:
        model = build_model(method, tiny=True, seed=args.seed)
    elif args.vision and args.llm:
        model = build_model(method, vision=args.vision, llm=args.llm, convnext=args.convnext, seed=args.seed)
    else:
        raise CLIError("give --tiny, or --vision DIR and --llm DIR (and --convnext DIR for llava-hr)")
    rng = np.random.default_rng(args.seed)
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    image = model.prepare_image(img)
    ids = torch.tensor(model.tokenizer(f"{model.config.image_token}\nDescribe the image.", add_special_tokens=False).input_ids)
    with torch.no_grad():
        out = model([ids], [[image]])
    vit = cast("ViT", model.visual.vit)  # every method's visual module holds its ViT as .vit
    params = {"total": sum(p.numel() for p in model.parameters()),
              "llm": sum(p.numel() for p in model.llm.parameters()),
              "vision_encoder": sum(p.numel() for p in vit.parameters())}
    params["connector"] = params["total"] - params["llm"] - params["vision_encoder"]
    from .parts import spec_from_config

    spec = spec_from_config(model.config)  # a composed method's count is its parts', not the planner's
    planned = spec.plan(image.plan.image_size, **model.config.plan_options).num_visual_tokens
    info = {"method": spec.name, "encoder_side": vit.image_size, "planned_visual_tokens": planned,
            "num_visual_tokens": out.batch.num_visual_tokens[0], "params": params,
            "views": len(image.plan.views), "logits_shape": list(out.logits.shape)}
    if args.json:
        print(json.dumps(info))
    else:
        for k, v in info.items():
            print(f"{k:<22} {v}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .data.records import DataError
    from .train.config import config_from_args
    from .train.trainer import TrainingError, train

    (method,) = _methods(args.method)
    connector = None
    if method not in METHODS:  # a method file: the run keeps its planner's name, the model gets the spec
        from .parts import resolve_method

        spec = resolve_method(method)
        method, connector = spec.parts["views"], {"method_spec": spec.to_json()}
    if not args.tiny and not args.init and not (args.vision and args.llm):
        raise CLIError("give --tiny, or --vision DIR and --llm DIR (and --convnext DIR for llava-hr), or --init DIR")
    cfg = config_from_args(args, method=method, connector=connector)
    try:
        res = train(cfg)
    except (TrainingError, DataError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None  # a RecordError lists the bad records, one per line
    except (OSError, ValueError) as e:
        # last resort: a user error the trainer does not type yet (an unreadable folder, a bad
        # value) prints as one line; typed errors subclass HiresError and are caught in main
        raise CLIError(one_line(e)) from None
    print(json.dumps({"steps": res.steps, "final_loss": res.final_loss, "output_dir": res.output_dir,
                      "stopped_by": res.stopped_by, "skipped_records": res.skipped_records}))
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from .data.synth import generate

    try:
        info = generate(Path(args.out), args.n, seed=args.seed, test_fraction=args.test_fraction,
                        tasks=tuple(args.tasks.split(",")) if args.tasks else ("color", "shape", "count", "digit"),
                        sizes=_sizes(args.size) if args.size else None, target_scale=args.target_scale,
                        workers=args.workers)
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(json.dumps({k: v for k, v in info.items() if k in ("counts", "out_dir", "seed")} or info, default=str))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import QUICK, DemoConfig, run_demo, run_tour
    from .demo.run import with_overrides

    if args.tour:
        run_tour(Path(args.out), quick=args.quick)
        return 0
    cfg = with_overrides(QUICK if args.quick else DemoConfig(), steps=args.steps, n=args.n, lr=args.lr,
                         seed=args.seed, target_scale=args.target_scale, methods=tuple(_methods(args.methods)) if args.methods else None)
    if args.seeds is not None:
        from .compare.cli import parse_ints
        from .demo.seeds import run_demo_seeds

        summary = run_demo_seeds(Path(args.out), parse_ints(args.seeds, "--seeds"), cfg, fresh=args.fresh,
                                 progress=not args.no_progress)
        return 1 if summary["holds"] is False else 0  # None: no baseline, no claim to fail
    run_demo(Path(args.out), config=cfg, fresh=args.fresh, progress=not args.no_progress)
    return 0


#: ``--max-visual-tokens`` of ``hires plan`` and ``hires cost``
BUDGET_HELP = ("visual-token budget: each method plans its largest faithful configuration within B tokens "
               "(docs/methods.md); a method that cannot is refused on one stderr line naming its smallest "
               "count, the others still run, and the exit status is 2")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hires", description="High-resolution multimodal LLMs of the LLaVA family.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("plan", help="how a method looks at an image: views, grid, separators, visual tokens")
    p.add_argument("images", nargs="*", help="image files to plan (their EXIF-oriented size is used)")
    p.add_argument("--method", "-m", required=True, help=f"one of {', '.join(METHODS)}; comma-separated, or 'all'")
    p.add_argument("--size", action="append", metavar="WxH", help="plan an image of this size (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--out", help="draw the plan over the image into this PNG")
    p.add_argument("--max-pixels", type=int, default=64_000_000, help="decompression-bomb limit")
    p.add_argument("--max-visual-tokens", type=parse_budget, metavar="B", help=BUDGET_HELP)
    p.set_defaults(func=cmd_plan)

    c = sub.add_parser("cost", help="visual tokens and TFLOPs per image, from the plan alone")
    c.add_argument("--method", "-m", required=True)
    c.add_argument("--size", action="append", required=True, metavar="WxH")
    c.add_argument("--llm-params", type=float, default=7e9, help="LLM parameter count (default 7e9)")
    c.add_argument("--llm-hidden", type=int, default=None, help="LLM hidden size (default: from --llm-params)")
    c.add_argument("--json", action="store_true")
    c.add_argument("--max-visual-tokens", type=parse_budget, metavar="B", help=BUDGET_HELP)
    c.set_defaults(func=cmd_cost)

    i = sub.add_parser("inspect", help="build a model and run a real forward on a random image")
    i.add_argument("--method", "-m", required=True)
    i.add_argument("--size", default="1024x768", metavar="WxH")
    i.add_argument("--tiny", action="store_true", help="the tiny preset (no weights needed)")
    i.add_argument("--vision", help="local CLIP/SigLIP directory (Hugging Face format)")
    i.add_argument("--llm", help="local causal LM directory (Hugging Face format)")
    i.add_argument("--convnext", help="local ConvNeXt weights (llava-hr)")
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    from .train.config import add_arguments as add_train_arguments  # torch-free: TrainConfig's fields

    t = sub.add_parser("train", help="train a method's stage on LLaVA-format data")
    add_train_arguments(t)  # one flag per TrainConfig field (its metadata: help, choices, flag names)
    t.set_defaults(func=cmd_train)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    sy = data.add_parser("synth", help="generate the synthetic fine-detail dataset (LLaVA format)")
    sy.add_argument("--out", required=True)
    sy.add_argument("--n", type=int, default=1000)
    sy.add_argument("--seed", type=int, default=0)
    sy.add_argument("--test-fraction", type=float, default=0.2)
    sy.add_argument("--tasks", help="comma-separated: color, shape, count, digit")
    sy.add_argument("--size", action="append", metavar="WxH",
                    help="canvas size (repeatable); the longer side must be 336·f, f >= 2 (default: f = 3..6)")
    sy.add_argument("--target-scale", type=float, default=1.0, help="enlarge the targets (not their texture)")
    sy.add_argument("--workers", type=int, default=1)
    sy.set_defaults(func=cmd_data_synth)

    # subcommands of other packages: each module's register(subparsers) adds its own
    import importlib

    for name in EXTENSIONS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not name.startswith(e.name):  # a missing dependency, not the module
                raise
            continue
        mod.register(sub)

    d = sub.add_parser("demo", help="the main job: train every method's tiny model on the synthetic fine-detail "
                                    "task and compare them (table, figure, plan overlays)")
    d.add_argument("--out", default="out/demo", help="output folder (finished stages in it are reused)")
    d.add_argument("--quick", action="store_true", help="the 2-minute smoke version")
    d.add_argument("--fresh", action="store_true", help="start over instead of reusing finished stages in --out")
    d.add_argument("--steps", type=int, help="training steps per method")
    d.add_argument("--n", type=int, help="images to generate")
    d.add_argument("--lr", type=float, help="learning rate of every method")
    d.add_argument("--target-scale", type=float, help="the coloured square's side in units of 8 336-pixels "
                   "(default 10: 160 px of a 672 px image; 6 was the 96 px of the 2026-11-22 results)")
    seeds = d.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, help="seed of the data, the encoders and the training (default 0)")
    seeds.add_argument("--seeds", help="comma-separated seeds: the whole demo at each, into OUT/seed-S, then "
                       "OUT/seeds.md (every method per seed, mean ± sd, margin over llava-1.5); exit status 1 "
                       "if a method is below llava-1.5 + 30 at a seed")
    d.add_argument("--methods", help="comma-separated subset of the compared methods")
    d.add_argument("--no-progress", action="store_true")
    d.add_argument("--tour", action="store_true", help="instead: every method's plan of a bundled image, with pictures")
    d.set_defaults(func=cmd_demo)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"hires {args.command}: error: {e}", file=sys.stderr)
        return 2
    except HiresError as e:  # any typed user error of the package (model, data, training, ...)
        print(f"hires {args.command}: error: {one_line(e)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `hires plan ... | head`
        return 0


if __name__ == "__main__":
    sys.exit(main())
