"""The package as users meet it: ``python -m hires_lmm``, its version, its type marker, and the
pure-geometry commands' start-up (no torch)."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import hires_lmm


def test_python_m_hires_lmm_is_the_hires_command():
    out = subprocess.run([sys.executable, "-m", "hires_lmm", "plan", "--method", "llava-uhd", "--size", "1024x768",
                          "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["num_visual_tokens"] == 1014
    bad = subprocess.run([sys.executable, "-m", "hires_lmm", "plan", "--method", "nope", "--size", "10x10"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "unknown method" in bad.stderr


def test_version_is_the_distributions():
    assert hires_lmm.__version__ == importlib.metadata.version("hires-lmm")


def test_the_package_ships_its_type_marker():
    assert (Path(hires_lmm.__file__).parent / "py.typed").is_file()


def test_plan_and_cost_import_no_torch():
    """Pure geometry starts in a fraction of a second: neither command may import torch (nor PIL
    for a bare --size), whatever the registered extension commands import when they run."""
    code = ("import sys\nfrom hires_lmm.cli import main\n"
            "for argv in (['plan', '-m', 'all', '--size', '1600x1200', '--json'],\n"
            "             ['cost', '-m', 'all', '--size', '1600x1200', '--json']):\n"
            "    assert main(argv) == 0\n"
            "heavy = sorted(m for m in ('torch', 'PIL', 'transformers', 'numpy') if m in sys.modules)\n"
            "print('HEAVY', heavy, file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stderr, out.stderr.splitlines()[-1]
