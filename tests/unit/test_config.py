"""Config loading: the demo config, and every error path with its field path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from supervisor.config.loader import load_config, parse_config
from supervisor.config.schema import Config, HealthHttp, HealthNone
from supervisor.errors import ConfigError
from supervisor.kernel.files import private_tmp
from supervisor.plan.capabilities import Capabilities, check

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = """
[services.web]
command = ["python3", "-m", "supervisor.demo"]
listen = ["127.0.0.1:8080"]
"""


def issues(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="t.toml")
    return [str(issue) for issue in info.value.issues]


def test_demo_config_loads() -> None:
    config = load_config(ROOT / "config" / "demo.toml", check_host_facts=False)
    web = config.services["web"]
    assert web.workers == 4
    assert [str(a) for a in web.listen] == ["127.0.0.1:8080"]
    assert web.health.kind == "notify"


def test_defaults() -> None:
    config = parse_config(MINIMAL)
    web = config.services["web"]
    assert (web.workers, web.backlog, web.retire, web.stop_signal) == (1, 1024, "auto", "SIGTERM")
    assert (web.stop_timeout, web.drain_timeout, web.ready_timeout) == (30.0, 30.0, 30.0)
    assert isinstance(web.health, HealthNone)
    assert web.health.settle == 0.5
    assert str(config.supervisor.control_socket) == "/run/reuseport-supervisor/control.sock"
    assert config.supervisor.control_socket_mode == 0o600
    assert (config.supervisor.log_format, config.supervisor.log_level) == ("auto", "info")


def test_health_variants_are_discriminated() -> None:
    text = MINIMAL + '[services.web.health]\nkind = "http"\npath = "/ready"\ntimeout = "2s"\n'
    health = parse_config(text).services["web"].health
    assert isinstance(health, HealthHttp)
    assert (health.path, health.timeout) == ("/ready", 2.0)


# Values a TOML file can hold that once passed validation and then crashed
# the daemon where they were used (a NaN deadline, setsockopt's C int) or
# broke a line-based name (fd-store names, STATUS=).
HOSTILE = [
    (MINIMAL + "ready_timeout = 0\n", "services.web.ready_timeout: Input should be greater than"),
    (
        MINIMAL + "ready_timeout = '1s'\n[services.web.health]\nkind = 'none'\nsettle = '2s'\n",
        "services.web: health.settle (2s) must be shorter than ready_timeout (1s)",
    ),
    (MINIMAL + "workers = 513\n", "services.web.workers: Input should be less than or equal"),
    (MINIMAL + "stop_timeout = nan\n", "services.web.stop_timeout: a duration is at most 366d"),
    (MINIMAL + "drain_timeout = inf\n", "services.web.drain_timeout: a duration is at most 366d"),
    (MINIMAL + "watch_debounce = -nan\n", "services.web.watch_debounce: a duration"),
    (MINIMAL + "ready_timeout = '" + "9" * 400 + "s'\n", "services.web.ready_timeout: a duration"),
    ("[supervisor]\ntls_warn_before = nan\n" + MINIMAL, "supervisor.tls_warn_before: a dur"),
    (
        MINIMAL + "[services.web.health]\nkind = 'tcp'\ninterval = nan\n",
        "services.web.health.interval: a duration is at most 366d",
    ),
    (
        MINIMAL + "[services.web.socket]\nrcvbuf = 2147483648\n",
        "services.web.socket.rcvbuf: Input should be less than or equal to 2147483647",
    ),
    (
        MINIMAL + "[services.web.socket]\ndefer_accept = 1e30\n",
        "services.web.socket.defer_accept: a duration is at most 366d",
    ),
    (
        MINIMAL + "[services.web.socket]\ndefer_accept = '2h'\n",
        "services.web.socket.defer_accept: Input should be less than or equal to 3600",
    ),
    (MINIMAL.replace("services.web", 'services."web\\n"'), "services: service name 'web\\n'"),
    (
        MINIMAL + "environment = { \"FOO\\n\" = '1' }\n",
        "services.web.environment: 'FOO\\n' is not a valid environment",
    ),
    (MINIMAL + 'environment = { FOO = "a\\u0000b" }\n', "services.web.environment.FOO: "),
    (MINIMAL + 'user = "www\\u0000"\n', "services.web.user: 'www\\x00' holds a NUL"),
    (
        MINIMAL + "[services.web.health]\nkind = 'http'\nhost = \"a\\r\\nX: y\"\n",
        "services.web.health.host: must be a host name",
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[services.web]\nlisten = ['127.0.0.1:1']\n", "services.web.command: required"),
        (
            MINIMAL + "workers = 0\n",
            "services.web.workers: Input should be greater than or equal to 1",
        ),
        (MINIMAL + "workers = 'four'\n", "services.web.workers: Input should be a valid integer"),
        (MINIMAL + "stop_timeout = '10 years'\n", "services.web.stop_timeout: invalid duration"),
        (
            MINIMAL + "retire = 'yolo'\n",
            "services.web.retire: Input should be 'auto', 'migrate' or 'drain'",
        ),
        (MINIMAL + "colour = 'blue'\n", "services.web.colour: unknown key"),
        (
            MINIMAL + "stop_signal = 'SIGKILL'\n",
            "services.web.stop_signal: 'SIGKILL' is not a signal",
        ),
        (
            MINIMAL + "environment = { LISTEN_FDS = '3' }\n",
            "services.web.environment: LISTEN_FDS is set by the supervisor",
        ),
        (
            MINIMAL + "environment = { 'A-B' = '1' }\n",
            "services.web.environment: 'A-B' is not a valid environment",
        ),
        (
            MINIMAL + "command = []\n".replace("command", "preflight"),
            "services.web.preflight: List should have at least 1 item",
        ),
        (
            MINIMAL + "[services.web.health]\nkind = 'magic'\n",
            "services.web.health: Input tag 'magic' found using 'kind' does not match",
        ),
        (
            MINIMAL + "[services.web.health]\nkind = 'http'\npath = 'healthz'\n",
            "services.web.health.path: must be an absolute request path",
        ),
        (
            MINIMAL + "[services.web.health]\nkind = 'exec'\n",
            "services.web.health.command: required",
        ),
        (
            MINIMAL + "[services.web.socket]\nfastopen = 0\n",
            "services.web.socket.fastopen: Input should be greater than or equal to 1",
        ),
        (
            "[services.web]\ncommand = ['x']\nlisten = []\n",
            "services.web.listen: List should have at least 1 item",
        ),
        (
            "[services.web]\ncommand = ['x']\nlisten = ['localhost:80']\n",
            "services.web.listen.0: 'localhost:80': host must be an IP",
        ),
        (
            "[services.web]\ncommand = ['x']\nlisten = ['127.0.0.1:80', '127.0.0.1:80']\n",
            "services.web.listen: 127.0.0.1:80 is listed twice",
        ),
        (
            "[services.web]\ncommand = ['']\nlisten = ['127.0.0.1:80']\n",
            "services.web.command: the program name (first element) is empty",
        ),
        ("[supervisor]\n", "services: required"),
        ("[services]\n", "services: Dictionary should have at least 1 item"),
        (
            MINIMAL.replace("services.web", 'services."bad name"'),
            "services: service name 'bad name'",
        ),
        (
            "[supervisor]\ncontrol_socket_mode = '0999'\n" + MINIMAL,
            "supervisor.control_socket_mode: '0999' is not an octal file mode",
        ),
        ("[supervisor]\nlog_level = 'loud'\n" + MINIMAL, "supervisor.log_level: Input should be"),
        (
            "[supervisor]\ncontrol_socket = '/" + "x" * 120 + "'\n" + MINIMAL,
            "supervisor.control_socket: /xxx",
        ),
        ("[services.web\n", "TOML syntax"),
        *HOSTILE,
    ],
)
def test_each_error_names_its_field(text: str, expected: str) -> None:
    found = issues(text)
    assert any(expected in issue for issue in found), found


def test_every_error_is_listed_at_once() -> None:
    found = issues(MINIMAL + "workers = 0\nbacklog = -1\nretire = 'x'\nfoo = 1\n")
    fields = sorted(issue.split(":")[0] for issue in found)
    assert fields == [
        "services.web.backlog",
        "services.web.foo",
        "services.web.retire",
        "services.web.workers",
    ]


def test_an_address_belongs_to_one_service() -> None:
    text = MINIMAL + MINIMAL.replace("services.web", "services.api")
    assert any("127.0.0.1:8080 is already used by services.web" in i for i in issues(text))


def test_octal_mode_in_either_spelling() -> None:
    assert (
        parse_config(
            "[supervisor]\ncontrol_socket_mode = '0660'\n" + MINIMAL
        ).supervisor.control_socket_mode
        == 0o660
    )
    assert (
        parse_config(
            "[supervisor]\ncontrol_socket_mode = 0o640\n" + MINIMAL
        ).supervisor.control_socket_mode
        == 0o640
    )


def test_relative_paths_resolve_against_the_config_dir(tmp_path: Path) -> None:
    (tmp_path / "www").mkdir()
    path = tmp_path / "s.toml"
    path.write_text(
        "[supervisor]\ncontrol_socket = 'run/ctl.sock'\n"
        + MINIMAL.replace("python3", sys.executable)
        + "working_directory = 'www'\n"
    )
    config = load_config(path)
    assert config.supervisor.control_socket == tmp_path / "run" / "ctl.sock"
    assert config.services["web"].working_directory == tmp_path / "www"


def test_host_checks(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        "[services.web]\ncommand = ['no-such-program-here']\nlisten = ['127.0.0.1:1']\n"
        "user = 'no-such-user-here'\ngroup = 'no-such-group-here'\n"
        "working_directory = 'missing'\npreflight = ['./not-executable']\n"
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "services.web.command: 'no-such-program-here' was not found on PATH" in text
    assert "services.web.user: no such user 'no-such-user-here'" in text
    assert "services.web.group: no such group 'no-such-group-here'" in text
    assert f"services.web.working_directory: {tmp_path / 'missing'} is not a directory" in text
    assert "services.web.preflight: ./not-executable is not an executable file" in text
    assert text.startswith(f"{path}: ")


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"cannot read .*absent.toml: No such file or directory"):
        load_config(tmp_path / "absent.toml")


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "supervisor.daemon", "--check", "-c", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_prints_the_plan(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text(
        MINIMAL.replace("python3", sys.executable).replace("-m", "{worker}/{generation}")
        + "workers = 2\n"
    )
    done = run_check(path)
    assert done.returncode == 0, done.stderr
    assert f"{path}: OK" in done.stdout
    assert "service web: generation 1, 2 worker(s), retire=auto" in done.stdout
    assert "'0/1'" in done.stdout and "'1/1'" in done.stdout
    assert "fd 3=127.0.0.1:8080" in done.stdout


def test_check_exits_2_with_every_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(MINIMAL + "workers = 0\nstop_timeout = 'soon'\n")
    done = run_check(path)
    assert done.returncode == 2
    assert f"{path}: services.web.workers:" in done.stderr
    assert f"{path}: services.web.stop_timeout:" in done.stderr


@pytest.mark.parametrize(("text", "expected"), HOSTILE)
def test_check_refuses_hostile_values_with_exit_2(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "hostile.toml"
    path.write_text(text.replace("python3", sys.executable))
    done = run_check(path)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert f"{path}: {expected}" in done.stderr


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.toml")), ids=lambda p: p.name)
def test_every_example_config_loads(path: Path) -> None:
    config = load_config(path, check_host_facts=False)
    assert config.services
    for service in config.services.values():
        if service.working_directory is not None:
            assert service.working_directory.is_dir(), service.working_directory


@pytest.mark.parametrize("path", sorted((ROOT / "config").glob("*.toml")), ids=lambda p: p.name)
def test_the_running_config_survives_its_json(path: Path) -> None:
    # What systemd's fd store keeps across a restart (supervisor-config): a
    # restart whose file is broken runs this instead.
    config = load_config(path, check_host_facts=False)
    assert Config.model_validate_json(config.model_dump_json()) == config


PRIVATE_TMP_MOUNTINFO = """\
27 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 27 8:1 /tmp/systemd-private-5f1c-reuseport-supervisor.service-Ab/tmp /tmp rw - ext4 /dev/sda1
41 27 0:30 / /run rw,nosuid - tmpfs tmpfs rw
42 41 0:30 /x /run/my\\040app rw - tmpfs tmpfs rw
"""


def test_a_private_tmp_is_told_from_the_mount_it_is_on() -> None:
    assert private_tmp(Path("/tmp"), PRIVATE_TMP_MOUNTINFO)
    assert private_tmp(Path("/tmp/sub"), PRIVATE_TMP_MOUNTINFO)
    assert not private_tmp(Path("/run/reuseport-supervisor"), PRIVATE_TMP_MOUNTINFO)
    assert not private_tmp(Path("/tmpfoo"), PRIVATE_TMP_MOUNTINFO)
    assert not private_tmp(Path("/run/my app"), PRIVATE_TMP_MOUNTINFO), "a bind, not systemd's"
    assert not private_tmp(Path("/tmp"), "27 1 8:1 / / rw - ext4 /dev/sda1 rw\n")
    tmpfs = (
        "27 1 8:1 / / rw - ext4 /dev/sda1\n30 27 0:40 /systemd-private-9-x/tmp /tmp rw - tmpfs\n"
    )
    assert private_tmp(Path("/tmp"), tmpfs), "a /tmp of its own filesystem"


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        ('listen = ["udp://127.0.0.1:8080"]', "adopts TCP listeners only"),
        ('command = ["gunicorn", "--bind", "fd://{fd}"]', "{fd} has no meaning"),
        ("socket = { fastopen = 16 }", "the worker sets its own socket options"),
    ],
)
def test_own_listen_mode_refuses_what_has_no_meaning_for_it(extra: str, why: str) -> None:
    text = '[services.web]\nlisten_mode = "own"\n' + extra + "\n"
    if "command" not in extra:
        text += 'command = ["nginx"]\n'
    if "listen" not in extra:
        text += 'listen = ["127.0.0.1:8080"]\n'
    found = issues(text)
    assert any(why in issue for issue in found), found


def test_own_listen_mode_needs_ebpf_steering_and_says_why() -> None:
    config = parse_config(MINIMAL + 'listen_mode = "own"\n')
    assert config.services["web"].listen_mode == "own"
    plan_default = parse_config(MINIMAL).services["web"]
    assert plan_default.listen_mode == "pass"
    cbpf = Capabilities(migrate_req=0, cbpf=True, ebpf=False)
    (issue,) = list(check(config, cbpf))
    assert issue.location == "services.web.listen_mode"
    assert '"own" needs eBPF steering' in issue.message
    assert "classic BPF selects by index" in issue.message
    ebpf = Capabilities(migrate_req=0, cbpf=True, ebpf=True)
    assert list(check(config, ebpf)) == []
