"""A real PostgreSQL for a test: a fresh cluster in a temporary directory,
run as the ``postgres`` user on a loopback port, trust authentication."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.load import LoadFailure
from tests.support.pgwire import select_one

USER = "postgres"


def _binary(name: str) -> str:
    found = shutil.which(name) or next(
        iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None
    )
    if found is None:
        pytest.skip(f"PostgreSQL's {name} is not installed here (Debian: postgresql)")
    return found


def as_postgres() -> list[str]:
    return ["setpriv", f"--reuid={USER}", f"--regid={USER}", "--init-groups"]


@contextlib.contextmanager
def owned_directory() -> Iterator[Path]:
    """A directory under /tmp owned by ``postgres``, removed after."""
    try:
        user = pwd.getpwnam(USER)
    except KeyError:
        pytest.skip(f"no {USER} user here (Debian's postgresql creates it)")
    root = Path(tempfile.mkdtemp(prefix="supervisor-pg-", dir="/tmp"))
    os.chown(root, user.pw_uid, user.pw_gid)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def cluster(root: Path, port: int) -> Iterator[None]:
    """A PostgreSQL cluster in ``root`` (owned by postgres) on 127.0.0.1:``port``."""
    data = root / "data"
    subprocess.run(
        [*as_postgres(), _binary("initdb"), "-D", str(data), "-U", USER, "--auth=trust",
         "--no-sync", "-E", "UTF8"],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    server = subprocess.Popen(
        [*as_postgres(), _binary("postgres"), "-D", str(data), "-k", str(root),
         "-h", "127.0.0.1", "-p", str(port), "-c", "fsync=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                select_one("127.0.0.1", port, USER, "postgres")
                break
            except LoadFailure:
                assert server.poll() is None, server.stderr.read() if server.stderr else ""
                assert time.monotonic() < deadline, "PostgreSQL did not answer in 60 s"
                time.sleep(0.2)
        yield
    finally:
        server.send_signal(signal.SIGINT)  # fast shutdown
        server.wait(timeout=60)
        if server.stderr is not None:
            server.stderr.close()
