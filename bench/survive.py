"""The supervisor surviving itself, beside what other servers do at the same event.

Each row runs the same wrk load (``Connection: close``) while its event
happens every ``every`` seconds:

- the supervisor: ``supervisorctl upgrade`` (in place, same pid);
- the supervisor under real systemd 252 (the shipped unit, in a private
  namespace; wrk runs in its network namespace): ``systemctl kill -s KILL``
  (the daemon and its workers) and ``systemctl restart``;
- nginx: ``kill -9`` of the master (its workers serve on, orphaned; nothing
  can start a new nginx on the port while they hold it), and a binary
  upgrade (USR2 to the master, then WINCH and QUIT to the old one);
- HAProxy: a master reload (USR2: the master re-executes itself).

Per row: requests, failed connections by cause (wrk's ``connect`` errors are
connections refused or reset at connect), latency, and each event's
duration (until the new process serves and the old one is gone).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import wrk
from bench.systems import HAProxy, Nginx, Supervised, nginx_http
from tests.support.procs import alive, children, wait_for, wait_gone
from tests.support.systemd_ns import UNIT, SystemdNamespace, available, install_supervisor

VENV_BIN = Path(sys.executable).parent


@dataclass
class Survival:
    name: str
    event: str
    load: wrk.WrkResult = field(default_factory=wrk.WrkResult)
    events: list[float] = field(default_factory=list)  # seconds each event took
    notes: list[str] = field(default_factory=list)
    error: str | None = None


Event = Callable[[], float]  # does the event once; returns how long it took


def run(port: int, seconds: float, every: float) -> list[dict[str, Any]]:
    rows = [
        _supervisor_upgrade(port, seconds, every),
        *_under_systemd(seconds, every),
        _nginx_master_killed(port, seconds),
        _nginx_binary_upgrade(port, seconds, every),
        _haproxy_master_reload(port, seconds, every),
    ]
    for row in rows:
        print(
            f"survive: {row.name}, {row.event}: {row.load.failed} failed "
            f"{row.load.errors}, {len(row.events)} events{', ' + row.error if row.error else ''}",
            flush=True,
        )
    return [row.__dict__ | {"load": row.load.__dict__} for row in rows]


def _repeat(row: Survival, client: wrk.Wrk, seconds: float, every: float, event: Event) -> None:
    stop_at = time.monotonic() + seconds - every
    time.sleep(1.0)
    while time.monotonic() < stop_at:
        row.events.append(event())
        time.sleep(every)
    row.load = client.result()


def _guarded(row: Survival, body: Callable[[], None]) -> Survival:
    try:
        body()
    except Exception as exc:  # noqa: BLE001  (a row that could not run says why)
        row.error = f"{type(exc).__name__}: {exc}"
    return row


def _supervisor_upgrade(port: int, seconds: float, every: float) -> Survival:
    row = Survival("supervisor (eBPF, 4 demo workers)", "supervisorctl upgrade")

    def body() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            sup = Supervised(Path(tmp), port, 4, "ebpf", "migrate")
            sup.start()
            try:

                def upgrade() -> float:
                    answer = sup.ask({"command": "upgrade"}, 300)
                    if not answer.get("ok"):
                        raise RuntimeError(f"upgrade refused: {answer.get('reasons')}")
                    return float(answer["upgrade"]["duration"])

                _repeat(row, wrk.Wrk(port, seconds), seconds, every, upgrade)
            finally:
                sup.stop()

    return _guarded(row, body)


CONFIG = """[supervisor]
control_socket = "/run/reuseport-supervisor/control.sock"
log_format = "json"
log_level = "warning"
[services.web]
command = ["python3", "-m", "supervisor.demo"]
workers = 4
listen = ["127.0.0.1:8080"]
stop_timeout = "10s"
[services.web.health]
kind = "notify"
"""


@contextmanager
def _systemd() -> Iterator[SystemdNamespace]:
    ns = SystemdNamespace()
    try:
        config = ns.root / "supervisor.toml"
        config.write_text(CONFIG)
        install_supervisor(ns, config, VENV_BIN)
        ns.boot()
        ns.ctl("start", UNIT)
        yield ns
    finally:
        ns.close()


def _under_systemd(seconds: float, every: float) -> list[Survival]:
    kill = Survival("supervisor under systemd (eBPF, 4 demo workers)", "systemctl kill -s KILL")
    restart = Survival("supervisor under systemd (eBPF, 4 demo workers)", "systemctl restart")
    why = available()
    if why is not None:
        kill.error = restart.error = f"real systemd: {why}"
        return [kill, restart]

    def killed(ns: SystemdNamespace) -> Event:
        def event() -> float:
            old = ns.main_pid(UNIT)
            start = time.monotonic()
            ns.ctl("kill", "-s", "KILL", UNIT)
            wait_for(lambda: _running_anew(ns, old), 60, "the unit to run again")
            return time.monotonic() - start

        return event

    def restarted(ns: SystemdNamespace) -> Event:
        def event() -> float:
            start = time.monotonic()
            ns.ctl("restart", UNIT)  # returns once the new daemon sent READY=1
            return time.monotonic() - start

        return event

    for row, make in ((kill, killed), (restart, restarted)):

        def body(row: Survival = row, make: Callable[[SystemdNamespace], Event] = make) -> None:
            with _systemd() as ns:
                prefix = ["nsenter", "-t", str(ns.pid), "-n"]
                client = wrk.Wrk(8080, seconds, prefix=prefix)
                _repeat(row, client, seconds, every, make(ns))

        _guarded(row, body)
    return [kill, restart]


def _running_anew(ns: SystemdNamespace, old: int) -> bool:
    props = ns.show(UNIT, "SubState")
    return props["SubState"] == "running" and ns.main_pid(UNIT) not in (0, old)


def _nginx_master_killed(port: int, seconds: float) -> Survival:
    row = Survival("nginx (4 workers)", "kill -9 of the master")

    def body() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            nginx = Nginx(Path(tmp), port, reuseport=False)
            nginx.start()
            assert nginx.proc is not None
            workers = children(nginx.proc.pid)
            client = wrk.Wrk(port, seconds)
            time.sleep(1.0)
            start = time.monotonic()
            nginx.proc.send_signal(signal.SIGKILL)
            nginx.proc.wait(10)
            row.events.append(time.monotonic() - start)
            row.load = client.result()
            serving = [pid for pid in workers if alive(pid)]
            row.notes.append(
                f"{len(serving)} of {len(workers)} workers served on, orphaned; a new nginx "
                "cannot bind the port while they hold it"
            )
            for pid in serving:  # nobody else will
                _kill(pid, signal.SIGQUIT)
            wait_gone(serving)

    return _guarded(row, body)


def _nginx_binary_upgrade(port: int, seconds: float, every: float) -> Survival:
    """nginx's documented binary upgrade. It needs a daemonized master: one whose
    parent is not the one it started under (otherwise USR2 is ignored)."""
    row = Survival("nginx (4 workers)", "binary upgrade: USR2, then WINCH and QUIT")

    def body() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            pidfile = work / "nginx.pid"
            conf = work / "nginx.conf"
            conf.write_text(
                f"daemon on; master_process on; worker_processes 4; pid {pidfile};\n"
                f"error_log {work}/error.log notice;\n"
                + nginx_http(work, f"127.0.0.1:{port} backlog=1024")
            )
            # The new master re-executes argv[0] with execve: no PATH search.
            nginx = shutil.which("nginx") or "/usr/sbin/nginx"
            subprocess.run([nginx, "-c", str(conf)], check=True, capture_output=True)
            wait_for(lambda: _pid_in(pidfile) is not None, 30, "nginx's master")
            masters = [_master(pidfile)]
            wait_for(lambda: len(children(masters[0])) >= 4, 30, "nginx's workers")

            def upgrade() -> float:
                old = masters[-1]
                start = time.monotonic()
                _kill(old, signal.SIGUSR2)  # a new master (new binary), beside the old
                wait_for(lambda: _pid_in(pidfile) not in (None, old), 30, "the new master")
                new = _master(pidfile)
                wait_for(lambda: len(children(new)) >= 4, 30, "the new workers")
                old_workers = children(old) - {new}  # the new master is a child of the old
                _kill(old, signal.SIGWINCH)  # old workers stop gracefully
                wait_gone(old_workers)
                _kill(old, signal.SIGQUIT)
                wait_gone([old])
                masters.append(new)
                return time.monotonic() - start

            try:
                _repeat(row, wrk.Wrk(port, seconds), seconds, every, upgrade)
            finally:
                last = masters[-1]
                workers = children(last)
                _kill(last, signal.SIGQUIT)
                wait_gone([last, *workers])

    return _guarded(row, body)


def _pid_in(pidfile: Path) -> int | None:
    try:
        return int(pidfile.read_text())
    except (OSError, ValueError):
        return None


def _master(pidfile: Path) -> int:
    pid = _pid_in(pidfile)
    assert pid is not None
    return pid


def _haproxy_master_reload(port: int, seconds: float, every: float) -> Survival:
    row = Survival("HAProxy (master-worker)", "master reload: USR2 (the master re-execs)")

    def body() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            haproxy = HAProxy(Path(tmp), port)
            haproxy.start()
            try:
                _repeat(
                    row, wrk.Wrk(port, seconds), seconds, every, lambda: haproxy.reload().seconds
                )
            finally:
                haproxy.stop()

    return _guarded(row, body)


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
