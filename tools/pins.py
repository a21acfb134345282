"""Version pins for the drift checks, read from pyproject.toml (no third-party imports).

    python tools/pins.py lowest      # one ``name==lower-bound`` line per runtime dependency

``make test-oldest`` installs with these as pip constraints, so every runtime dependency sits at
the lowest version pyproject.toml allows (the versions CI tests); ``make lock`` writes
requirements/lock.txt, the exact set ``make install`` uses.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def runtime_requirements() -> list[str]:
    """The ``[project] dependencies`` of pyproject.toml."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["project"]["dependencies"])


def lowest(requirements: list[str]) -> list[str]:
    """``name==X`` for each requirement's ``>=X`` bound; a requirement without one is an error:
    an untested lower bound is what this check exists to prevent."""
    pins = []
    for req in requirements:
        m = re.match(r"^\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?\s*([^;]*)", req)
        if not m:
            raise SystemExit(f"cannot read requirement {req!r}")
        name, spec = m.group(1), m.group(2)
        low = re.search(r">=\s*([0-9][^,\s]*)", spec)
        if not low:
            raise SystemExit(f"requirement {req!r} has no lower bound (>=)")
        pins.append(f"{name}=={low.group(1)}")
    return pins


def main(argv: list[str]) -> int:
    if argv[1:] != ["lowest"]:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    print("\n".join(lowest(runtime_requirements())))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
