"""Health checks: when a freshly spawned worker counts as RUNNING.

Each probe's ``wait_ready`` returns once the worker is healthy and retries
otherwise, remembering the last failure in ``last_error`` so that a caller
who gives up (``ready_timeout``) can say why. The caller bounds the time.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import h11
import trio

from supervisor.config.schema import (
    Health,
    HealthExec,
    HealthHttp,
    HealthNone,
    HealthTcp,
    HealthTls,
)
from supervisor.errors import DiagError, StartFailed, SupervisorError
from supervisor.kernel import diag
from supervisor.kernel.notify import NotifyMessage
from supervisor.kernel.proc import CommandResult, describe_exit
from supervisor.plan.plan import substitute
from supervisor.serve.listener import Listener
from supervisor.text import printable
from supervisor.values import ListenAddress, Served, connect_address

_MAX_OUTPUT = 2000
_MAX_HEAD = 8192  # an answer's status line and headers, at most
ACCEPT_POLL = 0.01


Connector = Callable[[], Awaitable[trio.SocketStream]]
Runner = Callable[[Sequence[str]], Awaitable[CommandResult]]


@dataclass(frozen=True)
class ProbeTarget:
    """What a probe looks at: the worker's identity and its first TCP listener.

    ``connect`` opens a connection that reaches this worker's own listener
    (pinned by steering), not just any member of the reuseport group.
    """

    label: str
    worker: int
    generation: int
    pid: int
    address: ListenAddress | None
    connect: Connector | None = None
    notifications: Callable[[], Awaitable[NotifyMessage]] | None = None
    # The service's tls.cert as read once for this generation (by the reload's
    # validation, or at its start): what a tls probe must be served.
    certificate: Served | None = None
    run: Runner | None = None  # runs an exec check as the service (user, env, cwd)


class Probe:
    """Base: retry ``attempt`` every ``interval`` until it returns True."""

    name = "none"
    interval = 0.1

    def __init__(self, target: ProbeTarget) -> None:
        self.target = target
        self._last_error = "not checked yet"

    @property
    def last_error(self) -> str:
        """Why the last attempt failed, as one printable line: it quotes what the
        worker answered, and it reaches reports, logs and systemd's ``STATUS=``."""
        return self._last_error

    @last_error.setter
    def last_error(self, text: str) -> None:
        self._last_error = printable(text, limit=_MAX_OUTPUT)

    async def attempt(self) -> bool:
        raise NotImplementedError

    async def wait_ready(self) -> None:
        # Probing an outside program is inherently a retry loop: there is no
        # event to wait for until the worker answers.
        while not await self.attempt():  # noqa: ASYNC110
            await trio.sleep(self.interval)


class SettleProbe(Probe):
    """``none``: healthy once the process stayed alive for ``settle`` (the caller
    notices an exit first)."""

    def __init__(self, target: ProbeTarget, check: HealthNone) -> None:
        super().__init__(target)
        self.settle = check.settle
        self.last_error = f"process did not stay up for {check.settle}s"

    async def attempt(self) -> bool:
        await trio.sleep(self.settle)
        return True


class NotifyProbe(Probe):
    """``notify``: healthy once the worker process itself sends ``READY=1``."""

    name = "notify"

    def __init__(self, target: ProbeTarget) -> None:
        super().__init__(target)
        self.last_error = "no READY=1 received on NOTIFY_SOCKET"

    async def attempt(self) -> bool:
        if self.target.notifications is None:
            self.last_error = "no NOTIFY_SOCKET was set up"
            return False
        message = await self.target.notifications()
        if message.pid != self.target.pid:
            self.last_error = f"ignored a notification from pid {message.pid}"
            return False
        return message.fields.get("READY") == "1"


