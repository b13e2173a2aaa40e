"""What is installed is what was tested: the declared dependency floors are
the ones CI tests (``make test-lowest``), and the wheel carries what a host
needs and runs its demo from any path.

This file: the parts with real processes; the rest is in
tests/unit/test_packaging.py.
"""

from __future__ import annotations

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.support.harness import free_port, wait_until
from tests.support.installed import demo_answers, demo_config

ROOT = Path(__file__).resolve().parents[2]


def _run(*argv: str | Path, env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=600, env=env, check=False
    )
    assert done.returncode == 0, f"{argv}: {done.stdout}{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install`` of the wheel into a fresh venv.

    The tests run in a network namespace of their own: the wheel is built
    without build isolation and installed without its dependencies, which
    the fresh venv then finds in this one's site-packages (a path line in a
    .pth file: this venv's own install of the package is not activated).
    ``make test-lowest`` resolves the dependencies from PyPI."""
    tmp_path = tmp_path_factory.mktemp("wheel")
    dist = tmp_path / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", dist, ROOT)  # fmt: skip
    (wheel,) = dist.glob("reuseport_supervisor-*.whl")
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    _run(sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q",
         "--no-deps", wheel)  # fmt: skip
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv


@pytest.mark.slow
def test_the_wheel_ships_what_a_host_needs_and_its_demo_serves_from_any_path(
    venv: Path, tmp_path: Path
) -> None:
    """With nothing on PATH but the venv's bin, the shipped demo config
    starts and serves."""
    share = venv / "share"
    for shipped in (
        "reuseport-supervisor/systemd/reuseport-supervisor.service",
        "reuseport-supervisor/systemd/sysctl.d/60-reuseport-supervisor-migrate.conf",
        "reuseport-supervisor/config/nginx/nginx.conf",
        "reuseport-supervisor/config/grafana-dashboard.json",
        "man/man8/supervisord.8",
        "man/man1/supervisorctl.1",
    ):
        assert (share / shipped).is_file(), shipped
    port = free_port()
    config, control = demo_config(share, tmp_path, port)
    # Only the venv's bin; then only the system's, whose python3 lacks the
    # package (the daemon linked into /usr/local/bin, the unit's PATH): the
    # demo's {python} is the daemon's own interpreter either way.
    for path in (str(venv / "bin"), "/usr/bin:/bin"):
        env = {"PATH": path}
        daemon = subprocess.Popen(
            [venv / "bin" / "reuseport-supervisord", "-c", config],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_until(lambda: demo_answers(port), 60, f"the demo to serve with PATH={path}")
            ctl = venv / "bin" / "reuseport-supervisorctl"
            assert "web: RUNNING" in _run(ctl, "-s", control, "status", env=env)
            _run(venv / "bin" / "supervisorctl", "-s", control, "shutdown", env=env)
            assert daemon.wait(60) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait(10)


# bash-completion's loader, asked for each command as bash asks when TAB is
# pressed after it; then the function it registered, called as bash calls it.
_BASH_COMPLETE = r"""
. /usr/share/bash-completion/bash_completion
for pair in "$@"; do
    cmd=${pair%%=*} word=${pair#*=}
    __load_completion "$cmd" || { echo "$cmd: nothing loaded"; continue; }
    read -r -a spec <<< "$(complete -p "$cmd")"
    COMP_WORDS=("$cmd" "$word") COMP_CWORD=1 COMP_LINE="$cmd $word" COMPREPLY=()
    COMP_POINT=${#COMP_LINE}
    "${spec[-2]}" "$cmd" "$word" "$cmd"
    echo "$cmd: ${COMPREPLY[*]}"
done
"""


# zsh's compinit reads the #compdef lines on fpath; the function, run the
# way compinit runs it, defines shtab's and binds it to the command.
_ZSH_COMPLETE = r"""
fpath=("$1" $fpath)
autoload -Uz compinit && compinit -u -d "$2/zcompdump"
for cmd in reuseport-supervisorctl reuseport-supervisord; do
    echo "$cmd: $_comps[$cmd]"
    "$_comps[$cmd]" 2>/dev/null   # _arguments outside a completion: only its definitions stand
    echo "$cmd: bound to $_comps[$cmd], $(whence -w _shtab_${cmd#reuseport-})"
done
"""


@pytest.mark.slow
def test_the_shipped_completions_complete_every_command_name(venv: Path, tmp_path: Path) -> None:
    """bash-completion finds the shipped files under XDG_DATA_DIRS by the
    command's name, for both names of both commands, and completes; zsh's
    compinit binds the reuseport- names."""
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "XDG_DATA_DIRS": str(venv / "share"),
        "HOME": str(tmp_path),
    }
    pairs = [
        *(f"{name}=re" for name in ("supervisorctl", "reuseport-supervisorctl")),
        *(f"{name}=--ch" for name in ("supervisord", "reuseport-supervisord")),
        "no-such-command=x",  # the control: what the loader says when nothing is shipped
    ]
    lines = _run("bash", "-c", _BASH_COMPLETE, "bash", *pairs, env=env).splitlines()
    assert lines == [
        "supervisorctl: reload restart",
        "reuseport-supervisorctl: reload restart",
        "supervisord: --check",
        "reuseport-supervisord: --check",
        "no-such-command: nothing loaded",
    ]
    site = venv / "share" / "zsh" / "site-functions"
    zsh = _run("zsh", "-f", "-c", _ZSH_COMPLETE, "zsh", site, tmp_path, env=env).splitlines()
    assert zsh == [
        "reuseport-supervisorctl: _reuseport-supervisorctl",
        "reuseport-supervisorctl: bound to _shtab_supervisorctl, _shtab_supervisorctl: function",
        "reuseport-supervisord: _reuseport-supervisord",
        "reuseport-supervisord: bound to _shtab_supervisord, _shtab_supervisord: function",
    ]
