"""The project's own unit under real systemd 252, booted in a private namespace.

The unit from ``systemd/`` is installed with its paths rewritten for the
test (the venv's commands, a config under the namespace's directory) and a
drop-in that gives it ``DefaultDependencies=no`` and a log file. systemctl
drives it: start, reload (synchronous ``ExecReload``), restart, ``kill -s
KILL``, the watchdog, stop. The load runs inside systemd's network
namespace. A crash or a restart must refuse or reset no connection at
connect: the listeners wait in systemd's fd store, and the next daemon
serves what queued on them. Only requests the killed workers had already
accepted may fail; they are counted.
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.certs import issue, write_pair
from tests.support.harness import smuggling_worker, wait_until
from tests.support.load import Load
from tests.support.systemd_ns import UNIT, SystemdNamespace, available, install_supervisor
from tests.support.systemd_unit import PORT, VENV_BIN, Unit, at_connect, booted, config_text, report

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.slow,
    pytest.mark.skipif(available() is not None, reason=f"real systemd: {available()}"),
]


@pytest.fixture
def unit() -> Iterator[Unit]:
    with booted(config_text()) as started:
        started.ctl("start", UNIT)
        yield started


def test_start_reload_failed_reload_and_stop(unit: Unit) -> None:
    status = unit.ns.show(UNIT, "StatusText", "MainPID", "Type", "NotifyAccess")
    assert status["Type"] == "notify"
    assert status["StatusText"] == "web generation 1 RUNNING"
    pid = unit.main_pid()
    with unit.load() as load:
        wait_until(load.answered, 15, "the load to be answered")
        unit.ctl("reload", UNIT)  # ExecReload: waits for the rollout's result
        after = unit.ns.show(UNIT, "StatusText")["StatusText"]
        unit.config.write_text(config_text().replace("workers = 4", "workers = 0"))
        failed = unit.ctl("reload", UNIT, check=False)
        unit.config.write_text(config_text())
    assert after.startswith("web generation 2 RUNNING; last reload succeeded")
    # The store holds the serving generation's listeners only (the retired
    # ones were removed with FDSTOREREMOVE, the rolled-back candidate's never
    # kept), and one running config (each reload's replaced the one before).
    assert unit.ns.show(UNIT, "NFileDescriptorStore")["NFileDescriptorStore"] == "5"
    assert failed.returncode != 0, "a rejected reload fails systemctl reload"
    assert "generation 2 RUNNING" in unit.ns.show(UNIT, "StatusText")["StatusText"]
    assert unit.main_pid() == pid
    report("reloads", load.result)
    assert load.result.failed == 0, (load.result.failures, load.result.examples)
    unit.ctl("stop", UNIT)
    assert unit.ns.show(UNIT, "ActiveState")["ActiveState"] == "inactive"
    assert unit.events("daemon_stopped"), "a clean stop"
    unit.ctl("start", UNIT)
    assert unit.events("fd_store_received") == [], "stop then start empties the store"


@pytest.mark.parametrize("how", ["kill -9", "restart"])
def test_a_crash_or_a_restart_refuses_no_connection(unit: Unit, how: str) -> None:
    unit.ctl("reload", UNIT)  # the store follows reloads: generation 2's listeners survive
    first = unit.main_pid()
    cookies = {w["cookie"] for w in _listeners(unit)}
    with unit.load() as load:
        wait_until(load.answered, 15, "the load to be answered")
        before = load.result.ok
        if how == "kill -9":
            unit.ctl("kill", "-s", "KILL", UNIT)  # the daemon and its workers
        else:
            unit.ctl("restart", UNIT)
        unit.restarted_from(first)
        unit.wait(lambda: _served_by_new_workers(unit, load), 30, "the new workers to serve", load)
        time.sleep(1)
    result = load.result
    report(how, result)
    inherited = unit.events("service_inherited")[-1]
    assert inherited["listeners"] == 4 and inherited["problems"] == [], inherited
    assert {w["cookie"] for w in _listeners(unit)} == cookies, "the very same listeners"
    assert at_connect(result) == 0, (result.at_connect, result.examples)
    assert result.ok > before
    if how == "restart":  # graceful: the old workers finished what they had accepted
        assert result.failed == 0, (result.failures, result.examples)
    else:  # only what the killed workers had accepted (at most one each) may fail
        assert set(result.failures) <= {"reset", "short"}, result.failures
        assert result.failed <= 4, result.failures


def test_a_hung_daemon_is_restarted_by_the_watchdog_and_loses_nothing_queued(
    unit: Unit,
) -> None:
    dropin = "[Service]\nWatchdogSec=2s\nTimeoutAbortSec=1s\n"
    (unit.ns.units / f"{UNIT}.d" / "watchdog.conf").write_text(dropin)
    unit.ctl("daemon-reload")
    unit.ctl("restart", UNIT)
    first = unit.main_pid()
    time.sleep(5)
    assert unit.main_pid() == first, "a live daemon feeds the watchdog"
    restarts = int(unit.ns.show(UNIT, "NRestarts")["NRestarts"])
    with unit.load() as load:
        wait_until(load.answered, 15, "the load to be answered")
        os.kill(first, signal.SIGSTOP)  # hung: no more WATCHDOG=1
        unit.restarted_from(first)
        unit.wait(lambda: _served_by_new_workers(unit, load), 30, "the new workers to serve", load)
    result = load.result
    report("watchdog", result)
    # Nothing but the watchdog could restart it: it was stopped, not told anything.
    assert int(unit.ns.show(UNIT, "NRestarts")["NRestarts"]) == restarts + 1
    assert at_connect(result) == 0, (result.at_connect, result.examples)
    assert result.failed <= 4, result.failures


def test_an_upgrade_under_systemd_keeps_the_main_pid(unit: Unit) -> None:
    pid = unit.main_pid()
    with unit.load() as load:
        wait_until(load.answered, 15, "the load to be answered")
        done = unit.supervisorctl("upgrade")
        unit.ctl("reload", UNIT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "restarted: 0 worker(s)" in done.stdout
    assert unit.main_pid() == pid, "MAINPID is unchanged"
    assert unit.ns.show(UNIT, "ActiveState")["ActiveState"] == "active"
    assert load.result.failed == 0, (load.result.failures, load.result.examples)


def test_a_config_changed_while_down_starts_like_a_reload(unit: Unit) -> None:
    """New listeners first, then the stored ones nobody takes are retired by migration."""
    first = unit.main_pid()
    failure: AssertionError | None = None
    with unit.load() as load:
        wait_until(load.answered, 15, "the load to be answered")
        unit.config.write_text(
            config_text(workers=2, listen=(f"127.0.0.1:{PORT}", "127.0.0.1:8081"))
        )
        unit.ctl("kill", "-s", "KILL", UNIT)
        unit.restarted_from(first)
        try:
            unit.wait(
                lambda: _served_by_new_workers(unit, load), 30, "the new workers to serve", load
            )
        except AssertionError as exc:
            failure = exc
    if failure is not None:  # what the load met, once it has stopped and counted
        result = load.result
        raise AssertionError(
            f"{failure}\nload: {result.ok} ok, failures {dict(result.failures)}, at connect "
            f"{dict(result.at_connect)}, examples {result.examples}"
        ) from None
    inherited = unit.events("service_inherited")[-1]
    assert inherited["listeners"] == 2, inherited
    assert len(inherited["retired"]) == 2, inherited
    listeners = _listeners(unit)
    assert {w["address"] for w in listeners} == {f"127.0.0.1:{PORT}", "127.0.0.1:8081"}
    assert at_connect(load.result) == 0, (load.result.at_connect, load.result.examples)


def test_a_restart_with_a_broken_file_serves_the_last_good_config(unit: Unit) -> None:
    # A typo and `systemctl restart`: the daemon once exited 2, the unit
    # stopped (RestartPreventExitStatus=2) and released the fd store, every
    # queued connection reset and the service down until someone fixed it.
    first = unit.main_pid()
    cookies = {w["cookie"] for w in _listeners(unit)}
    with unit.load() as load:
        wait_until(load.answered, 15, "the load to be answered")
        unit.config.write_text(config_text().replace("workers = 4", "workers = 'four'"))
        unit.ctl("restart", UNIT, check=False)
        unit.restarted_from(first)
        unit.wait(lambda: _served_by_new_workers(unit, load), 30, "the new workers to serve", load)
        status = unit.ns.show(UNIT, "StatusText")["StatusText"]
        taken = {w["cookie"] for w in _listeners(unit)}
        unit.config.write_text(config_text())
        fixed = unit.ctl("reload", UNIT, check=False)
    result = load.result
    report("restart with a broken file", result)
    assert "running the last good config, the file was refused" in status, status
    assert "services.web.workers" in status
    assert unit.events("config_file_refused"), "the log says so"
    assert taken == cookies, "the very same listeners, from the store"
    assert at_connect(result) == 0, (result.at_connect, result.examples)
    assert result.failed == 0, (result.failures, result.examples)
    assert fixed.returncode == 0, fixed.stderr
    assert "refused" not in unit.ns.show(UNIT, "StatusText")["StatusText"]


def test_a_crash_during_a_rollout_on_a_drain_host_resets_nothing() -> None:
    # Classic BPF and tcp_migrate_req=0 (the namespace's own): nothing migrates.
    # Killed while the candidate starts, the daemon's successor once took the
    # candidate's empty standby listeners and shut down the serving ones with
    # every connection queued during the outage (40 of 40 reset in the audit),
    # and logged that they had moved.
    drain = 'retire = "drain"'
    text = config_text(supervisor='steering = "cbpf"', service=drain)
    with booted(text) as unit:
        unit.ctl("start", UNIT)
        first = unit.main_pid()
        slow = text.replace('"--work", "0.002"]', '"--work", "0.002", "--delay", "4"]')
        assert slow != text
        with unit.load() as load:
            wait_until(load.answered, 15, "the load to be answered")
            unit.config.write_text(slow)
            reloading = subprocess.Popen(
                [*unit.ns.enter(), str(VENV_BIN / "supervisorctl"), "reload"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
            unit.wait(lambda: len(unit.events("worker_spawned")) >= 8, 30, "the candidate")
            unit.ctl("kill", "-s", "KILL", UNIT)
            reloading.wait(30)
            unit.restarted_from(first)
            unit.wait(
                lambda: _served_by_new_workers(unit, load), 30, "the new workers to serve", load
            )
        result = load.result
        report("crash mid-rollout, drain host", result)
        retired = unit.events("inherited_listener_retired")
        assert retired, "the candidate's listeners were retired"
        assert not any(e["moved"] for e in retired), "nothing migrates here: none moved"
        assert at_connect(result) == 0, (result.at_connect, result.examples)
        # Only what the killed workers had accepted (at most one each) may fail.
        assert result.failed <= 4, (result.failures, result.examples)


SMUGGLER = smuggling_worker(f"web/tcp-127.0.0.1-{PORT}/g1/w0")  # a serving listener's name


def test_a_worker_cannot_command_systemd_through_a_failed_reload(unit: Unit) -> None:
    before = unit.ns.show(UNIT, "MainPID", "NFileDescriptorStore", "NRestarts")
    demo = next(line for line in config_text().splitlines() if line.startswith("command = "))
    hostile = (
        config_text(workers=1)
        .replace(demo, f'command = {json.dumps(["python3", "-c", SMUGGLER])}\nready_timeout = "2s"')
        .replace('kind = "notify"', 'kind = "http"\ninterval = "100ms"')
    )
    assert "WATCHDOG" in hostile
    with unit.load() as load:
        wait_until(load.answered, 15, "the load to be answered")
        unit.config.write_text(hostile)
        failed = unit.ctl("reload", UNIT, check=False)
        time.sleep(1)  # what systemd would have done with a smuggled command, it has
    assert failed.returncode != 0, "the hostile candidate was rolled back"
    after = unit.ns.show(UNIT, "MainPID", "NFileDescriptorStore", "NRestarts", "StatusText")
    assert "WATCHDOG=trigger" in after["StatusText"], after
    assert after["MainPID"] == before["MainPID"], "MAINPID= was not taken"
    assert after["NRestarts"] == before["NRestarts"], "WATCHDOG=trigger was not taken"
    assert after["NFileDescriptorStore"] == before["NFileDescriptorStore"], "nor FDSTOREREMOVE"
    assert unit.ns.show(UNIT, "ActiveState")["ActiveState"] == "active"
    assert load.result.failed == 0, (load.result.failures, load.result.examples)


def test_two_instances_keep_their_units_apart(unit: Unit) -> None:
    """Each namespace's systemd runs its units in a cgroup tree of its own. In a
    shared one, the other instance's daemon and workers sit in the same unit
    cgroup, as pid 0 to this systemd, and ``systemctl kill`` fails with EIO."""
    other = SystemdNamespace()
    try:
        config = other.root / "supervisor.toml"
        config.write_text(config_text(workers=2))
        install_supervisor(other, config, VENV_BIN)
        other.boot()
        other.ctl("start", UNIT)
        first = unit.main_pid()
        done = unit.ctl("kill", "-s", "KILL", UNIT, check=False)
        assert done.returncode == 0, done.stderr
        unit.restarted_from(first)
        assert other.show(UNIT, "ActiveState")["ActiveState"] == "active"
    finally:
        other.close()
    assert not any(cgroup.exists() for cgroup in other.cgroups), "close() removes its cgroups"


def _listeners(unit: Unit) -> list[dict[str, Any]]:
    return [lst for w in unit.workers() for lst in w["listeners"]]


def _served_by_new_workers(unit: Unit, load: Load) -> bool:
    """Some answer came from a worker of the daemon now running (pids as the
    namespace numbers them: the demo answers with its own)."""
    try:
        pids = [w["pid"] for w in unit.workers()]
    except AssertionError:  # the control socket is not up yet
        return False
    return any(pid is not None and load.served_by(pid) for pid in pids)


NOBODY = pwd.getpwnam("nobody")
NOGROUP = grp.getgrgid(NOBODY.pw_gid).gr_name


def test_a_group_may_use_the_control_socket_under_the_shipped_unit() -> None:
    # The docs' advice (troubleshooting) for giving operators access. Under a bounding set
    # without CAP_CHOWN the daemon could not give the socket to a group it is
    # not in: "Operation not permitted", exit 1, a restart loop.
    group = f'control_socket_group = "{NOGROUP}"\ncontrol_socket_mode = "0660"'
    with booted(config_text(workers=1, supervisor=group)) as unit:
        started = unit.ctl("start", UNIT, check=False)
        assert started.returncode == 0, unit.log.read_text(errors="replace")[-2000:]
        done = subprocess.run(
            [*unit.ns.enter(), "setpriv", "--reuid=nobody", f"--regid={NOGROUP}",
             "--clear-groups", str(VENV_BIN / "supervisorctl"),
             "-s", "/run/reuseport-supervisor/control.sock", "status", "web"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + done.stderr
        assert "web: RUNNING" in done.stdout


def test_a_key_only_its_owner_may_read_is_read_under_the_shipped_unit() -> None:
    # An application's key, owned by its user with mode 0600: root reads it
    # only with CAP_DAC_READ_SEARCH, which the bounding set once lacked.
    with booted("") as unit:
        leaf = issue("web.test", issuer=issue("Test CA", ca=True))
        tls = unit.ns.root / "tls"
        tls.mkdir()
        cert, key = write_pair(tls, leaf)
        os.chown(key, NOBODY.pw_uid, NOBODY.pw_gid)
        key.chmod(0o600)
        tls_files = f'tls = {{ cert = "{cert}", key = "{key}" }}'
        unit.config.write_text(config_text(workers=1, service=tls_files))
        started = unit.ctl("start", UNIT, check=False)
        assert started.returncode == 0, unit.log.read_text(errors="replace")[-2000:]
        status = unit.supervisorctl("status", "--json")
        assert json.loads(status.stdout)["services"]["web"]["certificate"] is not None


def test_a_crash_with_full_accept_queues_on_a_drain_host_keeps_every_listener() -> None:
    # Classic BPF learns an inherited group's order by probing each index; a
    # probe cannot enter a full accept queue. The audit's successor then closed
    # every inherited listener: 18 of 40 clients reset. Here 16 clients fill
    # four queues of 2 (backlog 1) while the daemon is down.
    text = config_text(supervisor='steering = "cbpf"', service='retire = "drain"\nbacklog = 1')
    with booted(text) as unit:
        unit.ctl("start", UNIT)
        first = unit.main_pid()
        with unit.load() as load:
            wait_until(load.answered, 15, "the load to be answered")
            unit.ctl("kill", "-s", "KILL", UNIT)
            unit.restarted_from(first)
            unit.wait(
                lambda: _served_by_new_workers(unit, load), 30, "the new workers to serve", load
            )
        result = load.result
        report("crash with full queues, drain host", result)
        inherited = unit.events("service_inherited")[-1]
        assert inherited["listeners"] == 4 and inherited["problems"] == [], inherited
        assert at_connect(result) == 0, (result.at_connect, result.examples)
        assert result.failed <= 4, (result.failures, result.examples)


def test_workers_lowered_while_down_on_a_drain_host_resets_nothing() -> None:
    # The slot the config dropped queued connections while nobody accepted;
    # shut down, it reset them (audit: 16 of 40). Where nothing migrates, its
    # listener is served by a worker first, then a rollout drains it away.
    drain = 'retire = "drain"'
    text = config_text(workers=2, supervisor='steering = "cbpf"', service=drain)
    with booted(text) as unit:
        unit.ctl("start", UNIT)
        first = unit.main_pid()
        with unit.load() as load:
            wait_until(load.answered, 15, "the load to be answered")
            unit.config.write_text(text.replace("workers = 2", "workers = 1"))
            unit.ctl("kill", "-s", "KILL", UNIT)
            unit.restarted_from(first)
            unit.wait(
                lambda: _served_by_new_workers(unit, load), 30, "the new workers to serve", load
            )
            unit.wait(lambda: len(unit.workers()) == 1, 60, "one worker, as configured", load)
            time.sleep(1)
        result = load.result
        report("workers lowered while down, drain host", result)
        kept = unit.events("inherited_queues_kept")
        assert kept and kept[-1]["workers"] == 2, kept
        finished = unit.events("rollout_finished")[-1]
        assert finished["outcome"] == "succeeded", finished
        assert len(unit.workers()) == 1
        retired = unit.events("inherited_listener_retired")
        assert not [e for e in retired if e["queued"]], retired
        assert at_connect(result) == 0, (result.at_connect, result.examples)
        assert result.failed <= 2, (result.failures, result.examples)


def test_systemctl_reload_finds_a_control_socket_the_config_moved() -> None:
    # ExecReload once named the default socket with -s: a config that put it
    # elsewhere made every `systemctl reload` fail. It reads the file now.
    text = config_text(workers=1).replace(
        "/run/reuseport-supervisor/control.sock", "/run/reuseport-supervisor/elsewhere.sock"
    )
    with booted(text) as unit:
        unit.ctl("start", UNIT)
        reloaded = unit.ctl("reload", UNIT, check=False)
        assert reloaded.returncode == 0, reloaded.stdout + reloaded.stderr
        assert "web generation 2 RUNNING" in unit.ns.show(UNIT, "StatusText")["StatusText"]
