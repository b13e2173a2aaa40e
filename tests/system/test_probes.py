"""The ``http`` health check against real workers: answers parsed by h11,
over TLS with ``scheme = "https"``, and its failures named."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.certs import issue, write_pair
from tests.support.harness import DEMO, Daemon, free_port, service_toml

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


def tls_demo(tmp_path: Path) -> list[str]:
    cert, key = write_pair(tmp_path, issue("localhost", issuer=issue("Test CA", ca=True)))
    return [*DEMO, "--tls-cert", str(cert), "--tls-key", str(key)]


def test_an_https_check_passes_a_worker_that_serves_tls_and_plain_http_is_named_wrong(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    command = tls_demo(tmp_path)
    https = 'kind = "http"\nscheme = "https"\npath = "/healthz"\ntimeout = "2s"'
    port = free_port()
    daemon = start_daemon(service_toml("web", port=port, workers=2, command=command, health=https))
    assert daemon.status()["services"]["web"]["state"] == "RUNNING"
    assert daemon.reload().ok
    # The same worker probed in plain HTTP: a TLS server's answer is not HTTP/1.
    plain = 'kind = "http"\npath = "/healthz"\ntimeout = "1s"'
    wrong = service_toml("web", port=port, workers=1, command=command, health=plain)
    daemon.rewrite(wrong.replace('ready_timeout = "15s"', 'ready_timeout = "2s"'))
    failed = daemon.reload()
    assert not failed.ok
    reasons = " ".join(failed.answer["reasons"])
    assert "health check http failed" in reasons and "GET /healthz" in reasons, reasons


def test_an_http_check_names_the_status_that_failed_it(
    start_daemon: Callable[..., Daemon],
) -> None:
    port = free_port()
    daemon = start_daemon(service_toml("web", port=port, workers=1))
    missing = 'kind = "http"\npath = "/nowhere"\ntimeout = "1s"'
    bad = service_toml("web", port=port, workers=1, health=missing)
    daemon.rewrite(bad.replace('ready_timeout = "15s"', 'ready_timeout = "2s"'))
    failed = daemon.reload()
    assert not failed.ok
    reasons = " ".join(failed.answer["reasons"])
    assert "GET /nowhere: HTTP/1.1 404" in reasons, reasons
