"""The control protocol: one JSON request line, then JSON response lines.

Request: ``{"command": "status" | "reload" | "restart" | "signal" | "stop" |
"start" | "shutdown" | "upgrade" | "metrics", "service": str|null, "reason":
str|null}`` (``stop``, ``start`` and ``signal`` need the service); ``signal``
also takes ``"signal"`` (a name) and ``"worker"`` (an index), ``metrics``
``"format"``. Responses: any number of ``{"type": "progress", ...}``
lines, then exactly one ``{"type": "result", "ok": true, ...}`` or
``{"type": "error", "ok": false, "error": str, "reasons": [str]}``; then the
server closes the connection.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from supervisor.config.schema import MAX_WORKERS
from supervisor.errors import ProtocolError
from supervisor.observe.metrics import Format
from supervisor.values import SignalName

MAX_LINE = 64 * 1024


class ControlRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    command: Literal[
        "status", "reload", "restart", "signal", "stop", "start", "shutdown", "upgrade", "metrics"
    ]
    service: str | None = Field(default=None, max_length=64)
    reason: str | None = Field(default=None, max_length=1024)
    format: Format = "prometheus"  # of ``metrics``: text 0.0.4, or OpenMetrics
    signal: SignalName | None = None  # of ``signal``
    worker: int | None = Field(default=None, ge=0, lt=MAX_WORKERS)  # of ``signal``

    @model_validator(mode="after")
    def _needs_a_target(self) -> ControlRequest:
        if self.command == "signal" and (self.service is None or self.signal is None):
            raise ValueError("signal needs a service and a signal")
        if self.command in ("stop", "start") and self.service is None:
            raise ValueError(f"{self.command} needs a service")
        return self


def parse_request(line: bytes) -> ControlRequest:
    """Parse one request line.

    Raises:
        ProtocolError: with a reason fit to send back to the client.
    """
    try:
        data = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"request is not JSON: {exc}") from None
    try:
        return ControlRequest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'request'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise ProtocolError(f"invalid request: {problems}") from None


def encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def progress(message: str, **fields: Any) -> dict[str, Any]:
    return {"type": "progress", "message": message, **fields}


# Of every final answer (what `reload --json` and `upgrade --json` print);
# raised when a field changes meaning or goes. New fields keep it.
SCHEMA_VERSION = 1


def result(**fields: Any) -> dict[str, Any]:
    return {"type": "result", "ok": True, "schema_version": SCHEMA_VERSION, **fields}


def error(message: str, reasons: list[str] | None = None, **fields: Any) -> dict[str, Any]:
    return {
        "type": "error",
        "ok": False,
        "schema_version": SCHEMA_VERSION,
        "error": message,
        "reasons": reasons or [],
        **fields,
    }
