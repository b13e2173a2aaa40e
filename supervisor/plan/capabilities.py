"""What this kernel and this network namespace let the supervisor do.

Detected at start and before each rollout, shown in status and logs, and
checked against the config: a strategy that cannot be honoured is a config
error, never a silent loss.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import structlog

from supervisor.config.schema import Config, ServiceConfig, SupervisorSection
from supervisor.errors import ConfigIssue
from supervisor.kernel import caps as kcaps
from supervisor.kernel import cbpf, fastspawn, sysctl
from supervisor.steering import Backend
from supervisor.steering.classic import build_program
from supervisor.steering.ebpf import available as ebpf_available

log = structlog.get_logger("supervisor.plan.capabilities")
RetirePath = Literal["migrate", "drain"]


@dataclass(frozen=True)
class Capabilities:
    migrate_req: int | None  # net.ipv4.tcp_migrate_req here; None: kernel < 5.14
    cbpf: bool  # SO_ATTACH_REUSEPORT_CBPF works
    ebpf: bool = False  # an SK_REUSEPORT SELECT_OR_MIGRATE program loads (CAP_BPF)
    wanted: Literal["auto", "ebpf", "cbpf"] = "auto"

    @property
    def steering(self) -> Backend:
        """The backend in use: eBPF when allowed and available, else classic BPF."""
        return "ebpf" if self.ebpf and self.wanted != "cbpf" else "cbpf"

    @property
    def can_migrate(self) -> bool:
        # A SELECT_OR_MIGRATE program migrates whatever the sysctl says.
        return self.steering == "ebpf" or self.migrate_req == 1

    def retire_path(self, retire: str) -> RetirePath:
        """The path a service configured with ``retire`` will take."""
        if retire == "drain" or (retire == "auto" and not self.can_migrate):
            return "drain"
        return "migrate"

    def describe(self) -> dict[str, object]:
        return {
            "steering": self.steering,
            "ebpf": self.ebpf,
            "cbpf": self.cbpf,
            "tcp_migrate_req": self.migrate_req,
        }


def _cbpf_works() -> bool:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind(("127.0.0.1", 0))
        probe.listen(1)
        cbpf.attach(probe, build_program(socket.AF_INET, [0], []))
    except OSError:  # seam: the probe of a kernel feature; refused means no
        return False
    finally:
        probe.close()
    return True


def detect(wanted: Literal["auto", "ebpf", "cbpf"] = "auto") -> Capabilities:
    ebpf = wanted != "cbpf" and ebpf_available()
    return Capabilities(sysctl.migrate_req(), _cbpf_works(), ebpf, wanted)


def prepare(config: SupervisorSection) -> Capabilities:
    """Detect, and with ``tcp_migrate_req = "enable"`` switch the sysctl on first."""
    policy = config.tcp_migrate_req
    if policy == "enable" and sysctl.migrate_req() == 0:
        try:
            sysctl.set_migrate_req(1)
            log.info("tcp_migrate_req_enabled")
        except OSError as exc:  # seam: the sysctl; not writable is logged
            log.warning("tcp_migrate_req_not_enabled", error=str(exc))
    caps = detect(config.steering)
    # How a worker that keeps the daemon's credentials starts (checked once, here):
    # posix_spawn + sh + setpriv, or the Python launcher (kernel/fastspawn.py).
    start = "posix_spawn" if fastspawn.available() else "launcher"
    log.info("capabilities", **caps.describe(), worker_start=start)
    return caps


def check(config: Config, caps: Capabilities) -> Iterable[ConfigIssue]:
    """What ``config`` asks that ``caps`` cannot honour."""
    if not caps.cbpf and caps.steering == "cbpf":
        yield ConfigIssue(
            "", "this kernel refuses SO_ATTACH_REUSEPORT_CBPF (Linux 4.5+): cannot steer"
        )
    if config.supervisor.steering == "ebpf" and not caps.ebpf:
        yield ConfigIssue(
            "supervisor.steering",
            "ebpf needs CAP_BPF and a kernel with SK_REUSEPORT programs (5.14+ for "
            'migration); use "auto" or "cbpf"',
        )
    for name, service in config.services.items():
        if service.listen_mode == "own":
            yield from _adoption_issues(name, service, caps)
        if service.retire == "migrate" and not caps.can_migrate:
            state = "missing (kernel < 5.14)" if caps.migrate_req is None else caps.migrate_req
            yield ConfigIssue(
                f"services.{name}.retire",
                "migrate needs eBPF steering (CAP_BPF) or net.ipv4.tcp_migrate_req=1 in "
                f"the supervisor's network namespace (it is {state}); set it, or [supervisor] "
                'tcp_migrate_req = "enable", or use retire = "auto" or "drain"',
            )


def _adoption_issues(
    name: str, service: ServiceConfig, caps: Capabilities
) -> Iterable[ConfigIssue]:
    """Why the workers' own sockets could not be adopted here."""
    where = f"services.{name}.listen_mode"
    if caps.steering != "ebpf":
        yield ConfigIssue(
            where,
            '"own" needs eBPF steering: a socket joins the group at its listen(), before '
            "the supervisor knows of it, and only the eBPF program never sends it a "
            "connection meanwhile (classic BPF selects by index into the group's socket "
            "array, which each worker's own listen() changes)",
        )
    problem = adoption_problem(other_user=service.user is not None)
    if problem:
        yield ConfigIssue(where, f'"own" cannot adopt the workers\' sockets: {problem}')


def adoption_problem(*, other_user: bool) -> str | None:
    """Why pidfd_getfd of a worker's socket would be refused here, or None."""
    scope = kcaps.ptrace_scope()
    if scope is not None and scope >= 3:
        return "kernel.yama.ptrace_scope is 3, which forbids it (pidfd_getfd is a ptrace access)"
    if not kcaps.lacks(kcaps.SYS_PTRACE):
        return None
    if other_user:
        return (
            "the workers run as another user (user =), and taking a duplicate of their "
            "fds (pidfd_getfd) then needs CAP_SYS_PTRACE, which the daemon lacks"
        )
    if scope == 2:
        return "kernel.yama.ptrace_scope is 2, which leaves it to CAP_SYS_PTRACE (lacking)"
    return None
