"""The BPF layer: the assembler (pure), and maps, program load and attach
against the real kernel (CAP_BPF: root, in the private network namespace)."""

from __future__ import annotations

import errno
import socket
import struct

import pytest

from supervisor.kernel import bpf
from supervisor.kernel.ebpf_asm import R0, R1, R6, Asm
from supervisor.kernel.sockets import ListenerOptions, open_listener, socket_cookie
from supervisor.steering.ebpf_program import build_program
from supervisor.values import parse_listen
from tests.support.harness import free_port


def test_assembler_encodes_and_resolves_labels() -> None:
    a = Asm()
    a.mov_reg(R6, R1)
    a.jeq_imm(R6, 0, "out")
    a.ld_map_fd(R1, 7)  # two slots
    a.label("out")
    a.mov_imm(R0, 1)
    a.exit()
    code = a.assemble()
    insns = [struct.unpack("<BBhi", code[i : i + 8]) for i in range(0, len(code), 8)]
    assert insns[0] == (0xBF, (R1 << 4) | R6, 0, 0)
    assert insns[1] == (0x15, R6, 2, 0), "jumps count from the next instruction, ld_imm64 is 2"
    assert insns[2] == (0x18, (1 << 4) | R1, 0, 7), "src=1: BPF_PSEUDO_MAP_FD"
    assert insns[3] == (0, 0, 0, 0)
    assert insns[4:] == [(0xB7, R0, 0, 1), (0x95, 0, 0, 0)]
    twice = Asm()
    twice.label("x")
    twice.label("x")
    with pytest.raises(ValueError, match="defined twice"):
        twice.assemble()


kernel = pytest.mark.kernel


@kernel
def test_maps_update_lookup_delete() -> None:
    with bpf.Map(bpf.MAP_TYPE_HASH, 4, 8, 16, "t_hash") as table:
        key = struct.pack("<I", 7)
        assert table.lookup(key) is None
        table.update(key, struct.pack("<Q", 42))
        assert table.lookup(key) == struct.pack("<Q", 42)
        assert table.delete(key) is True
        assert table.delete(key) is False
        with pytest.raises(ValueError, match="key of 2 bytes"):
            table.lookup(b"xx")
        with pytest.raises(ValueError, match="value of 4 bytes"):
            table.update(key, struct.pack("<I", 1))
        with pytest.raises(bpf.BpfError) as err:
            table.update(key, struct.pack("<Q", 1), flags=2)  # BPF_EXIST on a missing key
        assert err.value.errno == errno.ENOENT
    assert table.fd == -1
    table.close()  # idempotent


@kernel
def test_a_map_reuses_its_request_buffers_without_mixing_calls() -> None:
    with bpf.Map(bpf.MAP_TYPE_HASH, 4, 8, 16, "t_reuse") as table:
        one, two = struct.pack("<I", 1), struct.pack("<I", 2)
        table.update(one, struct.pack("<Q", 42))
        table.update(two, struct.pack("<Q", 7))
        first = table.lookup(one)
        assert table.lookup(two) == struct.pack("<Q", 7)
        assert first == struct.pack("<Q", 42)  # an answer is a copy, not the buffer
        assert table.delete(one) is True  # a delete after an update: value pointer 0
        assert table.lookup(one) is None
        assert table.lookup(two) == struct.pack("<Q", 7)


@kernel
def test_a_refused_program_carries_the_verifier_log() -> None:
    a = Asm()
    a.exit()  # R0 was never set
    with pytest.raises(bpf.BpfError) as err:
        bpf.Program(
            a.assemble(), bpf.PROG_TYPE_SK_REUSEPORT, bpf.SK_REUSEPORT_SELECT_OR_MIGRATE, "t_bad"
        )
    assert err.value.errno in (errno.EACCES, errno.EINVAL)
    assert "R0 !read_ok" in err.value.log
    assert "verifier: " in str(err.value) and "R0 !read_ok" in str(err.value)


@kernel
def test_steering_program_loads_and_attaches_and_detaches() -> None:
    socks = bpf.Map(bpf.MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, 4, "t_socks")
    table = bpf.Map(bpf.MAP_TYPE_ARRAY, 4, 4, 8, "t_table")
    pins = bpf.Map(bpf.MAP_TYPE_HASH, 4, 4, 4, "t_pins")
    refuse = bpf.Map(bpf.MAP_TYPE_HASH, 8, 4, 4, "t_refuse")
    counters = bpf.Map(bpf.MAP_TYPE_ARRAY, 4, 8, 4000, "t_count")
    maps = {
        "socks": socks.fd,
        "table": table.fd,
        "pins": pins.fd,
        "refuse": refuse.fd,
        "counters": counters.fd,
    }
    program = bpf.Program(
        build_program(maps),
        bpf.PROG_TYPE_SK_REUSEPORT,
        bpf.SK_REUSEPORT_SELECT_OR_MIGRATE,
        "t_steer",
    )
    address = parse_listen(f"127.0.0.1:{free_port()}")
    listener = open_listener(address, ListenerOptions())
    try:
        socks.update(struct.pack("<I", 0), struct.pack("<Q", listener.fileno()))
        # User space reads a sockarray slot back as the socket's cookie.
        assert socks.lookup(struct.pack("<I", 0)) == struct.pack("<Q", socket_cookie(listener))
        bpf.attach_reuseport(listener, program)
        assert bpf.detach_reuseport(listener) is True
        assert bpf.detach_reuseport(listener) is False
    finally:
        listener.close()
        for obj in (program, socks, table, pins, refuse, counters):
            obj.close()
    # A slot takes only a socket in a reuseport group (listening, or bound UDP).
    with (
        bpf.Map(bpf.MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8, 4, "t_socks2") as socks2,
        socket.socket() as unbound,
        pytest.raises(bpf.BpfError, match="map update"),
    ):
        socks2.update(struct.pack("<I", 0), struct.pack("<Q", unbound.fileno()))
