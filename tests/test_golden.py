"""Golden outputs of the seven tiny presets: the model must reproduce, bit for bit, the visual tokens,
spliced inputs, logits and greedy generations recorded in ``tests/golden/`` (before the core
redesign), so a refactor of model / visual / methods / config is proven not to change any number.

Re-record (only when a numerical change is intended, or after bumping the locked versions)::

    .venv/bin/python tests/golden/record.py

What is recorded and how: see the docstring of ``tests/golden/record.py`` (this test imports its
``compute`` so both build the presets and the inputs the same way).

Exactness: under the recorded torch / transformers versions and CPU capability the check is the
SHA-256 of every tensor's float32 bytes. Under other versions (or another CPU kernel family) bit
identity is not meaningful, so the test falls back to comparing the stored slices (first 64
values, 256 evenly spaced values) within 1e-4, and the row sums within 1e-4 per summed element,
and says so in its messages (and in a warning); it never skips. Shapes, visual-token counts and
generated texts are compared exactly in both modes. The thread count is fixed (``THREADS``).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from hires_lmm.plan import METHODS

GOLDEN = Path(__file__).resolve().parent / "golden"
TOL = 1e-4


def _load_record():
    spec = importlib.util.spec_from_file_location("hires_golden_record", GOLDEN / "record.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


record = _load_record()
DOC = json.loads(record.JSON_PATH.read_text())
ENV_KEYS = ("torch", "transformers", "cpu_capability")
RECORDED = {k: DOC["environment"].get(k) for k in ENV_KEYS}
CURRENT = {k: record.environment()[k] for k in ENV_KEYS}
EXACT = RECORDED == CURRENT
MODE = ("exact: SHA-256 of the float32 bytes (recorded and installed versions match: "
        + ", ".join(f"{k} {v}" for k, v in CURRENT.items()) + ")") if EXACT else (
        f"TOLERANCE {TOL:g} on the stored slices, NOT bit identity: installed "
        + ", ".join(f"{k} {CURRENT[k]}" for k in ENV_KEYS) + " differ from the recorded "
        + ", ".join(f"{k} {RECORDED[k]}" for k in ENV_KEYS))


@pytest.fixture(scope="module")
def stats():
    from safetensors.torch import load_file

    return load_file(str(record.TENSORS_PATH))


@pytest.fixture(scope="module", autouse=True)
def fixed_threads():
    prev = record.setup_torch()
    yield
    torch.set_num_threads(prev)


def test_golden_files_cover_every_preset(stats):
    assert list(DOC["presets"]) == list(METHODS), "re-record: .venv/bin/python tests/golden/record.py"
    assert DOC["threads"] == record.THREADS and DOC["seed"] == record.SEED
    for m, facts in DOC["presets"].items():
        assert set(facts["cases"]) == set(record.CASES), m
        for name in facts["tensors"]:
            for stat in ("head", "strided", "rowsum"):
                assert f"{m}/{name}/{stat}" in stats, (m, name, stat)
    size = sum(p.stat().st_size for p in GOLDEN.iterdir() if p.is_file())
    assert size < 3_000_000, f"tests/golden/ holds {size} bytes"


def _diffs(got: dict[str, torch.Tensor], stored: dict[str, torch.Tensor]) -> dict[str, float]:
    return {s: float((got[s] - stored[s]).abs().max()) if got[s].shape == stored[s].shape else float("inf")
            for s in stored}


@pytest.mark.parametrize("method", METHODS)
def test_golden(method, stats):
    if not EXACT:
        warnings.warn(f"golden outputs of {method}: {MODE}", stacklevel=1)
    want = DOC["presets"][method]
    tensors, facts = record.compute(method)
    problems: list[str] = []
    if set(tensors) != set(want["tensors"]):
        problems.append(f"tensors {sorted(tensors)} instead of {sorted(want['tensors'])}")
    for case, wc in want["cases"].items():
        gc = facts["cases"][case]
        for key in ("num_visual_tokens", "text", "input_ids_sha256"):
            if gc[key] != wc[key]:
                problems.append(f"case {case}: {key} {gc[key]!r}, recorded {wc[key]!r}")
    for name, w in want["tensors"].items():
        if name not in tensors:
            continue
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        if list(t.shape) != w["shape"]:
            problems.append(f"{name}: shape {list(t.shape)}, recorded {w['shape']}")
            continue
        got = record.reduce(t)
        stored = {s: stats[f"{method}/{name}/{s}"] for s in ("head", "strided", "rowsum")}
        d = _diffs(got, stored)
        detail = ", ".join(f"max |diff| {s} {v:.3g}" for s, v in d.items())
        if EXACT:
            if record.sha256(t) != w["sha256"]:
                problems.append(f"{name} {tuple(t.shape)}: SHA-256 differs; on the stored slice {detail}")
        else:
            row_len = t.shape[-1] if t.dim() > 1 else t.numel()
            if d["head"] > TOL or d["strided"] > TOL or d["rowsum"] > TOL * row_len:
                problems.append(f"{name} {tuple(t.shape)}: beyond tolerance; {detail} "
                                f"(allowed {TOL:g}, row sums {TOL * row_len:g})")
    if problems:
        # name-independent: a redesign may rename the parameters without changing them
        if facts["weights"]["unnamed"] != want["weights"]["unnamed"]:
            problems.append(f"note: the initial weights differ too (fingerprint {facts['weights']}, recorded "
                            f"{want['weights']}): the build initialises differently, so every output moves")
        else:
            problems.append("note: the initial weights are identical, so the computation itself changed")
        pytest.fail(f"{method} differs from its golden outputs [mode: {MODE}]:\n  " + "\n  ".join(problems)
                    + "\n(re-record only if the change is intended: .venv/bin/python tests/golden/record.py)",
                    pytrace=False)
