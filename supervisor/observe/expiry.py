"""The daily warning before a served certificate expires.

The supervisor rotates certificates when their files change; it does not
renew them. A certificate that nobody renewed is served until it expires,
and then every new handshake fails: so once a day (and at start) each
service whose serving generation loaded a certificate that ends within
``[supervisor] tls_warn_before`` gets a ``tls_expires_soon`` warning.
``status`` and the metrics show the same date.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import structlog
import trio

from supervisor.serve.service import Service

log = structlog.get_logger("supervisor.observe.expiry")

EVERY = 86400.0  # once a day


def expiring(services: Mapping[str, Service], before: float) -> list[tuple[str, float]]:
    """(service, seconds left) of each served certificate that ends within ``before``."""
    out = []
    for name, service in services.items():
        cert = service.certificate
        if cert is not None and cert.seconds_left() < before:
            out.append((name, cert.seconds_left()))
    return out


async def warn_daily(services: Callable[[], Mapping[str, Service]], before: float) -> None:
    """Log ``tls_expires_soon`` for every certificate ending within ``before``, daily."""
    while True:
        now = services()
        for name, left in expiring(now, before):
            cert = now[name].certificate
            assert cert is not None
            log.warning(
                "tls_expires_soon",
                service=name,
                subject=cert.subject,
                path=str(cert.path),
                not_after=cert.not_after.isoformat(),
                days_left=round(left / 86400, 2),
            )
        await trio.sleep(EVERY)
