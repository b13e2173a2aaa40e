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

from supervisor.config import Config
from supervisor.errors import ConfigIssue
from supervisor.kernel import cbpf, sysctl
from supervisor.steering import build_program

log = structlog.get_logger("supervisor.capabilities")
RetirePath = Literal["migrate", "drain"]


@dataclass(frozen=True)
class Capabilities:
    migrate_req: int | None  # net.ipv4.tcp_migrate_req here; None: kernel < 5.14
    cbpf: bool  # SO_ATTACH_REUSEPORT_CBPF works

    @property
    def can_migrate(self) -> bool:
        return self.migrate_req == 1

    def retire_path(self, retire: str) -> RetirePath:
        """The path a service configured with ``retire`` will take."""
        if retire == "drain" or (retire == "auto" and not self.can_migrate):
            return "drain"
        return "migrate"

    def describe(self) -> dict[str, object]:
        return {"tcp_migrate_req": self.migrate_req, "cbpf": self.cbpf}


def _cbpf_works() -> bool:
    probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        probe.bind(("127.0.0.1", 0))
        probe.listen(1)
        cbpf.attach(probe, build_program(socket.AF_INET, [0], []))
    except OSError:
        return False
    finally:
        probe.close()
    return True


def detect() -> Capabilities:
    return Capabilities(migrate_req=sysctl.migrate_req(), cbpf=_cbpf_works())


def prepare(policy: Literal["keep", "enable"]) -> Capabilities:
    """Detect, and with ``policy="enable"`` switch the migration sysctl on first."""
    if policy == "enable" and sysctl.migrate_req() == 0:
        try:
            sysctl.set_migrate_req(1)
            log.info("tcp_migrate_req_enabled")
        except OSError as exc:
            log.warning("tcp_migrate_req_not_enabled", error=str(exc))
    caps = detect()
    log.info("capabilities", **caps.describe())
    return caps


def check(config: Config, caps: Capabilities) -> Iterable[ConfigIssue]:
    """What ``config`` asks that ``caps`` cannot honour."""
    if not caps.cbpf:
        yield ConfigIssue(
            "", "this kernel refuses SO_ATTACH_REUSEPORT_CBPF (Linux 4.5+): cannot steer"
        )
    for name, service in config.services.items():
        if service.retire == "migrate" and not caps.can_migrate:
            state = "missing (kernel < 5.14)" if caps.migrate_req is None else caps.migrate_req
            yield ConfigIssue(
                f"services.{name}.retire",
                "migrate needs net.ipv4.tcp_migrate_req=1 in the supervisor's network "
                f"namespace (it is {state}); set it, or [supervisor] "
                'tcp_migrate_req = "enable", or use retire = "auto" or "drain"',
            )
