"""The launcher and real child processes: fds, LISTEN_PID, death signal, privileges."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal

import pytest
import trio
import trio.testing

from supervisor.kernel import fastspawn, launch
from supervisor.kernel.proc import LAUNCHER, Credentials, describe_exit, spawn
from tests.support.harness import process_gone, wait_until

REPORT = textwrap.dedent(
    """
    import json, os, socket, sys
    fds = sorted(int(f) for f in os.listdir("/proc/self/fd"))
    kinds = {}
    for fd in range(3, 3 + int(os.environ["LISTEN_FDS"])):
        s = socket.socket(fileno=fd)
        kinds[fd] = s.getsockname()[1]
        s.detach()
    print(json.dumps({"pid": os.getpid(), "listen_pid": os.environ["LISTEN_PID"],
                      "fds": fds, "ports": kinds, "uid": os.getuid(), "gid": os.getgid(),
                      "groups": os.getgroups(), "cwd": os.getcwd()}), flush=True)
    """
)


def _via(path: str) -> Literal["auto", "launcher"]:
    if path == "auto" and fastspawn.available() is None:
        pytest.skip("no /bin/sh or no setpriv with --pdeathsig: every start uses the launcher")
    return "auto" if path == "auto" else "launcher"


# Both ways a worker starts: posix_spawn + sh + setpriv ("auto" for a worker
# that keeps the supervisor's credentials) and the Python launcher.
VIA = pytest.mark.parametrize("via", ["auto", "launcher"], ids=["fastspawn", "launcher"])


def listener() -> socket.socket:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


async def run_child(argv: list[str], fds: list[int], **kwargs: Any) -> str:
    """Spawn through the launcher, wait, return what the child printed."""
    read, write = os.pipe()
    env = {**os.environ, "LISTEN_FDS": str(len(fds))}
    try:
        proc = spawn(argv, env=env, fds=fds, stdout=write, **kwargs)
    finally:
        os.close(write)
    with trio.fail_after(30):
        code = await proc.wait()
    proc.close()
    with os.fdopen(read) as f:
        out = f.read()
    assert code == 0, out
    return out


async def run_report(fds: list[int], via: str = "auto") -> dict[str, Any]:
    return dict(json.loads(await run_child([sys.executable, "-c", REPORT], fds, via=_via(via))))


@VIA
async def test_listeners_arrive_at_3_and_up_with_listen_pid(via: str) -> None:
    socks = [listener() for _ in range(3)]
    ports = [s.getsockname()[1] for s in socks]
    try:
        # Hand them over in reverse fd order to exercise the two-pass move.
        fds = [s.fileno() for s in reversed(socks)]
        report = await run_report(fds, via)
    finally:
        for s in socks:
            s.close()
    assert report["listen_pid"] == str(report["pid"])
    assert report["ports"] == {"3": ports[2], "4": ports[1], "5": ports[0]}
    assert report["fds"][:6] == [0, 1, 2, 3, 4, 5]
    assert len(report["fds"]) == 7, "nothing else leaks in (the 7th is listdir's own fd)"


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")
async def test_privileges_are_dropped_in_the_child() -> None:
    sock = listener()
    try:
        out = await run_child(
            ["/bin/sh", "-c", 'echo "$(id -u) $(id -g) [$(id -G)] $(pwd) $LISTEN_PID $$"'],
            [sock.fileno()],
            credentials=Credentials(uid=65534, gid=65534, groups=()),
            cwd=Path("/"),
        )
    finally:
        sock.close()
    uid, gid, groups, cwd, listen_pid, pid = out.split()
    assert (uid, gid, groups, cwd) == ("65534", "65534", "[65534]", "/")
    assert listen_pid == pid


@VIA
async def test_exec_failure_is_exit_127(via: str) -> None:
    proc = spawn(["/nonexistent/program"], env=dict(os.environ), fds=[], via=_via(via))
    with trio.fail_after(30):
        code = await proc.wait()
    proc.close()
    assert code == 127
    assert describe_exit(code) == "exited with status 127"


@pytest.mark.parametrize("groups", [None, [], [7, 8]])
def test_the_spec_survives_its_encoding(groups: list[int] | None) -> None:
    argv = ["prog", "", "-", "a b", "--", "7,8"]  # the worker's argv is taken as it is
    fields = {"fds": [9, 4], "parent": 12, "pdeathsig": 9, "uid": None, "gid": 0,
              "groups": groups, "cwd": "/srv/a dir", "nofile": 1024}  # fmt: skip
    spec = launch.Spec(launch.encode(argv, **fields))  # type: ignore[arg-type]
    assert spec.argv == argv
    assert {k: getattr(spec, k) for k in fields} == fields


@VIA
async def test_the_worker_gets_the_soft_fd_limit_and_the_directory_it_is_given(
    via: str, tmp_path: Path
) -> None:
    out = await run_child(
        ["/bin/sh", "-c", "ulimit -Sn; pwd"], [], nofile=777, cwd=tmp_path, via=_via(via)
    )
    assert out.split() == ["777", str(tmp_path)]


def test_an_fd_the_supervisor_inherited_never_reaches_a_worker() -> None:
    # posix_spawn closes nothing: an inheritable fd the daemon got from its own
    # parent must be sealed before the first start (in a fresh process).
    code = textwrap.dedent(
        """
        import json, os, sys, time
        from supervisor.kernel.proc import spawn
        stray = os.dup2(os.pipe()[0], 100, inheritable=True)  # above the child's own
        read, write = os.pipe()
        listing = "import os; print(sorted(int(f) for f in os.listdir('/proc/self/fd')))"
        child = spawn([sys.executable, "-c", listing], env=dict(os.environ), fds=[], stdout=write)
        os.close(write)
        print(json.dumps({"stray": stray, "child": os.read(read, 4096).decode()}))
        while os.waitpid(child.pid, 0)[0] != child.pid:
            pass
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    seen = json.loads(done.stdout)
    assert seen["stray"] not in json.loads(seen["child"]), seen


