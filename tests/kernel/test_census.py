"""The census's kernel reads: members of a group by sock_diag, their holders by
/proc, their settings through a pidfd_getfd duplicate; and what a stranger
in an eBPF-steered group receives (nothing)."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from supervisor.kernel import diag, members
from supervisor.kernel.sockets import ListenerOptions, open_listener, socket_cookie
from supervisor.steering import Role
from supervisor.steering.ebpf import EbpfGroup
from supervisor.values import ListenAddress, parse_listen
from tests.support.stranger import stranger

pytestmark = [pytest.mark.kernel]
SYSTEM_PYTHON = Path("/usr/bin/python3")


def test_members_holders_and_settings_of_a_stranger(address: ListenAddress) -> None:
    ours = [open_listener(address, ListenerOptions()) for _ in range(2)]
    wildcard = parse_listen(f"0.0.0.0:{address.port}")
    try:
        with stranger(address.host, address.port, defer_accept=5) as proc:
            found = diag.bound_on(address)
            exact = {b.cookie: b for b in found if b.exact}
            assert {socket_cookie(s) for s in ours} < set(exact)
            assert all(b.uid == 0 and b.host == address.host for b in exact.values())
            inodes = {os.fstat(s.fileno()).st_ino for s in ours}
            assert inodes == {
                b.inode for b in exact.values() if b.cookie in map(socket_cookie, ours)
            }
            (theirs,) = [b for b in exact.values() if b.inode not in inodes]
            held = members.holders([theirs.inode])[theirs.inode]
            assert [h.pid for h in held] == [proc.pid]
            assert held[0].command.startswith("python")
            settings = members.settings_held(held[0])
            mine = members.settings_of(ours[0])
            assert settings.reuseport and mine.reuseport
            assert settings.defer_accept > 0 == mine.defer_accept
            assert settings.differences(mine) == [f"defer_accept {settings.defer_accept} (ours 0)"]
            # Seen from the wildcard on the same port: a neighbour, not a member.
            assert {b.exact for b in diag.bound_on(wildcard)} == {False}
        assert {b.cookie for b in diag.bound_on(address)} == {socket_cookie(s) for s in ours}
    finally:
        for sock in ours:
            sock.close()


def test_another_uid_cannot_join_or_overlap_our_group(address: ListenAddress) -> None:
    """Measured: the kernel keeps a group to one owner uid, and refuses an
    overlapping wildcard of another uid. A stranger in our group is a
    process of our own uid (see docs/kernel.md §2)."""
    if not SYSTEM_PYTHON.exists():
        pytest.skip(f"{SYSTEM_PYTHON} (a Python user nobody may run) is not installed")
    ours = open_listener(address, ListenerOptions())
    script = (
        "import socket, sys\n"
        "for host in sys.argv[2:]:\n"
        "    s = socket.socket()\n"
        "    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
        "    try:\n"
        "        s.bind((host, int(sys.argv[1]))); s.listen(1); print(host, 'ok')\n"
        "    except OSError as e:\n"
        "        print(host, e.errno)\n"
    )
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    hosts = [address.host, "0.0.0.0", "127.0.0.2"]
    try:
        done = subprocess.run(
            [*nobody, str(SYSTEM_PYTHON), "-c", script, str(address.port), *hosts],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
    finally:
        ours.close()
    assert done.stdout.splitlines() == [f"{address.host} 98", "0.0.0.0 98", "127.0.0.2 ok"], (
        done.stdout
    )


def test_a_stray_member_bound_mid_run_receives_no_syn(address: ListenAddress) -> None:
    """A socket of our uid joins the group while connections arrive: under
    the eBPF program it gets none of them, even once an active member left
    without the steering knowing (its slot fails to select: the program tries
    the next active slot), and every SYN is counted on an active slot (none
    left to the kernel's hash). The negative control, the same group without
    a program, hands the stray its share."""
    for steered in (True, False):
        got, stray_got, unsteered = _run_with_stray(address, steered)
        total = sum(got.values()) + stray_got
        print(f"steered={steered}: ours {dict(got)}, stray {stray_got}, of {total}")
        assert total >= 600
        if steered:
            assert stray_got == 0 and unsteered == 0, (got, stray_got, unsteered)
        else:
            assert stray_got > total / 10, (got, stray_got)
        address = parse_listen(f"127.0.0.1:{address.port + 1}")


def _run_with_stray(address: ListenAddress, steered: bool) -> tuple[Counter[int], int, int]:
    group = EbpfGroup(address) if steered else None
    ours = [open_listener(address, ListenerOptions(backlog=4096)) for _ in range(2)]
    got: Counter[int] = Counter()
    stop = threading.Event()

    def accept(i: int, sock: socket.socket) -> None:
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                sock.accept()[0].close()
                got[i] += 1
            except TimeoutError:
                continue
            except OSError:  # shut down: EINVAL
                return

    threads = [threading.Thread(target=accept, args=(i, s)) for i, s in enumerate(ours)]
    try:
        if group is not None:
            for sock in ours:
                group.join(sock, Role.ACTIVE)
            group.apply()
        for thread in threads:
            thread.start()
        clients = []
        deadline = time.monotonic() + 60
        stray: socket.socket | None = None
        for n in range(900):
            if n == 300:  # mid-run: a member nobody placed joins the group
                stray = socket.socket()
                stray.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                stray.bind(address.sockaddr)
                stray.listen(4096)
            if n == 600 and group is not None:
                # One of ours leaves behind the steering's back: its slot is
                # still in the active table, and selecting it fails from now on.
                ours[1].shutdown(socket.SHUT_RDWR)
            if time.monotonic() > deadline:
                break
            clients.append(socket.create_connection(address.sockaddr, timeout=5))
            if len(clients) > 64:
                clients.pop(0).close()
        for client in clients:
            client.close()
        assert stray is not None
        time.sleep(0.3)  # the accept threads take what is queued on ours
        stray_got = 0
        stray.setblocking(False)
        while True:
            try:
                stray.accept()[0].close()
                stray_got += 1
            except BlockingIOError:
                break
        stray.close()
        return got, stray_got, 0 if group is None else group.unsteered_syns()
    finally:
        stop.set()
        for thread in threads:
            if thread.is_alive():
                thread.join(5)
        for sock in ours:
            sock.close()
        if group is not None:
            group.close()
