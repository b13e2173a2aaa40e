"""The pure plan: what a generation will run."""

from __future__ import annotations

from supervisor.config.loader import parse_config
from supervisor.plan.plan import describe, plan_config, plan_service, socket_changes, substitute

CONFIG = """
[services.web]
command = ["gunicorn", "--bind", "fd://{fd}", "--name", "w{worker}g{generation}", "{\\"json\\": 1}"]
workers = 3
listen = ["127.0.0.1:8080", "udp://[::1]:53"]
environment = { ROLE = "worker-{worker}", PLAIN = "x" }
working_directory = "/srv/{generation}"
user = "www-data"
"""


def test_placeholders_in_command_env_and_cwd() -> None:
    service = parse_config(CONFIG).services["web"]
    plan = plan_service("web", service, generation=7)
    second = plan.workers[1]
    assert second.argv == ("gunicorn", "--bind", "fd://3", "--name", "w1g7", '{"json": 1}')
    env = dict(second.environment)
    assert env["ROLE"] == "worker-1"
    assert env["PLAIN"] == "x"
    assert str(second.working_directory) == "/srv/7"
    assert second.user == "www-data"
    assert second.label == "web[1]@7"


def test_supervisor_environment_for_each_worker() -> None:
    service = parse_config(CONFIG).services["web"]
    env = dict(plan_service("web", service, generation=2).workers[2].environment)
    assert env["SUPERVISOR_SERVICE"] == "web"
    assert env["SUPERVISOR_GENERATION"] == "2"
    assert env["SUPERVISOR_WORKER"] == "2"
    assert env["LISTEN_FDS"] == "2"
    assert env["LISTEN_FDNAMES"] == "tcp-127.0.0.1-8080:udp-__1-53"
    assert "LISTEN_PID" not in env, "only the child knows its pid"


def test_one_plan_per_worker_and_generation_default_one() -> None:
    plans = plan_config(parse_config(CONFIG))
    assert [p.generation for p in plans] == [1]
    assert [w.index for w in plans[0].workers] == [0, 1, 2]
    assert all(w.listen == plans[0].workers[0].listen for w in plans[0].workers)


def test_substitute_leaves_other_braces() -> None:
    assert substitute("{x} {fd} {worker}{generation} {}", worker=4, generation=9) == "{x} 3 49 {}"


def test_describe_names_every_worker_and_fd() -> None:
    lines = describe(plan_config(parse_config(CONFIG)))
    text = "\n".join(lines)
    assert "service web: generation 1, 3 worker(s)" in text
    assert "fd 3=127.0.0.1:8080, fd 4=udp://[::1]:53" in text
    assert text.count("  worker ") == 3
    assert "user=www-data" in text


def test_socket_changes_name_each_setting_but_backlog() -> None:
    old = parse_config(CONFIG).services["web"]
    same = old.model_copy(update={"backlog": 16})
    assert socket_changes(old, same) == []
    new_socket = old.socket.model_copy(update={"defer_accept": 1.0, "rcvbuf": 262144})
    changed = old.model_copy(update={"socket": new_socket})
    assert socket_changes(old, changed) == ["defer_accept unset -> 1s", "rcvbuf unset -> 262144"]
    assert socket_changes(changed, old) == ["defer_accept 1s -> unset", "rcvbuf 262144 -> unset"]
