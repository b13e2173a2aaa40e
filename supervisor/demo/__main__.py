"""The demo worker's command line.

``python -m supervisor.demo [--delay S] [--concurrency N] [--work S] [--tls-cert F --tls-key F]
[--bind HOST:PORT ...]``
"""

from __future__ import annotations

import argparse
import ssl
import sys

import trio

from supervisor.demo.server import ListenFdsError, serve, tls_context
from supervisor.observe import logs


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m supervisor.demo")
    parser.add_argument(
        "--delay",
        type=float,
        default=0.0,
        help="seconds to wait before accepting and sending READY=1 (a slow start)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=0,
        help="connections served at once per listener (0: no limit); like a sync worker",
    )
    parser.add_argument(
        "--work", type=float, default=0.0, help="seconds of simulated work per request"
    )
    parser.add_argument(
        "--tls-cert", help="serve TLS with this certificate (PEM, chain after leaf)"
    )
    parser.add_argument("--tls-key", help="the certificate's private key (PEM)")
    parser.add_argument(
        "--bind",
        action="append",
        metavar="HOST:PORT",
        help="bind this address itself (SO_REUSEPORT) instead of taking LISTEN_FDS; repeatable",
    )
    args = parser.parse_args()
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    logs.configure("auto", "warning")
    try:
        tls = tls_context(args.tls_cert, args.tls_key) if args.tls_cert else None
    except (OSError, ssl.SSLError) as exc:
        print(f"demo: cannot load {args.tls_cert} / {args.tls_key}: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        trio.run(serve, args.delay, args.concurrency, args.work, tls, args.bind)
    except ListenFdsError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
