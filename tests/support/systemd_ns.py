"""Real systemd (Debian 12's 252) as PID 1 of a private namespace, for tests.

systemd boots in its own PID, mount and network namespace with only the
test's units on its unit path: no boot unit runs (one would wipe the host's
/tmp and change kernel-wide settings). /run, /var/tmp and /tmp are fresh
tmpfs inside it, so nothing it writes reaches the host; so are the shipped
unit's state and logs directories (``PRIVATE``). Its files live in a
directory under /var/lib, outside the tmpfs mounts. ``close()`` kills it
(which ends the namespace and everything in it) and removes the directory.

The cgroup tree is the host's (there is no cgroup namespace), and systemd
takes the cgroup it starts in as its root. Started in the host's root, every
instance would put its units in the very same ``/system.slice/UNIT`` cgroup:
one instance's processes (pid 0 to another, being in no pid namespace it can
see) then make the other's ``systemctl kill`` fail with EIO, and a leftover
keeps a unit's cgroup from ever emptying. So each instance starts in a cgroup
of its own, named like its directory, and ``close()`` removes that subtree.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import supervisor

SYSTEMD = Path("/usr/lib/systemd/systemd")
BASE = Path("/var/lib")
BOOT_TIMEOUT = 30.0
# The shipped unit's StateDirectory= and LogsDirectory=: each instance gets
# its own, under its directory, bind-mounted where systemd makes them. What
# the daemon and its workers write there stays out of the host's /var.
PRIVATE = ("/var/lib/reuseport-supervisor", "/var/log/reuseport-supervisor")

RUN = """#!/bin/sh
set -e
mount --make-rprivate /
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /var/tmp
mount -t tmpfs tmpfs /tmp
ip link set lo up
for dir in {private}; do
    mkdir -p "$dir" "{root}/private$dir" && mount --bind "{root}/private$dir" "$dir"
done
for procs in {cgroups}; do echo $$ > "$procs"; done
export SYSTEMD_UNIT_PATH={units}
exec {systemd} --system --unit=test.target --log-target=console --log-level=info
"""


def available() -> str | None:
    """Why real systemd cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root for a private PID and mount namespace"
    for tool in ("unshare", "nsenter", "setsid"):
        if shutil.which(tool) is None:
            return f"needs {tool} (util-linux)"
    if not SYSTEMD.exists():
        return f"needs {SYSTEMD} (Debian's systemd package)"
    code = Path(supervisor.__file__).resolve().parent
    for what, path in (("the venv", Path(sys.executable)), ("the code", code)):
        if path.is_relative_to("/tmp"):
            return (
                f"{what} is under /tmp ({path}), and the namespace mounts a fresh /tmp "
                "(systemd's boot would wipe the host's): clone outside /tmp to run these"
            )
    return None


