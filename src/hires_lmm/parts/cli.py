"""``hires methods [--json]``: the stages, their registered parts (with their options) and the
presets as parts — what a method file may name (docs/adding-a-method.md)."""

from __future__ import annotations

import argparse
import json
from typing import Any

__all__ = ["methods_json", "register"]


def methods_json() -> dict[str, Any]:
    """``{"stages": [...], "parts": {stage: [names]}, "options": {stage: {part: {option: default}}},
    "presets": {preset: {stage: part}}}``."""
    from . import METHOD_SPECS, PARTS, STAGES

    return {"stages": list(STAGES),
            "parts": {s: list(PARTS[s]) for s in STAGES},
            "options": {s: {n: _jsonable(cls.defaults()) for n, cls in PARTS[s].items()} for s in STAGES},
            "presets": {m: dict(spec.parts) for m, spec in METHOD_SPECS.items() if spec.base is None}}


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return {k: v if isinstance(v, (str, int, float, bool, type(None))) else [list(x) if isinstance(x, tuple) else x for x in v]
            if isinstance(v, (tuple, list)) else repr(v) for k, v in d.items()}


def cmd_methods(args: argparse.Namespace) -> int:
    from . import METHOD_SPECS, PARTS, STAGES

    if args.json:
        print(json.dumps(methods_json()))
        return 0
    print("stages: " + " → ".join(STAGES) + "\n")
    for s in STAGES:
        print(f"{s}:")
        for name, cls in PARTS[s].items():
            opts = ", ".join(f"{k}={v!r}" for k, v in cls.defaults().items())
            print(f"  {name:<16} {cls.summary()}" + (f"\n  {'':<16} options: {opts}" if opts else ""))
        print()
    print("presets:")
    for m, spec in METHOD_SPECS.items():
        if spec.base is None:
            print(f"  {m:<16} " + "  ".join(f"{s}={spec.parts[s]}" for s in STAGES[1:]))
    print("\na method file: {\"base\": PRESET, STAGE: PART, \"<stage>_options\": {...}} (JSON or YAML), "
          "given as --method FILE")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    m = sub.add_parser("methods", help="list the stages, parts (with options) and presets a method file composes")
    m.add_argument("--json", action="store_true", help="one JSON object")
    m.set_defaults(func=cmd_methods)
