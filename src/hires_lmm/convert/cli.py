"""``hires convert`` (a released checkpoint → a hires-lmm model directory), ``hires export`` (a
llava-1.5 / llava-next model → a transformers LLaVA directory, :mod:`~hires_lmm.convert.export`)
and ``hires logits`` (the LLM's float32 logits over a spliced prompt, for parity checks against
other implementations).

Registered by :func:`hires_lmm.cli.build_parser` through :func:`register`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import CLIError, one_line
from .errors import ConversionError
from .formats import FORMATS

__all__ = ["cmd_convert", "cmd_export", "cmd_logits", "register"]


def _connector_overrides(items: list[str] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--connector expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def cmd_convert(args: argparse.Namespace) -> int:
    from .core import convert_checkpoint

    if not Path(args.src).is_dir():
        raise CLIError(f"{args.src}: no such checkpoint directory")
    for opt in ("vision", "convnext"):
        d = getattr(args, opt)
        if d is not None and not Path(d).exists():
            raise CLIError(f"--{opt} {d}: no such directory")
    try:
        report = convert_checkpoint(args.fmt, args.src, args.dst, vision=args.vision, convnext=args.convnext,
                                    dtype=args.dtype, force=args.force, overwrite=args.overwrite,
                                    max_shard_size=args.max_shard_size,
                                    connector=_connector_overrides(args.connector))
    except (ConversionError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    except OSError as e:  # an unreadable checkpoint file, an unwritable output directory, a full disk
        raise CLIError(one_line(e)) from None
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(f"converted {report.format} {report.src} -> {report.dst}: {report.method}, "
              f"{report.loaded} tensors loaded ({report.tensors} read"
              + "".join(f", {n} dropped: {why}" for why, n in report.dropped.items()) + f"), {report.dtype}")
        for part, where in report.external.items():
            print(f"  {part} from {where}")
        for note in report.notes:
            print(f"  note: {note}")
    return 0


def cmd_logits(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from ..image import ImageLoadError
    from ..model import HiresLMM

    try:
        model = HiresLMM.from_pretrained(args.model, device=args.device)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise CLIError(f"cannot load {args.model}: {one_line(e)}") from None
    tok = model.tokenizer
    ids = tok(args.text, add_special_tokens=not args.no_special_tokens).input_ids
    images = args.image or []
    n = ids.count(model.image_token_id)
    if n != len(images):
        raise CLIError(f"the text holds {n} {model.config.image_token} placeholder(s) but {len(images)} --image given")
    prepared = []
    for path in images:
        try:
            prepared.append(model.prepare_image(path))
        except (ImageLoadError, FileNotFoundError) as e:
            raise CLIError(str(e)) from None
    if args.pixel_values:
        if len(prepared) != 1:
            raise CLIError("--pixel-values replaces the views of exactly one --image")
        arr = np.load(args.pixel_values)
        views = prepared[0].views
        want = [tuple(v.shape) for v in views]
        if arr.ndim != 4 or arr.shape[0] != len(views) or any(tuple(a.shape) != w for a, w in zip(arr, want)):
            raise CLIError(f"--pixel-values of shape {tuple(arr.shape)} do not match the plan's views {want}")
        prepared[0].views = [torch.from_numpy(np.ascontiguousarray(a)).float() for a in arr]
    with torch.no_grad():
        out = model([torch.tensor(ids, dtype=torch.long)], [prepared])
    logits = out.logits[0].float().cpu().numpy()
    dest = Path(args.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest, "wb") as f:  # exactly the path given (np.save would append .npy)
        np.save(f, logits)
    print(json.dumps({"out": str(dest), "shape": list(logits.shape),
                      "num_visual_tokens": out.batch.num_visual_tokens, "num_text_tokens": len(ids) - n}))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ..errors import HiresError
    from .export_targets import ExportError, check_exportable

    src = Path(args.src)
    if not src.is_dir():
        raise CLIError(f"{src}: no such model directory")
    raw: Any = None
    try:
        raw = json.loads((src / "config.json").read_bytes().decode("utf-8-sig"))
    except (OSError, ValueError):
        pass  # no, unreadable or broken config.json: export_checkpoint names the problem
    if isinstance(raw, dict) and raw.get("model_type") == "hires_lmm":
        try:  # a method transformers cannot represent is refused before torch is even imported
            check_exportable(str(raw.get("method")), args.to)
        except ExportError as e:
            raise CLIError(str(e)) from None
    from .export import export_checkpoint

    try:
        report = export_checkpoint(src, args.dst, to=args.to, dtype=args.dtype, overwrite=args.overwrite,
                                   max_shard_size=args.max_shard_size, verify=args.verify)
    except HiresError as e:  # ExportError, and the model loader's own one-line errors
        raise CLIError(one_line(e)) from None
    except OSError as e:  # an unreadable model file, an unwritable output directory, a full disk
        raise CLIError(one_line(e)) from None
    if args.json:
        print(json.dumps(report.to_json()))
    else:
        print(f"exported {report.method} {report.src} -> {report.dst}: {report.architecture}, "
              f"{report.tensors} tensors, {report.dtype}")
        if report.verify:
            print(f"  verified: max logit difference {report.verify['max_logit_diff']:.3g}, "
                  f"max pixel difference {report.verify['max_pixel_diff']:.3g}")
        for note in report.notes:
            print(f"  note: {note}")
    return 0


def register(sub: Any) -> None:
    """Add ``convert``, ``export`` and ``logits`` to the ``hires`` subcommands."""
    from .export_targets import EXPORT_TARGETS, UNSUPPORTED
    c = sub.add_parser("convert", help="convert a released checkpoint into a hires-lmm model directory",
                       description="Formats: " + ", ".join(FORMATS) + " (or auto). Every tensor is mapped; "
                       "missing, left-over or misshaped weights are refused by name.")
    c.add_argument("--from", dest="fmt", required=True, choices=[*FORMATS, "auto"], metavar="FORMAT",
                   help=f"checkpoint format: {', '.join(FORMATS)}, or auto")
    c.add_argument("src", help="checkpoint directory (config.json, weights, tokenizer)")
    c.add_argument("dst", help="output directory (a HiresLMM.from_pretrained directory)")
    c.add_argument("--vision", help="local CLIP/SigLIP directory, when the checkpoint has no vision-tower weights")
    c.add_argument("--convnext", help="local ConvNeXt directory, when a LLaVA-HR checkpoint has none")
    c.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="storage dtype of the output (auto: the checkpoint's)")
    c.add_argument("--force", action="store_true",
                   help="convert even when the config asks for what hires-lmm cannot reproduce (weights never)")
    c.add_argument("--overwrite", action="store_true", help="write into a non-empty output directory")
    c.add_argument("--max-shard-size", default="5GB")
    c.add_argument("--connector", action="append", metavar="KEY=VALUE",
                   help="override a connector option (JSON value), e.g. selector_variant=spec")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=cmd_convert)

    ex = sub.add_parser("export", help="write a llava-1.5 / llava-next model as a transformers LLaVA directory "
                        "(LlavaForConditionalGeneration / LlavaNextForConditionalGeneration + AutoProcessor)",
                        description="Formats: " + ", ".join(f"{k} ({m} -> {c})" for k, (m, c) in EXPORT_TARGETS.items())
                        + ". Refused: " + ", ".join(UNSUPPORTED) + " (transformers has no class for them).")
    ex.add_argument("--to", required=True, choices=list(EXPORT_TARGETS), metavar="FORMAT",
                    help=f"output format: {', '.join(EXPORT_TARGETS)}")
    ex.add_argument("src", help="a hires-lmm model directory (HiresLMM.from_pretrained)")
    ex.add_argument("dst", help="output directory (transformers from_pretrained / vLLM / SGLang)")
    ex.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="storage dtype of the output (auto: the model's)")
    ex.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory (as a whole)")
    ex.add_argument("--max-shard-size", default="5GB")
    ex.add_argument("--verify", action="store_true", help="before writing, load the export with transformers and "
                    "compare its logits with hires-lmm's on test images (refused at >= 1e-4)")
    ex.add_argument("--json", action="store_true", help="print the report as JSON")
    ex.set_defaults(func=cmd_export)

    lg = sub.add_parser("logits", help="float32 LLM logits over a prompt with images spliced in (.npy)")
    lg.add_argument("--model", required=True, help="a hires-lmm model directory")
    lg.add_argument("--image", action="append", help="an image per <image> placeholder, in order (repeatable)")
    lg.add_argument("--text", required=True, help='the prompt, e.g. "USER: <image>\\nWhat is this? ASSISTANT:"')
    lg.add_argument("--out", required=True, help="output .npy: (sequence length, vocabulary) float32")
    lg.add_argument("--pixel-values", help="a (views, 3, H, W) .npy replacing the rendered views of the one "
                    "image (e.g. another implementation's processor output)")
    lg.add_argument("--no-special-tokens", action="store_true", help="do not add BOS")
    lg.add_argument("--device", default=None)
    lg.set_defaults(func=cmd_logits)

