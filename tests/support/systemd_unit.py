"""The shipped unit under real systemd, as the tests drive it: ``booted``
installs it with a config and boots systemd; ``Unit`` is what a test asks of
it (systemctl, supervisorctl inside the namespace, the daemon's log, a load
in its network namespace)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.support.harness import wait_until
from tests.support.load import Load, LoadResult
from tests.support.systemd_ns import UNIT, SystemdNamespace, install_supervisor, json_lines

VENV_BIN = Path(sys.executable).parent
PORT = 8080  # the namespace's own loopback: no other test is there


def config_text(
    workers: int = 4,
    listen: tuple[str, ...] = (f"127.0.0.1:{PORT}",),
    supervisor: str = "",
    service: str = "",
) -> str:
    addresses = ", ".join(f'"{a}"' for a in listen)
    return f"""[supervisor]
control_socket = "/run/reuseport-supervisor/control.sock"
log_format = "json"
{supervisor}

[services.web]
{service}
command = ["{{python}}", "-m", "supervisor.demo", "--concurrency", "1", "--work", "0.002"]
workers = {workers}
listen = [{addresses}]
stop_timeout = "10s"

[services.web.health]
kind = "notify"
"""


@dataclass
class Unit:
    ns: SystemdNamespace
    config: Path

    @property
    def log(self) -> Path:
        return self.ns.root / "daemon.log"

    def events(self, name: str) -> list[dict[str, Any]]:
        return [e for e in json_lines(self.log) if e.get("event") == name]

    def main_pid(self) -> int:
        return self.ns.main_pid(UNIT)

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.ns.ctl(*args, check=check)

    def supervisorctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.ns.enter(), str(VENV_BIN / "supervisorctl"), *args],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    def workers(self, service: str = "web") -> list[dict[str, Any]]:
        """``status --json``'s workers of ``service``."""
        done = self.supervisorctl("status", "--json")
        assert done.returncode == 0, done.stderr
        return list(json.loads(done.stdout)["services"][service]["workers"])

    def tail(self) -> str:
        """The daemon log's end, for an assertion's message."""
        return self.log.read_text(errors="replace")[-3000:]

    def load(self, duration: float = 180) -> Load:
        # A bound, not the test's length: the load stops when its block ends, and
        # must outlast every wait in it (a restart, then the new workers' start).
        return Load(PORT, threads=16, duration=duration, netns=self.ns.netns())

    def wait(
        self, done: Callable[[], bool], timeout: float, what: str, load: Load | None = None
    ) -> None:
        """``wait_until``, with the daemon's last log lines (less the test's own
        status polling) and the load's counts if it times out."""
        try:
            wait_until(done, timeout, what)
        except TimeoutError as exc:
            lines = self.log.read_text(errors="replace").splitlines()
            tail = [line for line in lines if '"control_request"' not in line][-40:]
            counts = "" if load is None else f"; answers so far from pids {load.pids()}"
            sockets = subprocess.run(
                [*self.ns.enter(), "ss", "-ltnpe"], capture_output=True, text=True, check=False
            ).stdout
            raise AssertionError(
                f"{exc}{counts}; listeners:\n{sockets}\ndaemon log:\n" + "\n".join(tail)
            ) from None

    def restarted_from(self, old: int) -> int:
        """Wait until the unit runs again under a new main pid, ready; return it."""

        def back() -> bool:
            props = self.ns.show(UNIT, "ActiveState", "SubState", "MainPID")
            return props["SubState"] == "running" and self.main_pid() not in (0, old)

        wait_until(back, 60, "the unit to be running again")
        return self.main_pid()


@contextlib.contextmanager
def booted(text: str, *, prelude: str | None = None) -> Iterator[Unit]:
    """The shipped unit installed with the config ``text``, systemd booted; not started.

    ``prelude``: Python run first by the daemon's entry point (a script of
    the test's own that the unit starts, and an upgrade execs, instead of
    the venv's ``reuseport-supervisord``)."""
    ns = SystemdNamespace()
    try:
        config = ns.root / "supervisor.toml"
        config.write_text(text)
        commands = VENV_BIN
        if prelude is not None:
            commands = ns.root / "bin"
            commands.mkdir()
            entry = commands / "reuseport-supervisord"
            main = "from supervisor.daemon.startup import main\nmain()\n"
            entry.write_text(f"#!{sys.executable}\n{prelude}\n{main}")
            entry.chmod(0o755)
            (commands / "reuseport-supervisorctl").symlink_to(VENV_BIN / "reuseport-supervisorctl")
        install_supervisor(ns, config, commands)
        ns.boot()
        yield Unit(ns, config)
    finally:
        ns.close()


def at_connect(result: LoadResult) -> int:
    return sum(result.at_connect.values())


def report(what: str, result: LoadResult) -> None:
    print(
        f"{what}: {result.ok} answered, {result.failed} failed ({dict(result.failures)}), "
        f"{at_connect(result)} at connect ({dict(result.at_connect)})"
    )
