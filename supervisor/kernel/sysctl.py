"""The one sysctl the supervisor cares about: ``net.ipv4.tcp_migrate_req``.

It is per network namespace: reading it tells what this daemon's listeners
will do on ``shutdown()``; writing it changes every program in the namespace.
"""

from __future__ import annotations

from pathlib import Path

from supervisor.errors import KernelError, translated

MIGRATE_REQ = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def migrate_req(path: Path = MIGRATE_REQ) -> int | None:
    """The current value, or None where the kernel has no such sysctl (< 5.14).

    Raises:
        KernelError: it exists but cannot be read now (out of fds, say).
    """
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KernelError(f"read {path}", exc) from exc
    with translated(KernelError, f"read {path}"):
        try:
            return int(text.strip())
        except ValueError as exc:
            raise OSError(0, f"not a number: {text.strip()!r}") from exc


def set_migrate_req(value: int, path: Path = MIGRATE_REQ) -> None:
    """Write the sysctl. Raises OSError (EACCES, EPERM, EROFS) without the right."""
    path.write_text(f"{value}\n")