class SystemdNamespace:
    """One systemd instance with the units given to ``install``."""

    def __init__(self) -> None:
        BASE.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(prefix="sv-systemd-", dir=BASE))
        self.units = self.root / "units"
        self.units.mkdir()
        (self.units / "test.target").write_text("[Unit]\nDescription=test target\n")
        self.pid = 0  # systemd, as the host sees it
        self._unshare: subprocess.Popen[bytes] | None = None
        self.cgroups = [Path(mount) / self.root.name for mount in _tracking_hierarchies()]

    def install(self, name: str, text: str, dropins: dict[str, str] | None = None) -> Path:
        path = self.units / name
        path.write_text(text)
        for dropin, body in (dropins or {}).items():
            folder = self.units / f"{name}.d"
            folder.mkdir(exist_ok=True)
            (folder / dropin).write_text(body)
        return path

    def boot(self) -> None:
        script = self.root / "run.sh"
        for cgroup in self.cgroups:
            cgroup.mkdir()
        procs = " ".join(str(cgroup / "cgroup.procs") for cgroup in self.cgroups)
        script.write_text(
            RUN.format(
                units=self.units,
                systemd=SYSTEMD,
                cgroups=procs,
                root=self.root,
                private=" ".join(PRIVATE),
            )
        )
        script.chmod(0o755)
        log = (self.root / "systemd.log").open("wb")
        self._unshare = subprocess.Popen(
            ["setsid", "unshare", "--pid", "--fork", "--mount", "--mount-proc", "-n", str(script)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + BOOT_TIMEOUT
        while time.monotonic() < deadline:
            self.pid = self._child_of(self._unshare.pid)
            if self.pid and self._ready():
                return
            time.sleep(0.05)
        raise AssertionError(f"systemd did not come up:\n{self.systemd_log()[-3000:]}")

    @staticmethod
    def _child_of(pid: int) -> int:
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{pid}/task"):
                children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
                if children:
                    return int(children[0])
        return 0

    def _ready(self) -> bool:
        probe = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "test", "-S", "/run/systemd/private"],
            check=False,
        )
        return probe.returncode == 0

    def systemd_log(self) -> str:
        return (self.root / "systemd.log").read_text(errors="replace")

    def enter(self, *namespaces: str) -> list[str]:
        """``nsenter`` into systemd's namespaces (default: mount, pid, net)."""
        flags = list(namespaces or ("-m", "-p", "-n"))
        return ["nsenter", "-t", str(self.pid), *flags]

    def ctl(
        self, *args: str, check: bool = True, timeout: float = 180
    ) -> subprocess.CompletedProcess[str]:
        """``systemctl ARGS`` inside; raises with its output if ``check`` and it failed."""
        done = subprocess.run(
            [*self.enter(), "systemctl", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"systemctl {' '.join(args)} exited {done.returncode}:\n{done.stdout}{done.stderr}"
                f"\n--- systemd ---\n{self.systemd_log()[-3000:]}"
            )
        return done

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.ctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def main_pid(self, unit: str) -> int:
        """The unit's MainPID, as the host sees it (0 if none)."""
        inner = int(self.show(unit, "MainPID")["MainPID"])
        if not inner:
            return 0
        return self.host_pid(inner)

    def host_pid(self, inner: int) -> int:
        """A pid of the namespace, in the host's numbering."""
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{entry}/status").read_text().splitlines():
                    if line.startswith("NSpid:"):
                        pids = line.split()[1:]
                        if len(pids) > 1 and pids[-1] == str(inner) and self._in_ns(int(entry)):
                            return int(entry)
        return 0

    def _in_ns(self, pid: int) -> bool:
        return os.readlink(f"/proc/{pid}/ns/pid") == os.readlink(f"/proc/{self.pid}/ns/pid")

    def netns(self) -> str:
        return f"/proc/{self.pid}/ns/net"

    def close(self) -> None:
        """Kill systemd: the namespace and every process in it end with it."""
        if self.pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
        if self._unshare is not None:
            try:
                self._unshare.wait(30)
            except subprocess.TimeoutExpired:
                self._unshare.kill()
                self._unshare.wait(10)
        _remove_cgroups(self.root.name)
        shutil.rmtree(self.root, ignore_errors=True)


def _cgroup_mounts() -> list[tuple[str, str, str]]:
    """(mount point, type, options) of every cgroup hierarchy mounted here."""
    out = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, point, kind, options = line.split()[:4]
        if kind in ("cgroup", "cgroup2"):
            out.append((point, kind, options))
    return out


def _tracking_hierarchies() -> list[str]:
    """The hierarchies systemd finds its own cgroup in: the cgroup2 one, and
    the named ``systemd`` one of a hybrid or legacy layout."""
    return [
        point
        for point, kind, options in _cgroup_mounts()
        if kind == "cgroup2" or "name=systemd" in options.split(",")
    ]


def _remove_cgroups(name: str) -> None:
    """Remove the cgroup subtree ``name`` from every hierarchy (systemd made it in
    the controllers' hierarchies too); its processes are gone by now, and a cgroup
    whose last task is still exiting may take a moment to let go."""
    for point, _, _ in _cgroup_mounts():
        top = Path(point) / name
        deadline = time.monotonic() + 10
        while top.exists() and time.monotonic() < deadline:
            for folder, _, _ in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
                with contextlib.suppress(OSError):
                    os.rmdir(folder)
            if top.exists():
                time.sleep(0.05)


def json_lines(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    for line in path.read_text(errors="replace").splitlines():
        with contextlib.suppress(ValueError):
            yield json.loads(line)


SHIPPED_UNIT = Path(__file__).resolve().parents[2] / "systemd" / "reuseport-supervisor.service"
UNIT = "reuseport-supervisor.service"


def install_supervisor(ns: SystemdNamespace, config: Path, venv_bin: Path) -> None:
    """The project's own unit, its paths rewritten for ``ns``: the venv's commands,
    ``config``; a drop-in with ``DefaultDependencies=no`` (no sysinit here) and
    the daemon's log in ``ns.root/daemon.log``."""
    text = SHIPPED_UNIT.read_text()
    text = text.replace("/usr/local/bin/", f"{venv_bin}/").replace(
        "/etc/reuseport-supervisor/supervisor.toml", str(config)
    )
    dropin = (
        "[Unit]\nDefaultDependencies=no\n"
        f"[Service]\nStandardOutput=append:{ns.root}/daemon.log\nStandardError=inherit\n"
        f"Environment=PATH={venv_bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"
    )
    ns.install(UNIT, text, {"test.conf": dropin})
