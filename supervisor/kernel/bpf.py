"""The ``bpf()`` syscall through ctypes: maps and program load, no compiler.

Layouts of ``union bpf_attr`` are from include/uapi/linux/bpf.h (docs/kernel.md
§3). Every map and program is an fd owned by one ``BpfObject``;
``close()`` releases it (a program attached to a reuseport group stays
attached: the group holds its own reference).
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import socket
import struct
from typing import Self

from supervisor.errors import KernelFeatureMissing
from supervisor.kernel import fds

# The syscall number per architecture; elsewhere there is no eBPF (fail closed:
# a wrong number would call some other syscall with our buffer).
_NR_BPF: int | None = {"x86_64": 321, "aarch64": 280}.get(platform.machine())
_ATTR_SIZE = 144  # sizeof(union bpf_attr) on 6.x; the unused tail must be zero

MAP_CREATE, MAP_LOOKUP_ELEM, MAP_UPDATE_ELEM, MAP_DELETE_ELEM, MAP_GET_NEXT_KEY = 0, 1, 2, 3, 4
PROG_LOAD = 5
MAP_TYPE_HASH, MAP_TYPE_ARRAY, MAP_TYPE_REUSEPORT_SOCKARRAY = 1, 2, 20
PROG_TYPE_SK_REUSEPORT = 21
SK_REUSEPORT_SELECT, SK_REUSEPORT_SELECT_OR_MIGRATE = 39, 40
ANY = 0
SO_ATTACH_REUSEPORT_EBPF, SO_DETACH_REUSEPORT_BPF = 52, 68

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class BpfError(OSError):
    """A bpf() call failed; ``log`` holds the verifier's words for a program load."""

    def __init__(self, err: int, what: str, log: str = "") -> None:
        # The verifier's verdict is at the end of its log: name it in the message.
        tail = [line for line in log.strip().splitlines() if line.strip()][-3:]
        detail = f" (verifier: {' | '.join(tail)})" if tail else ""
        super().__init__(err, f"bpf {what}: {os.strerror(err)}{detail}")
        self.log = log


