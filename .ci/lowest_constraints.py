#!/usr/bin/env python3
"""Print pip constraints that pin every requirement of pyproject.toml to its lower bound (`name>=X` -> `name==X`),
for `make test-lowest`: the test suite on the oldest versions the package claims to support.

Usage: python .ci/lowest_constraints.py > lowest.txt; pip install -c lowest.txt -e ".[dev]"
"""

import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Packages that are not our requirements but must be held back for the lowest set to import at all.
TRANSITIVE = {
    # pyarrow 26 (pulled in by datasets) needs NumPy 2 at import time without declaring it; 24, the lowest that
    # datasets 5.1 accepts, works with NumPy 1.24
    "pyarrow": "24.0.0",
}
# Requirements whose lower bound cannot be installed here: torch (a CPU build of one version lies on disk).
SKIP = {"torch"}


def lower_bounds(requirements: list[str]) -> dict[str, str]:
    bounds = {}
    for text in requirements:
        match = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(\[[^\]]*\])?\s*>=\s*([0-9][^,;\s]*)", text)
        if match and match.group(1).lower() not in SKIP:
            bounds[match.group(1).lower().replace("_", "-")] = match.group(3)
    return bounds


def main():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in ("diffusers", "train", "eval"):
        requirements += project["optional-dependencies"][extra]
    bounds = lower_bounds(requirements)
    bounds.update(TRANSITIVE)
    sys.stdout.write("".join(f"{name}=={version}\n" for name, version in sorted(bounds.items())))


if __name__ == "__main__":
    main()
