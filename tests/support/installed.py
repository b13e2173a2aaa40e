"""The shipped demo config, run from an install of the package (a wheel in a
venv: tests/system/test_packaging.py; pipx: tests/support/pipx_route.py).
Standard library only: pipx_route.py runs it as a script."""

from __future__ import annotations

import urllib.request
from pathlib import Path


def demo_config(share: Path, work: Path, port: int) -> tuple[Path, Path]:
    """The install's ``share/reuseport-supervisor/config/demo.toml`` written
    to ``work``, its listener on ``port`` and its control socket in ``work``:
    (the config, the control socket)."""
    control = work / "control.sock"
    demo = (share / "reuseport-supervisor" / "config" / "demo.toml").read_text()
    config = work / "demo.toml"
    config.write_text(
        demo.replace("127.0.0.1:8080", f"127.0.0.1:{port}").replace(
            "/tmp/supervisor-demo.sock", str(control)
        )
    )
    return config, control


def demo_answers(port: int) -> bool:
    """A demo worker answers on ``port`` (its reply names its pid)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
            return b"pid=" in answer.read()
    except OSError:
        return False
