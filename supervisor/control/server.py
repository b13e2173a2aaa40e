"""The control socket server: a unix stream socket speaking JSON lines.

Status is answered from an immutable snapshot; everything else becomes a
typed request on the daemon's channel, with a reply channel whose messages
are streamed back to the client as they come.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import structlog
import trio

from supervisor.control import protocol
from supervisor.control.access import Access, Peer, peer_of
from supervisor.control.requests import Reload, Reply, Request, Shutdown, Signal, Switch, Upgrade
from supervisor.errors import OUT_OF_RESOURCES, AlreadyRunning, ControlError, ProtocolError
from supervisor.kernel import caps
from supervisor.observe.metrics import Format
from supervisor.status import Status

log = structlog.get_logger("supervisor.control")

REQUEST_TIMEOUT = 5.0  # a client has this long to send its request line
LINGER = 1.0  # after an error reply, how long we read and discard the rest
CLOSE_GRACE = 5.0  # at exit, connected clients have this long to get their answers
RETRY = 0.1  # after accept() failed for want of fds or memory
PAUSE_LIMIT = REQUEST_TIMEOUT + 1  # a paused server waits this long for clients mid-request
SEND_TIMEOUT = 10.0  # a client that reads nothing for this long is given up
# Clients connected at once; the next wait in the listen backlog (BACKLOG).
# Only allowed peers get past the socket's mode, but a member of
# control_socket_group may be anyone's script gone wrong. A client costs an fd
# and a task, and has REQUEST_TIMEOUT to send its request: with 64 slots, 150
# clients that trickle their requests filled them and the backlog, and an
# operator's `status` got EAGAIN (a unix socket does not retry, as TCP does).
MAX_CLIENTS = 256
BACKLOG = 1024


def _live_daemon_at(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError as exc:  # seam: the control socket's probe
            if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
                return False
            raise
    return True


def _give_to_group(path: Path, group: str) -> None:
    try:
        os.chown(path, -1, grp.getgrnam(group).gr_gid)
    except PermissionError as exc:
        why = caps.why_denied(caps.CHOWN) or f": the daemon is not a member of {group}"
        raise ControlError(
            f"cannot give control socket {path} to group {group} "
            f"(control_socket_group): {exc.strerror}{why}"
        ) from exc


@contextlib.contextmanager
def bound_control_socket(
    path: Path, mode: int, group: str | None = None
) -> Iterator[socket.socket]:
    """Bind and listen on ``path`` with ``mode`` (and ``group``); unlink it on exit.

    A socket file left by a daemon that died is removed; one a live daemon
    answers on is not touched.

    Raises:
        AlreadyRunning: another daemon answers on ``path``.
        ControlError: the path cannot be created.
    """
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            if _live_daemon_at(path):
                raise AlreadyRunning(str(path))
            log.warning("control_socket_stale", path=str(path), action="removed")
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    except OSError as exc:  # seam: the control socket, as ControlError
        raise ControlError(f"cannot create control socket {path}: {exc.strerror}") from exc
    try:
        # The umask makes the file private from its first instant; chmod then
        # applies the configured mode (which may grant a group access).
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(path))
        finally:
            os.umask(old_umask)
        if group is not None:
            _give_to_group(path, group)
        os.chmod(path, mode)
        sock.listen(BACKLOG)
    except ControlError:
        sock.close()
        raise
    except OSError as exc:  # seam: the control socket, as ControlError
        sock.close()
        raise ControlError(f"cannot create control socket {path}: {exc.strerror}") from exc
    try:
        yield sock
    finally:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class ControlServer:
    """Serves one control socket; requests go to ``requests``.

    ``pause`` stops accepting (clients wait in the socket's backlog) until
    ``resume``: an upgrade pauses it, and the next image accepts them.
    """

    def __init__(
        self,
        requests: trio.MemorySendChannel[Request],
        status: Callable[[], Status],
        access: Access | None = None,
        metrics: Callable[[Format], str] = lambda _form: "# EOF\n",
    ) -> None:
        self._requests = requests
        self._status = status
        self._metrics = metrics
        self._access = access or Access(frozenset(), frozenset())
        self._accepting = trio.CancelScope()
        self._closed = False
        self._resumed = trio.Event()
        self._busy = 0  # clients being read or answered (not waiting on the daemon)
        self._quiet = trio.Event()
        self._handlers: trio.Nursery | None = None
        self._slots = trio.Semaphore(MAX_CLIENTS)

    async def serve(
        self,
        sock: socket.socket,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept clients on ``sock`` (the caller keeps owning it) until ``close``.

        After ``close``, clients already connected get ``CLOSE_GRACE`` seconds
        to receive their answers (a shutdown's last reply among them).
        """
        listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock.dup()))
        async with listener, trio.open_nursery() as handlers:
            self._handlers = handlers
            task_status.started()
            while not self._closed:
                with self._accepting:
                    await self._accept(listener, handlers)
                if not self._closed:
                    await self._resumed.wait()
            handlers.cancel_scope.deadline = trio.current_time() + CLOSE_GRACE

    async def _accept(self, listener: trio.SocketListener, handlers: trio.Nursery) -> None:
        while True:
            await self._slots.acquire()  # at the cap, new clients wait in the backlog
            try:
                stream = await listener.accept()
            except BaseException as exc:
                self._slots.release()
                if not isinstance(exc, OSError) or exc.errno not in OUT_OF_RESOURCES:
                    raise
                # The client waits in the backlog; the daemon must not die.
                log.warning("control_accept_failed", error=str(exc), retry_in=RETRY)
                await trio.sleep(RETRY)
                continue
            handlers.start_soon(self._handle, stream)

    def close(self) -> None:
        """Stop accepting; ``serve`` returns once connected clients are answered."""
        self._closed = True
        self._accepting.cancel()
        self._resumed.set()

    async def pause(self) -> None:
        """Stop accepting, and wait (at most ``PAUSE_LIMIT``) until every client is
        either answered or waiting on the daemon (a reload, an upgrade)."""
        self._resumed = trio.Event()
        self._accepting.cancel()
        with trio.move_on_after(PAUSE_LIMIT):
            while self._busy:
                self._quiet = trio.Event()
                await self._quiet.wait()

    def resume(self) -> None:
        self._accepting = trio.CancelScope()
        self._resumed.set()

    def adopt(self, fd: int, request: Callable[[Reply], Request]) -> None:
        """Serve a client an earlier image accepted: ``request(reply)`` goes to the
        daemon, and what comes back on ``reply`` goes to the client."""
        assert self._handlers is not None
        raw = socket.socket(fileno=fd)
        raw.set_inheritable(False)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(raw))

        async def handle() -> None:
            async with stream:
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await self._forward(stream, request)

        self._handlers.start_soon(handle)

    async def _handle(self, stream: trio.SocketStream) -> None:
        """Serve one client. Nothing a client does may stop the daemon: a
        client that hangs up is dropped, and a bug is logged, not raised."""
        self._busy += 1
        try:
            async with stream:
                try:
                    await self._serve_client(stream)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    log.debug("control_client_gone")
                except trio.TooSlowError:
                    log.warning("control_client_stalled", timeout=SEND_TIMEOUT)
                except Exception:
                    log.exception("control_handler_failed")
        finally:
            self._settle()
            self._slots.release()

    def _settle(self) -> None:
        """One client fewer is being read or answered."""
        self._busy -= 1
        if not self._busy:
            self._quiet.set()

    async def _serve_client(self, stream: trio.SocketStream) -> None:
        peer = peer_of(stream.socket)  # type: ignore[arg-type]
        if not self._access.allows(peer):
            log.warning("control_refused", peer_pid=peer.pid, peer_uid=peer.uid, peer_gid=peer.gid)
            await _refuse(
                stream,
                f"uid {peer.uid} (pid {peer.pid}) may not control this daemon: allow it with "
                "[supervisor] control_allow_users or control_allow_groups",
            )
            return
        try:
            request = protocol.parse_request(await _read_line(stream))
        except (ProtocolError, trio.TooSlowError) as exc:
            message = str(exc) or "no request received in time"
            log.warning("control_bad_request", peer_pid=peer.pid, reason=message)
            await _refuse(stream, message)
            return
        log.info("control_request", command=request.command, peer_pid=peer.pid)
        await self._dispatch(stream, request, peer)

    async def _dispatch(
        self, stream: trio.SocketStream, request: protocol.ControlRequest, peer: Peer
    ) -> None:
        if request.command == "status":
            snapshot = self._status()
            if request.service is not None and request.service not in snapshot.services:
                await _send(stream, protocol.error(f"no service named {request.service!r}"))
                return
            await _send(stream, protocol.result(status=snapshot.model_dump(mode="json")))
            return
        if request.command == "metrics":
            await _send(stream, protocol.result(text=self._metrics(request.format)))
            return
        source = f"control (pid {peer.pid}, uid {peer.uid})"
        fd = stream.socket.fileno()

        def typed(reply: Reply) -> Request:
            if request.command == "shutdown":
                return Shutdown(source=source, reply=reply)
            if request.command == "upgrade":
                return Upgrade(source=source, reply=reply, connection=fd)
            if request.command in ("stop", "start"):
                assert request.service is not None  # the model checks it
                return Switch(source, request.service, request.command == "start", reply)
            if request.command == "signal":
                assert request.service is not None  # the model checks both
                assert request.signal is not None
                return Signal(source, request.service, request.signal, request.worker, reply)
            return Reload(
                source,
                request.service,
                request.reason,
                reply=reply,
                connection=fd,
                keep_config=request.command == "restart",
            )

        self._settle()  # waiting on the daemon from here: an upgrade may carry it over
        try:
            await self._forward(stream, typed)
        finally:
            self._busy += 1

    async def _forward(
        self, stream: trio.SocketStream, request: Callable[[Reply], Request]
    ) -> None:
        send, receive = trio.open_memory_channel[dict[str, Any]](64)
        await self._requests.send(request(send))
        reading = True
        async with receive:
            # Drained to the end whatever the client does: the daemon's side
            # of the channel must never wait on a client.
            async for message in receive:
                if not reading:
                    continue
                try:
                    await _send(stream, message)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    reading = False
                except trio.TooSlowError:
                    log.warning("control_client_stalled", timeout=SEND_TIMEOUT)
                    reading = False
                    await trio.aclose_forcefully(stream)


async def _send(stream: trio.SocketStream, message: dict[str, Any]) -> None:
    """Raises ``trio.TooSlowError`` if the client does not take it in ``SEND_TIMEOUT``."""
    with trio.fail_after(SEND_TIMEOUT):
        await stream.send_all(protocol.encode(message))


async def _refuse(stream: trio.SocketStream, reason: str) -> None:
    """Send an error, then read and discard what the client still sends for a
    moment (a lingering close): closing with unread input would make the
    kernel answer RST, and the client would lose our error line."""
    await _send(stream, protocol.error(reason))
    await stream.send_eof()
    with trio.move_on_after(LINGER):
        while await stream.receive_some(65536):
            pass


async def _read_line(stream: trio.SocketStream) -> bytes:
    buffer = b""
    with trio.fail_after(REQUEST_TIMEOUT):
        while b"\n" not in buffer:
            if len(buffer) > protocol.MAX_LINE:
                raise ProtocolError(f"request longer than {protocol.MAX_LINE} bytes")
            chunk = await stream.receive_some(4096)
            if not chunk:
                if buffer.strip():
                    break
                raise ProtocolError("connection closed before a request was sent")
            buffer += chunk
    return buffer.split(b"\n", 1)[0]
