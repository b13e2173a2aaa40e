"""The folders of ``supervisor/`` are layers (see its ``__init__``): a module
imports only from its own folder or from one below it. Every import counts,
the lazy ones and those under ``TYPE_CHECKING`` too: a type that points up
is a dependency that points up."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "supervisor"

# Bottom first. The top-level modules (errors, values, status, text) are
# the floor every folder stands on; demo/, a worker of its own, may use
# any, and nothing uses it.
LAYERS = [
    "",
    "kernel",
    "steering",
    "config",
    "plan",
    "handoff",
    "serve",
    "observe",
    "control",
    "daemon",
    "demo",
]


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else ""


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "supervisor":
                found |= {f"supervisor.{alias.name}" for alias in node.names}
            elif node.module.startswith("supervisor."):
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("supervisor.")}
    return found


def upward_imports(root: Path = PACKAGE) -> set[tuple[str, str]]:
    """Every (importer, imported) pair whose imported folder stands higher."""
    rank = {name: i for i, name in enumerate(LAYERS)}
    found = set()
    for path in root.rglob("*.py"):
        module = ".".join(("supervisor", *path.relative_to(root).with_suffix("").parts))
        here = _folder(module)
        for target in _imports(path):
            there = _folder(target) if target.count(".") > 1 else ""
            if target.removeprefix("supervisor.") in rank:  # `from supervisor import serve`
                there = target.removeprefix("supervisor.")
            if here != there and rank[there] > rank[here]:
                found.add((module, target))
    return found


def test_every_folder_is_a_layer_of_the_map() -> None:
    folders = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert folders == set(LAYERS) - {""}


def test_no_module_imports_from_a_folder_above_its_own() -> None:
    assert not upward_imports(), f"imports that point up: {sorted(upward_imports())}"


def test_an_upward_import_is_caught(tmp_path: Path) -> None:
    """The control: a kernel module that imports the daemon fails the check."""
    for path in PACKAGE.rglob("*.py"):
        copy = tmp_path / path.relative_to(PACKAGE)
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_text(path.read_text())
    (tmp_path / "kernel" / "sneaky.py").write_text("from supervisor.daemon import upgrade\n")
    assert ("supervisor.kernel.sneaky", "supervisor.daemon") in upward_imports(tmp_path)


def test_every_oserror_caught_above_the_kernel_says_why() -> None:
    """Foreign errors are translated where they enter: above ``kernel/`` and
    ``steering/`` an ``except OSError`` is a seam, and says so (a comment on
    its line or the line above: ``# seam: what it is``)."""
    bare = []
    for path in PACKAGE.rglob("*.py"):
        folder = path.relative_to(PACKAGE).parts[0]
        if folder in ("kernel", "steering", "demo"):
            continue
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if line.lstrip().startswith("except") and "OSError" in line.split("#")[0]:
                above = lines[number - 2].strip()
                if "#" not in line and not above.startswith("#"):
                    bare.append(f"{path.relative_to(PACKAGE)}:{number}")
    assert not bare, f"except OSError without a word of why: {bare}"
