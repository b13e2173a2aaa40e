"""supervisorctl: it judges no config, never locks the operator out, and keeps
the conventions a command line is expected to keep.

This file: the parts that need no root and no running daemon; the rest is in
tests/system/test_client.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from supervisor import __version__
from supervisor.config.schema import DEFAULT_CONTROL_SOCKET
from supervisor.control import ctl
from supervisor.daemon import manpage

CTL = [sys.executable, "-m", "supervisor.control.ctl"]


def supervisorctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CTL, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('[supervisor]\ncontrol_socket = "/run/x.sock"\n', "/run/x.sock"),
        # a TOML error elsewhere: the key is found line by line
        ('[supervisor]\ncontrol_socket = "/run/x.sock"  # ours\n[services.web\n', "/run/x.sock"),
        ("[supervisor]\ncontrol_socket = 'rel/x.sock'\n", "{dir}/rel/x.sock"),
        # a bad field is not the client's business
        (
            '[supervisor]\ncontrol_socket = "/run/x.sock"\n[services.web]\nworkers = "x"\n',
            "/run/x.sock",
        ),
        ("[services.web]\ncommand = ['x']\n", str(DEFAULT_CONTROL_SOCKET)),  # not set: default
        ('[other]\ncontrol_socket = "/nope"\n[broken\n', str(DEFAULT_CONTROL_SOCKET)),
    ],
)
def test_the_client_reads_only_control_socket(
    tmp_path: Path, text: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "s.toml"
    config.write_text(text)
    found = ctl.find_socket(None, config)
    assert str(found) == expected.format(dir=tmp_path.resolve())
    assert capsys.readouterr().err == "", "a file that can be read needs no note"


@pytest.mark.parametrize(
    ("text", "note"),
    [
        (None, "cannot read"),
        ("[supervisor]\ncontrol_socket = 5\n", "control_socket is not a string"),
    ],
)
def test_a_key_that_cannot_be_read_falls_back_to_the_default_and_says_so(
    tmp_path: Path, text: str | None, note: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "s.toml"
    if text is not None:
        config.write_text(text)
    assert ctl.find_socket(None, config) == DEFAULT_CONTROL_SOCKET
    err = capsys.readouterr().err
    assert note in err and f"using {DEFAULT_CONTROL_SOCKET}" in err


def test_version_and_bad_durations() -> None:
    version = supervisorctl("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"supervisorctl {__version__}"
    bad = supervisorctl("-s", "/nonexistent", "reload", "--timeout", "soon")
    assert bad.returncode == 2
    assert "invalid duration 'soon'" in bad.stderr and "Traceback" not in bad.stderr


def test_ctrl_c_exits_130_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def interrupted(args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(ctl, "run", interrupted)
    with pytest.raises(SystemExit) as exited:
        ctl.main(["-s", "/nonexistent", "status"])
    assert exited.value.code == 130
    assert capsys.readouterr().err == "supervisorctl: interrupted (the daemon carries on)\n"


def test_the_man_pages_are_made_from_the_parsers() -> None:
    """docs/man holds what `make man` makes now: regenerate after changing an option."""
    committed = Path(__file__).resolve().parents[2] / "docs" / "man"
    for name, text in manpage.pages().items():
        assert (committed / name).read_text() == text, f"docs/man/{name} is stale: make man"
    ctl_page = manpage.pages()["supervisorctl.1"]
    for command in ("status", "reload", "upgrade", "shutdown", "metrics", "--timeout"):
        assert command.replace("-", "\\-") in ctl_page


@pytest.mark.parametrize("program", ["supervisorctl", "supervisord"])
@pytest.mark.parametrize("shell", ["bash", "zsh"])
def test_shell_completions_come_from_the_parsers(program: str, shell: str) -> None:
    module = {"supervisorctl": "supervisor.control.ctl", "supervisord": "supervisor.daemon"}[
        program
    ]
    done = subprocess.run(
        [sys.executable, "-m", module, "--print-completion", shell],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert program in done.stdout
    if program == "supervisorctl":
        assert all(word in done.stdout for word in ("status", "reload", "upgrade", "--timeout"))
