"""Plan: what a generation of a service will run, computed without side effects.

The plan is pure (no trio, no sockets, no processes) so it can be printed by
``supervisord --check`` and unit-tested. The code that acts follows it.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from supervisor.config.schema import Config, Health, ServiceConfig
from supervisor.kernel.sockets import ListenerOptions
from supervisor.plan.capabilities import Capabilities, RetirePath
from supervisor.values import ListenAddress, Served, format_duration

FIRST_LISTEN_FD = 3  # the systemd socket-activation protocol starts at fd 3


@dataclass(frozen=True)
class WorkerPlan:
    """One worker of one generation: its command, environment and listeners."""

    service: str
    generation: int
    index: int
    argv: tuple[str, ...]
    environment: tuple[tuple[str, str], ...]
    working_directory: Path | None
    state_directory: Path | None  # created before the process starts (serve/spawner.py)
    user: str | None
    group: str | None
    listen: tuple[ListenAddress, ...]

    @property
    def label(self) -> str:
        return f"{self.service}[{self.index}]@{self.generation}"


@dataclass(frozen=True)
class RestartPolicy:
    """When to respawn a worker that died, and when to give up (FATAL).

    A run is *short* if the process died before becoming RUNNING or less than
    ``stable_after`` seconds after it was spawned. The first respawn after a
    long run is immediate (its listener's queue is waiting); each short run
    in a row doubles the delay; ``max_short_runs`` short runs in a row make
    the worker FATAL.
    """

    initial_delay: float = 0.1
    max_delay: float = 5.0
    stable_after: float = 5.0
    max_short_runs: int = 5

    def is_short(self, *, reached_running: bool, lifetime: float) -> bool:
        return not reached_running or lifetime < self.stable_after

    def delay(self, short_runs: int) -> float:
        """Seconds to wait before the next spawn, given short runs in a row so far."""
        if short_runs <= 0:
            return 0.0
        return float(min(self.initial_delay * 2 ** (short_runs - 1), self.max_delay))

    def gives_up(self, short_runs: int) -> bool:
        return short_runs >= self.max_short_runs


@dataclass(frozen=True)
class SlotSettings:
    """How a slot runs its processes (from the service config)."""

    health: Health
    ready_timeout: float
    stop_signal: int = signal.SIGTERM
    stop_timeout: float = 30.0
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    certificate: Served | None = None  # tls.cert as read once: what a tls probe must be served
    output: Literal["events", "inherit"] = "events"  # workers' stdout and stderr


def slot_settings(config: ServiceConfig, certificate: Served | None = None) -> SlotSettings:
    """How the slots of ``config``'s workers run their processes (``certificate``:
    its tls.cert, as read once by whoever planned it)."""
    return SlotSettings(
        health=config.health,
        ready_timeout=config.ready_timeout,
        stop_signal=signal.Signals[config.stop_signal],
        stop_timeout=config.stop_timeout,
        certificate=certificate,
        output=config.output,
    )


def listener_options(config: ServiceConfig) -> ListenerOptions:
    """The socket options of ``config``'s listeners (backlog and ``socket.*``)."""
    opts = config.socket
    return ListenerOptions(
        backlog=config.backlog,
        defer_accept=opts.defer_accept,
        fastopen=opts.fastopen,
        rcvbuf=opts.rcvbuf,
        sndbuf=opts.sndbuf,
    )


@dataclass(frozen=True)
class ServicePlan:
    """One generation of one service."""

    name: str
    generation: int
    config: ServiceConfig
    workers: tuple[WorkerPlan, ...]
    settings: SlotSettings  # how every slot runs its process: decided here, once
    listener_options: ListenerOptions  # and how every listener is made


def substitute(text: str, *, worker: int, generation: int) -> str:
    """Replace ``{fd}``, ``{worker}`` and ``{generation}``; leave other braces alone.

    Only these exact tokens are replaced (not ``str.format``) so that commands
    carrying JSON or shell snippets with braces pass through untouched.
    """
    return (
        text.replace("{fd}", str(FIRST_LISTEN_FD))
        .replace("{worker}", str(worker))
        .replace("{generation}", str(generation))
    )


def plan_worker(name: str, service: ServiceConfig, generation: int, index: int) -> WorkerPlan:
    """The plan of worker ``index`` of generation ``generation`` of ``name``."""

    def sub(text: str) -> str:
        return substitute(text, worker=index, generation=generation)

    env = {key: sub(value) for key, value in service.environment.items()}
    env.update(
        SUPERVISOR_SERVICE=name,
        SUPERVISOR_GENERATION=str(generation),
        SUPERVISOR_WORKER=str(index),
    )
    if service.listen_mode == "pass":  # "own": the worker binds them itself
        env.update(
            LISTEN_FDS=str(len(service.listen)),
            LISTEN_FDNAMES=":".join(address.fd_name for address in service.listen),
        )
    cwd = service.working_directory
    return WorkerPlan(
        service=name,
        generation=generation,
        index=index,
        argv=tuple(sub(arg) for arg in service.command),
        environment=tuple(sorted(env.items())),
        working_directory=None if cwd is None else Path(sub(str(cwd))),
        state_directory=service.state_directory,
        user=service.user,
        group=service.group,
        listen=tuple(service.listen),
    )


