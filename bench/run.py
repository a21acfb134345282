"""Thin entry to the benchmarks of docs/performance.md: ``python bench/run.py [--quick] [--json] ...``
is ``hires bench ...`` (the code lives in ``hires_lmm.bench``, so an installed package has it too).
``bench/serve_load.py`` is the separate load test of ``hires serve``."""

from __future__ import annotations

import sys

from hires_lmm.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
