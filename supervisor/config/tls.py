"""A service's TLS certificate and key, checked before a rollout may use them.

A rotation that writes a broken pair must be rejected while the old
generation keeps serving, with a message that names the cause: a file that
does not parse, a key that does not match the certificate, a certificate
that is expired or not yet valid, or a chain in the wrong order.

Imported only where a service has ``[tls]`` (loader, service, the ``tls``
probe): cryptography costs some 9 MB of the daemon's RSS.
"""

from __future__ import annotations

import datetime
import itertools
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from supervisor.config.schema import Config, TlsFiles
from supervisor.errors import ConfigIssue, TlsError
from supervisor.kernel import caps
from supervisor.kernel.files import read_regular
from supervisor.values import Served

PEM_LIMIT = 1 << 20  # a chain of ten 4096-bit certificates is about 20 KiB
_PRIVATE_KEYS = (
    rsa.RSAPrivateKey,
    ec.EllipticCurvePrivateKey,
    ed25519.Ed25519PrivateKey,
    ed448.Ed448PrivateKey,
)


@dataclass(frozen=True)
class Certificate:
    """What a valid pair is: the served (leaf) certificate and its chain."""

    leaf: x509.Certificate
    chain: tuple[x509.Certificate, ...]

    @property
    def leaf_der(self) -> bytes:
        return self.leaf.public_bytes(serialization.Encoding.DER)

    def describe(self) -> str:
        return (
            f"{self.leaf.subject.rfc4514_string()}, serial {self.leaf.serial_number:x}, "
            f"valid until {self.leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )


def _read(path: Path, what: str) -> bytes:
    try:
        return read_regular(path, PEM_LIMIT)
    except OSError as exc:  # seam: a TLS file, read as TlsError
        why = caps.why_denied(caps.DAC_READ_SEARCH) if isinstance(exc, PermissionError) else ""
        raise TlsError(f"{what} {path}: cannot read: {exc.strerror or exc}{why}") from exc


def load_certificates(path: Path) -> tuple[x509.Certificate, ...]:
    """Every certificate of a PEM file, leaf first.

    Raises:
        TlsError: unreadable, or not a PEM certificate.
    """
    data = _read(path, "certificate")
    try:
        certs = tuple(x509.load_pem_x509_certificates(data))
    except ValueError as exc:
        raise TlsError(f"certificate {path}: not a PEM certificate ({exc})") from exc
    return certs


def check_pair(files: TlsFiles, now: datetime.datetime | None = None) -> Certificate:
    """The certificate of ``files`` if it is fit to serve now.

    Raises:
        TlsError: naming the file and the problem.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    certs = load_certificates(files.cert)
    leaf = certs[0]
    if now < leaf.not_valid_before_utc:
        raise TlsError(
            f"certificate {files.cert}: not valid before "
            f"{leaf.not_valid_before_utc:%Y-%m-%d %H:%M} UTC"
        )
    if now >= leaf.not_valid_after_utc:
        raise TlsError(
            f"certificate {files.cert}: expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
        )
    _check_chain(files.cert, certs)
    _check_key(files, leaf)
    return Certificate(leaf, certs[1:])


def _check_chain(path: Path, certs: tuple[x509.Certificate, ...]) -> None:
    """Each certificate must be issued (and signed) by the one after it."""
    for index, (cert, issuer) in enumerate(itertools.pairwise(certs)):
        where = f"certificate {path}: chain entry {index + 1} ({issuer.subject.rfc4514_string()})"
        if cert.issuer != issuer.subject:
            raise TlsError(
                f"{where} did not issue entry {index} ({cert.subject.rfc4514_string()}, "
                f"issued by {cert.issuer.rfc4514_string()}): chain out of order"
            )
        try:
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
            raise TlsError(f"{where} did not sign entry {index}: {exc or 'bad signature'}") from exc


def _check_key(files: TlsFiles, leaf: x509.Certificate) -> None:
    data = _read(files.key, "key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise TlsError(f"key {files.key}: encrypted keys are not supported ({exc})") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise TlsError(f"key {files.key}: not a PEM private key ({exc})") from exc
    if not isinstance(key, _PRIVATE_KEYS):
        raise TlsError(f"key {files.key}: unsupported key type {type(key).__name__}")
    if key.public_key() != leaf.public_key():
        raise TlsError(
            f"key {files.key} does not match certificate {files.cert} "
            f"({leaf.subject.rfc4514_string()})"
        )


def served_of(path: Path, leaf: x509.Certificate) -> Served:
    return Served(
        path,
        leaf.subject.rfc4514_string(),
        leaf.serial_number,
        leaf.not_valid_after_utc,
        leaf.public_bytes(serialization.Encoding.DER),
    )


def served(path: Path) -> Served | None:
    """The leaf of ``path`` as a generation starting now loads it; None if it
    cannot be read (the rollout's own check said why)."""
    try:
        leaf = load_certificates(path)[0]
    except (TlsError, IndexError):
        return None
    return served_of(path, leaf)


def check_config(config: Config, seen: dict[str, Served] | None = None) -> Iterable[ConfigIssue]:
    """A config issue for every service whose certificate and key are not fit
    to serve; ``seen`` gets each fit one's certificate, as read here."""
    for name, service in config.services.items():
        if service.tls is None:
            continue
        try:
            certificate = check_pair(service.tls)
        except TlsError as exc:
            yield ConfigIssue(f"services.{name}.tls", str(exc))
        else:
            if seen is not None:
                seen[name] = served_of(service.tls.cert, certificate.leaf)
