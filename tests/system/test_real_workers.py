"""Real servers as workers, from the example configs, across reloads under load.

gunicorn (sync workers), uvicorn, and nginx over TLS with its certificate
rotated by the file watch. Each must lose no connection; a tool that is not
installed here skips with a reason (CI installs nginx from Debian; gunicorn
and uvicorn come with the test extras).
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import shutil
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.certs import Issued, issue, write_pair
from tests.support.harness import Daemon, free_port, wait_until
from tests.support.load import Load

pytestmark = [pytest.mark.kernel, pytest.mark.slow]

CONFIG = Path(__file__).resolve().parents[2] / "config"
RELOADS = 10


def example(name: str, port: int) -> str:
    """The services of ``config/NAME.toml`` (the test supplies [supervisor]) on
    ``port`` (in ``listen``, and where a server binds it itself)."""
    text = (CONFIG / f"{name}.toml").read_text()
    services = text[text.index("[services.") :]
    return re.sub(r"127\.0\.0\.1:\d+", f"127.0.0.1:{port}", services)


def sha(leaf: Issued) -> str:
    return hashlib.sha256(leaf.der).hexdigest()


def needs(program: str) -> None:
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed here")


def needs_module(name: str) -> None:
    """The examples run Python servers as ``{python} -m NAME``: the daemon's own interpreter."""
    if importlib.util.find_spec(name) is None:
        pytest.skip(f"{name} is not installed beside the supervisor")


def reload_under_load(
    daemon: Daemon,
    service: str,
    port: int,
    tls: ssl.SSLContext | None = None,
    reloads: int = RELOADS,
) -> None:
    with Load(port, threads=4, duration=180, max_connections=100_000, tls=tls) as running:
        wait_until(running.answered, 15, "the load to be answered")
        for n in range(reloads):
            reloaded = daemon.reload(service)
            assert reloaded.ok, reloaded.answer
            assert reloaded.report(service)["generation"] == n + 2
    result = running.result
    assert result.failed == 0, (result.failures, result.examples)
    generations = {b["generation"] for b in result.bodies if "generation" in b}
    if generations:  # the apps name their generation; nginx names only its pid
        assert len(generations) >= reloads // 2, generations
    assert result.ok > 10 * reloads


def test_gunicorn_binding_its_own_socket_across_twenty_reloads(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """``gunicorn --reuse-port --bind``, adopted (``listen_mode = "own"``)."""
    needs_module("gunicorn")
    shutil.copytree(CONFIG / "apps", tmp_path / "apps")
    port = free_port()
    daemon = start_daemon(example("gunicorn-own", port), supervisor_extra='steering = "ebpf"')
    (group,) = daemon.status()["services"]["gunicorn"]["census"]
    assert len(group["members"]) == 4 and all(m["ours"] for m in group["members"]), group
    reload_under_load(daemon, "gunicorn", port, reloads=20)


@pytest.mark.parametrize("server", ["gunicorn", "uvicorn"])
def test_python_servers_across_reloads(
    server: str, start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    needs_module(server)
    shutil.copytree(CONFIG / "apps", tmp_path / "apps")
    port = free_port()
    daemon = start_daemon(example(server, port))
    assert daemon.status()["services"][server]["state"] == "RUNNING"
    reload_under_load(daemon, server, port)


def test_nginx_binding_its_own_socket_across_twenty_reloads(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """nginx with ``listen ... reuseport``, adopted (``listen_mode = "own"``)."""
    needs("nginx")
    port = free_port()
    (tmp_path / "nginx").mkdir()
    conf = (CONFIG / "nginx" / "nginx-own.conf").read_text().replace("8081", str(port))
    (tmp_path / "nginx" / "nginx-own.conf").write_text(conf)
    state = tmp_path / "state"
    extra = f'state_directory = "{state}"\nsteering = "ebpf"'
    daemon = start_daemon(example("nginx-own", port), supervisor_extra=extra)
    (group,) = daemon.status()["services"]["nginx"]["census"]
    assert len(group["members"]) == 4 and all(m["ours"] for m in group["members"]), group
    reload_under_load(daemon, "nginx", port, reloads=20)


def test_nginx_over_tls_across_reloads_and_a_rotation(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    needs("nginx")
    port = free_port()
    (tmp_path / "nginx" / "tls").mkdir(parents=True)
    conf = (CONFIG / "nginx" / "nginx.conf").read_text().replace("8443", str(port))
    (tmp_path / "nginx" / "nginx.conf").write_text(conf)
    ca = issue("Test CA", ca=True)
    first, second = issue("localhost", issuer=ca), issue("localhost", issuer=ca)
    cert, key = write_pair(tmp_path / "nginx" / "tls", first)
    (tmp_path / "ca.pem").write_bytes(ca.pem)
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    context.check_hostname = False

    state = tmp_path / "state"  # nginx's prefix, {state}: its pid and temporary files
    daemon = start_daemon(example("nginx", port), supervisor_extra=f'state_directory = "{state}"')
    daemon.wait_event("watching", service="nginx")
    reload_under_load(daemon, "nginx", port, tls=context)

    # Rotation: the watch reloads nginx, which then serves the new certificate.
    with Load(port, threads=4, duration=60, max_connections=50_000, tls=context) as running:
        wait_until(running.answered, 15, "the load to be answered")
        mark = daemon.mark()
        cert.write_bytes(second.pem)
        time.sleep(0.1)
        key.write_bytes(second.key_pem)
        answered = daemon.wait_event("reload_answered", after=mark)
        done = time.monotonic()
        assert answered["ok"], answered
        time.sleep(1)  # the load goes on against the new generation
    result = running.result
    assert result.failed == 0, (result.failures, result.examples)
    served = {b["_cert"] for b in result.bodies}
    assert served == {sha(first), sha(second)}
    assert {b["_cert"] for b in result.bodies if float(b["_at"]) > done} == {sha(second)}
    assert (state / "nginx" / "client_body_temp").is_dir()
