"""``--print-completion SHELL`` for both commands, from their parsers (shtab).

The shells are ours to list, not shtab's: its list grows between releases,
and the man pages (made from the parsers) must read the same whichever
version is installed.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

import shtab

SHELLS = ("bash", "zsh")


class _Print(argparse.Action):
    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,  # noqa: ARG002
        values: str | Sequence[Any] | None,
        option_string: str | None = None,  # noqa: ARG002
    ) -> None:
        print(shtab.complete(parser, shell=str(values)))
        parser.exit(0)


def add_option(parser: argparse.ArgumentParser) -> None:
    """Give ``parser`` a ``--print-completion {bash,zsh}`` that prints and exits."""
    parser.add_argument(
        "--print-completion", choices=SHELLS, action=_Print, help="print a bash or zsh completion"
    )
