"""Cutover: the moment a candidate takes every new connection from the old generation.

``promote`` is the one place where both generations' steering roles change
together. It either completes or leaves the kernel as it was: the roles are
restored and republished when any group refuses the new ones, so a failed
cutover is a rollback, never a half-steered service.
"""

from __future__ import annotations

import structlog

from supervisor.errors import RolloutAborted, SupervisorError
from supervisor.serve.generation import Generation
from supervisor.steering import Role, SteeringGroup

log = structlog.get_logger("supervisor.serve.cutover")


def _publish(groups: dict[int, SteeringGroup]) -> None:
    for group in groups.values():
        group.apply()


def promote(candidate: Generation, old: Generation) -> None:
    """Steer every new connection to ``candidate``; ``old`` gets none from now on.

    Raises:
        RolloutAborted: a group refused the new roles; both generations are
            back in the roles they had (old active, candidate standby) and the
            kernel steers as before.
    """
    groups = old.admit(Role.RETIRING)
    groups.update(candidate.admit(Role.ACTIVE))
    try:
        _publish(groups)
    except SupervisorError as exc:
        log.error("cutover_failed", error=str(exc))
        old.admit(Role.ACTIVE)
        candidate.admit(Role.STANDBY)
        try:
            _publish(groups)
        except SupervisorError as again:  # each group kept its table: see apply()
            log.error("cutover_restore_failed", error=str(again))
        raise RolloutAborted(candidate.plan.name, [f"cutover failed: {exc}"]) from exc
