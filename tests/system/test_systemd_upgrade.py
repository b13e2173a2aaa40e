"""An upgrade whose new image dies after the exec, under real systemd 252.

The check before the exec passes (it runs the same entry point with
``--check``), and then the exec'd image exits 1: a broken install the check
could not reach. Under the shipped unit every listener is in systemd's fd
store, so nothing is refused at connect: systemd restarts the daemon, which
takes the listeners back, and only what the dead workers had accepted may
fail.
"""

from __future__ import annotations

import time

import pytest

from tests.support.harness import wait_until
from tests.support.systemd_ns import UNIT, available
from tests.support.systemd_unit import at_connect, booted, config_text, report

pytestmark = [
    pytest.mark.kernel,
    pytest.mark.slow,
    pytest.mark.skipif(available() is not None, reason=f"real systemd: {available()}"),
]

# The "new install": once the flag file exists, the entry point dies when it
# is exec'd to continue an upgrade, and only then.
BROKEN = """\
import os, sys
flag = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "broken")
continuing = any(a.startswith("--state-fd") for a in sys.argv) and "--check" not in sys.argv
if continuing and os.path.exists(flag):
    sys.exit(1)
"""


def test_a_new_image_that_dies_after_the_exec_leaves_the_listeners_in_the_fd_store() -> None:
    with booted(config_text(), prelude=BROKEN) as unit:
        unit.ctl("start", UNIT)
        first = unit.main_pid()
        cookies = {lst["cookie"] for w in unit.workers() for lst in w["listeners"]}
        with unit.load() as load:
            wait_until(load.answered, 15, "the load to be answered")
            (unit.ns.root / "broken").touch()
            upgraded = unit.supervisorctl("upgrade")
            unit.restarted_from(first)
            unit.wait(lambda: len(unit.workers()) == 4, 30, "the workers to serve again", load)
            served = {lst["cookie"] for w in unit.workers() for lst in w["listeners"]}
            time.sleep(1)  # the load goes on against the new daemon's workers
        result = load.result
        report("new image died after the exec", result)
        assert upgraded.returncode != 0, upgraded.stdout
        assert unit.ns.show(UNIT, "NRestarts")["NRestarts"] == "1"
        inherited = unit.events("service_inherited")[-1]
        assert inherited["listeners"] == 4 and inherited["problems"] == [], inherited
        assert served == cookies, "the very same listeners, from the store"
        assert at_connect(result) == 0, (result.at_connect, result.examples)
        assert result.failed <= 4, (result.failures, result.examples)
