"""PgBouncer binding its own socket (``so_reuseport = 1``), adopted
(``listen_mode = "own"``), in front of a real PostgreSQL started by the test:
20 reloads under a load of ``SELECT 1`` over fresh connections, 0 failed."""

from __future__ import annotations

import os
import pwd
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.harness import Daemon, free_port, toml_list
from tests.support.pgwire import QueryLoad
from tests.support.postgres import USER, cluster, owned_directory
from tests.support.procs import wait_for

pytestmark = [pytest.mark.kernel, pytest.mark.slow]
RELOADS = 20

INI = """
[databases]
db = host=127.0.0.1 port={pg} dbname=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
so_reuseport = 1
unix_socket_dir =
auth_type = trust
auth_file = {root}/users.txt
pool_mode = session
max_client_conn = 500
default_pool_size = 20
logfile =
pidfile =
"""


def test_pgbouncer_binding_its_own_socket_across_twenty_reloads(
    start_daemon: Callable[..., Daemon],
) -> None:
    pgbouncer = shutil.which("pgbouncer")
    if pgbouncer is None:
        pytest.skip("pgbouncer is not installed here (Debian: pgbouncer)")
    with owned_directory() as root:
        pg, port = free_port(), free_port()
        user = pwd.getpwnam(USER)
        for name, text in (
            ("pgbouncer.ini", INI.format(pg=pg, port=port, root=root)),
            ("users.txt", f'"{USER}" ""\n'),
        ):
            (root / name).write_text(text)
            os.chown(root / name, user.pw_uid, user.pw_gid)
        with cluster(root, pg):
            daemon = start_daemon(
                _service(pgbouncer, root, port), supervisor_extra='steering = "ebpf"'
            )
            (group,) = daemon.status()["services"]["pgbouncer"]["census"]
            assert len(group["members"]) == 4 and all(m["ours"] for m in group["members"])
            assert {m["uid"] for m in group["members"]} == {user.pw_uid}
            with QueryLoad(port, USER, "db", threads=4, duration=180) as load:
                wait_for(load.answered.is_set, 15, "the first SELECT 1")
                for n in range(RELOADS):
                    reloaded = daemon.reload()
                    assert reloaded.ok, reloaded.answer
                    assert reloaded.report("pgbouncer")["generation"] == n + 2
            result = load.result
            print(f"pgbouncer own: {RELOADS} reloads, {result.ok} ok, {dict(result.failures)}")
            assert result.failed == 0, (result.failures, result.examples)
            assert result.ok > 10 * RELOADS
            assert daemon.terminate() == 0


def _service(pgbouncer: str, root: Path, port: int) -> str:
    return f"""
[services.pgbouncer]
command = {toml_list([pgbouncer, str(root / "pgbouncer.ini")])}
user = "{USER}"
workers = 4
listen = ["127.0.0.1:{port}"]
listen_mode = "own"
stop_signal = "SIGINT"
stop_timeout = "20s"
ready_timeout = "15s"

[services.pgbouncer.health]
kind = "tcp"
"""
