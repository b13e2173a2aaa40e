"""Logging: structlog, configured once, in the entry point.

JSON lines when stdout is not a terminal (systemd, pipes, tests), colourless
console lines otherwise. Under journald (stdout is ``$JOURNAL_STREAM``) each
line starts with its sd-daemon priority (``<3>`` error, ``<4>`` warning,
``<6>`` info, ``<7>`` debug). Every line carries ``service``, ``generation``,
``worker`` and ``pid`` (null where they do not apply); they are bound as
context variables before a task starts, so each task's lines carry its own.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, Literal

import structlog

_ALWAYS = ("service", "generation", "worker", "pid")


def _ensure_keys(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in _ALWAYS:
        event.setdefault(key, None)
    if event["pid"] is None and event["worker"] is None:
        event["pid"] = os.getpid()  # a daemon-level line: the daemon's own pid
    return event


_PRIORITIES = {"critical": 2, "error": 3, "exception": 3, "warning": 4, "info": 6, "debug": 7}


def to_journal(environ: MutableMapping[str, str] | None = None) -> bool:
    """Is stdout the journal? ``$JOURNAL_STREAM`` names its device and inode."""
    value = (environ if environ is not None else os.environ).get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(sys.stdout.fileno())
    except (OSError, ValueError):  # seam: stdout may be closed or no file at all
        return False
    return f"{st.st_dev}:{st.st_ino}" == f"{device}:{inode}"


def _priority(_: Any, method: str, event: Any) -> str:
    """``<6>`` before a rendered line: journald files it with that priority, so
    ``journalctl -p warning`` shows warnings and errors only. (The renderer
    before it has turned the event into its line.)"""
    return f"<{_PRIORITIES.get(method, 6)}>{event}"


def configure(
    fmt: Literal["auto", "json", "console"] = "auto",
    level: str = "info",
) -> None:
    """Configure structlog for the whole process; call once, before any task starts."""
    as_json = fmt == "json" or (fmt == "auto" and not sys.stdout.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    journal: list[structlog.typing.Processor] = [_priority] if to_journal() else []
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _ensure_keys,
            structlog.processors.format_exc_info,
            renderer,
            *journal,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        # One write() a line, newline included: print() writes the newline
        # apart when stdout is unbuffered (PYTHONUNBUFFERED, python -u), and a
        # worker with output = "inherit" shares this stdout, so its lines
        # could land inside ours.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
