"""A worker that starts in milliseconds, for the soak, the scale section and
the compare row that shows the spike left without a slow start.

Standard library only, run with ``python -I -S``: the soak measures the
supervisor across many reloads, and the demo worker's 0.3 s start would
make 1,000 of them take most of the benchmark's time. It serves the
inherited listener (fd 3), one request per connection, says READY=1 on
``NOTIFY_SOCKET``, and on SIGTERM finishes the connection in hand and
exits; ``EINVAL`` from accept (the supervisor shut the listener) also ends it.
"""

import contextlib
import errno
import os
import signal
import socket

stopping = False


def stop(_signum: int, _frame: object) -> None:
    global stopping  # noqa: PLW0603
    stopping = True


def notify_ready() -> None:
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"READY=1", "\0" + address[1:] if address[0] == "@" else address)


def serve(conn: socket.socket, answer: bytes) -> None:
    conn.settimeout(5)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(4096)
        if not chunk:
            return
        data += chunk
    conn.sendall(answer)


def main() -> None:
    signal.signal(signal.SIGTERM, stop)
    listener = socket.socket(fileno=3)
    listener.settimeout(0.1)
    body = f"service=web pid={os.getpid()}\n".encode()
    answer = (
        f"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body
    notify_ready()
    while not stopping:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            continue
        except OSError as exc:
            if exc.errno == errno.EINVAL:  # shut down by the supervisor: retired
                break
            raise
        with conn, contextlib.suppress(OSError):
            serve(conn, answer)


if __name__ == "__main__":
    main()