def _call(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> int:
    if _NR_BPF is None:
        raise KernelFeatureMissing(
            "eBPF", f"the bpf() syscall number of {platform.machine()!r} is not known here"
        )
    result = int(_libc.syscall(_NR_BPF, cmd, ctypes.byref(attr), ctypes.c_uint(_ATTR_SIZE)))
    if result < 0:
        err = ctypes.get_errno()
        # EPERM is the missing privilege; EACCES is the verifier refusing a program.
        if err == errno.EPERM:
            raise KernelFeatureMissing("eBPF", f"{what} needs CAP_BPF ({os.strerror(err)})")
        raise BpfError(err, what)
    return result


class BpfObject:
    """An fd of the bpf subsystem, closed by ``close()`` (idempotent)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _call_unless_missing(cmd: int, attr: ctypes.Array[ctypes.c_char], what: str) -> bool:
    """``_call``, False where the key is not there (ENOENT)."""
    try:
        _call(cmd, attr, what)
    except BpfError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True


def _check_fdinfo(fd: int, kind: str, expected: dict[str, int]) -> None:
    """Raise BpfError unless ``fd`` is a BPF ``kind`` (map or prog) with ``expected`` fields."""
    try:
        target = fds.fd_kind(fd)
        info = fds.fdinfo(fd) if target == f"anon_inode:bpf-{kind}" else {}
    except OSError as exc:
        raise BpfError(exc.errno or errno.EBADF, f"adopt {kind}: fd {fd}") from exc
    if not info:
        raise BpfError(errno.EBADF, f"adopt {kind}: fd {fd} is {target}, not a BPF {kind}")
    for key, want in expected.items():
        if info.get(key) != str(want):
            raise BpfError(
                errno.EINVAL, f"adopt {kind}: fd {fd} has {key} {info.get(key)}, not {want}"
            )


class Map(BpfObject):
    """A BPF map with fixed-size keys and values (bytes)."""

    def __init__(
        self,
        map_type: int,
        key_size: int,
        value_size: int,
        entries: int,
        name: str,
        *,
        adopt: int | None = None,
    ) -> None:
        """Create the map; or, with ``adopt``, wrap an fd an earlier image made,
        once its type and sizes are checked (BpfError if they differ)."""
        if adopt is not None:
            _check_fdinfo(
                adopt,
                "map",
                {
                    "map_type": map_type,
                    "key_size": key_size,
                    "value_size": value_size,
                    "max_entries": entries,
                },
            )
            fd = adopt
        else:
            attr = ctypes.create_string_buffer(_ATTR_SIZE)
            struct.pack_into("<IIIII", attr, 0, map_type, key_size, value_size, entries, 0)
            struct.pack_into("16s", attr, 28, name.encode()[:15])
            fd = _call(MAP_CREATE, attr, f"map create {name}")
        super().__init__(fd)
        self.key_size, self.value_size, self.entries = key_size, value_size, entries
        # One request for every element call, written in place: three fresh
        # ctypes buffers made a call 2.9 to 3.5 us, against 2.2 now. A call
        # is synchronous and the daemon has one thread, so none overlap.
        self._key = ctypes.create_string_buffer(key_size)
        self._value = ctypes.create_string_buffer(value_size)
        self._attr = ctypes.create_string_buffer(_ATTR_SIZE)  # the tail stays zero

    def all_keys(self) -> list[bytes]:
        """Every key of a hash map (BPF_MAP_GET_NEXT_KEY from no key on)."""
        out: list[bytes] = []
        key: bytes | None = None
        while True:
            current = ctypes.create_string_buffer(key or b"", self.key_size)
            following = ctypes.create_string_buffer(self.key_size)
            attr = ctypes.create_string_buffer(_ATTR_SIZE)
            kaddr = 0 if key is None else ctypes.addressof(current)
            struct.pack_into("<IxxxxQQ", attr, 0, self.fd, kaddr, ctypes.addressof(following))
            if not _call_unless_missing(MAP_GET_NEXT_KEY, attr, "map next key"):
                return out
            key = following.raw
            out.append(key)
            if len(out) > self.entries:  # a map changing under us: stop, do not spin
                return out

    def _request(
        self, key: bytes, value: bytes | None, flags: int, *, answer: bool = False
    ) -> ctypes.Array[ctypes.c_char]:
        """The attr of an element call on ``key``: ``value`` is copied in (update),
        or the value buffer receives the answer (lookup, ``answer``). Without
        either the value pointer is 0: the kernel wants every field after the
        last one a command reads zero (delete reads only the key)."""
        if len(key) != self.key_size:
            raise ValueError(f"key of {len(key)} bytes, map wants {self.key_size}")
        if value is not None and len(value) != self.value_size:
            raise ValueError(f"value of {len(value)} bytes, map wants {self.value_size}")
        self._key.raw = key
        if value is not None:
            self._value.raw = value
        struct.pack_into(
            "<IxxxxQQQ",
            self._attr,
            0,
            self.fd,
            ctypes.addressof(self._key),
            ctypes.addressof(self._value) if value is not None or answer else 0,
            flags,
        )
        return self._attr

    def update(self, key: bytes, value: bytes, flags: int = ANY) -> None:
        _call(MAP_UPDATE_ELEM, self._request(key, value, flags), "map update")

    def lookup(self, key: bytes) -> bytes | None:
        """The value, or None where there is none (ENOENT)."""
        found = _call_unless_missing(
            MAP_LOOKUP_ELEM, self._request(key, None, 0, answer=True), "map lookup"
        )
        return self._value.raw if found else None

    def delete(self, key: bytes) -> bool:
        """Delete ``key``; False if it was not there."""
        return _call_unless_missing(MAP_DELETE_ELEM, self._request(key, None, 0), "map delete")


class Program(BpfObject):
    """A loaded program; raises BpfError with the verifier log if it is refused."""

    def __init__(
        self,
        insns: bytes,
        prog_type: int,
        expected_attach_type: int,
        name: str,
        *,
        adopt: int | None = None,
    ) -> None:
        """Load the program; or, with ``adopt``, wrap an fd an earlier image loaded
        (checked to be a program of ``prog_type``; its code is the kernel's)."""
        if adopt is not None:
            _check_fdinfo(adopt, "prog", {"prog_type": prog_type})
            super().__init__(adopt)
            return
        code = ctypes.create_string_buffer(insns, len(insns))
        license_ = ctypes.create_string_buffer(b"GPL")
        log = ctypes.create_string_buffer(1 << 18)
        attr = ctypes.create_string_buffer(_ATTR_SIZE)
        struct.pack_into(
            "<IIQQIIQII",
            attr,
            0,
            prog_type,
            len(insns) // 8,
            ctypes.addressof(code),
            ctypes.addressof(license_),
            1,
            len(log),
            ctypes.addressof(log),
            0,
            0,
        )
        struct.pack_into("16s", attr, 48, name.encode()[:15])
        struct.pack_into("<II", attr, 64, 0, expected_attach_type)
        try:
            fd = _call(PROG_LOAD, attr, f"program load {name}")
        except BpfError as exc:
            raise BpfError(exc.errno or 0, f"program load {name}", log.value.decode()) from exc
        super().__init__(fd)


def attach_reuseport(member: socket.socket, program: Program) -> None:
    """Make ``program`` the program of ``member``'s reuseport group (replacing any).

    ``member`` must already listen (bound, for UDP): attached before, the
    socket would get a private group and could not join the existing one.
    """
    member.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, struct.pack("<i", program.fd))


def detach_reuseport(member: socket.socket) -> bool:
    """Remove the program of ``member``'s group; False if it had none (ENOENT)."""
    try:
        member.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, struct.pack("<i", 0))
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return False
        raise
    return True
