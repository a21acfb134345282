"""``hires bench`` (registered by :func:`register`)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from ..errors import CLIError

DEFAULT_REPORT = "docs/performance.md"


def cmd_bench(args: argparse.Namespace) -> int:
    from ..plan import parse_size
    from .report import write_report
    from .runner import SECTIONS, BenchSettings, parse_sections, run_bench, without

    try:
        skip = parse_sections(args.skip)
        only = parse_sections(args.only) or SECTIONS
        photo_size = parse_size(args.photo_size) if args.photo_size else None
    except ValueError as e:
        raise CLIError(str(e)) from None
    for name in ("threads", "repeat", "photos", "encode_images", "tokens"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1")
    s = BenchSettings.preset(args.quick, threads=args.threads, sections=without(only, skip),
                             argv=_argv(args))
    if args.repeat is not None:
        s = replace(s, preprocess_repeat=args.repeat, encode_repeat=args.repeat, e2e_repeat=args.repeat)
    if args.photos is not None:
        s = replace(s, photos=args.photos)
    if photo_size is not None:
        s = replace(s, photo_size=photo_size)
    if args.encode_images is not None:
        s = replace(s, encode_images=min(args.encode_images, s.encode_images))
    if args.tokens is not None:
        s = replace(s, e2e_tokens=args.tokens)
    out = args.out if args.out is not None else (None if args.quick else DEFAULT_REPORT)
    res = run_bench(s)
    if out and not args.no_report:
        path = write_report(res, out)
        print(f"wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(res["summary"]))
    else:
        for k, v in res["summary"].items():
            print(f"{k}: {v}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``hires bench``."""
    b = sub.add_parser("bench", help="measure preprocessing, encoding, cost, end-to-end (and GPU) performance",
                       description="Run the benchmarks and write docs/performance.md (not with --quick unless "
                                   "--out is given). --json prints the figures tools check.")
    b.add_argument("--quick", action="store_true", help="small settings: well under a minute on a laptop CPU")
    b.add_argument("--json", action="store_true", help="print the summary figures as one JSON object")
    b.add_argument("--out", help=f"report path (default: {DEFAULT_REPORT}, none with --quick)")
    b.add_argument("--no-report", action="store_true", help="write no report")
    b.add_argument("--threads", type=int, help="torch CPU threads (default: every core)")
    b.add_argument("--only", help="comma-separated sections: preprocess, encode, cost, e2e, gpu")
    b.add_argument("--skip", help="comma-separated sections to leave out")
    b.add_argument("--repeat", type=int, help="timed repeats of every measurement")
    b.add_argument("--photos", type=int, help="number of photos in the preprocessing benchmark")
    b.add_argument("--photo-size", metavar="WxH", help="size of those photos (default 4000x3000)")
    b.add_argument("--encode-images", type=int, help="use the first N of the 8 images of the encoding batch")
    b.add_argument("--tokens", type=int, help="new tokens per generation in the end-to-end benchmark")
    b.set_defaults(func=cmd_bench)


def _argv(args: argparse.Namespace) -> list[str]:
    """The options of this run, as a command line (for the report)."""
    out: list[str] = []
    for flag in ("quick", "json", "no_report"):
        if getattr(args, flag):
            out.append("--" + flag.replace("_", "-"))
    for name in ("out", "threads", "only", "skip", "repeat", "photos", "photo_size", "encode_images", "tokens"):
        v = getattr(args, name)
        if v is not None:
            out += ["--" + name.replace("_", "-"), str(v)]
    return out
