"""The answers of ``reload``, ``restart`` and ``upgrade``, typed at both ends
of the wire, as ``status.py``'s snapshots are: the daemon fills them in
(``serve/rollout.py``, ``daemon/handover.py``) and sends ``model_dump``;
``supervisorctl`` reads them back with the same models. Unknown keys are
ignored when reading, so a client and a daemon of neighbouring versions (an
upgrade in progress) still understand each other; a missing one is an error
``supervisorctl`` names.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

# What a rollout of one service came to (the metrics count each).
Outcome = Literal["succeeded", "rejected", "rolled_back", "cancelled"]
# A reload also starts services the file added and stops those it dropped.
ReloadOutcome = Outcome | Literal["started", "stopped"]


class RolloutReport(BaseModel):
    """The answer to "did the reload work, and what did it cost?", for one
    service. Filled in as the rollout goes (assignments are not validated)."""

    model_config = ConfigDict(extra="ignore")

    service: str
    outcome: ReloadOutcome
    generation: int | None = None  # the new (or attempted) generation
    previous: int | None = None
    duration: float = 0.0
    path: str | None = None
    path_reason: str | None = None
    steering: str | None = None
    queued_at_cutover: int | None = None
    handshakes_at_cutover: int | None = None
    listeners_at_cutover: list[dict[str, Any]] = Field(default_factory=list)
    drained: int | None = None
    left_at_shutdown: int | None = None
    datagrams_left: int | None = None
    drain_timed_out: bool = False
    unmovable: list[str] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)
    problems: list[str] = Field(default_factory=list)  # kernel failures after the cutover
    counters: dict[str, int] = Field(default_factory=dict)
    reasons: list[str] = Field(default_factory=list)
    reason: str | None = None  # why the rollout was asked for (--reason)
    timings: dict[str, float] = Field(default_factory=dict)  # see rollout.Timer

    @computed_field  # type: ignore[prop-decorator]
    @property
    def ok(self) -> bool:
        return self.outcome in ("succeeded", "started", "stopped")


class Adopted(BaseModel):
    model_config = ConfigDict(extra="ignore")

    services: int = 0
    listeners: int = 0
    workers: int = 0


class UpgradeResult(BaseModel):
    """What an in-place upgrade did: sent by the new image to the clients
    that asked for it (``"from"`` and ``"to"`` on the wire)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    from_version: str = Field(alias="from")
    to_version: str = Field(alias="to")
    pid: int
    duration: float
    adopted: Adopted
    restarted: int = 0
    problems: list[str] = Field(default_factory=list)

    def wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True)


def reports_of(answer: Mapping[str, Any]) -> dict[str, RolloutReport]:
    """The per-service reports of a reload or restart answer, read back.

    Raises:
        pydantic.ValidationError: an entry this version cannot read.
    """
    services = answer.get("services") or {}
    return {
        name: RolloutReport.model_validate({"service": name, **raw})
        for name, raw in services.items()
    }
