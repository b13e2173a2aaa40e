"""The systems compared: each starts serving on a port, reloads, and stops.

``reload()`` returns when the reload is complete: the old generation's
processes are gone and the new generation serves. Its duration is measured
from the command (or signal) being issued. Every system answers ``GET /``
with one short ``text/plain`` line; the supervisor, naive and hand-rolled
rows run the same demo worker (trio + h11).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from supervisor.control.ctl import request
from supervisor.errors import DaemonUnreachable
from tests.support.procs import DEMO, ROOT, SelfBound, children, wait_for, wait_gone

BODY = "service=web generation=1 worker=0 pid=0 listener=0"


@dataclass
class Reload:
    seconds: float
    ok: bool = True
    report: dict[str, Any] | None = None  # the supervisor's own report


class System(Protocol):
    def start(self) -> None: ...
    def reload(self) -> Reload: ...
    def stop(self) -> None: ...


class Supervised:
    """supervisord with ``workers`` workers of ``command`` (the demo worker by default)."""

    def __init__(
        self,
        workdir: Path,
        port: int,
        workers: int,
        steering: str,
        retire: str,
        *,
        command: list[str] | None = None,
        extra: str = 'stop_timeout = "10s"',
        health: str = "notify",
    ) -> None:
        self.control = workdir / "control.sock"
        self.config = workdir / "bench.toml"
        argv = ", ".join(f'"{a}"' for a in (command or DEMO))
        self.config.write_text(
            f'[supervisor]\ncontrol_socket = "{self.control}"\nlog_level = "warning"\n'
            f'steering = "{steering}"\n'
            f"[services.web]\ncommand = [{argv}]\nworkers = {workers}\n"
            f'retire = "{retire}"\nlisten = ["127.0.0.1:{port}"]\nbacklog = 1024\n'
            f'ready_timeout = "120s"\n{extra}\n'
            f'[services.web.health]\nkind = "{health}"\n'
        )
        self.log_path = workdir / "supervisord.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.launch()
        self.wait_serving()

    def launch(self) -> None:
        """Start the daemon; return at once."""
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor.daemon", "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_serving(self) -> None:
        """Until every worker is RUNNING."""
        wait_for(self._serving, 300, f"supervisord to start (see {self.log_path})")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _serving(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"supervisord exited; see {self.log_path}")
        try:
            status = self.ask({"command": "status"}, 5)
        except DaemonUnreachable:
            return False
        web = status.get("status", {}).get("services", {}).get("web", {})
        return bool(web.get("state") == "RUNNING")

    def ask(self, message: dict[str, Any], timeout: float) -> dict[str, Any]:
        for reply in request(self.control, message, timeout=timeout):
            if reply["type"] in ("result", "error"):
                return dict(reply)
        raise RuntimeError("the daemon gave no answer")

    def reload(self) -> Reload:
        start = time.monotonic()
        answer = self.ask({"command": "reload"}, 600)
        report = dict(answer["services"]["web"])
        return Reload(time.monotonic() - start, bool(report.get("ok")), report)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(120)


def nginx_workers(workdir: Path, port: int, workers: int, steering: str) -> Supervised:
    """The supervisor with nginx as its workers: one nginx (a master and one
    worker process) per supervisor worker, on the listener it inherits (NGINX=3;)."""
    conf = workdir / "nginx-worker.conf"
    conf.write_text(
        "daemon off; master_process on; worker_processes 1; error_log stderr warn;\n"
        + nginx_http(workdir, f"127.0.0.1:{port}")
    )
    command = [
        "nginx",
        "-c",
        str(conf),
        "-g",
        f"pid {workdir}/nginx-{{generation}}-{{worker}}.pid;",
    ]
    extra = 'environment = { NGINX = "3;" }\nstop_signal = "SIGQUIT"\nstop_timeout = "20s"'
    return Supervised(
        workdir, port, workers, steering, "migrate", command=command, extra=extra, health="http"
    )


def nginx_http(workdir: Path, listen: str) -> str:
    """nginx's events and http blocks: one server answering ``BODY`` on ``listen``."""
    kinds = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    temp = " ".join(f"{kind}_temp_path {workdir}/{kind};" for kind in kinds)
    return (
        "events { worker_connections 4096; }\n"
        f"http {{ access_log off; {temp}\n"
        f"  server {{ listen {listen};\n"
        f'    location / {{ default_type text/plain; return 200 "{BODY}\\n"; }} }} }}\n'
    )