@pytest.mark.parametrize(("carried", "expected"), [("", "256"), ("1000", "1000")])
def test_the_daemon_raises_its_fd_limit_and_remembers_the_first(
    carried: str, expected: str
) -> None:
    # In a child: the limits are the process's own.
    code = textwrap.dedent(
        """
        import resource
        from supervisor.kernel.proc import raise_fd_limit
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        workers = raise_fd_limit()
        print(workers, resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard)
        """
    )
    env = {**os.environ, "SUPERVISOR_WORKER_NOFILE": carried}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
        check=True,
    )  # fmt: skip
    assert done.stdout.split() == [expected, "True"]


def test_a_malformed_spec_is_exit_127_with_the_cause() -> None:
    done = subprocess.run(
        [sys.executable, "-I", "-S", str(LAUNCHER), "1", "x"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 127
    assert "bad launch spec" in done.stderr


@VIA
def test_children_die_with_their_parent(via: str) -> None:
    # A middleman process spawns a sleeper and is then SIGKILLed: the
    # parent-death signal must take the sleeper with it.
    code = textwrap.dedent(
        f"""
        import os, sys, time
        from supervisor.kernel.proc import spawn
        child = spawn(["sleep", "300"], env=dict(os.environ), fds=[], via={_via(via)!r})
        print(child.pid, flush=True)
        time.sleep(300)
        """
    )
    middle = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert middle.stdout is not None
        child = int(middle.stdout.readline())
        # The launcher sets the signal just before exec: wait for `sleep`.
        wait_until(lambda: _comm(child) == "sleep", 30, "the child to exec sleep")
        middle.kill()
        middle.wait(10)
        wait_until(lambda: process_gone(child), 10, "the orphaned child to die")
    finally:
        middle.kill()
        middle.wait(10)


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


def test_describe_exit() -> None:
    assert describe_exit(-signal.SIGKILL) == "killed by SIGKILL"
    assert describe_exit(0) == "exited with status 0"


async def test_a_cancelled_waiter_hands_over_to_the_next() -> None:
    proc = spawn(["sleep", "0.5"], env=dict(os.environ), fds=[])
    codes: list[int] = []
    first = trio.CancelScope()

    async def watcher() -> None:  # holds the pidfd watch, then is cancelled
        with first:
            await proc.wait()

    async def waiter() -> None:
        codes.append(await proc.wait())

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watcher)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            first.cancel()
    assert first.cancelled_caught
    assert codes == [0], "the waiter behind the cancelled one still saw the exit"
    assert proc.returncode == 0 and process_gone(proc.pid)


async def test_close_never_waits_and_the_child_is_reaped_later() -> None:
    proc = spawn(["sleep", "30"], env=dict(os.environ), fds=[])
    with trio.fail_after(30):
        proc.close()  # SIGKILL; the reaping is handed to a background task
        while proc.returncode is None:
            await trio.sleep(0.01)
    assert proc.returncode == -signal.SIGKILL
    assert process_gone(proc.pid), "reaped, not left a zombie"


def test_a_parent_that_dies_before_the_death_signal_is_set_leaves_no_orphan(
    tmp_path: Path,
) -> None:
    # The window: fastspawn's first sh has checked its parent, and setpriv has
    # not yet set the death signal. A setpriv that waits there makes it wide:
    # the parent exits inside it, and the worker must not start.
    setpriv = fastspawn.available()
    if setpriv is None:
        pytest.skip("no setpriv with --pdeathsig here")
    slow = tmp_path / "slow-setpriv"
    slow.write_text(f'#!/bin/sh\nsleep 1\nexec {setpriv} "$@"\n')
    slow.chmod(0o755)
    code = textwrap.dedent(
        f"""
        import os, signal
        from supervisor.kernel import fastspawn
        null = os.open(os.devnull, os.O_WRONLY)  # an orphan must not hold our pipe open
        pid = fastspawn.spawn({str(slow)!r}, ["sleep", "300"], env=dict(os.environ), fds=[],
            cwd=None, death_signal=signal.SIGKILL, stdout=null, stderr=null, nofile=None)
        print(pid, flush=True)
        """
    )
    middle = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30
    )
    child = int(middle.stdout)  # the middleman has exited: the child is an orphan now
    try:
        wait_until(lambda: process_gone(child) or _comm(child) == "sleep", 30, "the child")
        assert process_gone(child), f"pid {child} started its worker with no parent to kill it"
    finally:
        if not process_gone(child):
            os.kill(child, signal.SIGKILL)  # ours, by pid: the old code's orphan
