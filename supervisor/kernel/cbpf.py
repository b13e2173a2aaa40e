"""Classic BPF for reuseport groups: instruction encoding and attach/detach.

A reuseport cBPF program returns an index into the group's listening
sockets (docs/kernel.md §2). It cannot drop: an index past the end makes
the kernel fall back to its own hash over every listening member. Loads use
``SKF_NET_OFF`` because ``skb->data`` points past the transport header.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from dataclasses import dataclass

SO_ATTACH_REUSEPORT_CBPF = 51
SO_DETACH_REUSEPORT_BPF = 68
SKF_NET_OFF = -0x100000
MAX_INSNS = 4096  # BPF_MAXINSNS

# Opcodes (linux/filter.h): class | size | mode, or class | op | source.
LD_W_ABS = 0x20
LD_H_ABS = 0x28
LD_B_ABS = 0x30
LD_H_IND = 0x48
LDX_B_MSH = 0xB1  # X = 4 * (P[k] & 0xf): the IPv4 header length
LD_MEM = 0x60
LDX_MEM = 0x61
LD_IMM = 0x00
ST = 0x02
ALU_MUL_K = 0x24
ALU_RSH_K = 0x74
ALU_MOD_K = 0x94
ALU_XOR_X = 0xAC
JMP_JA = 0x05
JMP_JEQ_K = 0x15
RET_K = 0x06
RET_A = 0x16


@dataclass(frozen=True)
class Insn:
    code: int
    jt: int = 0
    jf: int = 0
    k: int = 0

    def pack(self) -> bytes:
        return struct.pack("<HBBI", self.code, self.jt, self.jf, self.k & 0xFFFFFFFF)


def encode(program: list[Insn]) -> bytes:
    """The program as ``struct sock_filter[]`` bytes."""
    if not 0 < len(program) <= MAX_INSNS:
        raise ValueError(f"a cBPF program has 1 to {MAX_INSNS} instructions, not {len(program)}")
    for insn in program:
        if not (0 <= insn.jt <= 255 and 0 <= insn.jf <= 255):
            raise ValueError(f"jump offset out of range in {insn}")
    return b"".join(insn.pack() for insn in program)


def attach(sock: socket.socket, program: list[Insn]) -> None:
    """Attach ``program`` to the reuseport group of ``sock`` (a listening member).

    The program belongs to the group: it replaces any earlier one and
    outlives ``sock``. Raises OSError from the kernel.
    """
    code = encode(program)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("<HxxxxxxQ", len(program), ctypes.addressof(buffer))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, fprog)


def detach(sock: socket.socket) -> None:
    """Remove the group's program (raises OSError ENOENT if there is none)."""
    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)
