"""Daemon-level reload: one request (control socket or SIGHUP) to service rollouts.

The whole file is loaded and validated first, once: a bad file changes
nothing, and what a service rolls out is exactly what was validated here
(a file edited meanwhile waits for the next reload). Then each targeted
service gets a rollout ticket carrying its snapshot (services coalesce
concurrent requests on their own), services new in the file are started
and services gone from it are stopped (reload of all services only), and
every service's progress is streamed to the caller as it happens, ending
in one result.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

from supervisor.config.schema import Config
from supervisor.control import protocol
from supervisor.control.requests import Reload, Reply
from supervisor.errors import ConfigError, SupervisorError
from supervisor.plan.capabilities import Capabilities
from supervisor.reports import RolloutReport
from supervisor.serve.rollout import Ticket, ValidatedConfig
from supervisor.serve.service import Service
from supervisor.values import Served

log = structlog.get_logger("supervisor.daemon.reloads")
CONFIG_REJECTED = "config rejected"  # the answer's error when the file was refused


@dataclass(frozen=True)
class Checked:
    """A config file judged once: the config, the kernel's capabilities it was
    judged on, and each service's certificate as the check read it (the one
    a rollout then probes for and shows)."""

    config: Config
    capabilities: Capabilities
    certificates: Mapping[str, Served] = field(default_factory=dict)


@dataclass(frozen=True)
class ServiceDirectory:
    """How a reload reaches the daemon's services."""

    services: Mapping[str, Service]
    # The whole file, validated against host and kernel, once for the whole reload.
    load: Callable[[], Checked]
    current: Callable[[], Config]
    start: Callable[[str, Config], Awaitable[None]]  # raises SupervisorError
    stop: Callable[[str], Awaitable[None]]
    stopped: Callable[[], MutableMapping[str, Any]]  # by `supervisorctl stop`: left alone


@dataclass(frozen=True)
class Answered:
    """A reload's answer as it was sent, and the reports it was made of (none
    when it was refused before any rollout): summaries read these, never the
    answer back."""

    answer: dict[str, Any]
    reports: Mapping[str, RolloutReport] = field(default_factory=dict)

    def summary(self) -> str:
        """``succeeded (web: generation 3 by migrate in 0.74 s)`` or ``failed: reasons``."""
        if not self.answer.get("ok"):
            reasons = "; ".join(self.answer.get("reasons") or []) or self.answer.get("message", "")
            return f"failed: {reasons}"[:300]
        done = [
            f"{name}: generation {r.generation}"
            + (f" by {r.path} in {r.duration:.2f} s" if r.path else f" {r.outcome}")
            for name, r in self.reports.items()
        ]
        return f"succeeded ({', '.join(done)})"

    def log_fields(self) -> dict[str, Any]:
        return {
            "ok": self.answer.get("ok"),
            "services": {
                name: r.model_dump(include={"outcome", "generation", "path", "duration"})
                for name, r in self.reports.items()
            },
            "reasons": self.answer.get("reasons", []),
        }


async def handle_reload(directory: ServiceDirectory, request: Reload) -> Answered:
    """Carry out ``request``; answer on its reply channel (if any) and close it.

    Returns the answer, with the reports it was made of.
    """
    reply = request.reply
    log.info(
        "reload_requested",
        source=request.source,
        target=request.service,
        reason=request.reason,
        restart=request.keep_config,
    )
    try:
        answered = await _reload(directory, request, reply)
    except BaseException:
        if reply is not None:
            reply.close()
        raise
    level = "info" if answered.answer.get("ok") else "error"
    log.log({"info": 20, "error": 40}[level], "reload_answered", **answered.log_fields())
    if reply is not None:
        async with reply:
            await reply.send(answered.answer)
    return answered


class _Refused(Exception):
    """The request is answered before any rollout starts (``answer``)."""

    def __init__(self, answer: dict[str, Any]) -> None:
        super().__init__(answer.get("error"))
        self.answer = answer


