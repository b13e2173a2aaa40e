"""Logging: structlog, configured once, in the entry point.

JSON lines when stdout is not a terminal (systemd, pipes, tests), colourless
console lines otherwise. Every line carries ``service``, ``generation``,
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
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _ensure_keys,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stdout),
        cache_logger_on_first_use=True,
    )
