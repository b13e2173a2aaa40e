"""The handoff of an in-place upgrade, without a daemon: a state document
whose ledger names real fds, and a real worker, is encoded and decoded as it
crosses the exec, its ledger checked for what was lost on the way, and taken
over by the service. One test per loss: a listener, a worker, its notify
socket, its pipes, eBPF objects, an fd number reused by something else, an
unknown document version; and a version 1 document, from the code before the
ledger. Every loss is named, none takes down what did cross, and nothing that
crossed is left untaken."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field

import pytest

from supervisor.config.loader import parse_config
from supervisor.config.schema import ServiceConfig
from supervisor.daemon import startup
from supervisor.errors import FdLost, StateError
from supervisor.handoff import state
from supervisor.handoff.fdstore import NO_STORE, listener_name, parse_name
from supervisor.handoff.ledger import Ledger
from supervisor.handoff.state import DaemonDoc, GroupDoc, ListenerDoc, ServiceDoc, WorkerDoc
from supervisor.kernel import fds
from supervisor.kernel.proc import start_time
from supervisor.kernel.sockets import socket_cookie
from supervisor.serve.takeover import Takeover, from_upgrade
from supervisor.values import parse_listen
from tests.support.harness import wait_until


@dataclass
class Image:
    """What the old image holds for one service of one worker: a listener, the
    worker (a real child), its notify socket and its output pipes, and two
    fds standing for eBPF objects. Everything is closed at the end."""

    listener: socket.socket
    notify: socket.socket
    pipes: list[int]
    ebpf: dict[str, int]
    worker: subprocess.Popen[bytes] | None
    port: int
    cookie: int
    extra: list[int] = field(default_factory=list)
    all_pipes: list[int] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def listener_name(self) -> str:
        return f"web/tcp-{self.address}/g2/w0"

    def document(self, *, pipes: bool = False) -> DaemonDoc:
        """The document the old image writes (``pipes``: all four pipe ends,
        as they were at the start). Every fd goes through one ledger."""
        ledger = Ledger()
        pid = None if self.worker is None else self.worker.pid
        listener = ListenerDoc(
            name=ledger.put(self.listener_name, self.listener.fileno()), worker=0,
            address=self.address, cookie=self.cookie,
        )  # fmt: skip
        ends = self.all_pipes if pipes else self.pipes
        worker = WorkerDoc(
            index=0, state="RUNNING", pid=pid, start_time=None if pid is None else start_time(pid),
            restarts=1, short_runs=0, last_exit=None, start_seconds=0.1,
            notify=ledger.put("web/w0/notify", self.notify.fileno()),
            output=[ledger.put(f"web/w0/output{k}", fd) for k, fd in enumerate(ends)],
        )  # fmt: skip
        ebpf = {obj: ledger.put(f"web/ebpf/{obj}", fd) for obj, fd in self.ebpf.items()}
        service = ServiceDoc(
            name="web", config={}, steering="ebpf", generation=2, last_generation=2,
            listeners=[listener], workers=[worker],
            groups=[GroupDoc(address=self.address, ebpf=ebpf)],
        )  # fmt: skip
        return DaemonDoc(
            software="0.1.0", config_path="/etc/supervisor.toml", supervisor={},
            control="control", started_at=1.0, upgrade_requested_at=2.0, services=[service],
            ledger=ledger.entries(),
        )  # fmt: skip

    def version_1(self) -> bytes:
        """What the code before the ledger wrote for the same service: fd
        numbers in place, identities by number (stamped now, as at the exec)."""
        pid = None if self.worker is None else self.worker.pid
        numbers = [self.listener.fileno(), self.notify.fileno(), *self.pipes, *self.ebpf.values()]
        return json.dumps({
            "version": 1, "software": "0.1.0", "config_path": "/etc/supervisor.toml",
            "supervisor": {}, "control_fd": -1, "started_at": 1.0, "upgrade_requested_at": 2.0,
            "identities": {str(fd): fds.identity(fd) for fd in numbers},
            "services": [{
                "name": "web", "config": {}, "steering": "ebpf", "generation": 2,
                "last_generation": 2,
                "listeners": [{
                    "fd": self.listener.fileno(), "worker": 0, "address": self.address,
                    "cookie": self.cookie, "name": self.listener_name,
                }],
                "workers": [{
                    "index": 0, "state": "RUNNING", "pid": pid,
                    "start_time": None if pid is None else start_time(pid), "restarts": 1,
                    "short_runs": 0, "last_exit": None, "start_seconds": 0.1,
                    "notify_fd": self.notify.fileno(), "output_fds": self.pipes,
                }],
                "groups": [{"address": self.address, "ebpf": self.ebpf}],
            }],
            "clients": [], "pending": [{"fd": -1, "command": "reload", "source": "signal"}],
            "metrics": {"reloads": 3}, "metrics_fd": -1,
        }).encode()  # fmt: skip

    def config(self) -> ServiceConfig:
        text = f'[services.web]\ncommand = ["x"]\nlisten = ["{self.address}"]\nworkers = 1\n'
        return parse_config(text).services["web"]


_HOLD_AS_FD_3 = "import os, sys, time; os.dup2(int(sys.argv[1]), 3); time.sleep(60)"


def _fd3_is_a_socket(pid: int) -> bool:
    """Not merely open: the interpreter opens files of its own while it starts."""
    try:
        return os.readlink(f"/proc/{pid}/fd/3").startswith("socket:")
    except OSError:
        return False


@pytest.fixture
def image() -> Iterator[Image]:
    listener = socket.create_server(("127.0.0.1", 0), reuse_port=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(b"\0supervisor-test-handoff-%d" % os.getpid())
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    ebpf = {"socks": os.open("/dev/null", os.O_RDONLY), "prog": os.open("/dev/null", os.O_RDONLY)}
    # The worker holds the listener as its fd 3, as a worker does.
    worker = subprocess.Popen(
        [sys.executable, "-c", _HOLD_AS_FD_3, str(listener.fileno())], pass_fds=[listener.fileno()]
    )
    wait_until(lambda: _fd3_is_a_socket(worker.pid), 10, "the worker to hold its listener as fd 3")
    pipes = [out_r, out_w, err_r, err_w]
    made = Image(
        listener, notify, pipes, ebpf, worker, listener.getsockname()[1],
        socket_cookie(listener), all_pipes=list(pipes),
    )  # fmt: skip
    yield made
    if made.worker is not None:
        made.worker.kill()
        made.worker.wait(10)
    for fd in [*made.pipes, *made.ebpf.values(), *made.extra]:
        with contextlib.suppress(OSError):
            os.close(fd)
    made.listener.close()
    made.notify.close()


def _across_the_exec(
    image: Image, lose: Sequence[int] = (), document: DaemonDoc | None = None
) -> tuple[DaemonDoc, Ledger]:
    """What the new image reads: the document (the image's own unless given),
    encoded with the identity of each fd at the exec and decoded; ``lose``
    is closed in between. Returns it with its ledger, checked."""
    sent = (document or image.document()).stamped()
    received = state.decode(state.encode(sent))
    assert received == sent
    for fd in lose:
        os.close(fd)
    return received, Ledger.received(received.ledger)


@contextlib.asynccontextmanager
async def _taken(image: Image, document: DaemonDoc, ledger: Ledger) -> AsyncIterator[Takeover]:
    """The takeover of ``document``'s service; then what it adopted is let go:
    sockets it wraps on the fixture's own fds are detached, a listener it took
    back from the worker (a new fd) is closed, the worker is reaped."""
    own = {image.listener.fileno(), image.notify.fileno()}
    found = from_upgrade(document.services[0], image.config(), ledger)
    try:
        yield found
    finally:
        for listener in found.listeners.values():
            if listener.sock.fileno() in own:
                listener.sock.detach()
            else:
                listener.sock.close()
        for adopted in (found.handovers or {}).values():
            if adopted.notify is not None:
                adopted.notify.detach()
            if adopted.process is not None:
                await adopted.process.aclose()


def _kinds(found: Takeover) -> list[str]:
    return [problem.kind for problem in found.problems]


async def test_what_crossed_whole_is_taken_over_whole(image: Image) -> None:
    document, ledger = _across_the_exec(image)
    assert ledger.lost() == {}
    assert set(document.numbers()) == {
        image.listener.fileno(),
        image.notify.fileno(),
        *image.pipes,
        *image.ebpf.values(),
    }
    async with _taken(image, document, ledger) as found:
        assert found.problems == [] and not found.repair
        (listener,) = found.listeners.values()
        assert socket_cookie(listener.sock) == socket_cookie(image.listener)
        adopted = (found.handovers or {})[0]
        assert adopted.process is not None and adopted.restarts == 1
        assert adopted.pipes is not None and adopted.notify is not None
        assert found.groups[parse_listen(image.address)].ebpf == image.ebpf
        assert ledger.untaken() == [], "every fd that crossed has its owner"


async def test_a_version_1_document_is_read_and_taken_over_whole(image: Image) -> None:
    """An upgrade from the code before the ledger: its document names fds by number."""
    document = state.decode(image.version_1())
    assert document.version == state.VERSION
    assert document.pending[0].connection is None and document.metrics == {"reloads": 3}
    ledger = Ledger.received(document.ledger)
    assert ledger.lost() == {}
    async with _taken(image, document, ledger) as found:
        assert found.problems == [] and not found.repair
        assert [i.name for i in found.listeners.values()] == [image.listener_name]
        assert found.groups[parse_listen(image.address)].ebpf == image.ebpf
        assert ledger.untaken() == []


async def test_a_lost_listener_is_taken_back_from_its_worker(image: Image) -> None:
    sent = image.document()
    fd = image.listener.detach()
    image.listener = socket.socket()  # a stand-in for the fixture to close
    document, ledger = _across_the_exec(image, lose=[fd], document=sent)
    assert ledger.lost() == {image.listener_name: f"fd {fd} was closed in the exec"}
    with pytest.raises(FdLost, match="closed in the exec"):
        ledger.take_fd(image.listener_name)
    async with _taken(image, document, ledger) as found:
        (listener,) = found.listeners.values()
        assert _kinds(found) == ["listener_taken_back"]
        assert "taken back from pid" in str(found.problems[0])
        assert listener.sock.getsockname()[1] == image.port
        assert not found.repair


async def test_a_lost_listener_whose_worker_is_gone_too_is_bound_anew_by_a_rollout(
    image: Image,
) -> None:
    assert image.worker is not None
    document = image.document()  # while the worker lives: its pid and start time
    image.worker.kill()
    image.worker.wait(10)
    image.worker = None
    fd = image.listener.detach()
    image.listener = socket.socket()
    received, ledger = _across_the_exec(image, lose=[fd], document=document)
    assert list(ledger.lost()) == [image.listener_name]
    async with _taken(image, received, ledger) as found:
        assert found.repair and found.listeners == {}
        assert _kinds(found) == ["worker_gone", "listener_lost"], found.problems
        assert "was gone after the upgrade: respawned" in str(found.problems[0])
        assert "closed in the exec" in str(found.problems[1])
        assert found.lost_workers == 1
        assert (found.handovers or {})[0].state.name == "BACKOFF"


async def test_a_lost_notify_socket_is_named_and_the_worker_kept(image: Image) -> None:
    sent = image.document()
    fd = image.notify.detach()
    image.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    document, ledger = _across_the_exec(image, lose=[fd], document=sent)
    assert list(ledger.lost()) == ["web/w0/notify"]
    async with _taken(image, document, ledger) as found:
        adopted = (found.handovers or {})[0]
        assert adopted.process is not None and adopted.notify is None
        assert _kinds(found) == ["notify_lost"], found.problems
        assert not found.repair


async def test_lost_output_pipes_ask_for_a_rollout(image: Image) -> None:
    gone = image.pipes[1]
    image.pipes = [fd for fd in image.pipes if fd != gone]
    document, ledger = _across_the_exec(image, lose=[gone], document=image.document(pipes=True))
    assert list(ledger.lost()) == ["web/w0/output1"]
    async with _taken(image, document, ledger) as found:
        assert found.repair, "a pipe nobody reads would stop its writer once full"
        assert _kinds(found) == ["pipes_lost"], found.problems
        assert (found.handovers or {})[0].pipes is None


async def test_lost_ebpf_objects_are_made_anew_and_the_rest_closed(image: Image) -> None:
    gone = image.ebpf["prog"]
    document = image.document()
    image.ebpf = {"socks": image.ebpf["socks"]}
    received, ledger = _across_the_exec(image, lose=[gone], document=document)
    assert list(ledger.lost()) == ["web/ebpf/prog"]
    async with _taken(image, received, ledger) as found:
        assert found.groups[parse_listen(image.address)].ebpf is None
        assert _kinds(found) == ["steering_made_anew"], found.problems
        assert "web/ebpf/prog" in str(found.problems[0])
        assert fds.identity(image.ebpf["socks"]) is None, "the object that crossed is closed"


def test_an_fd_number_reused_by_something_else_counts_as_lost(image: Image) -> None:
    sent = image.document().stamped()
    fd = image.listener.detach()
    image.listener = socket.socket()
    os.close(fd)
    reused = os.open("/dev/null", os.O_RDONLY)
    image.extra.append(reused)
    assert reused == fd, "the kernel hands out the lowest free number"
    ledger = Ledger.received(state.decode(state.encode(sent)).ledger)
    assert ledger.lost() == {image.listener_name: f"fd {fd} is something else after the exec"}
    assert image.listener_name not in ledger.untaken(), "a lost fd is not ours to close"


def test_the_ledger_hands_each_fd_to_one_owner_and_closes_the_rest() -> None:
    a, b = os.pipe()
    ledger = Ledger()
    assert ledger.put("a", a) == "a"
    ledger.put("a", a)  # the same fd again is no conflict
    with pytest.raises(ValueError, match="two fds named 'a'"):
        ledger.put("a", b)
    ledger.put("b", b)
    document = DaemonDoc(
        software="0", config_path="/x", supervisor={}, control="control", started_at=0,
        upgrade_requested_at=0, services=[], ledger=ledger.entries(),
    ).stamped()  # fmt: skip
    received = Ledger.received(document.ledger)
    assert received.take_fd("a") == a
    with pytest.raises(FdLost, match="a: taken already"):
        received.take_fd("a")
    with pytest.raises(FdLost, match="no such name"):
        received.take_fd("control")
    with pytest.raises(FdLost, match=f"fd {a} is not a socket"):
        Ledger.received(document.ledger).take_socket("a")
    assert received.untaken() == ["b"]
    assert received.close_untaken() == ["b"]
    assert fds.identity(b) is None and fds.identity(a) is not None
    os.close(a)


def test_a_document_of_an_unknown_version_is_refused_by_name(image: Image) -> None:
    newer = image.document().model_copy(update={"version": 99})
    with pytest.raises(StateError, match="state document version 99; this code reads version 1, 2"):
        state.decode(state.encode(newer))
    with pytest.raises(StateError, match="not a state document"):
        state.decode(b'{"version": 2, "services": "none"}')
    with pytest.raises(StateError, match="not a version 1 state document"):
        state.decode(b'{"version": 1, "services": "none"}')
    with pytest.raises(StateError):
        state.decode(b"\xff not json")


def test_the_fd_store_s_fds_go_to_their_service_by_name_and_the_rest_is_closed() -> None:
    """After a crash: systemd hands fds back by name. The service's listener is
    taken, a stored fd that is no socket and one of a service the config no
    longer has are closed, and so is a second fd under a name already seen."""
    web = socket.create_server(("127.0.0.1", 0), reuse_port=True)
    gone = socket.create_server(("127.0.0.1", 0))
    twin = socket.create_server(("127.0.0.1", 0))
    a, b = os.pipe()
    address = parse_listen(f"127.0.0.1:{web.getsockname()[1]}")
    name = listener_name("web", 3, 0, address)
    stored = [
        parse_name(name, web.detach()),
        parse_name(name, twin.detach()),
        parse_name(listener_name("web", 3, 1, address), a),
        parse_name(listener_name("gone", 1, 0, address), gone.detach()),
    ]
    config = parse_config(f'[services.web]\ncommand = ["x"]\nlisten = ["{address}"]\nworkers = 1\n')
    found = startup._recover(config, stored, NO_STORE)["web"]
    try:
        assert list(found.listeners) == [(address, 0)]
        assert found.generation == 4, "the next generation after the newest stored"
        assert _kinds(found) == ["not_a_socket"], found.problems
        assert fds.identity(a) is None, "a stored fd that is no socket is closed"
        assert fds.identity(stored[1].fd) is None, "the second of one name is closed"
        assert fds.identity(stored[3].fd) is None, "a service the config lacks: closed"
    finally:
        for item in found.listeners.values():
            item.sock.close()
        os.close(b)