class TcpProbe(Probe):
    """``tcp``: healthy once the worker accepted a connection to its own listener.

    The supervisor owns the listener, so the kernel completes a handshake even
    while the worker accepts nothing: a connect proves the listener, not the
    worker. The probe waits until sock_diag shows its connection off the
    accept queue (the server side has a socket file, or was closed already).
    """

    name = "tcp"

    def __init__(self, target: ProbeTarget, check: HealthTcp | HealthHttp | HealthTls) -> None:
        super().__init__(target)
        self.timeout = check.timeout
        self.interval = check.interval

    async def _connect(self) -> trio.SocketStream | None:
        if self.target.address is None or self.target.connect is None:
            self.last_error = "the service has no TCP listen address"
            return None
        host, port = connect_address(self.target.address)
        try:
            with trio.fail_after(self.timeout):
                return await self.target.connect()
        # seam: the probe's connection; a failure is its result
        except (OSError, SupervisorError, trio.TooSlowError) as exc:
            self.last_error = f"connect {host}:{port}: {exc or 'timed out'}"
            return None

    async def attempt(self) -> bool:
        stream = await self._connect()
        if stream is None:
            return False
        try:
            return await self._accepted(stream)
        finally:
            await stream.aclose()

    async def _accepted(self, stream: trio.SocketStream) -> bool:
        ours, theirs = stream.socket.getsockname(), stream.socket.getpeername()
        with trio.move_on_after(self.timeout):
            while True:
                try:
                    if diag.accepted(theirs[:2], ours[:2]):
                        return True
                except DiagError as exc:
                    self.last_error = f"cannot see whether the worker accepted: {exc}"
                    return False
                await trio.sleep(ACCEPT_POLL)  # the kernel has no event for "accepted"
        self.last_error = (
            f"the worker did not accept the probe connection within {self.timeout:g}s "
            "(the kernel completed the handshake; it waited in the accept queue)"
        )
        return False


class HttpProbe(TcpProbe):
    """``http``: healthy once ``GET path`` answers with a 2xx status (over TLS
    with ``scheme = "https"``). The answer is parsed by h11."""

    name = "http"

    def __init__(self, target: ProbeTarget, check: HealthHttp) -> None:
        super().__init__(target, check)
        self.path = check.path
        self.host = check.host
        self.context = _unverified() if check.scheme == "https" else None

    async def attempt(self) -> bool:
        stream = await self._connect()
        if stream is None:
            return False
        what = f"GET {self.path}"
        channel: trio.abc.Stream = stream
        if self.context is not None:
            channel = trio.SSLStream(stream, self.context, server_hostname=self.host)
            what = f"GET https {self.path}"
        try:
            with trio.fail_after(self.timeout):
                response = await _get(channel, self.path, self.host or "localhost")
        # seam: the probe's exchange; a failure is its result
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            cause = exc.__cause__ or exc
            self.last_error = f"{what}: {cause or 'timed out'}"
            return False
        except h11.ProtocolError as exc:
            self.last_error = f"{what}: not an HTTP/1 answer: {exc}"
            return False
        finally:
            await trio.aclose_forcefully(channel)
        if response is None:
            self.last_error = f"{what}: no response"
            return False
        if 200 <= response.status_code < 300:
            return True
        reason = response.reason.decode(errors="replace")
        self.last_error = (
            f"{what}: HTTP/{response.http_version.decode()} {response.status_code} {reason}"
        )
        return False


async def _get(stream: trio.abc.Stream, path: str, host: str) -> h11.Response | None:
    """Send ``GET path`` and read the answer's head (None: closed before one).

    Raises:
        h11.ProtocolError: what came back is not HTTP/1.
    """
    client = h11.Connection(our_role=h11.CLIENT, max_incomplete_event_size=_MAX_HEAD)
    request = h11.Request(
        method="GET",
        target=path,
        headers=[("Host", host), ("Connection", "close"), ("User-Agent", "reuseport-supervisor")],
    )
    await stream.send_all(client.send(request) + client.send(h11.EndOfMessage()))
    while True:
        event = client.next_event()
        if event is h11.NEED_DATA:
            client.receive_data(bytes(await stream.receive_some(4096)))
        elif isinstance(event, h11.Response):
            return event
        elif isinstance(event, h11.ConnectionClosed):
            return None
        # an InformationalResponse (1xx): the final one follows


