"""``supervisorctl stop SERVICE`` and ``start SERVICE``.

A stop is a service's whole shutdown, as when it leaves the config: the
workers get ``stop_signal`` and finish what they accepted (``stop_timeout``),
and its listeners are closed and taken out of systemd's fd store, so new
connections are refused and nothing else takes them. The daemon keeps the
config the service ran and its last generation number: ``status`` shows it
``STOPPED`` (exit 3), a reload of every service leaves it stopped, and
``start`` runs it again with that config, from the next generation number.
A stop lasts until ``start``, or until the daemon itself starts again
(after a crash or a restart it runs every service of its file). An upgrade
carries it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import structlog

from supervisor.config.schema import ServiceConfig
from supervisor.control import protocol
from supervisor.control.requests import Switch
from supervisor.errors import SupervisorError
from supervisor.serve.service import Service, ServiceState
from supervisor.status import ServiceStatus

log = structlog.get_logger("supervisor.daemon.switch")


@dataclass(frozen=True)
class Stopped:
    """A service the operator stopped: what it ran, and its last generation."""

    config: ServiceConfig
    generation: int

    def snapshot(self, name: str) -> ServiceStatus:
        return ServiceStatus(
            name=name,
            generation=self.generation,
            state=ServiceState.STOPPED.value,
            retire="-",
            steering="-",
            workers=[],
        )

    def export(self) -> dict[str, Any]:
        return {"config": self.config.model_dump(mode="json"), "generation": self.generation}

    @classmethod
    def restore(cls, data: dict[str, Any]) -> Stopped:
        """From ``export()`` (an upgrade's state document).

        Raises:
            pydantic.ValidationError: this code's schema refuses the config.
        """
        return cls(ServiceConfig.model_validate(data["config"]), int(data["generation"]))


class SwitchHost(Protocol):
    """What a stop or a start needs of the daemon (``Daemon`` is one)."""

    @property
    def services(self) -> Mapping[str, Service]: ...

    @property
    def stopped(self) -> dict[str, Stopped]: ...

    async def stop_service(self, name: str) -> None: ...

    async def start_service(
        self, name: str, config: ServiceConfig, *, first_generation: int = 1
    ) -> None: ...


async def switch(daemon: SwitchHost, request: Switch) -> dict[str, Any]:
    """Stop or start ``request.service``; the answer for the client."""
    name = request.service
    log.info("switch_requested", source=request.source, service=name, start=request.on)
    if request.on:
        return await _start(daemon, name)
    return await _stop(daemon, name)


async def _stop(daemon: SwitchHost, name: str) -> dict[str, Any]:
    if name in daemon.stopped:
        return protocol.result(message=f"{name}: already stopped")
    service = daemon.services.get(name)
    if service is None:
        return protocol.error(f"no service named {name!r}")
    generation = service.current.number if service.current is not None else 0
    stopped = Stopped(service.config, max(generation, service.last_generation))
    await daemon.stop_service(name)
    daemon.stopped[name] = stopped
    log.info("service_stopped_by_request", service=name, generation=stopped.generation)
    return protocol.result(
        message=f"{name}: stopped (generation {stopped.generation}); its listeners are closed"
    )


async def _start(daemon: SwitchHost, name: str) -> dict[str, Any]:
    if name in daemon.services:
        return protocol.result(message=f"{name}: already running")
    stopped = daemon.stopped.pop(name, None)
    if stopped is None:
        return protocol.error(f"no stopped service named {name!r}")
    try:
        await daemon.start_service(name, stopped.config, first_generation=stopped.generation + 1)
    except SupervisorError as exc:
        daemon.stopped[name] = stopped
        return protocol.error(f"{name}: could not start", [str(exc)])
    generation = stopped.generation + 1
    log.info("service_started_by_request", service=name, generation=generation)
    return protocol.result(message=f"{name}: started (generation {generation})")
