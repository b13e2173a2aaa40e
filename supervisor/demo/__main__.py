"""``python -m supervisor.demo [--delay S] [--concurrency N] [--work S]``: the demo worker."""

from __future__ import annotations

import argparse
import sys

import trio

from supervisor import logs
from supervisor.demo.server import ListenFdsError, serve


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
    args = parser.parse_args()
    logs.configure("auto", "warning")
    try:
        trio.run(serve, args.delay, args.concurrency, args.work)
    except ListenFdsError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
