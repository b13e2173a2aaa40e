"""Certificate rotation under a TLS load: watched files, validated pairs, a tls health gate."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.certs import DAY, NOW, Issued, issue, write_pair
from tests.support.harness import DEMO, Daemon, free_port, service_toml, wait_until
from tests.support.load import Load

pytestmark = [pytest.mark.kernel, pytest.mark.slow]


def tls_service(
    port: int, cert: Path, key: Path, *, served: tuple[Path, Path] | None = None
) -> str:
    """The demo in TLS mode, watching its files; or, with ``served``, loading
    another pair than ``tls`` names (and watching nothing)."""
    served_cert, served_key = served or (cert, key)
    command = [*DEMO, "--tls-cert", str(served_cert), "--tls-key", str(served_key)]
    extra = f'tls = {{ cert = "{cert}", key = "{key}" }}\n'
    if served is None:
        extra += f'watch = ["{cert}", "{key}"]\nwatch_debounce = "300ms"'

    return service_toml(
        "web", port=port, workers=2, command=command, health='kind = "tls"', extra=extra
    )


def client_context(ca: Issued, tmp_path: Path) -> ssl.SSLContext:
    cafile = tmp_path / "ca.pem"
    cafile.write_bytes(ca.pem)
    context = ssl.create_default_context(cafile=str(cafile))
    context.check_hostname = False  # the chain is verified; the name is not the point here
    return context


def sha(leaf: Issued) -> str:
    return hashlib.sha256(leaf.der).hexdigest()


def rotate(cert: Path, key: Path, leaf: Issued, *, key_of: Issued | None = None) -> None:
    """Write the certificate, then the key a little later, as a deploy hook would."""
    cert.write_bytes(leaf.pem)
    time.sleep(0.1)
    key.write_bytes((key_of or leaf).key_pem)


ROTATIONS = 5


def test_rotation_under_tls_load_loses_no_handshake(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    ca = issue("Test CA", ca=True)
    leaves = [issue("web.test", issuer=ca) for _ in range(ROTATIONS + 1)]
    cert, key = write_pair(tmp_path, leaves[0])
    port = free_port()
    daemon = start_daemon(tls_service(port, cert, key))
    daemon.wait_event("watching", service="web")
    context = client_context(ca, tmp_path)
    # (from, to): after rotation n was answered, before rotation n + 1 began
    windows: list[tuple[float, float]] = []

    with Load(port, threads=4, duration=120, max_connections=50_000, tls=context) as load:
        wait_until(lambda: load.served_by(daemon.worker_pids()[0]), 15, "TLS load to be served")
        for leaf in leaves[1:]:
            mark = daemon.mark()
            began = time.monotonic()
            if windows:
                windows[-1] = (windows[-1][0], began)
            rotate(cert, key, leaf)
            answered = daemon.wait_event("reload_answered", after=mark)
            assert answered["ok"], answered
            windows.append((time.monotonic(), float("inf")))
            time.sleep(0.2)
        assert daemon.status()["services"]["web"]["generation"] == ROTATIONS + 1

        # A key that belongs to another certificate: rejected; the last generation serves on.
        mark = daemon.mark()
        rotate(cert, key, leaves[-1], key_of=issue("web.test", issuer=ca))
        rejected = daemon.wait_event("reload_answered", after=mark)
        assert not rejected["ok"]
        assert "services.web.tls: key" in rejected["reasons"][0]
        assert "does not match certificate" in rejected["reasons"][0]

        # An expired certificate with its own key: rejected too.
        mark = daemon.mark()
        rotate(cert, key, issue("web.test", issuer=ca, not_after=NOW - DAY))
        expired = daemon.wait_event("reload_answered", after=mark)
        assert not expired["ok"]
        assert "expired on" in expired["reasons"][0]
        time.sleep(0.5)  # the load keeps going against the last good generation
    result = load.result

    assert result.failed == 0, (result.failures, result.examples)
    status = daemon.status()["services"]["web"]
    assert status["generation"] == ROTATIONS + 1
    assert status["last_rollout"]["reason"].startswith("watched files changed: ")
    # Every generation served the certificate it was started with, and only that.
    certs = {str(n + 1): sha(leaf) for n, leaf in enumerate(leaves)}
    assert {(b["generation"], b["_cert"]) for b in result.bodies} == set(certs.items())
    # Once a rotation was answered, every new handshake presented the new certificate.
    for n, (start, end) in enumerate(windows):
        inside = {b["_cert"] for b in result.bodies if start < float(b["_at"]) < end}
        assert inside == {sha(leaves[n + 1])}, f"after rotation {n + 1}"


def test_cutover_waits_for_the_new_certificate_to_be_served(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    ca = issue("Test CA", ca=True)
    first, second = issue("web.test", issuer=ca), issue("web.test", issuer=ca)
    stale = tmp_path / "stale"
    stale.mkdir()
    cert, key = write_pair(tmp_path, first)
    served = write_pair(stale, first)
    port = free_port()
    # The workers load a copy that rotation does not touch: they keep serving
    # the old certificate, so the tls check must refuse the candidate.
    daemon = start_daemon(tls_service(port, cert, key, served=served))
    rotate(cert, key, second)
    reloaded = daemon.reload(reason="certbot deploy-hook")
    assert not reloaded.ok
    report = reloaded.report()
    assert report["outcome"] == "rolled_back"
    assert report["reason"] == "certbot deploy-hook"
    assert "health check tls failed" in report["reasons"][0]
    assert "served certificate (CN=web.test" in report["reasons"][0]
    assert f"is not {cert}" in report["reasons"][0]
    assert daemon.status()["services"]["web"]["generation"] == 1


def test_a_worker_respawned_after_the_file_changed_waits_for_the_reload_that_checks_it(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A generation serves the certificate read for it, once: a worker that
    respawns after the file changed (no reload yet, nothing watched) loads a
    certificate nothing validated, and gets no traffic until a reload checks
    it and rolls it out."""
    ca = issue("Test CA", ca=True)
    first, second = issue("web.test", issuer=ca), issue("web.test", issuer=ca)
    cert, key = write_pair(tmp_path, first)
    port = free_port()
    daemon = start_daemon(tls_service(port, cert, key, served=(cert, key)))
    rotate(cert, key, second)
    mark = daemon.mark()
    os.kill(daemon.worker_pids()[0], signal.SIGKILL)
    refused = daemon.wait_event("worker_unhealthy", after=mark, worker=0)
    assert f"serial {second.cert.serial_number:x}) is not {cert}" in refused["reason"], refused
    assert f"serial {first.cert.serial_number:x})" in refused["reason"], refused
    reloaded = daemon.reload(reason="the new certificate")
    assert reloaded.ok, reloaded.answer
    status = daemon.status()["services"]["web"]
    assert status["generation"] == 2
    assert [w["state"] for w in status["workers"]] == ["RUNNING", "RUNNING"]