async def _reload(directory: ServiceDirectory, request: Reload, reply: Reply | None) -> Answered:
    async def say(message: str) -> None:
        if reply is not None:
            await reply.send(protocol.progress(message))

    notes: list[str] = []
    results: dict[str, RolloutReport] = {}
    if request.service is not None and request.service in directory.stopped():
        return Answered(_stopped(request.service))
    try:
        if request.keep_config:
            snapshots = _running(directory, request.service)
        else:
            snapshots = await _from_file(directory, request.service, notes, results, say)
    except _Refused as refused:
        return Answered(refused.answer)
    tickets = {
        name: directory.services[name].request_rollout(snapshot, request.reason)
        for name, snapshot in snapshots.items()
    }
    async with trio.open_nursery() as nursery:
        for ticket in tickets.values():
            nursery.start_soon(_forward, ticket, reply)
    for name, ticket in tickets.items():
        assert ticket.report is not None
        results[name] = ticket.report
    failed = [f"{name}: {_why(r)}" for name, r in results.items() if not r.ok]
    what = "restart" if request.keep_config else "reload"
    services = {name: report.model_dump() for name, report in results.items()}
    if failed:
        answer = protocol.error(f"{what} failed", failed, services=services, notes=notes)
    else:
        answer = protocol.result(message=f"{what} succeeded", services=services, notes=notes)
    return Answered(answer, results)


async def _from_file(
    directory: ServiceDirectory,
    service: str | None,
    notes: list[str],
    results: dict[str, RolloutReport],
    say: Callable[[str], Awaitable[None]],
) -> dict[str, ValidatedConfig]:
    """``reload``: the file, loaded and judged once; services new in it started
    and those gone from it stopped (a reload of every service); the snapshot
    each service rolls out.

    Raises:
        _Refused: the file, or the named service, cannot be reloaded.
    """
    began = trio.current_time()
    try:
        checked = directory.load()
    except ConfigError as exc:
        raise _Refused(
            protocol.error(CONFIG_REJECTED, [str(i) for i in exc.issues], services={})
        ) from None
    validated_in = trio.current_time() - began
    config = checked.config
    if service is not None and service not in directory.services:
        raise _Refused(protocol.error(f"no service named {service!r}", services={}))
    if service is not None and service not in config.services:
        raise _Refused(
            protocol.error(
                f"service {service!r} is no longer in the config file",
                ["reload every service to stop it"],
                services={},
            )
        )
    if config.supervisor != directory.current().supervisor:
        notes.append("changes to [supervisor] take effect at the next start")
    if service is None:
        await _add_and_remove(directory, config, results, say)
        names = [n for n in config.services if n in directory.services and n not in results]
    else:
        names = [service]
    return {
        name: ValidatedConfig(
            config.services[name],
            validated_in,
            checked.capabilities,
            checked.certificates.get(name),
        )
        for name in names
    }


def _running(directory: ServiceDirectory, service: str | None) -> dict[str, ValidatedConfig]:
    """``supervisorctl restart``: each service's snapshot of the config it runs
    (the file is neither read nor judged).

    Raises:
        _Refused: no such service.
    """
    if service is not None and service not in directory.services:
        raise _Refused(protocol.error(f"no service named {service!r}", services={}))
    names = list(directory.services) if service is None else [service]
    return {name: ValidatedConfig(directory.services[name].config) for name in names}


def _stopped(name: str) -> dict[str, Any]:
    return protocol.error(
        f"service {name!r} is stopped", [f"supervisorctl start {name} first"], services={}
    )


async def _add_and_remove(
    directory: ServiceDirectory,
    config: Config,
    results: dict[str, RolloutReport],
    say: Callable[[str], Awaitable[None]],
) -> None:
    stopped = directory.stopped()
    for name in [n for n in stopped if n not in config.services]:
        await say(f"{name}: removed from the config: forgotten (it was stopped)")
        del stopped[name]
        results[name] = RolloutReport(service=name, outcome="stopped")
    for name in [n for n in config.services if n not in directory.services and n not in stopped]:
        await say(f"{name}: new service: starting generation 1")
        try:
            await directory.start(name, config)
        except SupervisorError as exc:
            results[name] = RolloutReport(service=name, outcome="rolled_back", reasons=[str(exc)])
        else:
            results[name] = RolloutReport(service=name, outcome="started", generation=1)
    for name in [n for n in directory.services if n not in config.services]:
        await say(f"{name}: removed from the config: stopping")
        await directory.stop(name)
        results[name] = RolloutReport(service=name, outcome="stopped")


async def _forward(ticket: Ticket, reply: Reply | None) -> None:
    async with ticket.messages:
        async for message in ticket.messages:
            if reply is not None:
                await reply.send(protocol.progress(message))
    await ticket.done.wait()


def _why(report: RolloutReport) -> str:
    reasons = "; ".join(report.reasons) or "no reason given"
    return f"{report.outcome}: {reasons}"
