"""Exec a worker on a listener it holds itself, as hand-rolled setups do.

``python selfbind.py --bind 127.0.0.1:8080 -- ARGV``: open a TCP listener
with SO_REUSEPORT (each process its own, the seeds' reproducer), put it at
fd 3 and exec ARGV with ``LISTEN_FDS=1`` and ``LISTEN_PID`` (exec keeps the
pid), the systemd protocol the demo worker reads.
``--fd N``: the listener was inherited at fd N (one socket shared by many
processes); it is moved to fd 3 the same way. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import socket


def main() -> None:
    parser = argparse.ArgumentParser()
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--bind", help="HOST:PORT for a listener of our own, with SO_REUSEPORT")
    where.add_argument("--fd", type=int, help="an inherited listener")
    parser.add_argument("--backlog", type=int, default=1024)
    parser.add_argument("argv", nargs="+")
    args = parser.parse_args()
    if args.bind:
        host, _, port = args.bind.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, int(port)))
        sock.listen(args.backlog)
        fd = sock.detach()
    else:
        fd = args.fd
    if fd != 3:
        os.dup2(fd, 3)
        os.close(fd)
    os.set_inheritable(3, True)
    os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
    os.execvp(args.argv[0], args.argv)  # noqa: S606


if __name__ == "__main__":
    main()
