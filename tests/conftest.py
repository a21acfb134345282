"""Helpers shared by the test files, and the ``slow`` marker.

``make test-fast`` (``pytest -m "not slow"``) leaves out the tests marked slow here: the ones that
train, launch processes or servers, or run lmms-eval, each taking more than about 10 s on 2 cores.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from PIL import Image

#: test modules whose every test is slow (training runs, multi-process launches, subprocess tools)
SLOW_MODULES = {"test_train", "test_train_hardening", "test_train_distributed", "test_train_synth",
                "test_lmms_eval", "test_demo", "test_golden", "test_compare"}
#: single slow tests in otherwise fast modules (module name, test-name prefix)
SLOW_TESTS = {("test_serve", "test_hires_serve_command"), ("test_serve", "test_web_page_in_chromium"),
              ("test_serve", "test_concurrent_requests_are_batched"), ("test_parts", "test_hires_train_predict"),
              ("test_parts", "test_composed_method_trains"), ("test_export", "test_round_trip"),
              ("test_serve_hardening", "test_large_requests_give_their_memory_back")}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1] if item.module is not None else ""
        if module in SLOW_MODULES or any(module == m and item.name.startswith(t) for m, t in SLOW_TESTS):
            item.add_marker(pytest.mark.slow)


def noise_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A (w, h) RGB image of smooth gradients plus noise, so resampling differences show."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 255 / max(w - 1, 1)), (yy * 255 / max(h - 1, 1)), ((xx + yy) % 97) * 2.6], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8), "RGB")


def rand_image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    """A (w, h) RGB image of uniform random pixels."""
    w, h = size
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


#: the colour-question training set of the trainer tests: colour word → RGB
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "white": (250, 250, 250)}


def write_colour_dataset(root, n: int, base: tuple[int, int]):  # noqa: ANN001, ANN201  (Path in, Path out)
    """``n`` small one-colour images under ``root/images`` (sizes ``base + (10 i, 7 i)``) and
    ``root/train.json``: LLaVA records asking their colour, answered with the colour word."""
    import json

    (root / "images").mkdir()
    recs = []
    for i in range(n):
        name = list(COLOURS)[i % 4]
        Image.new("RGB", (base[0] + 10 * i, base[1] + 7 * i), COLOURS[name]).save(root / "images" / f"{i}.png")
        recs.append({"id": f"r{i}", "image": f"{i}.png",
                     "conversations": [{"from": "human", "value": "<image>\nWhat colour is it?"},
                                       {"from": "gpt", "value": name}]})
    (root / "train.json").write_text(json.dumps(recs))
    return root


def run_cli(*argv: str) -> int:
    """``hires`` with only the convert package's subcommands (``convert``, ``logits``, ``export``:
    :func:`hires_lmm.convert.cli.register`), printing a CLI error as ``hires_lmm.cli.main`` does
    (``hires COMMAND: error: ...`` on stderr, exit code 2)."""
    import argparse
    import sys

    from hires_lmm.cli import CLIError
    from hires_lmm.convert.cli import register

    ap = argparse.ArgumentParser(prog="hires")
    register(ap.add_subparsers(dest="command", required=True))
    args = ap.parse_args(list(argv))
    try:
        return args.func(args)
    except CLIError as e:
        print(f"hires {args.command}: error: {e}", file=sys.stderr)
        return 2


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    """The CLI's error: exit status 2 and a single stderr line, no traceback."""
    assert r.returncode == 2, r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]
