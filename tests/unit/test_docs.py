"""The docs a newcomer reads: README short, every link and anchor resolving,
the configuration reference made from the models and current, and nothing
of the old single README lost in the split."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from supervisor.config import reference
from supervisor.config.schema import ServiceConfig, SocketOptions, SupervisorSection, TlsFiles

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
# Every section the README had before it was split into docs/.
SECTIONS = [
    "Quick start", "See a reload lose nothing", "Commands", "Configuration reference",
    "What a worker receives", "The demo worker", "How a reload works", "Steering",
    "Which path you get", "Upgrade in place", "Crash recovery", "Failure behaviour", "Metrics",
    "Troubleshooting", "Status JSON", "Logs", "Rotate a TLS certificate",
    "Real servers as workers", "Run it under systemd", "Benchmarks", "Development",
]  # fmt: skip


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"(?ms)^```.*?^```", "", page.read_text())
    return {slug(m.group(1)) for m in re.finditer(r"(?m)^#+ (.+)$", text)}


def headings() -> set[str]:
    return {
        m.group(1).strip()
        for page in PAGES
        for m in re.finditer(r"(?m)^#+ (.+)$", page.read_text())
    }


def test_the_readme_is_short() -> None:
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 200, f"README.md has {lines} lines: move detail to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page: Path) -> None:
    text = re.sub(r"(?ms)^```.*?^```", "", page.read_text())
    for target in LINK.findall(text):
        if re.match(r"^(https?|mailto|man):", target):
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.exists(), f"{page.name}: {target}: no such file"
        if anchor:
            assert resolved.suffix == ".md", f"{page.name}: {target}: an anchor in a non-page"
            assert anchor in anchors(resolved), f"{page.name}: {target}: no such heading"


def test_nothing_the_readme_had_is_lost() -> None:
    missing = [title for title in SECTIONS if title not in headings()]
    assert not missing, missing


def test_the_configuration_reference_is_made_from_the_models_and_current() -> None:
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == reference.markdown(), "stale: run `make docs`"
    committed, made = (ROOT / "docs" / "config.schema.json").read_text(), reference.schema()
    if json.loads(committed)["$comment"] == json.loads(made)["$comment"]:
        assert committed == made, "stale: run `make docs`"
    else:  # another pydantic (make test-lowest) words the same schema otherwise
        assert _keys(json.loads(committed)) == _keys(json.loads(made)), "stale: run `make docs`"
    for prefix, model in (
        ("supervisor.", SupervisorSection),
        ("services.", ServiceConfig),
        ("services.socket.", SocketOptions),
        ("services.tls.", TlsFiles),
    ):
        key_prefix = prefix.removeprefix("supervisor.").removeprefix("services.")
        for name, field in model.model_fields.items():
            if name in ("socket", "health"):
                continue  # sections of their own
            default = reference.default(prefix.rsplit(".", 2)[0] + "." + name, field)
            row = f"| `{key_prefix}{name}` | {default} |"
            assert row in page, f"no row {row!r}"


def _keys(schema: dict[str, Any]) -> dict[str, dict[str, tuple[object, object]]]:
    """Each model's keys, with their meaning and default: what a schema says
    whichever pydantic wrote it."""
    return {
        name: {
            key: (spec.get("description"), spec.get("default"))
            for key, spec in model.get("properties", {}).items()
        }
        for name, model in [("", schema), *schema["$defs"].items()]
    }


def test_the_json_schema_takes_what_the_loader_takes() -> None:
    schema = json.loads((ROOT / "docs" / "config.schema.json").read_text())
    service = schema["$defs"]["ServiceConfig"]["properties"]
    assert {"type": "string"} in service["stop_timeout"]["anyOf"], "durations as text"
    assert service["listen"]["items"]["type"] == "string"
    assert "description" in service["command"]


def test_every_citation_of_the_kernel_facts_names_a_section_that_exists() -> None:
    """Docstrings cite ``docs/kernel.md §N``; its sections are numbered so
    they resolve, and nothing cites the maintainers' notes outside the tree."""
    sections = set(re.findall(r"^## (\d+)\. ", (ROOT / "docs" / "kernel.md").read_text(), re.M))
    cited: dict[str, str] = {}
    for path in [*(ROOT / "supervisor").rglob("*.py"), *(ROOT / "tests").rglob("*.py")]:
        text = path.read_text()
        assert not re.search(r"\b(KERNEL|DESIGN)\.md\b", text), f"{path}: cite docs/ instead"
        for citation in re.findall(r"docs/kernel\.md\s+((?:§\d+(?:,\s*)?)+)", text):
            cited |= {n: str(path) for n in re.findall(r"§(\d+)", citation)}
    assert cited, "no citation found: the pattern is wrong"
    assert set(cited) <= sections, {n: cited[n] for n in set(cited) - sections}
