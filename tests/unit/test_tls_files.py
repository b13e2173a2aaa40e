"""A service's certificate and key: every way a rotation can write a bad pair."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config.schema import TlsFiles
from supervisor.config.tls import check_pair
from supervisor.errors import TlsError
from tests.support.certs import DAY, NOW, issue, write_pair


@pytest.fixture
def ca_and_leaf(tmp_path: Path) -> tuple[TlsFiles, bytes]:
    ca = issue("Test CA", ca=True)
    leaf = issue("web.test", issuer=ca)
    cert, key = write_pair(tmp_path, leaf, ca)
    return TlsFiles(cert=cert, key=key), leaf.der


def test_good_pair_with_chain(ca_and_leaf: tuple[TlsFiles, bytes]) -> None:
    files, der = ca_and_leaf
    checked = check_pair(files)
    assert checked.leaf_der == der
    assert len(checked.chain) == 1
    assert "CN=web.test" in checked.describe()


def test_key_of_another_certificate(tmp_path: Path) -> None:
    cert, key = write_pair(tmp_path, issue("web.test"))
    key.write_bytes(issue("other.test").key_pem)
    with pytest.raises(TlsError, match=rf"key {key} does not match certificate {cert}"):
        check_pair(TlsFiles(cert=cert, key=key))


def test_expired(tmp_path: Path) -> None:
    cert, key = write_pair(tmp_path, issue("web.test", not_after=NOW - DAY))
    with pytest.raises(TlsError, match=rf"certificate {cert}: expired on "):
        check_pair(TlsFiles(cert=cert, key=key))


def test_not_yet_valid(tmp_path: Path) -> None:
    cert, key = write_pair(tmp_path, issue("web.test", not_before=NOW + DAY))
    with pytest.raises(TlsError, match="not valid before"):
        check_pair(TlsFiles(cert=cert, key=key))


def test_chain_out_of_order(tmp_path: Path) -> None:
    root = issue("Root", ca=True)
    intermediate = issue("Intermediate", issuer=root, ca=True)
    leaf = issue("web.test", issuer=intermediate)
    cert, key = write_pair(tmp_path, leaf, root, intermediate)
    with pytest.raises(TlsError, match="chain out of order"):
        check_pair(TlsFiles(cert=cert, key=key))
    write_pair(tmp_path, leaf, intermediate, root)
    assert len(check_pair(TlsFiles(cert=cert, key=key)).chain) == 2


def test_chain_with_a_forged_issuer(tmp_path: Path) -> None:
    # Same subject name as the real CA, different key: names match, signature does not.
    real, forged = issue("Test CA", ca=True), issue("Test CA", ca=True)
    cert, key = write_pair(tmp_path, issue("web.test", issuer=real), forged)
    with pytest.raises(TlsError, match="did not sign entry 0"):
        check_pair(TlsFiles(cert=cert, key=key))


def test_garbage_and_missing_files(tmp_path: Path) -> None:
    cert, key = write_pair(tmp_path, issue("web.test"))
    files = TlsFiles(cert=cert, key=key)
    key.write_text("-----BEGIN PRIVATE KEY-----\nnot base64\n-----END PRIVATE KEY-----\n")
    with pytest.raises(TlsError, match=rf"key {key}: not a PEM private key"):
        check_pair(files)
    cert.write_text("half a certificate")
    with pytest.raises(TlsError, match=rf"certificate {cert}: not a PEM certificate"):
        check_pair(files)
    cert.unlink()
    with pytest.raises(TlsError, match=rf"certificate {cert}: cannot read: No such file"):
        check_pair(files)


def check(tmp_path: Path, tls: str) -> subprocess.CompletedProcess[str]:
    """``supervisord --check`` on a service with ``tls`` (a TOML line) and a tls check."""
    config = tmp_path / "s.toml"
    config.write_text(
        f"[services.web]\ncommand = [{sys.executable!r}]\nlisten = ['127.0.0.1:8443']\n"
        f"{tls}\n[services.web.health]\nkind = 'tls'\n"
    )
    return subprocess.run(
        [sys.executable, "-m", "supervisor.daemon", "--check", "-c", str(config)],
        capture_output=True,
        text=True,
    )


def test_check_names_the_field_and_exits_2(tmp_path: Path) -> None:
    cert, _ = write_pair(tmp_path, issue("web.test", not_after=NOW - DAY))
    done = check(tmp_path, "tls = { cert = 'cert.pem', key = 'key.pem' }")
    assert done.returncode == 2
    assert f"services.web.tls: certificate {cert}: expired on" in done.stderr


def test_tls_health_check_needs_the_files(tmp_path: Path) -> None:
    done = check(tmp_path, "")
    assert done.returncode == 2
    assert 'services.web: health kind "tls" compares the served certificate' in done.stderr
