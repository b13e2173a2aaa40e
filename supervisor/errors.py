"""Every error the supervisor raises on purpose, in one shallow tree.

Foreign errors (OSError, pydantic's ValidationError, tomllib's errors) are
translated where they enter, with ``raise X from exc``, so callers above the
kernel modules only ever handle these types. Each carries structured fields
for logs and for the control protocol, and a message an operator can act on.
"""

from __future__ import annotations

import errno as errno_mod
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, TypeVar

ExcT = TypeVar("ExcT", bound=BaseException)


class SupervisorError(Exception):
    """Base of every deliberate error."""


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config file: where (dotted field path) and why."""

    location: str
    message: str

    def __str__(self) -> str:
        return f"{self.location}: {self.message}" if self.location else self.message


class ConfigError(SupervisorError):
    """A config file could not be read or is invalid. Lists every issue found."""

    def __init__(self, source: str, issues: Sequence[ConfigIssue]) -> None:
        self.source = source
        self.issues = tuple(issues)
        lines = [f"{source}: {issue}" for issue in self.issues]
        super().__init__("\n".join(lines) if lines else f"{source}: invalid config")


# What says the daemon, not a peer or a worker, ran short: of fds, its own or
# the system's, or of memory.
OUT_OF_RESOURCES = frozenset(
    {errno_mod.EMFILE, errno_mod.ENFILE, errno_mod.ENOBUFS, errno_mod.ENOMEM}
)

_BIND_HINTS = {
    errno_mod.EADDRINUSE: (
        "address already in use by another program, by a socket without SO_REUSEPORT, "
        "or by a socket of another user (a reuseport group needs one owner)"
    ),
    errno_mod.EACCES: "permission denied (ports below 1024 need CAP_NET_BIND_SERVICE)",
    errno_mod.EADDRNOTAVAIL: "address is not local to this host or network namespace",
    errno_mod.EAFNOSUPPORT: "address family not supported (is IPv6 disabled?)",
    errno_mod.EMFILE: "out of file descriptors (RLIMIT_NOFILE)",
    errno_mod.ENFILE: "the system is out of file descriptors",
}


class ListenerError(SupervisorError):
    """A listener could not be created, bound or set to listen."""

    def __init__(self, address: str, err: OSError, step: str, detail: str | None = None) -> None:
        self.address = address
        self.errno = err.errno or 0
        self.step = step
        name = errno_mod.errorcode.get(self.errno, str(self.errno))
        hint = detail or _BIND_HINTS.get(
            self.errno, os.strerror(self.errno) if self.errno else str(err)
        )
        super().__init__(f"cannot {step} {address}: {name}: {hint}")


class SpawnError(SupervisorError):
    """A worker process could not be started at all."""

    def __init__(self, worker: str, reason: str) -> None:
        self.worker = worker
        self.reason = reason
        super().__init__(f"{worker}: cannot start: {reason}")


def os_reason(err: OSError) -> str:
    """``EMFILE: Too many open files``: the errno's name, then the words."""
    name = errno_mod.errorcode.get(err.errno or 0)
    words = err.strerror or str(err)
    return f"{name}: {words}" if name else words


class StartFailed(SupervisorError):
    """A process (a worker, a preflight, an exec check) could not be started:
    the spawner's one error, its OSError translated at the seam
    (``serve/spawner.py``). ``starved``: the host ran out of something (fds,
    memory, processes) and a retry may work; the program is not at fault."""

    def __init__(self, program: str, err: OSError) -> None:
        self.program = program
        self.errno = err.errno or 0
        self.reason = os_reason(err)
        super().__init__(f"cannot start {program}: {self.reason}")

    @property
    def starved(self) -> bool:
        return self.errno in OUT_OF_RESOURCES or self.errno == errno_mod.EAGAIN


class WorkerFatal(SupervisorError):
    """A worker failed to start or stay up too many times in a row."""

    def __init__(self, worker: str, failures: int, last_exit: str) -> None:
        self.worker = worker
        self.failures = failures
        self.last_exit = last_exit
        super().__init__(
            f"{worker}: FATAL after {failures} failed starts in a row (last: {last_exit})"
        )


class HealthCheckFailed(SupervisorError):
    """A worker did not pass its health check within ``ready_timeout``."""

    def __init__(self, worker: str, check: str, detail: str) -> None:
        self.worker = worker
        self.check = check
        self.detail = detail
        super().__init__(f"{worker}: health check {check} failed: {detail}")


class TlsError(SupervisorError):
    """A certificate or key cannot be served: unreadable, mismatched, expired, misordered."""


