"""Listener creation and observation against the real kernel."""

from __future__ import annotations

import errno
import os
import pwd
import socket
import subprocess
import sys

import pytest

from supervisor.errors import ListenerError
from supervisor.kernel.sockets import ListenerOptions, accept_queue, open_listener, socket_cookie
from supervisor.values import parse_listen
from tests.support.harness import free_port

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


def test_reuseport_listeners_share_a_port_and_report_their_queue() -> None:
    address = parse_listen(f"127.0.0.1:{free_port()}")
    first = open_listener(address, ListenerOptions(backlog=16))
    second = open_listener(address, ListenerOptions(backlog=32))
    clients = []
    try:
        assert socket_cookie(first) != socket_cookie(second)
        assert accept_queue(first).limit == 16
        assert accept_queue(second).limit == 32
        second.close()  # now every connection is queued on `first`
        clients = [socket.create_connection(address.sockaddr, timeout=5) for _ in range(3)]
        depth = accept_queue(first)
        assert (depth.listening, depth.queued) == (True, 3)
        first.shutdown(socket.SHUT_RDWR)
        assert not accept_queue(first).listening
    finally:
        for sock in (first, second, *clients):
            sock.close()


def test_port_is_free_for_others_while_its_served_connections_sit_in_time_wait() -> None:
    """After the supervisor stops, a server that binds without SO_REUSEPORT (nginx
    with a plain ``listen``) can take the port at once: the connections our
    listener's workers closed first linger in TIME_WAIT for 60 s, and only
    SO_REUSEADDR on our listener lets a new bind pass them."""
    address = parse_listen(f"127.0.0.1:{free_port()}")
    listener = open_listener(address, ListenerOptions(backlog=16))
    client = socket.create_connection(address.sockaddr, timeout=5)
    served, _ = listener.accept()
    served.close()  # the server closes first: its side goes to TIME_WAIT
    assert client.recv(1) == b""
    client.close()
    listener.close()
    other = socket.socket()
    try:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(address.sockaddr)
        other.listen(1)
    finally:
        other.close()


def test_ipv6_and_udp() -> None:
    port = free_port("::1")
    tcp6 = open_listener(parse_listen(f"[::1]:{port}"), ListenerOptions())
    udp = open_listener(parse_listen(f"udp://127.0.0.1:{port}"), ListenerOptions())
    try:
        assert tcp6.family == socket.AF_INET6
        assert tcp6.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
        assert udp.type == socket.SOCK_DGRAM
        assert udp.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
    finally:
        tcp6.close()
        udp.close()


def test_options_are_applied() -> None:
    options = ListenerOptions(backlog=8, defer_accept=2.0, fastopen=64, rcvbuf=65536)
    sock = open_listener(parse_listen(f"127.0.0.1:{free_port()}"), options)
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_DEFER_ACCEPT) > 0
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_FASTOPEN) == 64
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 65536
    finally:
        sock.close()


def test_port_held_by_another_program_is_named() -> None:
    port = free_port()
    other = socket.socket()  # no SO_REUSEPORT: like another program's listener
    other.bind(("127.0.0.1", port))
    other.listen()
    try:
        with pytest.raises(ListenerError) as info:
            open_listener(parse_listen(f"127.0.0.1:{port}"), ListenerOptions())
    finally:
        other.close()
    assert info.value.errno == errno.EADDRINUSE
    assert str(info.value) == (
        f"cannot bind 127.0.0.1:{port}: EADDRINUSE: held by a socket of this user "
        f"(uid {os.geteuid()}) without SO_REUSEPORT: another program (or another "
        "supervisord) already serves this address"
    )


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_port_held_by_another_user_names_the_owner(proto: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a listener as another user")
    port = free_port()
    kind = "SOCK_STREAM" if proto == "tcp" else "SOCK_DGRAM"
    listen = "s.listen()" if proto == "tcp" else "pass"
    # A program of user nobody holds the port in its own SO_REUSEPORT group.
    holder = subprocess.Popen(
        [
            "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable,
            "-c",
            f"import socket, sys; s = socket.socket(socket.AF_INET, socket.{kind}); "
            "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1); "
            f"s.bind(('127.0.0.1', {port})); {listen}; print('ready', flush=True); "
            "sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "ready\n"
        with pytest.raises(ListenerError) as info:
            open_listener(parse_listen(f"{proto}://127.0.0.1:{port}"), ListenerOptions())
    finally:
        holder.kill()
        holder.wait(10)
    nobody = pwd.getpwnam("nobody").pw_uid
    assert str(info.value) == (
        f"cannot bind {'udp://' if proto == 'udp' else ''}127.0.0.1:{port}: EADDRINUSE: "
        f"held by a socket of uid {nobody} (nobody); a SO_REUSEPORT group has one owner, "
        "and the supervisor runs as uid 0 (root): stop that program or run as its user"
    )


def test_address_not_local_is_named() -> None:
    # bind() only: no packet is sent anywhere.
    with pytest.raises(ListenerError) as info:
        open_listener(parse_listen("192.0.2.1:8080"), ListenerOptions())
    assert info.value.errno == errno.EADDRNOTAVAIL
    assert "cannot bind 192.0.2.1:8080: EADDRNOTAVAIL: address is not local" in str(info.value)
