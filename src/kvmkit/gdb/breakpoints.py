"""The stub's breakpoints and watchpoints, and the debug controls they mean for KVM.

Software breakpoints (Z0) plant 0xCC in guest memory at the guest-physical address the
breakpoint's linear address translates to when it is set (KVM_GUESTDBG_USE_SW_BP). Hardware
breakpoints and watchpoints (Z1-Z4) take one of DR0-DR3 each, with DR7's enable, R/W and LEN
fields (Intel SDM vol. 3 §18.2.4, AMD APM vol. 2 §13.1.1.5; KVM_GUESTDBG_USE_HW_BP). The
caller (`GdbStub`) holds its lock around every call.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from kvmkit.abi.constants import GuestDebug
from kvmkit.memory.guest import GuestMemory
from kvmkit.memory.region import GuestMemoryError

INT3 = 0xCC
DR7_FIXED = 0x0600  # GE and the reserved bit 10 (read as 1)
HW_SLOTS = 4  # DR0-DR3
HW_TYPE_BITS = {1: 0b00, 2: 0b01, 3: 0b11, 4: 0b11}  # Z type -> DR7 R/W (read: use R/W)
HW_LEN_BITS = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}  # bytes -> DR7 LEN
WATCH_NAMES = {2: "watch", 3: "rwatch", 4: "awatch"}  # Z type -> stop-reply field


@dataclass
class SwBreakpoint:
    va: int
    phys: int
    orig: int  # the byte the 0xCC replaced


@dataclass
class HwSlot:
    ztype: int  # 1 exec, 2 write, 3 read, 4 access
    addr: int
    length: int


class Breakpoints:
    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        self.sw: dict[int, SwBreakpoint] = {}
        self.hw: list[HwSlot | None] = [None] * HW_SLOTS

    # -- software
    def insert_sw(self, va: int, phys: int) -> None:
        if va in self.sw:
            return
        orig = self.mem.read_u8(phys)
        self.sw[va] = SwBreakpoint(va, phys, orig)
        self.mem.write_u8(phys, INT3)

    def remove_sw(self, va: int) -> None:
        removed = self.sw.pop(va, None)
        if removed is not None and self.read_u8(removed.phys) == INT3:
            self.mem.write_u8(removed.phys, removed.orig)

    def planted(self, va: int) -> SwBreakpoint | None:
        """The stub's breakpoint at `va` if its 0xCC is still there (the guest may have
        rewritten the byte: then an int3 there is the guest's)."""
        bp = self.sw.get(va)
        return bp if bp is not None and self.read_u8(bp.phys) == INT3 else None

    def lift(self, va: int) -> None:
        """Put the original byte back for a step over the breakpoint (`replant` after)."""
        bp = self.sw.get(va)
        if bp is not None:
            self.mem.write_u8(bp.phys, bp.orig)

    def replant(self, va: int) -> None:
        bp = self.sw.get(va)
        if bp is not None:
            with contextlib.suppress(GuestMemoryError):
                self.mem.write_u8(bp.phys, INT3)

    def memory_written(self, addr: int, data: bytes) -> None:
        """GDB wrote guest memory: a planted breakpoint inside the range keeps its 0xCC, and
        the new byte becomes the one restored when it is removed."""
        for va, bp in self.sw.items():
            if addr <= va < addr + len(data):
                bp.orig = data[va - addr]
                self.mem.write_u8(bp.phys, INT3)

    # -- hardware
    @staticmethod
    def hw_length(ztype: int, addr: int, kind: int) -> int | None:
        """The length a Z1-Z4 packet asks for, or None if DR7 cannot express it (lengths 1,
        2, 4, 8, naturally aligned; an execution breakpoint has length 1)."""
        if ztype == 1:
            return 1
        if kind not in HW_LEN_BITS or addr % kind:
            return None
        return kind

    def insert_hw(self, slot: HwSlot) -> bool:
        """False when the four debug registers are taken."""
        if slot in self.hw:
            return True
        if None not in self.hw:
            return False
        self.hw[self.hw.index(None)] = slot
        return True

    def remove_hw(self, slot: HwSlot) -> None:
        if slot in self.hw:
            self.hw[self.hw.index(slot)] = None

    def hit(self, dr6: int) -> tuple[int, HwSlot] | None:
        """The slot whose DR6 B0-B3 bit is set."""
        for index, slot in enumerate(self.hw):
            if slot is not None and dr6 & (1 << index):
                return index, slot
        return None

    # -- KVM_SET_GUEST_DEBUG
    def control(self, skip_hw: int | None = None) -> tuple[int, tuple[int, ...]]:
        """(control flags, DR0-DR7) for the breakpoints set; `skip_hw` leaves one debug
        register out (a vCPU stepping over that hardware breakpoint)."""
        ctl = 0
        if self.sw:
            ctl |= GuestDebug.ENABLE | GuestDebug.USE_SW_BP
        dregs: tuple[int, ...] = ()
        if any(self.hw):
            ctl |= GuestDebug.ENABLE | GuestDebug.USE_HW_BP
            dr7 = DR7_FIXED
            addrs = [0] * HW_SLOTS
            for index, slot in enumerate(self.hw):
                if slot is None or index == skip_hw:
                    continue
                addrs[index] = slot.addr
                dr7 |= (2 << (index * 2)) | (HW_TYPE_BITS[slot.ztype] << (16 + index * 4))
                dr7 |= HW_LEN_BITS[slot.length] << (18 + index * 4)
            dregs = (*addrs, 0, 0, 0, dr7)
        return int(ctl), dregs

    def clear(self) -> None:
        """Lift every software breakpoint still planted and free the debug registers."""
        for bp in self.sw.values():
            with contextlib.suppress(GuestMemoryError):
                if self.mem.read_u8(bp.phys) == INT3:
                    self.mem.write_u8(bp.phys, bp.orig)
        self.sw.clear()
        self.hw = [None] * HW_SLOTS

    def read_u8(self, phys: int) -> int:
        try:
            return self.mem.read_u8(phys)
        except GuestMemoryError:
            return -1
