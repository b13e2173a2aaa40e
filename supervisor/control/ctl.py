"""``supervisorctl``: a small synchronous client of the control socket.

Exit codes: 0 success; 1 the daemon answered with an error (reload
rejected or rolled back, unknown service), or ``census`` found a socket
not ours on a listen address; 2 usage error, daemon
unreachable, or no answer within ``--timeout``; 3 ``status SERVICE`` of a
service that is neither RUNNING nor RELOADING (as ``systemctl is-active``); 130 interrupted.

The client judges no config: with ``-c FILE`` it reads one key,
``[supervisor] control_socket``, and sends the request. Whether the file is
good is the daemon's verdict (a reload answers it), so a broken file never
locks the operator out of ``status`` or ``shutdown``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import sys
import time
import tomllib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from supervisor import __version__
from supervisor.config.schema import DEFAULT_CONTROL_SOCKET
from supervisor.control import completion
from supervisor.errors import DaemonUnreachable
from supervisor.reports import RolloutReport, UpgradeResult, reports_of
from supervisor.status import Status, render, render_census
from supervisor.values import format_duration, parse_duration, parse_signal

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
# What `status SERVICE` exits 0 for: every worker serves, or a reload is under
# way while the current generation serves (`systemctl is-active` counts
# "reloading" as active too; a check run during a reload must not page).
ACTIVE_STATES = frozenset({"RUNNING", "RELOADING"})
_KEY = re.compile(r"""^\s*control_socket\s*=\s*(["'])(.*?)\1\s*(#.*)?$""")


def find_socket(explicit: str | None, config: Path | None) -> Path:
    """``-s``, then ``$SUPERVISOR_SOCKET``, then ``-c FILE``'s control_socket, then the default.

    Only that one key is read. A file that cannot be read, or whose key cannot
    be found, gives the default, with a note on stderr saying why.
    """
    if explicit:
        return Path(explicit)
    from_env = os.environ.get("SUPERVISOR_SOCKET")
    if from_env:
        return Path(from_env)
    if config is None:
        return DEFAULT_CONTROL_SOCKET
    try:
        found = control_socket_of(config)
    except ValueError as exc:
        print(f"supervisorctl: {exc}; using {DEFAULT_CONTROL_SOCKET}", file=sys.stderr)
        return DEFAULT_CONTROL_SOCKET
    return DEFAULT_CONTROL_SOCKET if found is None else found


def control_socket_of(config: Path) -> Path | None:
    """``[supervisor] control_socket`` of ``config`` (relative to its directory),
    or None where the file does not set it. A file with a TOML error elsewhere
    is read line by line for that key.

    Raises:
        ValueError: the file cannot be read, or the key's value is not a string.
    """
    try:
        text = config.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:  # seam: the client's config file
        raise ValueError(f"cannot read {config}: {exc.strerror}") from exc
    try:
        value = tomllib.loads(text).get("supervisor", {}).get("control_socket")
    except tomllib.TOMLDecodeError:
        value = _scan(text)
    except AttributeError:  # [supervisor] is not a table
        value = None
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"{config}: control_socket is not a string")
    path = Path(value)
    return path if path.is_absolute() else (config.resolve().parent / path)


def _scan(text: str) -> str | None:
    """The key's value in the ``[supervisor]`` table, line by line."""
    table = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            table = stripped.strip("[] ")
        elif table == "supervisor" and (match := _KEY.match(line)):
            return match.group(2)
    return None


class TimedOut(Exception):
    """No final answer before the caller's deadline."""


