"""The file watcher with real inotify: one reload per rotation, and only for real changes."""

from __future__ import annotations

import os
from pathlib import Path

import trio

from supervisor.control.watch import WatchSpec, watch_files

DEBOUNCE = 0.3


class Calls:
    def __init__(self) -> None:
        self.batches: list[list[Path]] = []
        self.event = trio.Event()

    async def __call__(self, paths: list[Path]) -> None:
        self.batches.append(paths)
        self.event.set()
        self.event = trio.Event()

    async def next(self) -> list[Path]:
        with trio.fail_after(10):  # only against hanging
            await self.event.wait()
        return self.batches[-1]

    async def none_within(self, seconds: float) -> bool:
        count = len(self.batches)
        await trio.sleep(seconds)
        return len(self.batches) == count


async def watching(nursery: trio.Nursery, paths: list[Path], debounce: float = DEBOUNCE) -> Calls:
    calls = Calls()
    await nursery.start(watch_files, WatchSpec(tuple(paths), debounce), calls)
    return calls


async def test_cert_then_key_written_apart_give_one_change(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("cert 1")
    key.write_text("key 1")
    async with trio.open_nursery() as nursery:
        calls = await watching(nursery, [cert, key])
        cert.write_text("cert 2")
        await trio.sleep(DEBOUNCE / 2)  # less than the debounce: still one rotation
        key.write_text("key 2")
        assert await calls.next() == [cert, key]
        assert await calls.none_within(DEBOUNCE * 3)
        assert len(calls.batches) == 1
        nursery.cancel_scope.cancel()


async def test_touch_or_identical_rewrite_is_not_a_change(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("cert 1")
    other = tmp_path / "unrelated.txt"
    async with trio.open_nursery() as nursery:
        calls = await watching(nursery, [cert])
        os.utime(cert)
        cert.write_text("cert 1")
        other.write_text("noise in the same directory")
        assert await calls.none_within(DEBOUNCE * 3)
        # Negative control: the same watcher does see a real change.
        cert.write_text("cert 2")
        assert await calls.next() == [cert]
        nursery.cancel_scope.cancel()


async def test_replace_by_rename_and_symlink_switch(tmp_path: Path) -> None:
    # certbot's layout: live/cert.pem -> ../archive/certN.pem, switched by rename.
    archive, live = tmp_path / "archive", tmp_path / "live"
    archive.mkdir()
    live.mkdir()
    (archive / "cert1.pem").write_text("cert 1")
    cert = live / "cert.pem"
    cert.symlink_to("../archive/cert1.pem")
    async with trio.open_nursery() as nursery:
        calls = await watching(nursery, [cert])
        (archive / "cert2.pem").write_text("cert 2")
        (live / "tmp-link").symlink_to("../archive/cert2.pem")
        (live / "tmp-link").rename(cert)
        assert await calls.next() == [cert]
        # Written in place through the symlink: the target's directory is watched too.
        (archive / "cert2.pem").write_text("cert 2, amended")
        assert await calls.next() == [cert]
        # An editor's save: write a temporary file, rename it over the original.
        plain = tmp_path / "key.pem"
        plain.write_text("key 1")
        nursery.cancel_scope.cancel()
    async with trio.open_nursery() as nursery:
        calls = await watching(nursery, [plain])
        (tmp_path / ".key.pem.swp").write_text("key 2")
        (tmp_path / ".key.pem.swp").rename(plain)
        assert await calls.next() == [plain]
        nursery.cancel_scope.cancel()


async def test_a_file_that_appears_later_is_seen(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    async with trio.open_nursery() as nursery:
        calls = await watching(nursery, [cert])
        cert.write_text("first issue")
        assert await calls.next() == [cert]
        cert.unlink()
        assert await calls.next() == [cert]
        nursery.cancel_scope.cancel()
