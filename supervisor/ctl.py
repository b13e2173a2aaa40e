"""``supervisorctl``: a small synchronous client of the control socket.

Exit codes: 0 success; 1 the daemon answered with an error (reload
rejected or rolled back, unknown service); 2 usage error or daemon
unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from supervisor.config import DEFAULT_CONTROL_SOCKET
from supervisor.errors import ConfigError, DaemonUnreachable
from supervisor.loader import load_config
from supervisor.status import Status, render

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def find_socket(explicit: str | None, config: Path | None) -> Path:
    """``-s``, then ``$SUPERVISOR_SOCKET``, then ``-c FILE``'s control_socket, then the default.

    Raises:
        ConfigError: ``-c`` names a file that cannot be read or is invalid.
    """
    if explicit:
        return Path(explicit)
    from_env = os.environ.get("SUPERVISOR_SOCKET")
    if from_env:
        return Path(from_env)
    if config is not None:
        return load_config(config, check_host_facts=False).supervisor.control_socket
    return DEFAULT_CONTROL_SOCKET


def request(path: Path, message: dict[str, Any], timeout: float | None) -> Iterator[dict[str, Any]]:
    """Send one request; yield each response line as it arrives.

    Raises:
        DaemonUnreachable: connect failed, or the daemon hung up without a result.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(5.0)
        try:
            sock.connect(str(path))
        except OSError as exc:
            raise DaemonUnreachable(str(path), exc.strerror or str(exc)) from exc
        sock.settimeout(timeout)
        sock.sendall(json.dumps(message).encode() + b"\n")
        with sock.makefile("rb") as lines:
            for raw in lines:
                reply: dict[str, Any] = json.loads(raw)
                yield reply
                if reply.get("type") in ("result", "error"):
                    return
        raise DaemonUnreachable(str(path), "the daemon closed the connection without an answer")
    except (TimeoutError, ConnectionError) as exc:
        raise DaemonUnreachable(str(path), str(exc) or type(exc).__name__) from exc
    finally:
        sock.close()


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="supervisorctl", description="Control supervisord.")
    parser.add_argument("-s", "--socket", help="control socket path")
    parser.add_argument("-c", "--config", type=Path, help="read control_socket from this config")
    sub = parser.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="show services and workers")
    status.add_argument("service", nargs="?")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    reload = sub.add_parser("reload", help="roll out a new generation (synchronous)")
    reload.add_argument("service", nargs="?")
    reload.add_argument("--json", action="store_true", help="print the result as one JSON object")
    reload.add_argument("--reason", help="why (recorded in the daemon's log)")
    sub.add_parser("shutdown", help="stop every worker and the daemon")
    up = sub.add_parser(
        "upgrade", help="re-exec the daemon's (newly installed) code in place (synchronous)"
    )
    up.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser.parse_args(argv)


def _print_status(reply: dict[str, Any], service: str | None, as_json: bool) -> None:
    status = Status.model_validate(reply["status"])
    if service is not None:
        status = status.model_copy(update={"services": {service: status.services[service]}})
    if as_json:
        print(json.dumps(status.model_dump(mode="json"), indent=2))
    else:
        print("\n".join(render(status)))


def describe_report(name: str, report: dict[str, Any]) -> list[str]:
    """Readable lines for one service's rollout report."""
    outcome = report.get("outcome")
    if outcome == "succeeded":
        counters = ", ".join(f"{k} {v:+d}" for k, v in (report.get("counters") or {}).items())
        lines = [
            f"{name}: generation {report['generation']} serving; generation "
            f"{report['previous']} retired by {report['path']} in {report['duration']:.3f} s",
            f"  why: {report.get('path_reason')} (steering: {report.get('steering')})",
            f"  accept queue at cutover: {report['queued_at_cutover']}; half-open handshakes: "
            f"{report.get('handshakes_at_cutover')}; drained: {report.get('drained')}; "
            f"still queued at shutdown: {report['left_at_shutdown']}",
            f"  kernel: {counters}",
        ]
        if report.get("datagrams_left"):
            lines.append(f"  datagram bytes unread at drain_timeout: {report['datagrams_left']}")
        if report.get("drain_timed_out"):
            lines.append("  drain_timeout reached before the old queues emptied")
        lines += [
            f"  {item}" for item in (report.get("unmovable") or []) + (report.get("notes") or [])
        ]
        return lines
    if outcome in ("started", "stopped"):
        return [f"{name}: {outcome}"]
    return [f"{name}: {outcome}", *(f"  {r}" for r in report.get("reasons") or [])]


def describe_upgrade(result: dict[str, Any]) -> list[str]:
    """Readable lines for an upgrade's result."""
    adopted = result.get("adopted") or {}
    lines = [
        f"upgraded {result.get('from')} -> {result.get('to')} in place (pid {result.get('pid')}) "
        f"in {result.get('duration', 0):.3f} s",
        f"  adopted: {adopted.get('services', 0)} service(s), {adopted.get('listeners', 0)} "
        f"listener(s), {adopted.get('workers', 0)} worker(s); restarted: "
        f"{result.get('restarted', 0)} worker(s)",
    ]
    lines += [f"  {problem}" for problem in result.get("problems") or []]
    return lines


def _print_reload(reply: dict[str, Any]) -> None:
    for name, report in (reply.get("services") or {}).items():
        print("\n".join(describe_report(name, report)))
    for note in reply.get("notes") or []:
        print(f"note: {note}")


def run(args: argparse.Namespace) -> int:
    """Carry out one command; return the exit code."""
    path = find_socket(args.socket, args.config)
    message: dict[str, Any] = {"command": args.command}
    if args.command in ("status", "reload"):
        message["service"] = args.service
    if args.command == "reload" and args.reason:
        message["reason"] = args.reason
    as_json = bool(getattr(args, "json", False))
    code = EXIT_FAILED
    for reply in request(path, message, timeout=None if args.command != "status" else 10.0):
        kind = reply.get("type")
        if kind == "progress" and not as_json:
            print(reply.get("message", ""), flush=True)
        elif kind == "error":
            _print_error(reply, as_json)
            code = EXIT_FAILED
        elif kind == "result":
            _print_result(args, reply, as_json)
            code = EXIT_OK
    return code


def _print_error(reply: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(reply, indent=2))
        return
    _print_reload(reply)
    print(f"error: {reply.get('error')}", file=sys.stderr)
    for reason in reply.get("reasons", []):
        print(f"  {reason}", file=sys.stderr)


def _print_result(args: argparse.Namespace, reply: dict[str, Any], as_json: bool) -> None:
    if args.command == "status":
        _print_status(reply, args.service, as_json)
    elif as_json:
        print(json.dumps(reply, indent=2))
    elif args.command == "reload":
        _print_reload(reply)
    elif args.command == "upgrade":
        print("\n".join(describe_upgrade(reply.get("upgrade") or {})))
    else:
        print(reply.get("message", "ok"))


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse(argv)
    try:
        code = run(args)
    except DaemonUnreachable as exc:
        print(f"supervisorctl: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    except ConfigError as exc:
        print(f"supervisorctl: {exc}", file=sys.stderr)
        code = EXIT_USAGE
    sys.exit(code)


if __name__ == "__main__":
    main()
