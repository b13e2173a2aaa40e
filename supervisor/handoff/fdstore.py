"""systemd's file descriptor store: the daemon's listeners outlive the daemon.

With ``FileDescriptorStoreMax=`` in the unit, systemd keeps a duplicate of
every fd the daemon sends with ``FDSTORE=1`` and gives them back, named, to
the next process of the unit (``LISTEN_FDS``, ``LISTEN_FDNAMES``) after a
crash or ``systemctl restart``. A listener in the store is never closed by
the daemon's death: connections queued on it, and SYNs that arrive while no
daemon runs, wait for the next one. The daemon removes a listener
(``FDSTOREREMOVE=1``) when it retires it: the store holds a duplicate, so
closing our own fd alone would keep the socket open.

Names: ``SERVICE/ADDRESS/gGENERATION/wWORKER``, one listener each; and
``supervisor-config``, a sealed memfd of the config that runs (the last one
that loaded), refreshed at start and after every reload: a restart whose file
is broken serves it instead of exiting, which would release the store. eBPF
maps and programs are not stored: every one of them is the same anonymous
inode to the store, which keeps one fd of an inode only (measured on
systemd 252: of six, one came back).
"""

from __future__ import annotations

import os
import re
from collections.abc import MutableMapping, Sequence
from dataclasses import dataclass

import structlog

from supervisor.kernel import fds, notify
from supervisor.values import ListenAddress

log = structlog.get_logger("supervisor.handoff.fdstore")

FIRST_FD = 3
CONFIG_NAME = "supervisor-config"
_LISTENER = re.compile(r"^(?P<service>[^/]+)/(?P<address>[^/]+)/g(?P<gen>\d+)/w(?P<worker>\d+)$")


def listener_name(service: str, generation: int, worker: int, address: ListenAddress) -> str:
    """The listener's name in systemd's fd store: service, address and slot
    (``parse_name`` reads it back; the format lives here only).

    ``:`` is the one character systemd forbids in a name (it separates
    ``LISTEN_FDNAMES``); ``/`` never occurs in a service name or an address.
    """
    return f"{service}/{address.fd_name}/g{generation}/w{worker}"


@dataclass(frozen=True)
class StoredFd:
    """One fd systemd handed back at start, and what its name says it is."""

    name: str
    fd: int
    service: str | None = None
    address: str | None = None  # the ListenAddress.fd_name part
    generation: int | None = None
    worker: int | None = None

    @property
    def is_listener(self) -> bool:
        return self.worker is not None


def parse_name(name: str, fd: int) -> StoredFd:
    if match := _LISTENER.match(name):
        return StoredFd(
            name,
            fd,
            match["service"],
            match["address"],
            int(match["gen"]),
            int(match["worker"]),
        )
    return StoredFd(name, fd)


def received(environ: MutableMapping[str, str]) -> list[StoredFd]:
    """The fds systemd passed to this process (``LISTEN_PID`` must be ours),
    taken out of ``environ`` so no child sees them. Close-on-exec from now on."""
    pid, count = environ.pop("LISTEN_PID", ""), environ.pop("LISTEN_FDS", "")
    names = environ.pop("LISTEN_FDNAMES", "")
    if pid != str(os.getpid()) or not count.isdigit():
        return []
    fds = range(FIRST_FD, FIRST_FD + int(count))
    labels = names.split(":") if names else []
    out = []
    for i, fd in enumerate(fds):
        os.set_inheritable(fd, False)
        out.append(parse_name(labels[i] if i < len(labels) else "unknown", fd))
    return out


class FdStore:
    """What the daemon keeps in (and removes from) systemd's store.

    Off without ``NOTIFY_SOCKET`` (no systemd), or when the config says so:
    then every method does nothing. A failed send is logged and costs only
    the crash recovery of that fd, never a reload.
    """

    def __init__(self, address: str | None) -> None:
        self.address = address

    @property
    def enabled(self) -> bool:
        return bool(self.address)

    def keep(self, name: str, fds: Sequence[int]) -> None:
        if not self.address:
            return
        try:
            notify.send(notify.message(FDSTORE=1, FDNAME=name), self.address, fds)
        except (OSError, ValueError) as exc:  # seam: systemd's fd store; a failure is logged
            log.warning("fdstore_keep_failed", name=name, error=str(exc))

    def keep_config(self, data: bytes) -> None:
        """Keep ``data`` (the running config) as ``CONFIG_NAME``, in place of the last."""
        if not self.address:
            return
        try:
            memfd = fds.sealed_memfd(CONFIG_NAME, data)
        except OSError as exc:  # seam: the config's memfd for the store
            log.warning("fdstore_keep_failed", name=CONFIG_NAME, error=str(exc))
            return
        try:
            self.drop(CONFIG_NAME)
            self.keep(CONFIG_NAME, [memfd])
        finally:
            os.close(memfd)

    def drop(self, name: str) -> None:
        """Remove every fd named ``name`` from the store (nothing if there is none)."""
        if not self.address:
            return
        try:
            notify.send(notify.message(FDSTOREREMOVE=1, FDNAME=name), self.address)
        except (OSError, ValueError) as exc:  # seam: systemd's fd store; a failure is logged
            log.warning("fdstore_drop_failed", name=name, error=str(exc))


NO_STORE = FdStore(None)


def kept_config(stored: Sequence[StoredFd]) -> bytes | None:
    """What ``keep_config`` left in the store (its fd is closed); None if nothing."""
    data = None
    for item in stored:
        if item.name == CONFIG_NAME:
            try:
                data = fds.read_sealed(item.fd)
            except OSError as exc:  # seam: a stored config that cannot be read
                log.warning("stored_config_unreadable", error=str(exc))
            finally:
                os.close(item.fd)
    return data
