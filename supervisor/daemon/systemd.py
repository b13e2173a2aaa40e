"""The daemon's side of systemd's notify protocol (``Type=notify``/``notify-reload``).

Active only when systemd set ``NOTIFY_SOCKET``. The variables are taken out
of the daemon's environment at start, so no child (worker, preflight, exec
probe) can notify systemd in the daemon's name. A failed send is logged at
warning and never stops the daemon.

Messages: ``READY=1`` (with ``MAINPID=`` and ``STATUS=``) once every
service's first generation serves; ``RELOADING=1`` with ``MONOTONIC_USEC=``
when a reload starts and ``READY=1`` with ``STATUS=`` when the last reload
under way ends (systemd needs both, and newer systemd waits forever for a
``RELOADING=1`` without ``MONOTONIC_USEC``); ``STOPPING=1`` at shutdown;
``WATCHDOG=1`` every half ``WATCHDOG_USEC``.
"""

from __future__ import annotations

import os
import time
from collections.abc import MutableMapping

import structlog
import trio

from supervisor.kernel import notify
from supervisor.text import printable

log = structlog.get_logger("supervisor.daemon.systemd")

_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
STATUS_LIMIT = 1000  # systemctl status shows one line; a datagram is at most 4 KiB here


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds: the clock systemd compares reloads with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def watchdog_interval(environ: MutableMapping[str, str]) -> float | None:
    """Half of ``WATCHDOG_USEC`` in seconds, if the watchdog is meant for this process."""
    usec, pid = environ.get("WATCHDOG_USEC"), environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        log.warning("watchdog_usec_invalid", value=usec)
        return None
    return value / 2_000_000 if value > 0 else None


class SystemdNotifier:
    """What the daemon tells systemd; does nothing without ``NOTIFY_SOCKET``."""

    def __init__(self, address: str | None, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog = watchdog if address else None
        self._reloads = 0  # reloads under way; READY=1 when the last one ends
        self._stopping = False

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str]) -> SystemdNotifier:
        """Take (and remove) systemd's variables from ``environ``."""
        interval = watchdog_interval(environ)
        address = environ.get("NOTIFY_SOCKET") or None
        for name in _VARIABLES:
            environ.pop(name, None)
        return cls(address, interval)

    def environment(self) -> dict[str, str]:
        """systemd's variables as they were given to this process (taken out of
        its environment at start): what an in-place upgrade's exec passes on."""
        if not self.address:
            return {}
        out = {"NOTIFY_SOCKET": self.address}
        if self.watchdog is not None:
            out["WATCHDOG_USEC"] = str(round(self.watchdog * 2_000_000))
            out["WATCHDOG_PID"] = str(os.getpid())
        return out

    def send(self, **fields: object) -> None:
        """Send ``fields``; ``STATUS=`` is made printable first (it carries words
        a worker chose: a probe's answer, a preflight's output). Any other value
        with a control character is refused and logged, never sent."""
        if not self.address:
            return
        if "STATUS" in fields:
            fields["STATUS"] = printable(str(fields["STATUS"]), limit=STATUS_LIMIT)
        try:
            message = notify.message(**fields)
        except ValueError as exc:
            log.error("systemd_notify_refused", error=str(exc))
            return
        try:
            notify.send(message, self.address)
        except OSError as exc:  # seam: systemd's socket; a lost notify is logged
            log.warning("systemd_notify_failed", message=message, error=str(exc))

    def ready(self, status: str) -> None:
        self.send(READY=1, MAINPID=os.getpid(), STATUS=status)

    def reload_started(self) -> None:
        self._reloads += 1
        if self._reloads == 1 and not self._stopping:
            self.send(RELOADING=1, MONOTONIC_USEC=monotonic_usec())

    def reload_finished(self, status: str) -> None:
        self._reloads -= 1
        if self._reloads == 0 and not self._stopping:
            self.send(READY=1, STATUS=status)

    def stopping(self) -> None:
        if not self._stopping:
            self._stopping = True
            self.send(STOPPING=1, STATUS="stopping")

    async def keep_watchdog(self) -> None:
        """Send ``WATCHDOG=1`` at half the interval systemd asked for, forever."""
        if self.watchdog is None:
            return
        log.info("systemd_watchdog", interval=self.watchdog)
        while True:
            self.send(WATCHDOG=1)
            await trio.sleep(self.watchdog)
