"""``pipx install .`` as the docs give it, then the shipped demo config served
from what pipx exposed, with nothing else on PATH (``make test-pipx``).

Not part of ``make test``: pipx builds the package with build isolation and
resolves its dependencies from PyPI, and the tests run in a network namespace
without a route out. This script installs pipx into a venv of its own, runs
``pipx install`` with the network, and serves the demo in a private network
namespace (``unshare -n``, loopback only). It exits 0 only if the demo
answered and stopped cleanly; everything it made is under one temporary
directory, removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script: tests.support from the checkout

from tests.support.installed import demo_answers, demo_config  # noqa: E402
from tests.support.procs import wait_for  # noqa: E402

PORT = 18080  # the demo's own port is 8080; in a namespace of its own either is free


def run(*argv: str | Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=600, env=env, check=False
    )
    if done.returncode != 0:
        sys.exit(f"{argv[0]} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    return done.stdout


def install(work: Path) -> None:
    """pipx, then ``pipx install ROOT``; what it exposed is under ``work``."""
    tool = work / "tool"
    run(sys.executable, "-m", "venv", tool)
    run(tool / "bin" / "pip", "install", "--quiet", "pipx")
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(work),
        "PIPX_HOME": str(work / "pipx"),
        "PIPX_BIN_DIR": str(work / "bin"),
        "PIPX_MAN_DIR": str(work / "man"),
    }
    print(run(tool / "bin" / "pipx", "install", "--python", sys.executable, ROOT, env=env))
    for exposed in ("bin/reuseport-supervisord", "bin/reuseport-supervisorctl",
                    "man/man8/supervisord.8", "man/man1/supervisorctl.1"):  # fmt: skip
        if not (work / exposed).exists():
            sys.exit(f"pipx did not expose {exposed}")


def serve(work: Path) -> None:
    """In the namespace: the demo config pipx installed, served and stopped."""
    share = work / "pipx" / "venvs" / "reuseport-supervisor" / "share"
    config, control = demo_config(share, work, PORT)
    env = {"PATH": str(work / "bin"), "HOME": str(work)}
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    log = work / "daemon.log"
    daemon = subprocess.Popen(
        [work / "bin" / "reuseport-supervisord", "-c", config],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        with contextlib.suppress(TimeoutError):  # said below, with the daemon's log
            wait_for(lambda: demo_answers(PORT) or daemon.poll() is not None, 60, "the demo")
        if not demo_answers(PORT):
            sys.exit(f"the demo installed by pipx did not serve:\n{log.read_text()}")
        print(run(work / "bin" / "reuseport-supervisorctl", "-s", control, "status", env=env))
        run(work / "bin" / "reuseport-supervisorctl", "-s", control, "shutdown", env=env)
        if daemon.wait(60) != 0:
            sys.exit(f"the daemon exited {daemon.returncode}:\n{log.read_text()}")
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--serve":
        serve(Path(sys.argv[2]))
        return
    with tempfile.TemporaryDirectory(dir=os.environ.get("PIPX_ROUTE_DIR")) as tmp:
        work = Path(tmp)
        install(work)
        print(run("unshare", "-n", sys.executable, __file__, "--serve", work), end="")
        print("pipx route: installed, served, stopped")


if __name__ == "__main__":
    main()
