"""The census of a service's reuseport groups, and the preflight it gives a reload.

Every socket listening on one of the service's addresses is listed by
sock_diag and matched by cookie against our own listeners. One that is not
ours shares our port: in our group (same address, port and owner uid; the
kernel asks nothing more), or beside it on an overlapping address (a
wildcard, or a specific address under our wildcard). Each is named by the
processes holding it, and its settings are read through a duplicate.

A reload is refused while a stranger is in a group the candidate would join
(with classic BPF it would receive connections, and every migration
assumes the group is ours), or while a more specific socket takes the
connections meant for our wildcard. The old generation serves on; the
refusal names the stranger and how it differs from our listeners.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

from supervisor.errors import KernelError
from supervisor.kernel import diag, members
from supervisor.kernel.proc import parent_of
from supervisor.serve.generation import Generation
from supervisor.serve.listener import Listener
from supervisor.status import GroupCensus, MemberStatus
from supervisor.values import ListenAddress

_ANCESTRY = 16  # how far up a holder's parents we look for one of our workers


@dataclass(frozen=True)
class Known:
    """What a census knows of the service: its listeners by cookie (with their
    generation's number), and its workers' pids (with their generation and index)."""

    listeners: Mapping[int, tuple[int, Listener]]
    workers: Mapping[int, tuple[int, int]]

    @classmethod
    def of(cls, generations: Iterable[Generation | None]) -> Known:
        listeners: dict[int, tuple[int, Listener]] = {}
        workers: dict[int, tuple[int, int]] = {}
        for gen in generations:
            if gen is None:
                continue
            listeners.update((lst.cookie, (gen.number, lst)) for lst in gen.listeners)
            workers.update(
                (slot.pid, (gen.number, slot.plan.index))
                for slot in gen.slots
                if slot.pid is not None
            )
        return cls(listeners, workers)

    def worker_of(self, pid: int) -> tuple[int, int] | None:
        """The (generation, index) of our worker that is ``pid`` or one of its ancestors."""
        for _ in range(_ANCESTRY):
            if pid in self.workers:
                return self.workers[pid]
            parent = parent_of(pid)
            if parent is None or parent <= 1:
                return None
            pid = parent
        return None


def take_census(
    addresses: Iterable[ListenAddress], known: Known, *, own: bool = False
) -> list[GroupCensus]:
    """The census of each of ``addresses`` (each once, in order). Never raises:
    a sock_diag failure is the group's ``error``. ``own``: the workers bind
    their own sockets (``listen_mode = "own"``), so one a worker holds and
    the daemon has not adopted yet is not a stranger."""
    return [_census(address, known, own) for address in dict.fromkeys(addresses)]


def problems(census: Iterable[GroupCensus]) -> list[str]:
    return [problem for group in census for problem in group.problems]


def _census(address: ListenAddress, known: Known, own: bool) -> GroupCensus:
    try:
        bound = diag.bound_on(address)
    except KernelError as exc:
        return GroupCensus(address=str(address), members=[], error=str(exc))
    strangers = [b for b in bound if b.cookie not in known.listeners]
    held = members.holders([b.inode for b in strangers]) if strangers else {}
    reference = _reference(address, known) if strangers else None  # only they are compared
    ours_wildcard = any(b.exact for b in bound if b.cookie in known.listeners) and (
        address.host in ("0.0.0.0", "::")
    )
    group: list[MemberStatus] = []
    neighbours: list[MemberStatus] = []
    found: list[str] = []
    for b in bound:
        mine = known.listeners.get(b.cookie)
        if mine is not None:
            number, lst = mine
            role = lst.role
            entry = _member(b, ours=True, generation=number, worker=lst.worker)
            entry = entry.model_copy(update={"role": None if role is None else role.value})
        else:
            holding = held.get(b.inode, [])
            entry = _stranger(b, holding, reference)
            adopting = own and any(known.worker_of(h.pid) for h in holding)
            problem = _problem(address, b, entry, _who(entry, holding, known), ours_wildcard)
            if problem and not adopting:
                found.append(problem)
        (group if b.exact else neighbours).append(entry)
    return GroupCensus(address=str(address), members=group, neighbours=neighbours, problems=found)


def _reference(address: ListenAddress, known: Known) -> members.Settings | None:
    """Our own listeners' settings on ``address`` (the newest generation's)."""
    ours = [gl for gl in known.listeners.values() if gl[1].address == address]
    if not ours:
        return None
    _, lst = max(ours, key=lambda gl: gl[0])
    try:
        return members.settings_of(lst.sock)
    except (KernelError, ValueError):  # closed meanwhile
        return None


def _member(bound: diag.BoundSocket, **fields: object) -> MemberStatus:
    return MemberStatus(
        inode=bound.inode, cookie=bound.cookie, uid=bound.uid, host=bound.host, **fields
    )


def _stranger(
    bound: diag.BoundSocket, holding: list[members.Holder], reference: members.Settings | None
) -> MemberStatus:
    settings: members.Settings | None = None
    unreadable = ""
    for holder in holding:
        try:
            settings = members.settings_held(holder)
            break
        except KernelError as exc:
            unreadable = str(exc)
    differences = []
    if settings is not None and reference is not None:
        differences = settings.differences(reference)
    if settings is not None and not settings.reuseport:
        differences.insert(0, "no SO_REUSEPORT")
    if settings is None and unreadable:
        differences.append(f"its settings could not be read: {unreadable}")
    return _member(
        bound,
        ours=False,
        holders=[str(h) for h in holding],
        settings=None if settings is None else asdict(settings),
        differences=differences,
    )


def _problem(
    address: ListenAddress,
    bound: diag.BoundSocket,
    entry: MemberStatus,
    who: str,
    ours_wildcard: bool,
) -> str | None:
    """Why ``entry`` (not ours) refuses a reload, or None if it is harmless."""
    if bound.exact:
        differs = f"; unlike ours: {', '.join(entry.differences)}" if entry.differences else ""
        return f"{address}: a socket not ours is in the reuseport group: {who}{differs}"
    if ours_wildcard:
        return (
            f"{address}: {who} listens on {bound.host}:{address.port}, more specific than "
            f"our wildcard: connections to {bound.host} go to it, not to us"
        )
    return None  # a wildcard beside our specific address: ours wins its lookups


def _who(entry: MemberStatus, holding: list[members.Holder], known: Known) -> str:
    held = ", ".join(entry.holders) if entry.holders else "held by no process visible here"
    text = f"inode {entry.inode} (uid {entry.uid}, {held})"
    for holder in holding:
        worker = known.worker_of(holder.pid)
        if worker is not None:
            return (
                f"{text}, bound by worker {worker[1]} of generation {worker[0]} itself "
                "(a worker that binds its own sockets is not supported yet)"
            )
    return text
