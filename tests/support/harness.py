"""Helpers to run a real ``supervisord`` in tests and wait on its log events."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from supervisor.control.ctl import request
from supervisor.kernel.sysctl import MIGRATE_REQ, set_migrate_req
from supervisor.values import ListenAddress, parse_listen
from tests.support.procs import alive, state, wait_for

DEMO = [sys.executable, "-m", "supervisor.demo"]
DAEMON = [sys.executable, "-m", "supervisor.daemon"]
START_TIMEOUT = 30.0


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join(json.dumps(i) for i in items) + "]"


def service_toml(
    name: str,
    *,
    port: int,
    workers: int = 4,
    command: list[str] | None = None,
    health: str = 'kind = "notify"',
    extra: str = "",
    host: str = "127.0.0.1",
) -> str:
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"""
[services.{name}]
command = {toml_list(command or DEMO)}
workers = {workers}
listen = ["{address}"]
stop_timeout = "10s"
ready_timeout = "15s"
{extra}

[services.{name}.health]
{health}
"""


@dataclass
class Reloaded:
    answer: dict[str, Any]
    progress: list[str]

    @property
    def ok(self) -> bool:
        return bool(self.answer.get("ok"))

    def report(self, service: str = "web") -> dict[str, Any]:
        return dict(self.answer["services"][service])


class Daemon:
    """A ``supervisord`` child process whose JSON log lines tests can wait on."""

    def __init__(
        self,
        config: Path,
        control: Path,
        header: str = "",
        env: dict[str, str] | None = None,
        entry: list[str] | None = None,
    ) -> None:
        self.config = config
        self.control = control
        self.header = header
        self.events: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cond = threading.Condition()
        self.proc = subprocess.Popen(
            [*(entry or DAEMON), "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=None if env is None else {**os.environ, **env},
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._cond:
                self.raw.append(line)
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if isinstance(event, dict):  # a worker's own line may parse too ("1234")
                        self.events.append(event)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_event(
        self,
        event: str,
        timeout: float = START_TIMEOUT,
        after: int = 0,
        **fields: Any,
    ) -> dict[str, Any]:
        """Wait for a log line ``event`` with ``fields`` (index >= ``after``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for entry in self.events[after:]:
                    if entry.get("event") == event and all(
                        entry.get(k) == v for k, v in fields.items()
                    ):
                        return entry
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    tail = "\n".join(self.raw[-30:])
                    raise AssertionError(f"no {event} {fields} in time; log tail:\n{tail}")
                self._cond.wait(min(left, 0.5))

    def mark(self) -> int:
        with self._cond:
            return len(self.events)

    def events_since(self, mark: int, event: str) -> list[dict[str, Any]]:
        """The log lines ``event`` logged since ``mark``, without waiting."""
        with self._cond:
            return [e for e in self.events[mark:] if e.get("event") == event]

    def status(self) -> dict[str, Any]:
        for reply in request(self.control, {"command": "status"}, timeout=10.0):
            if reply["type"] == "result":
                return dict(reply["status"])
        raise AssertionError(f"status failed: {reply}")

    def rewrite(self, services: str) -> None:
        """Replace the services of the config file (the [supervisor] part stays)."""
        self.config.write_text(self.header + services)

    def upgrade(self) -> Reloaded:
        """``supervisorctl upgrade`` in-process: the progress lines and the final answer."""
        progress = []
        for reply in request(self.control, {"command": "upgrade"}, timeout=120.0):
            if reply["type"] == "progress":
                progress.append(reply["message"])
            else:
                return Reloaded(reply, progress)
        raise AssertionError("no final answer")

    def reload(self, service: str | None = None, reason: str | None = None) -> Reloaded:
        """``supervisorctl reload`` in-process: the progress lines and the final answer."""
        message: dict[str, Any] = {"command": "reload", "service": service}
        if reason:
            message["reason"] = reason
        progress = []
        for reply in request(self.control, message, timeout=120.0):
            if reply["type"] == "progress":
                progress.append(reply["message"])
            else:
                return Reloaded(reply, progress)
        raise AssertionError("no final answer")

    def cookies_by_generation(self) -> dict[int, set[int]]:
        """Listener cookies of every generation, from the daemon's log."""
        out: dict[int, set[int]] = {}
        with self._cond:
            for entry in self.events:
                if entry.get("event") == "generation_listening":
                    cookies = {lst["cookie"] for lst in entry["listeners"]}
                    out.setdefault(entry["generation"], set()).update(cookies)
        return out

    def worker_pids(self, service: str = "web") -> list[int]:
        return [w["pid"] for w in self.status()["services"][service]["workers"]]

    def terminate(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._release()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._release()

    def _release(self) -> None:
        """Once the daemon has exited: its log is read to the end, the pipe closed."""
        if self.proc.poll() is None:
            return
        self._reader.join(5)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()


class Background:
    """``daemon.reload()`` (or ``upgrade()``) in a thread, so the test can act meanwhile."""

    def __init__(
        self, daemon: Daemon, service: str | None = None, *, upgrade: bool = False
    ) -> None:
        self.answer: Reloaded | None = None
        self._thread = threading.Thread(
            target=self._run, args=(daemon, service, upgrade), daemon=True
        )
        self._thread.start()

    def _run(self, daemon: Daemon, service: str | None, upgrade: bool) -> None:
        self.answer = daemon.upgrade() if upgrade else daemon.reload(service)

    def running(self) -> bool:
        return self._thread.is_alive()

    def result(self, timeout: float = 120.0) -> Reloaded:
        self._thread.join(timeout)
        assert self.answer is not None, "the reload was answered"
        return self.answer


def process_gone(pid: int) -> bool:
    """True if ``pid`` no longer exists (or is a zombie nobody has reaped yet)."""
    return not alive(pid)


def tracer_of(pid: int) -> int:
    """The pid tracing ``pid`` (ptrace), 0 if none."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    return 0


@contextlib.contextmanager
def syscall_fault(pid: int, syscall: str, error: str, when: str) -> Iterator[None]:
    """Make ``pid``'s main thread fail ``syscall`` with ``error`` (strace's
    ``inject``): ``when`` counts from the attach (``"3"``: the third call only,
    ``"3+"``: the third and every later one). Detaches on exit."""
    tracer = subprocess.Popen(
        [
            "strace",
            "-qq",
            "-p",
            str(pid),
            "-e",
            f"trace={syscall}",
            "-o",
            "/dev/null",
            "-e",
            f"inject={syscall}:error={error}:when={when}",
        ],
        stdin=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: tracer_of(pid) == tracer.pid, 10, "strace to attach")
        yield
    finally:
        tracer.send_signal(signal.SIGINT)  # strace detaches and exits
        try:
            tracer.wait(10)
        except subprocess.TimeoutExpired:
            tracer.kill()
            tracer.wait(10)
        wait_until(lambda: tracer_of(pid) == 0, 10, "strace to detach")


process_state = state
wait_until = wait_for  # one waiting helper for tests and the benchmark


def established_owned_by(pid: int, port: int) -> int:
    """Established TCP connections on local ``port`` whose socket ``pid`` holds."""
    out = subprocess.run(
        ["ss", "-Htnp", "state", "established", f"sport = :{port}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(1 for line in out.splitlines() if f"pid={pid}," in line)


def listening_sockets(port: int) -> list[str]:
    out = subprocess.run(
        ["ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True, check=True
    ).stdout
    return [line for line in out.splitlines() if line.strip()]


@pytest.fixture
def start_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Factory: ``start_daemon(services_toml)`` -> a running, ready ``Daemon``."""
    started: list[Daemon] = []

    def start(
        services: str,
        *,
        wait_ready: bool = True,
        supervisor_extra: str = "",
        env: dict[str, str] | None = None,
        entry: list[str] | None = None,
    ) -> Daemon:
        control = tmp_path / f"control-{len(started)}.sock"
        config = tmp_path / f"supervisor-{len(started)}.toml"
        header = (
            f'[supervisor]\ncontrol_socket = "{control}"\nlog_level = "debug"\n{supervisor_extra}\n'
        )
        config.write_text(header + services)
        daemon = Daemon(config, control, header, env, entry)
        started.append(daemon)
        if wait_ready:
            daemon.wait_event("daemon_ready")
        return daemon

    yield start
    for daemon in started:
        # Gracefully first: SIGKILL kills the workers by their parent-death
        # signal, and a worker with children of its own (nginx's master)
        # would leave those behind.
        with contextlib.suppress(subprocess.TimeoutExpired):
            daemon.terminate(timeout=30)
        daemon.kill()


@pytest.fixture
def migrate_req() -> Iterator[Callable[[int], None]]:
    """Set net.ipv4.tcp_migrate_req in the test namespace; restored afterwards."""
    path = Path("/proc/sys/net/ipv4/tcp_migrate_req")
    original = path.read_text()

    def set_value(value: int) -> None:
        path.write_text(f"{value}\n")

    yield set_value
    path.write_text(original)


@pytest.fixture
def address() -> Iterator[ListenAddress]:
    """A fresh loopback port, with the migration sysctl off: only a program migrates."""
    original = MIGRATE_REQ.read_text()
    set_migrate_req(0)
    yield parse_listen(f"127.0.0.1:{free_port()}")
    MIGRATE_REQ.write_text(original)


def open_fd_count(pid: int) -> int:
    """How many fds ``pid`` has open now."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_seconds(pid: int) -> float:
    """``pid``'s user and system CPU time so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def upgrading(daemon: Daemon) -> tuple[threading.Thread, list[Reloaded]]:
    """``daemon.upgrade()`` started in a thread; its answer lands in the list."""
    answers: list[Reloaded] = []
    thread = threading.Thread(target=lambda: answers.append(daemon.upgrade()))
    thread.start()
    return thread, answers


def smuggling_worker(fdname: str) -> str:
    """Python source of a worker that answers every connection on fd 3 with a
    503 whose reason phrase smuggles notify commands after bare newlines
    (``WATCHDOG=trigger``, ``FDSTOREREMOVE=1`` with ``FDNAME=fdname``,
    ``MAINPID=1``), and an ANSI escape for the console: the audit's reproducer."""
    answer = (
        "HTTP/1.1 503 x\nWATCHDOG=trigger\nFDSTOREREMOVE=1\n"
        f"FDNAME={fdname}\nMAINPID=1\x1b[2J\r\n\r\n"
    )
    return (
        "import socket\n"
        f"answer = {answer.encode()!r}\n"
        "lst = socket.socket(fileno=3)\n"
        "while True:\n"
        "    conn, _ = lst.accept()\n"
        "    conn.recv(4096)\n"
        "    conn.sendall(answer)\n"
        "    conn.close()\n"
    )