def test_a_certificate_near_its_end_is_shown_and_warned_about(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    ca = issue("ca.test", ca=True)
    cert, key = write_pair(tmp_path, issue("web.test", issuer=ca, not_after=NOW + 2 * DAY), ca)
    daemon = start_daemon(tls_service(free_port(), cert, key))
    warning = daemon.wait_event("tls_expires_soon", service="web")
    assert warning["subject"] == "CN=web.test" and 1.9 < warning["days_left"] <= 2.0
    shown = daemon.status()["services"]["web"]["certificate"]
    assert shown["subject"] == "CN=web.test" and shown["path"] == str(cert)
    assert shown["not_after"].startswith((NOW + 2 * DAY).date().isoformat())
    assert 1.9 < shown["days_left"] <= 2.0
    # Renewed: the rollout serves the new one, and status follows it.
    rotate(cert, key, issue("web.test", issuer=ca, not_after=NOW + 90 * DAY))
    wait_until(
        lambda: daemon.status()["services"]["web"]["certificate"]["days_left"] > 89,
        60,
        "the renewed certificate to be served",
    )


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_watched_file_replaced_by_a_fifo_or_a_device_is_refused(
    start_daemon: Callable[..., Daemon], tmp_path: Path, kind: str
) -> None:
    # Whoever renews the certificate (an unprivileged ACME client) can write
    # the watched directory. A FIFO there once blocked the root daemon in
    # open() for good, and a link to /dev/zero would be read until the OOM.
    ca = issue("Test CA", ca=True)
    cert, key = write_pair(tmp_path, issue("web.test", issuer=ca))
    daemon = start_daemon(tls_service(free_port(), cert, key))
    daemon.wait_event("watching", service="web")
    pids = daemon.worker_pids()
    mark = daemon.mark()
    cert.unlink()
    if kind == "fifo":
        os.mkfifo(cert)
    else:
        cert.symlink_to("/dev/zero")
    answered = daemon.wait_event("reload_answered", after=mark)
    assert not answered["ok"]
    what = "a FIFO" if kind == "fifo" else "a character device"
    assert f"not a regular file ({what})" in json.dumps(answered), answered
    began = time.monotonic()
    status = daemon.status()
    assert time.monotonic() - began < 5
    assert status["services"]["web"]["generation"] == 1
    assert daemon.worker_pids() == pids, "the old generation serves on"
    assert daemon.terminate() == 0
