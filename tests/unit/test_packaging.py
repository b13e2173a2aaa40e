"""What is installed is what was tested: the declared dependency floors are
the ones CI tests (``make test-lowest``), and the wheel carries what a host
needs and runs its demo from any path.

This file: the parts that need no root and no running daemon; the rest is in
tests/system/test_packaging.py.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


_FLOOR = re.compile(r"([A-Za-z0-9_.-]+)\s*>=\s*([0-9][^,;\s]*)")


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def test_every_floor_in_pyproject_is_pinned_in_the_lowest_constraints() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    floors = {_name(m.group(1)): m.group(2) for spec in declared if (m := _FLOOR.match(spec))}
    pinned = {}
    for line in (ROOT / ".ci" / "lowest.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pinned[_name(name)] = version.strip()
    # gunicorn and uvicorn are the tests' real workers, not imported: no pin.
    wanted = {n: v for n, v in floors.items() if n not in {"gunicorn", "uvicorn"}}
    for name, floor in wanted.items():
        assert name in pinned, f"{name}>={floor} has no pin in .ci/lowest.txt"
        assert Version(pinned[name]) == Version(floor), (name, floor, pinned[name])
