"""The daemon's effective capabilities, so an error can name the one it lacks.

A root daemon under a unit's ``CapabilityBoundingSet=`` is root without most
of root's powers: chown(2) to a group it is not in needs ``CAP_CHOWN``, and
reading a file another user owns with mode 0600 needs ``CAP_DAC_READ_SEARCH``.
"Operation not permitted" alone sends an operator looking in the wrong place.
"""

from __future__ import annotations

import os
from pathlib import Path

CHOWN = 0
DAC_OVERRIDE = 1
DAC_READ_SEARCH = 2
SYS_PTRACE = 19
NAMES = {
    SYS_PTRACE: "CAP_SYS_PTRACE",
    CHOWN: "CAP_CHOWN",
    DAC_OVERRIDE: "CAP_DAC_OVERRIDE",
    DAC_READ_SEARCH: "CAP_DAC_READ_SEARCH",
}


def effective() -> int:
    """The effective capability set, as a bit mask (0 if it cannot be read)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except (OSError, ValueError):
        return 0
    return 0


def lacks(*caps: int) -> list[str]:
    """The names of ``caps`` this process does not have (root's included)."""
    have = effective()
    return [NAMES[cap] for cap in caps if not have & (1 << cap)]


def why_denied(*caps: int) -> str:
    """A clause for a permission error: which capability a root daemon lacks
    (the unit's CapabilityBoundingSet), or nothing for a daemon that is not root."""
    if os.geteuid() != 0:
        return ""
    missing = lacks(*caps)
    if not missing:
        return ""
    return f" (the daemon runs as root without {' and '.join(missing)}: see CapabilityBoundingSet)"


def ptrace_scope() -> int | None:
    """Yama's ``kernel.yama.ptrace_scope`` (None: no Yama): 3 forbids every
    ptrace access, pidfd_getfd included; 1 and 2 leave it to descendants and
    to CAP_SYS_PTRACE."""
    try:
        return int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text())
    except (OSError, ValueError):
        return None
