"""``python -m supervisor.demo [--delay SECONDS]``: run the demo worker."""

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
    args = parser.parse_args()
    logs.configure("auto", "warning")
    try:
        trio.run(serve, args.delay)
    except ListenFdsError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
