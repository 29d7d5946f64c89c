"""Host side of the tiny-guest channel (in the spirit of the KVM selftests' `ucall`).

A guest writes, with a 32-bit OUT to `UCALL_PORT`, the guest-physical address of a
`struct ucall` (layout in kvmkit_guest.h). The host reads it with bounds-checked guest-memory
accesses: a broken guest pointer becomes a `GuestError`, never a host fault.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from kvmkit.memory.guest import GuestMemory
from kvmkit.memory.region import GuestMemoryError

UCALL_PORT = 0x1000
EXCEPTION_PORT = 0x1001  # default IDT stubs write the vector number here
REPORT32_PORT = 0x1002  # asm guests: a 32-bit OUT appends the value to the reports

_UCALL = struct.Struct("<IIII6Q64s128s")
UCALL_SIZE = _UCALL.size


class UcallCmd(enum.IntEnum):
    PRINT = 1
    REPORT = 2
    ASSERT = 3
    DONE = 4
    SYNC = 5


class GuestError(Exception):
    """The guest did something the test did not expect (bad exit, exception, bad ucall)."""


class GuestAssertionError(AssertionError):
    """A GUEST_ASSERT in guest code failed; the message carries file:line and the expression."""


class GuestTimeout(GuestError):
    pass


@dataclass
class Ucall:
    cmd: UcallCmd
    args: list[int]
    line: int = 0
    file: str = ""
    msg: str = ""


@dataclass
class GuestOutput:
    """What a tiny guest reported while it ran."""

    prints: list[str] = field(default_factory=list)
    reports: list[int] = field(default_factory=list)
    syncs: list[int] = field(default_factory=list)
    status: int | None = None


def read_ucall(mem: GuestMemory, gpa: int) -> Ucall:
    try:
        raw = mem.read(gpa, UCALL_SIZE)
    except GuestMemoryError as err:
        raise GuestError(f"ucall at {gpa:#x}: {err}") from None
    cmd, nargs, line, _pad, *rest = _UCALL.unpack(raw)
    args, file_raw, msg_raw = rest[:6], rest[6], rest[7]
    try:
        command = UcallCmd(cmd)
    except ValueError:
        raise GuestError(f"ucall at {gpa:#x}: unknown command {cmd}") from None
    if nargs > 6:
        raise GuestError(f"ucall at {gpa:#x}: {nargs} arguments (at most 6)")
    return Ucall(
        command,
        list(args[:nargs]),
        line,
        file_raw.split(b"\0", 1)[0].decode("utf-8", "replace"),
        msg_raw.split(b"\0", 1)[0].decode("utf-8", "replace"),
    )