class PreflightFailed(SupervisorError):
    """The configured preflight command did not exit 0."""

    def __init__(self, service: str, argv: Sequence[str], status: str, output: str) -> None:
        self.service = service
        self.argv = tuple(argv)
        self.status = status
        self.output = output
        tail = f"\n{output.rstrip()}" if output.strip() else ""
        super().__init__(f"service {service}: preflight {list(argv)} {status}{tail}")


class RolloutAborted(SupervisorError):
    """A rollout was rejected or rolled back; the running generation is untouched."""

    def __init__(self, service: str, reasons: Sequence[str]) -> None:
        self.service = service
        self.reasons = tuple(reasons)
        super().__init__(f"service {service}: rollout aborted: " + "; ".join(self.reasons))


class KernelFeatureMissing(SupervisorError):
    """A kernel feature the config asks for is not available here."""

    def __init__(self, feature: str, detail: str) -> None:
        self.feature = feature
        self.detail = detail
        super().__init__(f"{feature} is not available: {detail}")


class KernelError(SupervisorError):
    """A kernel or OS call failed where the supervisor steers or observes.

    Raised by the kernel-facing modules (steering, sock_diag, sockets,
    netstat) in place of the OSError they met, so that the orchestration
    above can decide what a failure means at each step of a rollout.
    """

    def __init__(self, operation: str, err: OSError) -> None:
        self.operation = operation
        self.errno = err.errno or 0
        super().__init__(f"{operation}: {os_reason(err)}")


class SteeringError(KernelError):
    """A steering program or map could not be created, updated or attached."""


class DiagError(KernelError):
    """sock_diag (inet_diag over netlink) could not be read."""


@contextmanager
def translated(error: Callable[[str, OSError], SupervisorError], what: str) -> Iterator[None]:
    """Turn an OSError raised inside into ``error(what, exc)``: a kernel
    error's operation, or the program a ``StartFailed`` could not start."""
    try:
        yield
    except OSError as exc:  # the translation helper itself
        raise error(what, exc) from exc


class ControlError(SupervisorError):
    """The control socket could not be opened, or a client request failed."""


class DaemonUnreachable(ControlError):
    """supervisorctl could not talk to the daemon."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"cannot reach supervisord at {path}: {reason}")


class AlreadyRunning(ControlError):
    """Another live daemon answers on the control socket we were asked to use."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(f"another supervisord is already serving the control socket {path}")


class ProtocolError(ControlError, ValueError):
    """A request line that is not a valid request."""


class HandoffError(SupervisorError):
    """What crosses an exec or a crash (the upgrade's state document, systemd's
    fd store) could not cross."""


class StateError(HandoffError):
    """A state document that cannot be read, or is of a version this code does not know."""


class UpgradeRefused(HandoffError):
    """The new code cannot take over; nothing changed and the old image serves on."""


class FdLost(HandoffError):
    """An fd the ledger names did not cross (closed, reused, not what it was)."""

    def __init__(self, name: str, why: str) -> None:
        super().__init__(f"{name}: {why}")
        self.name = name
        self.why = why


# What a takeover (an upgrade's new image, or a start from systemd's fd store)
# could not take as it was left. Not an error: the start goes on without it.
AdoptionKind = Literal[
    "listener_lost",  # gone in the exec: bound anew, and a rollout replaces the generation
    "listener_taken_back",  # gone in the exec, taken back from its worker
    "worker_gone",  # its process had exited: respawned
    "notify_lost",  # its NOTIFY_SOCKET: later notifications are lost
    "pipes_lost",  # its output pipes: a rollout gives it new ones
    "not_a_socket",  # a stored fd that is no socket: closed
    "steering_made_anew",  # eBPF objects that could not be taken over
    "steering_not_replaced",
    "steering_join_failed",  # a listener that could not join its group: closed
    "order_unknown",  # the classic BPF order could not be learned
    "listener_closed",  # an inherited listener no slot takes
    "shutdown_failed",  # a leftover listener that could not be shut down
]


@dataclass(frozen=True)
class AdoptionProblem:
    """One thing a takeover could not take over as it was: its kind, for code
    (the next daemon's adoption decides by it), and the words for people."""

    kind: AdoptionKind
    message: str

    def __str__(self) -> str:
        return self.message


class TransitionError(RuntimeError):
    """A state change the lifecycle does not allow: a bug, not an operating
    condition (so not a SupervisorError: nothing should handle it)."""


def leaves(group: BaseExceptionGroup[ExcT]) -> list[ExcT]:
    """The exceptions inside a (possibly nested) exception group, in order."""
    out: list[ExcT] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(leaves(exc))
        else:
            out.append(exc)
    return out