def _unverified() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class TlsProbe(TcpProbe):
    """``tls``: healthy once a handshake presents the certificate of ``tls.cert``
    as it was read for this generation (by the reload's validation).

    So a cutover happens only once the validated certificate is really
    served, and a worker respawned after the file changed gets no traffic
    with a certificate nothing validated (the reload the change asks for
    does that). The chain is not verified (a self-signed or private CA is
    fine): the served leaf must be byte for byte the validated one.
    """

    name = "tls"

    def __init__(self, target: ProbeTarget, check: HealthTls) -> None:
        super().__init__(target, check)
        self.server_name = check.server_name
        self.context = _unverified()

    async def attempt(self) -> bool:
        expected = self.target.certificate
        if expected is None:
            self.last_error = "the service has no readable tls.cert to compare with"
            return False
        stream = await self._connect()
        if stream is None:
            return False
        secure = trio.SSLStream(stream, self.context, server_hostname=self.server_name)
        try:
            with trio.fail_after(self.timeout):
                await secure.do_handshake()
            served = secure.getpeercert(binary_form=True)
        # seam: the probe's handshake; a failure is its result
        except (OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            cause = exc.__cause__ or exc
            self.last_error = f"TLS handshake: {cause or 'timed out'}"
            return False
        finally:
            await trio.aclose_forcefully(secure)
        if served == expected.der:
            return True
        self.last_error = f"served certificate {_describe(served)} is not {expected.describe()}"
        return False


def _describe(der: bytes | None) -> str:
    if not der:
        return "(none)"
    from cryptography import x509  # noqa: PLC0415

    cert = x509.load_der_x509_certificate(der)
    return f"({cert.subject.rfc4514_string()}, serial {cert.serial_number:x})"


class ExecProbe(Probe):
    """``exec``: healthy once the command exits 0."""

    name = "exec"

    def __init__(self, target: ProbeTarget, check: HealthExec) -> None:
        super().__init__(target)
        self.argv = [
            substitute(arg, worker=target.worker, generation=target.generation)
            for arg in check.command
        ]
        self.timeout = check.timeout
        self.interval = check.interval

    async def attempt(self) -> bool:
        if self.target.run is None:
            self.last_error = "no way to run a command was given"
            return False
        try:
            with trio.fail_after(self.timeout):
                result = await self.target.run(self.argv)
        except trio.TooSlowError:
            self.last_error = f"{self.argv} did not finish within {self.timeout}s"
            return False
        except StartFailed as exc:
            self.last_error = f"{self.argv}: {exc.reason}"
            return False
        if result.returncode == 0:
            return True
        output = result.output[-_MAX_OUTPUT:].strip()
        self.last_error = f"{self.argv} {describe_exit(result.returncode)}: {output}"
        return False


def pinned_connector(listener: Listener) -> Connector:
    """Connections to the listener's address that its group steers to it.

    The probe binds its source port first, pins (source address, port) to
    the listener in the group's program, connects, and unpins: the check then
    proves the very listener that will take traffic, even while it is standby.
    """
    host, port = connect_address(listener.address)

    async def connect() -> trio.SocketStream:
        client = trio.socket.socket(listener.address.family, socket.SOCK_STREAM)
        try:
            await client.bind((host, 0))
            with listener.pinned(host, client.getsockname()[1]):
                await client.connect((host, port))
        except BaseException:
            client.close()
            raise
        return trio.SocketStream(client)

    return connect


def make_probe(check: Health, target: ProbeTarget) -> Probe:
    """The probe for a configured health check."""
    if isinstance(check, HealthNone):
        return SettleProbe(target, check)
    if isinstance(check, HealthHttp):
        return HttpProbe(target, check)
    if isinstance(check, HealthTls):
        return TlsProbe(target, check)
    if isinstance(check, HealthTcp):
        return TcpProbe(target, check)
    if isinstance(check, HealthExec):
        return ExecProbe(target, check)
    return NotifyProbe(target)