def request(
    path: Path,
    message: dict[str, Any],
    timeout: float | None,
    *,
    deadline: float | None = None,
) -> Iterator[dict[str, Any]]:
    """Send one request; yield each response line as it arrives.

    ``timeout`` bounds each wait for a line (a dead daemon); ``deadline``
    (``time.monotonic()``) the whole exchange.

    Raises:
        DaemonUnreachable: connect failed, or the daemon hung up without a result.
        TimedOut: ``deadline`` passed before the final answer.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(5.0)
        try:
            sock.connect(str(path))
        except OSError as exc:  # seam: the control socket, as DaemonUnreachable
            raise DaemonUnreachable(str(path), exc.strerror or str(exc)) from exc
        sock.sendall(json.dumps(message).encode() + b"\n")
        buffer = b""
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise TimedOut
            sock.settimeout(
                min(t for t in (timeout, left) if t is not None) if (timeout or left) else None
            )
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimedOut from None
                raise
            if not chunk:
                raise DaemonUnreachable(
                    str(path), "the daemon closed the connection without an answer"
                )
            buffer += chunk
            while b"\n" in buffer:
                raw, buffer = buffer.split(b"\n", 1)
                reply: dict[str, Any] = json.loads(raw)
                yield reply
                if reply.get("type") in ("result", "error"):
                    return
    except (TimeoutError, ConnectionError) as exc:
        raise DaemonUnreachable(str(path), str(exc) or type(exc).__name__) from exc
    finally:
        sock.close()


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _signal(text: str) -> str:
    try:
        return parse_signal(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def get_parser() -> argparse.ArgumentParser:
    """The command line (shell completions and the man page are made from it)."""
    parser = argparse.ArgumentParser(
        prog="supervisorctl",
        description="Control supervisord: status, census, reload, restart, signal, stop, start, "
        "upgrade, shutdown, metrics.",
        epilog="Exit status: 0 success; 1 the daemon answered with an error (a reload "
        "rejected or rolled back, an unknown service; census: a socket not ours shares a "
        "listen address); 2 usage error, daemon unreachable, or "
        "no answer within --timeout; 3 status SERVICE: the service is not RUNNING or RELOADING; "
        "130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    completion.add_option(parser)
    parser.add_argument("-s", "--socket", help="control socket path")
    parser.add_argument(
        "-c", "--config", type=Path, help="read [supervisor] control_socket from this config"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    status = sub.add_parser(
        "status", help="show services and workers (exit 3: neither RUNNING nor RELOADING)"
    )
    status.add_argument("service", nargs="?", help="only this service")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    census = sub.add_parser(
        "census",
        help="list who shares each listen address: every member of its reuseport group "
        "(exit 1: one a reload would refuse)",
    )
    census.add_argument("service", nargs="?", help="only this service")
    census.add_argument("--json", action="store_true", help="print the census as JSON")
    for verb, what in (
        ("reload", "roll out a new generation from the config file (synchronous)"),
        ("restart", "roll out a new generation of the config the service runs (synchronous)"),
    ):
        rollout = sub.add_parser(verb, help=what)
        rollout.add_argument("service", nargs="?", help="only this service (default: every one)")
        rollout.add_argument(
            "--json", action="store_true", help="print the result as one JSON object"
        )
        rollout.add_argument("--reason", help="why (recorded in the daemon's log)")
        rollout.add_argument(
            "--timeout",
            type=_duration,
            metavar="DURATION",
            help=f"give up waiting after DURATION (exit 2; the {verb} goes on in the daemon)",
        )
    for verb, what in (
        ("stop", "stop a service's workers and close its listeners, until start"),
        ("start", "start a stopped service again, with the config it ran"),
    ):
        switched = sub.add_parser(verb, help=what)
        switched.add_argument("service", help="the service")
    signalled = sub.add_parser(
        "signal", help="send a signal to a service's workers (every generation's, or one)"
    )
    signalled.add_argument("service", help="the service")
    signalled.add_argument(
        "signal", type=_signal, help="a name: HUP, SIGUSR1, ... (not KILL or STOP)"
    )
    signalled.add_argument(
        "--worker", type=int, metavar="N", help="only worker N of the serving generation"
    )
    sub.add_parser("shutdown", help="stop every worker and the daemon")
    up = sub.add_parser(
        "upgrade", help="re-exec the daemon's (newly installed) code in place (synchronous)"
    )
    up.add_argument("--json", action="store_true", help="print the result as one JSON object")
    up.add_argument(
        "--timeout", type=_duration, metavar="DURATION", help="give up waiting after DURATION"
    )
    shown = sub.add_parser(
        "metrics",
        help="print the daemon's metrics (Prometheus text 0.0.4: node_exporter's textfile "
        "collector reads it)",
    )
    shown.add_argument(
        "--openmetrics", action="store_true", help="print OpenMetrics 1.0.0 text instead"
    )
    return parser


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    return get_parser().parse_args(argv)


def _print_status(reply: dict[str, Any], service: str | None, as_json: bool) -> int:
    """Print the status; EXIT_NOT_RUNNING if the named service is not serving
    (``ACTIVE_STATES``)."""
    status = Status.model_validate(reply["status"])
    if service is not None:
        status = status.model_copy(update={"services": {service: status.services[service]}})
    if as_json:
        print(json.dumps(status.model_dump(mode="json"), indent=2))
    else:
        print("\n".join(render(status)))
    if service is not None and status.services[service].state not in ACTIVE_STATES:
        return EXIT_NOT_RUNNING
    return EXIT_OK


def describe_report(report: RolloutReport) -> list[str]:
    """Readable lines for one service's rollout report."""
    name = report.service
    if report.outcome == "succeeded":
        counters = ", ".join(f"{k} {v:+d}" for k, v in report.counters.items())
        lines = [
            f"{name}: generation {report.generation} serving; generation "
            f"{report.previous} retired by {report.path} in {report.duration:.3f} s",
            f"  why: {report.path_reason} (steering: {report.steering})",
            f"  accept queue at cutover: {report.queued_at_cutover}; half-open handshakes: "
            f"{report.handshakes_at_cutover}; drained: {report.drained}; "
            f"still queued at shutdown: {report.left_at_shutdown}",
            f"  kernel: {counters}",
        ]
        if report.datagrams_left:
            lines.append(f"  datagram bytes unread at drain_timeout: {report.datagrams_left}")
        if report.drain_timed_out:
            lines.append("  drain_timeout reached before the old queues emptied")
        lines += [f"  {item}" for item in report.unmovable + report.notes]
        return lines
    if report.outcome in ("started", "stopped"):
        return [f"{name}: {report.outcome}"]
    return [f"{name}: {report.outcome}", *(f"  {r}" for r in report.reasons)]


