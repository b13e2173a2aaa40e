"""Man pages for ``supervisord`` and ``supervisorctl``, made from their argparse parsers.

``python -m supervisor.daemon.manpage DIR`` writes ``supervisord.8`` and
``supervisorctl.1`` there (``make man`` writes ``docs/man/``); a test checks
that the committed pages are what the parsers give. The options are written
once, in the code; the pages and ``--help`` cannot disagree.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from supervisor import __version__
from supervisor.control.ctl import get_parser as ctl_parser
from supervisor.daemon.startup import get_parser as daemon_parser

DATE = "2026-12"
SEE_ALSO = "systemd.service(5), sd_notify(3), systemd.time(7)"


def _escape(text: str) -> str:
    return text.replace("\\", "\\e").replace("-", "\\-").replace("'", "\\(aq")


def _metavar(action: argparse.Action, default: str) -> str:
    metavar = action.metavar or default
    return " ".join(metavar) if isinstance(metavar, tuple) else str(metavar)


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"\\fI{_escape(_metavar(action, action.dest))}\\fR"
    names = ", ".join(f"\\fB{_escape(flag)}\\fR" for flag in action.option_strings)
    if action.nargs == 0:
        return names
    return f"{names} \\fI{_escape(_metavar(action, action.dest.upper()))}\\fR"


def _usage(parser: argparse.ArgumentParser) -> str:
    return _escape(" ".join(parser.format_usage().removeprefix("usage: ").split()))


def _options(parser: argparse.ArgumentParser) -> list[str]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction | argparse._HelpAction):
            continue
        if action.help == argparse.SUPPRESS:
            continue
        out += [".TP", _flags(action), _escape(action.help or "")]
    return out


def render(parser: argparse.ArgumentParser, section: int, summary: str, extra: list[str]) -> str:
    """The roff text of one page."""
    name = parser.prog
    lines = [
        f'.TH {name.upper()} {section} "{DATE}" "reuseport-supervisor {__version__}"',
        ".SH NAME",
        f"{name} \\- {_escape(summary)}",
        ".SH SYNOPSIS",
        _usage(parser),
        ".SH DESCRIPTION",
        _escape(parser.description or ""),
        ".SH OPTIONS",
        *_options(parser),
    ]
    subparsers = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if subparsers:
        lines.append(".SH COMMANDS")
        for choice in subparsers[0]._choices_actions:
            command = subparsers[0].choices[choice.dest]
            lines += [".TP", f"\\fB{_usage(command)}\\fR", _escape(choice.help or "")]
            options = _options(command)
            if options:
                lines += [".RS", *options, ".RE"]
    if parser.epilog:
        lines += [".SH EXIT STATUS", _escape(parser.epilog)]
    lines += [*extra, ".SH SEE ALSO", SEE_ALSO, ""]
    return "\n".join(lines)


def pages() -> dict[str, str]:
    """File name -> roff text, for both commands."""
    files = [
        ".SH FILES",
        "/etc/reuseport-supervisor/supervisor.toml, /run/reuseport-supervisor/control.sock",
    ]
    return {
        "supervisord.8": render(
            daemon_parser(), 8, "zero-downtime process supervisor (the daemon)", files
        ),
        "supervisorctl.1": render(ctl_parser(), 1, "control supervisord", files),
    }


def main(argv: list[str] | None = None) -> None:
    target = Path((argv or sys.argv[1:] or ["docs/man"])[0])
    target.mkdir(parents=True, exist_ok=True)
    for name, text in pages().items():
        (target / name).write_text(text)
        print(target / name)


if __name__ == "__main__":
    main()
