"""A small eBPF assembler: the handful of instructions the steering program uses.

``struct bpf_insn { u8 code; u8 dst:4, src:4; s16 off; s32 imm; }``,
little-endian. Jumps name labels; offsets are resolved at ``assemble()``
(relative to the next instruction). ``ld_map_fd`` takes two slots.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

R0, R1, R2, R3, R4, R5, R6, R7, R8, R9, R10 = range(11)

# Helpers (include/uapi/linux/bpf.h).
MAP_LOOKUP_ELEM = 1
GET_SOCKET_COOKIE = 46
SK_SELECT_REUSEPORT = 82


@dataclass(frozen=True)
class _Insn:
    code: int
    dst: int = 0
    src: int = 0
    off: int | str = 0  # a label for jumps
    imm: int = 0


class Asm:
    def __init__(self) -> None:
        self._items: list[_Insn | str] = []

    def _emit(
        self, code: int, dst: int = 0, src: int = 0, off: int | str = 0, imm: int = 0
    ) -> None:
        self._items.append(_Insn(code, dst, src, off, imm))

    def label(self, name: str) -> None:
        self._items.append(name)

    # 64-bit ALU
    def mov_imm(self, dst: int, imm: int) -> None:
        self._emit(0xB7, dst, imm=imm)

    def mov_reg(self, dst: int, src: int) -> None:
        self._emit(0xBF, dst, src)

    def add_imm(self, dst: int, imm: int) -> None:
        self._emit(0x07, dst, imm=imm)

    def add_reg(self, dst: int, src: int) -> None:
        self._emit(0x0F, dst, src)

    def mul_imm(self, dst: int, imm: int) -> None:
        self._emit(0x27, dst, imm=imm)

    def rsh_imm(self, dst: int, imm: int) -> None:
        self._emit(0x77, dst, imm=imm)

    def and_imm(self, dst: int, imm: int) -> None:
        self._emit(0x57, dst, imm=imm)

    def mod_reg(self, dst: int, src: int) -> None:
        self._emit(0x9F, dst, src)

    # memory
    def ldxw(self, dst: int, src: int, off: int) -> None:
        self._emit(0x61, dst, src, off)

    def ldxh(self, dst: int, src: int, off: int) -> None:
        self._emit(0x69, dst, src, off)

    def ldxdw(self, dst: int, src: int, off: int) -> None:
        self._emit(0x79, dst, src, off)

    def stxw(self, dst: int, off: int, src: int) -> None:
        self._emit(0x63, dst, src, off)

    def stxdw(self, dst: int, off: int, src: int) -> None:
        self._emit(0x7B, dst, src, off)

    def atomic_add64(self, dst: int, off: int, src: int) -> None:
        self._emit(0xDB, dst, src, off, 0)

    def ld_map_fd(self, dst: int, fd: int) -> None:
        self._emit(0x18, dst, 1, 0, fd)  # src = BPF_PSEUDO_MAP_FD
        self._emit(0x00)

    # jumps and calls
    def jeq_imm(self, dst: int, imm: int, label: str) -> None:
        self._emit(0x15, dst, off=label, imm=imm)

    def jne_imm(self, dst: int, imm: int, label: str) -> None:
        self._emit(0x55, dst, off=label, imm=imm)

    def jgt_reg(self, dst: int, src: int, label: str) -> None:
        self._emit(0x2D, dst, src, off=label)

    def jge_imm(self, dst: int, imm: int, label: str) -> None:
        self._emit(0x35, dst, off=label, imm=imm)

    def jge_reg(self, dst: int, src: int, label: str) -> None:
        self._emit(0x3D, dst, src, off=label)

    def ja(self, label: str) -> None:
        self._emit(0x05, off=label)

    def call(self, helper: int) -> None:
        self._emit(0x85, imm=helper)

    def exit(self) -> None:
        self._emit(0x95)

    def assemble(self) -> bytes:
        labels: dict[str, int] = {}
        pc = 0
        for item in self._items:
            if isinstance(item, str):
                if item in labels:
                    raise ValueError(f"label {item!r} defined twice")
                labels[item] = pc
            else:
                pc += 1
        out, pc = [], 0
        for item in self._items:
            if isinstance(item, str):
                continue
            off = item.off
            if isinstance(off, str):
                off = labels[off] - (pc + 1)
            out.append(struct.pack("<BBhi", item.code, (item.src << 4) | item.dst, off, item.imm))
            pc += 1
        return b"".join(out)
