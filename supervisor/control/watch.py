"""File watches that trigger reloads: the TLS certificate rotation trigger.

A service's ``watch`` paths are watched through their directories (so a
file replaced by rename, or a symlink switched to a new target, is seen as
well as one written in place). Events are debounced: a certificate and its
key written one after the other give one reload. A reload is requested only
when a watched file's content really changed (SHA-256 over what the path
resolves to), so touching a file or rewriting it identically does nothing.
"""

from __future__ import annotations

import errno
import hashlib
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import trio

from supervisor.kernel.files import read_regular
from supervisor.kernel.inotify import Inotify

log = structlog.get_logger("supervisor.control.watch")

Fingerprints = dict[Path, str | None]
# Hashed in the event loop at every change: a certificate or a config file is
# far smaller. A larger file (a binary) is compared by its metadata instead.
HASH_LIMIT = 16 << 20
RETRY = 2.0  # seconds until a directory that could not be watched is tried again


@dataclass(frozen=True)
class WatchSpec:
    """What one service watches. ``seen``: the fingerprints last acted on (by
    path name), kept by the daemon so an upgrade's next image compares with
    them: a change that came during the exec still reloads."""

    paths: tuple[Path, ...]
    debounce: float
    seen: dict[str, str | None] = field(default_factory=dict, compare=False)


def fingerprints(paths: Iterable[Path]) -> Fingerprints:
    """The content hash of each path (through symlinks); None if it cannot be
    read or is not a regular file (a FIFO would block the daemon, a device
    never end). A file over ``HASH_LIMIT`` is known by its size, time and inode."""
    out: Fingerprints = {}
    for path in paths:
        try:
            out[path] = hashlib.sha256(read_regular(path, HASH_LIMIT)).hexdigest()
        except OSError as exc:  # seam: a watched file; unreadable is a fingerprint too
            out[path] = _by_stat(path) if exc.errno == errno.EFBIG else None
    return out


def _by_stat(path: Path) -> str | None:
    try:
        info = path.stat()
    except OSError:  # seam: a watched file's stat
        return None
    return f"stat:{info.st_size}:{info.st_mtime_ns}:{info.st_dev}:{info.st_ino}"


def directories(paths: Iterable[Path]) -> set[Path]:
    """Where changes to ``paths`` show up: their directories and their targets'."""
    dirs = set()
    for path in paths:
        dirs.add(path.parent)
        try:
            target = path.resolve().parent
        except (OSError, RuntimeError):  # a symlink loop: its target is nowhere
            continue
        if target.is_dir():
            dirs.add(target)
    return dirs


async def watch_files(
    spec: WatchSpec,
    on_change: Callable[[list[Path]], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``on_change(changed paths)`` after each quiet spell that changed content.

    ``started()`` once the watches are in place.

    Raises:
        OSError: a directory cannot be watched.
    """
    with Inotify() as inotify:
        watched = directories(spec.paths)
        for directory in watched:
            inotify.watch_directory(directory)
        now = fingerprints(spec.paths)
        known = {str(path) for path in spec.paths} <= set(spec.seen)
        seen = {path: spec.seen[str(path)] for path in spec.paths} if known else now
        task_status.started()
        while True:
            changed = [path for path in spec.paths if now[path] != seen[path]]
            seen = now
            spec.seen.update({str(path): value for path, value in seen.items()})
            missing = _watch_new(inotify, directories(spec.paths) - watched, watched)
            if changed:
                await on_change(changed)
            # A directory that could not be watched sends no event: look again
            # after RETRY (a change made there meanwhile shows in the hashes).
            with trio.move_on_after(RETRY if missing else math.inf):
                await inotify.changes()
                await _quiet(inotify, spec.debounce)
            now = fingerprints(spec.paths)


def _watch_new(inotify: Inotify, directories: set[Path], watched: set[Path]) -> bool:
    """Watch ``directories`` (a symlink's new target) too; whether one failed."""
    failed = False
    for directory in directories:
        try:
            inotify.watch_directory(directory)
        except OSError as exc:  # seam: inotify
            # Gone again (a Kubernetes ..data swap), the watch limit, or a
            # directory root may not read: the watches in place go on, and the
            # daemon must not end over it.
            log.warning("watch_failed", directory=str(directory), error=str(exc))
            failed = True
        else:
            watched.add(directory)
    return failed


async def _quiet(inotify: Inotify, debounce: float) -> None:
    """Return once no event came for ``debounce`` seconds."""
    while True:
        with trio.move_on_after(debounce) as quiet:
            await inotify.changes()
        if quiet.cancelled_caught:
            return


async def watch_services(
    specs: Mapping[str, WatchSpec],
    request_reload: Callable[[str, Sequence[Path]], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Watch every service's paths; ``started()`` once all watches are in place.

    A service whose directory cannot be watched is logged and left out: the
    daemon serves on, and reloads by hand still work.
    """
    async with trio.open_nursery() as nursery:
        for name, spec in specs.items():

            async def changed(paths: list[Path], name: str = name) -> None:
                log.info("watch_changed", service=name, paths=[str(p) for p in paths])
                await request_reload(name, paths)

            try:
                await nursery.start(watch_files, spec, changed)
            except OSError as exc:  # seam: inotify at start; logged, retried
                log.error("watch_failed", service=name, error=str(exc))
            else:
                log.info("watching", service=name, paths=[str(p) for p in spec.paths])
        task_status.started()
