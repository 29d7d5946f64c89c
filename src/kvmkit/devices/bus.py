"""Port-I/O and MMIO dispatch: a sorted set of non-overlapping ranges, each owned by a device.

The vCPU run loop hands every IO/MMIO exit to `Bus.read`/`Bus.write` with the guest address
and the exit's data view; the device sees an offset relative to the start of its range. The
offset and length come from the guest, so the bus checks that the whole access lies inside
one range before the device sees it.
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass
from typing import Protocol


class BusDevice(Protocol):
    def read(self, offset: int, data: memoryview) -> None:
        """Fill `data` (1, 2, 4 or 8 bytes) with the register at `offset`."""

    def write(self, offset: int, data: memoryview) -> None:
        """Take the bytes the guest wrote at `offset`."""


class BusError(ValueError):
    pass


@dataclass(frozen=True)
class _Range:
    base: int
    length: int
    device: BusDevice
    name: str

    @property
    def end(self) -> int:
        return self.base + self.length


class Bus:
    """One address space (port I/O or MMIO)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._ranges: list[_Range] = []
        self._bases: list[int] = []
        # Devices may be called from several vCPU threads; each device keeps its own lock
        # where it has state shared with other threads. The bus itself is read-mostly.
        self._lock = threading.Lock()

    def insert(self, device: BusDevice, base: int, length: int, name: str = "") -> None:
        if length <= 0 or base < 0:
            raise BusError(f"{self.name}: bad range {base:#x}+{length:#x}")
        with self._lock:
            for r in self._ranges:
                if base < r.end and r.base < base + length:
                    raise BusError(
                        f"{self.name}: {name or device} at {base:#x}+{length:#x} overlaps "
                        f"{r.name or r.device} at {r.base:#x}+{r.length:#x}"
                    )
            i = bisect.bisect(self._bases, base)
            self._ranges.insert(i, _Range(base, length, device, name or type(device).__name__))
            self._bases.insert(i, base)

    def find(self, addr: int, length: int = 1) -> tuple[BusDevice, int] | None:
        """The device whose range holds all of [addr, addr+length) and the offset in it."""
        i = bisect.bisect_right(self._bases, addr) - 1
        if i < 0:
            return None
        r = self._ranges[i]
        if addr + length > r.end:
            return None
        return r.device, addr - r.base

    def read(self, addr: int, data: memoryview) -> bool:
        """Dispatch a read; False when no device claims the address (the caller decides what
        an unclaimed read returns: all ones, as on a PC bus)."""
        # `find` inlined: this runs on every port-I/O and MMIO exit, and its tuple would be
        # the only object the dispatch builds.
        i = bisect.bisect_right(self._bases, addr) - 1
        if i < 0:
            return False
        r = self._ranges[i]
        if addr + len(data) > r.base + r.length:
            return False
        r.device.read(addr - r.base, data)
        return True

    def write(self, addr: int, data: memoryview) -> bool:
        i = bisect.bisect_right(self._bases, addr) - 1
        if i < 0:
            return False
        r = self._ranges[i]
        if addr + len(data) > r.base + r.length:
            return False
        r.device.write(addr - r.base, data)
        return True

    def write_burst(self, addr: int, size: int, data: bytes) -> bool:
        """`len(data) // size` writes of `size` bytes to `addr`, in order (from the coalesced
        ring). A device with a `write_burst(offset, data)` method takes one-byte runs at
        once; others see each write."""
        hit = self.find(addr, size)
        if hit is None or size <= 0:
            return False
        device, offset = hit
        burst = getattr(device, "write_burst", None)
        if size == 1 and burst is not None:
            burst(offset, data)
            return True
        view = memoryview(data)
        for i in range(0, len(data) - size + 1, size):
            device.write(offset, view[i : i + size])
        return True

    def devices(self) -> list[tuple[int, int, str]]:
        return [(r.base, r.length, r.name) for r in self._ranges]
