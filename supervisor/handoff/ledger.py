"""Every fd that crosses an exec or systemd's fd store, by name: one ledger.

The old image ``put``s each fd it hands over under a name, and the state
document refers to fds by those names only. At the exec each entry gets the
fd's identity (device and inode: an fd number alone is none, a closed one is
soon reused). The new image checks every identity once (``received``),
before it opens anything that could take a number; after a crash or a
restart, systemd's store hands fds back by name (``stored``).

Then each owner takes what is its own, by name: ``take_fd`` or
``take_socket``, which raise ``FdLost`` naming the cause. ``untaken`` lists
the rest and ``close_untaken`` closes it: nothing that crossed is leaked,
nothing that did not cross is closed.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping

from supervisor.errors import FdLost, SupervisorError
from supervisor.handoff.state import FdDoc
from supervisor.kernel import fds
from supervisor.kernel.sockets import socket_cookie


class Ledger:
    """Fds by name: what one image hands over, or what the next one received."""

    def __init__(self, entries: Mapping[str, int] | None = None) -> None:
        self._fds: dict[str, int] = dict(entries or {})
        self._lost: dict[str, str] = {}  # name -> why
        self._taken: set[str] = set()

    # --- the image that hands over ------------------------------------------------

    def put(self, name: str, fd: int) -> str:
        """Hand ``fd`` over as ``name`` (returned, for the document to refer to)."""
        if self._fds.get(name, fd) != fd:
            raise ValueError(f"two fds named {name!r}: {self._fds[name]} and {fd}")
        self._fds[name] = fd
        return name

    def entries(self) -> dict[str, FdDoc]:
        """For the document: each name's fd (identities are stamped at the exec)."""
        return {name: FdDoc(fd=fd) for name, fd in self._fds.items()}

    # --- the image that takes over -----------------------------------------------

    @classmethod
    def received(cls, entries: Mapping[str, FdDoc]) -> Ledger:
        """What crossed an exec: an entry whose fd is not what it was at the exec
        (closed, or its number reused) is lost. Nobody may use or close it."""
        ledger = cls()
        for name, entry in entries.items():
            found = fds.identity(entry.fd)
            if entry.identity is None or found != tuple(entry.identity):
                ledger._lost[name] = (
                    f"fd {entry.fd} was closed in the exec"
                    if found is None
                    else f"fd {entry.fd} is something else after the exec"
                )
            else:
                ledger._fds[name] = entry.fd
        return ledger

    @classmethod
    def stored(cls, items: Mapping[str, int]) -> Ledger:
        """What systemd's fd store handed back, by name (systemd vouches for each fd)."""
        return cls(items)

    def lost(self) -> dict[str, str]:
        """The names whose fd did not cross, and why."""
        return dict(self._lost)

    def take_fd(self, name: str) -> int:
        """The fd named ``name``, now the caller's to own and close.

        Raises:
            FdLost: it did not cross, or it was taken already.
        """
        if name in self._lost:
            raise FdLost(name, self._lost[name])
        if name not in self._fds:
            raise FdLost(name, "the ledger has no such name")
        if name in self._taken:
            raise FdLost(name, "taken already")
        self._taken.add(name)
        return self._fds[name]

    def take_socket(self, name: str, cookie: int | None = None) -> socket.socket:
        """The socket named ``name`` (with SO_COOKIE ``cookie``, when given).

        Raises:
            FdLost: it did not cross, is no socket, or is another socket. Such
                an fd is not ours to close: it stays open, and counts as lost.
        """
        fd = self.take_fd(name)
        why = socket_problem(fd, cookie)
        if why is not None:
            self._lost[name] = why
            raise FdLost(name, why)
        return fds.adopt_socket(fd)

    def untaken(self) -> list[str]:
        """The names that crossed and nobody took."""
        return [name for name in self._fds if name not in self._taken]

    def close_untaken(self) -> list[str]:
        """Close what nobody took; returns its names."""
        names = self.untaken()
        for name in names:
            self._taken.add(name)
            with contextlib.suppress(OSError):
                os.close(self._fds[name])
        return names


def socket_problem(fd: int, cookie: int | None) -> str | None:
    """Why ``fd`` is not the socket we were told of (None: it is)."""
    if not fds.is_socket(fd):
        return f"fd {fd} is not a socket"
    if cookie is None:
        return None
    probe = socket.socket(fileno=fd)
    try:
        found = socket_cookie(probe)
    except SupervisorError as exc:
        return f"fd {fd}: {exc}"
    finally:
        probe.detach()
    if found != cookie:
        return f"fd {fd} is another socket (cookie {found}, not {cookie})"
    return None