def plan_service(
    name: str, service: ServiceConfig, generation: int, certificate: Served | None = None
) -> ServicePlan:
    """The plan of one generation of a service: ``workers`` worker plans
    (``certificate``: its tls.cert as read once, for the tls health check)."""
    workers = tuple(plan_worker(name, service, generation, i) for i in range(service.workers))
    return ServicePlan(
        name=name,
        generation=generation,
        config=service,
        workers=workers,
        settings=slot_settings(service, certificate),
        listener_options=listener_options(service),
    )


def socket_changes(old: ServiceConfig, new: ServiceConfig) -> list[str]:
    """Listener settings (backlog aside) that differ between two configs.

    The kernel would migrate a request between such listeners as if they were
    alike; the application could then see a connection with settings it did
    not ask for (docs/kernel.md §1). A rollout with
    changes retires by drain and refuses migrations where it can.
    """
    changes = []
    for key in type(old.socket).model_fields:
        before, after = getattr(old.socket, key), getattr(new.socket, key)
        if before != after:
            changes.append(f"{key} {_setting(key, before)} -> {_setting(key, after)}")
    return changes


def _setting(key: str, value: float | None) -> str:
    if value is None:
        return "unset"
    return format_duration(value) if key == "defer_accept" else str(value)


def retire_decision(
    retire: str, changes: list[str] | tuple[str, ...], caps: Capabilities
) -> tuple[RetirePath, str]:
    """The path a reload takes, and why, given what it changes in listener settings."""
    path = caps.retire_path(retire)
    if path == "migrate" and changes:
        return "drain", (
            f"listener settings changed ({', '.join(changes)}): "
            "no migration between listeners whose settings differ"
        )
    if path == "drain":
        if retire == "drain":
            return "drain", 'retire = "drain" in the config'
        sysctl = "missing (kernel < 5.14)" if caps.migrate_req is None else caps.migrate_req
        return "drain", f"no migration here: classic BPF steering and tcp_migrate_req={sysctl}"
    if caps.steering == "ebpf":
        return "migrate", "the eBPF SELECT_OR_MIGRATE program migrates to active listeners"
    return "migrate", "net.ipv4.tcp_migrate_req=1: the kernel migrates by its own hash"


@dataclass(frozen=True)
class RolloutPlan:
    """What one rollout will do: the candidate's workers, and how the old
    generation retires after the cutover."""

    candidate: ServicePlan
    path: RetirePath
    why: str
    changes: tuple[str, ...]  # listener settings that differ from the serving generation's
    refuse_migration: bool  # no request may migrate between old and new listeners

    def describe(self) -> list[str]:
        refuse = "refused (settings differ)" if self.refuse_migration else "allowed"
        return [
            f"service {self.candidate.name}: reloads retire by {self.path}: {self.why}",
            f"  next generation {self.candidate.generation}: {len(self.candidate.workers)} "
            f"worker(s); migration between generations {refuse}",
        ]


def plan_rollout(
    current: ServicePlan,
    new: ServiceConfig,
    generation: int,
    caps: Capabilities,
    certificate: Served | None = None,
) -> RolloutPlan:
    """The plan of a rollout from ``current`` to ``new`` on a host with ``caps``
    (``certificate``: the new tls.cert, as validation read it). Pure."""
    changes = tuple(socket_changes(current.config, new))
    path, why = retire_decision(new.retire, changes, caps)
    return RolloutPlan(
        candidate=plan_service(current.name, new, generation, certificate),
        path=path,
        why=why,
        changes=changes,
        refuse_migration=bool(changes),
    )


def plan_config(config: Config, generations: Mapping[str, int] | None = None) -> list[ServicePlan]:
    """Plans for every service, at the given generation numbers (default 1)."""
    generations = generations or {}
    return [
        plan_service(name, service, generations.get(name, 1))
        for name, service in config.services.items()
    ]


def describe(plans: list[ServicePlan]) -> list[str]:
    """Human-readable lines of what the plans will run (``supervisord --check``)."""
    lines = []
    for plan in plans:
        cfg = plan.config
        lines.append(
            f"service {plan.name}: generation {plan.generation}, {cfg.workers} worker(s), "
            f"retire={cfg.retire}, health={cfg.health.kind}, "
            + ("" if cfg.listen_mode == "own" else f"backlog={cfg.backlog}, ")
            + f"stop={cfg.stop_signal} then SIGKILL after {format_duration(cfg.stop_timeout)}"
        )
        if cfg.preflight:
            lines.append(f"  preflight: {list(cfg.preflight)}")
        if cfg.state_directory is not None:
            lines.append(f"  state directory ({{state}}): {cfg.state_directory}")
        for worker in plan.workers:
            fds = ", ".join(
                f"fd {FIRST_LISTEN_FD + i}={address}" for i, address in enumerate(worker.listen)
            )
            lines.append(f"  worker {worker.index}: {list(worker.argv)}")
            if cfg.listen_mode == "own":
                bound = ", ".join(str(address) for address in worker.listen)
                lines.append(
                    f"    listeners: bound by the worker itself on {bound} (listen_mode = "
                    "own): found by sock_diag, adopted with pidfd_getfd, steered by eBPF"
                )
            else:
                lines.append(f"    listeners: {fds} (SO_REUSEPORT, one per worker)")
            who = [f"user={worker.user}"] if worker.user else []
            who += [f"group={worker.group}"] if worker.group else []
            who += [f"cwd={worker.working_directory}"] if worker.working_directory else []
            if who:
                lines.append(f"    {' '.join(who)}")
    return lines
