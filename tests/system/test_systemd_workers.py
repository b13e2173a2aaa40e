"""Real workers under the shipped unit's sandbox, in real systemd 252.

``ProtectSystem=strict``, ``PrivateTmp=`` and the capability bounding set
are the workers' as well as the daemon's. The shipped nginx example,
installed as the docs say (its config and ``nginx/`` directory side by side
in a directory the sandbox makes read-only, as ``/etc`` is), must start,
serve over TLS, reload ten times under load and take ``systemctl kill -s
USR1`` (logrotate's signal, sent to every process of the unit) with no
request failed and nothing killed. A state directory the sandbox keeps
read-only is named at start, before anything runs.
"""

from __future__ import annotations

import shutil
import ssl
import time
from pathlib import Path

import pytest

from tests.support.certs import issue, write_pair
from tests.support.harness import wait_until
from tests.support.load import Load
from tests.support.systemd_ns import UNIT, available
from tests.support.systemd_unit import Unit, booted, report

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.slow,
    pytest.mark.skipif(available() is not None, reason=f"real systemd: {available()}"),
    pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed here"),
]

CONFIG = Path(__file__).resolve().parents[2] / "config"
NGINX_PORT = 8443  # the example's own: the namespace's loopback is the test's alone
RELOADS = 10


def install_nginx_example(unit: Unit) -> ssl.SSLContext:
    """What the docs' steps put next to the config: ``nginx/`` and a key pair.
    Returns a client context that trusts the pair."""
    shutil.copytree(CONFIG / "nginx", unit.ns.root / "nginx")
    (unit.ns.root / "nginx" / "tls").mkdir()
    ca = issue("Test CA", ca=True)
    write_pair(unit.ns.root / "nginx" / "tls", issue("localhost", issuer=ca))
    (unit.ns.root / "ca.pem").write_bytes(ca.pem)
    context = ssl.create_default_context(cafile=str(unit.ns.root / "ca.pem"))
    context.check_hostname = False
    return context


def test_the_nginx_example_serves_reloads_and_reopens_under_the_shipped_unit() -> None:
    with booted((CONFIG / "nginx.toml").read_text()) as unit:  # its log: JSON, not a tty
        context = install_nginx_example(unit)
        started = unit.ctl("start", UNIT, check=False)
        assert started.returncode == 0, unit.tail()
        pid = unit.main_pid()
        with Load(NGINX_PORT, threads=8, duration=240, netns=unit.ns.netns(), tls=context) as load:
            wait_until(load.answered, 15, "the load to be answered")
            for _ in range(RELOADS):
                unit.ctl("reload", UNIT)  # ExecReload: fails unless the rollout succeeded
            workers = {w["pid"] for w in unit.workers("nginx")}
            unit.ctl("kill", "-s", "USR1", UNIT)  # every process of the unit, as logrotate's
            unit.wait(lambda: bool(unit.events("reopen_forwarded")), 15, "the reopen", load)
            time.sleep(2)  # the load goes on against the same workers
        result = load.result
        report("nginx example under the unit", result)
        assert result.failed == 0, (result.failures, result.examples)
        assert {w["generation"] for w in unit.workers("nginx")} == {RELOADS + 1}
        assert {w["pid"] for w in unit.workers("nginx")} == workers, "USR1 killed a worker"
        assert unit.main_pid() == pid, "USR1 killed the daemon"
        assert unit.ns.show(UNIT, "NRestarts")["NRestarts"] == "0"
        forwarded = unit.events("reopen_forwarded")[-1]
        assert forwarded["signal"] == "SIGUSR1" and forwarded["workers"] == 4, forwarded
        # nginx's pid and temporary files went to the service's state directory.
        state = unit.ns.root / "private/var/lib/reuseport-supervisor/nginx"
        assert (state / "client_body_temp").is_dir(), sorted(p.name for p in state.iterdir())


def test_a_state_directory_the_sandbox_keeps_read_only_is_named_at_start() -> None:
    with booted("") as unit:
        readonly = unit.ns.root / "elsewhere"  # under /var/lib: read-only in the sandbox
        text = (CONFIG / "nginx.toml").read_text()
        unit.config.write_text(f'[supervisor]\nstate_directory = "{readonly}"\n\n{text}')
        install_nginx_example(unit)
        started = unit.ctl("start", UNIT, check=False)
        assert started.returncode != 0
        assert unit.ns.show(UNIT, "NRestarts")["NRestarts"] == "0", "exit 2: no restart loop"
        log = unit.tail()
        assert "services.nginx.state_directory" in log, log
        assert f"{unit.ns.root} is on a read-only file system" in log, log
        assert not unit.events("worker_spawned"), "nothing of the service started"
