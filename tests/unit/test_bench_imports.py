"""``bench/`` runs outside ``make test`` (it needs matplotlib, wrk and half
an hour), so nothing else would notice when a helper it imports from
``tests/support`` or from itself moves or is renamed: each name it imports
from the repository must be defined where it imports it from."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _defined(module: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(module.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign | ast.AnnAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _module_path(dotted: str) -> Path | None:
    path = ROOT.joinpath(*dotted.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def test_every_name_bench_imports_from_the_repository_exists() -> None:
    missing = []
    checked = 0
    for script in sorted((ROOT / "bench").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if not isinstance(node, ast.ImportFrom) or not node.module:
                continue
            if not node.module.startswith(("tests", "bench", "supervisor")):
                continue
            target = _module_path(node.module)
            if target is None:
                missing.append(f"{script.name}: no module {node.module}")
                continue
            defined = _defined(target)
            for alias in node.names:
                checked += 1
                is_module = _module_path(f"{node.module}.{alias.name}") is not None
                if alias.name not in defined and not is_module:
                    missing.append(f"{script.name}: {node.module} has no {alias.name}")
    assert checked > 20, "the bench imports were not found: the walk is wrong"
    assert not missing, missing