def describe_upgrade(result: UpgradeResult) -> list[str]:
    """Readable lines for an upgrade's result."""
    adopted = result.adopted
    lines = [
        f"upgraded {result.from_version} -> {result.to_version} in place (pid {result.pid}) "
        f"in {result.duration:.3f} s",
        f"  adopted: {adopted.services} service(s), {adopted.listeners} listener(s), "
        f"{adopted.workers} worker(s); restarted: {result.restarted} worker(s)",
    ]
    lines += [f"  {problem}" for problem in result.problems]
    return lines


def _print_reload(reply: dict[str, Any]) -> None:
    for report in reports_of(reply).values():
        print("\n".join(describe_report(report)))
    for note in reply.get("notes") or []:
        print(f"note: {note}")


def _print_census(reply: dict[str, Any], service: str | None, as_json: bool) -> int:
    """Print the census; EXIT_FAILED if a group has a problem (a reload would be refused)."""
    status = Status.model_validate(reply["status"])
    services = status.services if service is None else {service: status.services[service]}
    if as_json:
        shown = {
            name: [g.model_dump(mode="json") for g in s.census] for name, s in services.items()
        }
        print(json.dumps(shown, indent=2))
    else:
        print("\n".join(render_census(status.model_copy(update={"services": services}))))
    troubled = any(group.problems for s in services.values() for group in s.census)
    return EXIT_FAILED if troubled else EXIT_OK


def run(args: argparse.Namespace) -> int:
    """Carry out one command; return the exit code."""
    path = find_socket(args.socket, args.config)
    message: dict[str, Any] = {"command": "status" if args.command == "census" else args.command}
    if args.command in ("status", "census", "reload", "restart", "signal", "stop", "start"):
        message["service"] = args.service
    if args.command in ("reload", "restart") and args.reason:
        message["reason"] = args.reason
    if args.command == "signal":
        message["signal"] = args.signal
        message["worker"] = args.worker
    if args.command == "metrics" and args.openmetrics:
        message["format"] = "openmetrics"
    as_json = bool(getattr(args, "json", False))
    limit = getattr(args, "timeout", None)
    deadline = None if limit is None else time.monotonic() + limit
    code = EXIT_FAILED
    quick = 10.0 if args.command in ("status", "census", "metrics", "shutdown", "signal") else None
    try:
        for reply in request(path, message, timeout=quick, deadline=deadline):
            kind = reply.get("type")
            if kind == "progress" and not as_json:
                print(reply.get("message", ""), flush=True)
            elif kind == "error":
                _print_error(reply, as_json)
                code = EXIT_FAILED
            elif kind == "result":
                code = _print_result(args, reply, as_json)
    except TimedOut:
        print(
            f"supervisorctl: no answer within {format_duration(limit or 0)}; the "
            f"{args.command} goes on in the daemon (see its log)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    return code


def _print_error(reply: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(reply, indent=2))
        return
    _print_reload(reply)
    print(f"error: {reply.get('error')}", file=sys.stderr)
    for reason in reply.get("reasons", []):
        print(f"  {reason}", file=sys.stderr)


def _print_result(args: argparse.Namespace, reply: dict[str, Any], as_json: bool) -> int:
    if args.command == "status":
        return _print_status(reply, args.service, as_json)
    if args.command == "census":
        return _print_census(reply, args.service, as_json)
    if args.command == "metrics":
        sys.stdout.write(str(reply.get("text", "")))
    elif as_json:
        print(json.dumps(reply, indent=2))
    elif args.command in ("reload", "restart"):
        _print_reload(reply)
    elif args.command == "signal":
        print(f"{reply.get('message')} (pids {', '.join(map(str, reply.get('pids') or []))})")
    elif args.command == "upgrade":
        print("\n".join(describe_upgrade(UpgradeResult.model_validate(reply.get("upgrade")))))
    else:
        print(reply.get("message", "ok"))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> None:
    try:
        args = _parse(argv)
        code = run(args)
    except DaemonUnreachable as exc:
        print(f"supervisorctl: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except ValidationError as exc:  # a daemon of another version: say which field
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in first["loc"]) or "answer"
        print(
            f"supervisorctl {__version__}: cannot read the daemon's answer "
            f"({where}: {first['msg']}); is the daemon another version?",
            file=sys.stderr,
        )
        code = EXIT_USAGE
    except KeyboardInterrupt:
        print("supervisorctl: interrupted (the daemon carries on)", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except BrokenPipeError:  # `supervisorctl status | head`: the reader left
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        code = EXIT_FAILED
    sys.exit(code)


if __name__ == "__main__":
    main()