class Naive:
    """supervisord-style restart: stop every worker, then start new ones."""

    def __init__(self, port: int, workers: int) -> None:
        self.workers = SelfBound(port, workers, "naive")

    def start(self) -> None:
        self.workers.procs = self.workers.start()

    def reload(self) -> Reload:
        start = time.monotonic()
        self.workers.stop(self.workers.procs)
        self.workers.procs = self.workers.start()
        return Reload(time.monotonic() - start)

    def stop(self) -> None:
        self.workers.close()


class HandRolled(Naive):
    """The seeds' reproducer: start new SO_REUSEPORT workers, then stop the old."""

    def reload(self) -> Reload:
        start = time.monotonic()
        fresh = self.workers.start()
        self.workers.stop(self.workers.procs)
        self.workers.procs = fresh
        return Reload(time.monotonic() - start)


class Mastered:
    """A server with its own master process that reloads its workers itself."""

    argv: list[str]
    workers = 4
    stop_signal = signal.SIGTERM
    reload_signal = signal.SIGHUP

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.workdir / "server.log").open("w") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: len(self._workers()) >= self.workers, 60, f"{self.argv[0]} workers")

    def _workers(self) -> set[int]:
        assert self.proc is not None
        if self.proc.poll() is not None:
            log = (self.workdir / "server.log").read_text().strip().splitlines()
            raise RuntimeError(f"{self.argv[0]} exited: {log[-1] if log else 'no output'}")
        return children(self.proc.pid)

    def signal_reload(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(self.reload_signal)

    def reload(self) -> Reload:
        old = self._workers()
        start = time.monotonic()
        self.signal_reload()
        wait_for(lambda: len(self._workers() - old) >= self.workers, 60, "new workers")
        wait_gone(old)
        return Reload(time.monotonic() - start)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


class Nginx(Mastered):
    """nginx with 4 workers; ``nginx -s reload`` (SIGHUP to the master)."""

    stop_signal = signal.SIGQUIT  # graceful

    def __init__(self, workdir: Path, port: int, reuseport: bool) -> None:
        super().__init__(workdir)
        self.conf = workdir / "nginx.conf"
        self.conf.write_text(
            f"daemon off; master_process on; worker_processes {self.workers};\n"
            f"pid {workdir}/nginx.pid; error_log {workdir}/error.log notice;\n"
            + nginx_http(workdir, f"127.0.0.1:{port}{' reuseport' * reuseport} backlog=1024")
        )
        self.argv = ["nginx", "-c", str(self.conf)]

    def signal_reload(self) -> None:
        subprocess.run([*self.argv, "-s", "reload"], check=True, capture_output=True)


class Gunicorn(Mastered):
    """gunicorn, 4 sync workers on one shared listener; SIGHUP to the arbiter."""

    def __init__(self, workdir: Path, port: int) -> None:
        super().__init__(workdir)
        gunicorn = shutil.which(
            "gunicorn", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}"
        )
        self.argv = [
            gunicorn or "gunicorn", "--workers", str(self.workers), "--worker-class", "sync",
            "--bind", f"127.0.0.1:{port}", "--backlog", "1024", "--no-control-socket",
            "--chdir", str(ROOT / "config" / "apps"), "hello:wsgi",
        ]  # fmt: skip


class HAProxy(Mastered):
    """HAProxy in master-worker mode, answering itself; SIGUSR2 to the master.

    Seamless reload as documented: the listeners pass from the old worker to
    the new one (``expose-fd listeners``), so no socket is closed and reopened.
    """

    workers = 1  # one worker process (with a thread per core)
    reload_signal = signal.SIGUSR2

    def __init__(self, workdir: Path, port: int) -> None:
        super().__init__(workdir)
        self.conf = workdir / "haproxy.cfg"
        self.conf.write_text(
            "global\n  maxconn 4096\n"
            f"  stats socket {workdir}/admin.sock mode 600 level admin expose-fd listeners\n"
            "defaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n"
            "  timeout server 30s\n"
            f"frontend web\n  bind 127.0.0.1:{port} backlog 1024\n"
            f'  http-request return status 200 content-type text/plain string "{BODY}"\n'
        )
        self.argv = ["haproxy", "-W", "-db", "-f", str(self.conf)]
