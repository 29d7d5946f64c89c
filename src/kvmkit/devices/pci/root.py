"""The PCI root: configuration mechanism #1 on ports 0xCF8-0xCFF, bus 0 with a host bridge
at 00:00.0 and device slots, and the MMIO window from which BARs are served.

Mechanism #1 (PCI Local Bus 3.0 §3.2.2.3.2): a dword write to 0xCF8 latches an address
(bit 31 enable, bus 23:16, device 15:11, function 10:8, register 7:2); accesses of 1, 2 or 4
bytes to 0xCFC-0xCFF then reach that function's register at (latch & 0xFC) + (port - 0xCFC).
Anything but a dword access to 0xCF8 is not an address write (Linux's pci_check_type1 writes
a byte to 0xCFB first and expects the latch unchanged).

BARs: one `PciMmioWindow` on the MMIO bus covers layout.PCI_MMIO_BASE..+PCI_MMIO_SIZE (the
window the DSDT's host bridge announces) and forwards an access to the function whose
enabled BAR holds it; with an I/O window, another one on the port bus does the same for
I/O BARs (passthrough devices have them; kvmkit's own functions do not). The guest may move
BARs (Linux reassigns them when it dislikes what firmware chose): a function recomputes its
mappings after every write to its command register or a BAR, and a BAR that leaves the
window, or whose memory decoding is off, is simply not served.
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass
from typing import Any

from kvmkit.devices.pci.config import (
    BAR0,
    BAR_COUNT,
    COMMAND,
    COMMAND_MEMORY,
    PciConfigSpace,
)
from kvmkit.snapshot.format import Fields, SnapshotError

log = logging.getLogger(__name__)

CONFIG_ADDRESS_PORT = 0xCF8
CONFIG_PORTS = 8  # 0xCF8-0xCFB address, 0xCFC-0xCFF data
_ENABLE = 1 << 31
# Reserved bits 30:24 and 1:0 read as 0 (AMD's extended-register bits 27:24 included:
# kvmkit has no extended configuration space).
_ADDRESS_MASK = 0x80FF_FFFC
SLOTS = 32

# The host bridge's identity: Red Hat's "QEMU PCIe host bridge" IDs (1b36:0008), which
# Linux knows no quirks for; class 06/00/00 (host bridge) is what Linux's pci_sanity_check
# looks for on bus 0 before it trusts mechanism #1.
HOST_BRIDGE_VENDOR = 0x1B36
HOST_BRIDGE_DEVICE = 0x0008
CLASS_HOST_BRIDGE = 0x060000


class PciFunction:
    """A type-0 function: its configuration space and the BAR accesses it serves.
    Subclasses implement `bar_read`/`bar_write` and may react to config writes."""

    def __init__(self, config: PciConfigSpace) -> None:
        self.config = config
        self.lock = threading.RLock()
        # (start, size, bar index) of each memory BAR the function answers right now, and
        # of each I/O BAR (ports).
        self.mapped: list[tuple[int, int, int]] = []
        self.io_mapped: list[tuple[int, int, int]] = []
        self.window: tuple[int, int] = (0, 0)  # set by the root: (base, size)

    # -- configuration space
    def config_read(self, offset: int, length: int) -> int:
        with self.lock:
            return self.config.read(offset, length)

    def config_write(self, offset: int, length: int, value: int) -> None:
        with self.lock:
            if not self.config.write(offset, length, value):
                return
            self.config_written(offset, length)
            end = offset + length
            command = offset < COMMAND + 2 and end > COMMAND
            bars = offset < BAR0 + 4 * BAR_COUNT and end > BAR0
            if command or bars:
                self.remap()

    def config_written(self, offset: int, length: int) -> None:
        """Hook: a guest write landed in [offset, offset+length) (capabilities use it)."""

    def remap(self) -> None:
        """Recompute which BARs answer: memory decoding on (§6.2.2 bit 1), and the whole BAR
        inside the root's window (a BAR the guest moved elsewhere is not served)."""
        base, size = self.window
        mapped: list[tuple[int, int, int]] = []
        if self.config.command & COMMAND_MEMORY:
            for i, bar_size in enumerate(self.config.bar_sizes):
                addr = self.config.bar_address(i)
                if bar_size and base <= addr and addr + bar_size <= base + size:
                    mapped.append((addr, bar_size, i))
        if mapped != self.mapped:
            old = self.mapped
            self.mapped = mapped
            self.mapping_changed(old, mapped)

    def mapping_changed(
        self, old: list[tuple[int, int, int]], new: list[tuple[int, int, int]]
    ) -> None:
        """Hook: BARs moved or were enabled/disabled (move ioeventfds here)."""

    # -- BARs
    def bar_read(self, bar: int, offset: int, data: memoryview) -> None:
        data[:] = b"\xff" * len(data)

    def bar_write(self, bar: int, offset: int, data: memoryview) -> None:
        pass


class HostBridge(PciFunction):
    def __init__(self) -> None:
        super().__init__(
            PciConfigSpace(
                vendor=HOST_BRIDGE_VENDOR, device=HOST_BRIDGE_DEVICE,
                class_code=CLASS_HOST_BRIDGE,
            )
        )  # fmt: skip


# Version of PciRootState's data. Files written before it had one hold the same fields and
# load as version 1.
ROOT_STATE_VERSION = 1


@dataclass(frozen=True)
class PciRootState:
    """The root's only run-time state: the 0xCF8 address latch."""

    address: int

    def to_dict(self) -> dict[str, Any]:
        return {"version": ROOT_STATE_VERSION, "address": self.address}

    @classmethod
    def from_dict(cls, obj: Any, path: str = "pci_root") -> PciRootState:
        f = Fields(obj, path)
        version = f.get_int("version", 0, 2**32 - 1) if f.has("version") else 1
        if version != ROOT_STATE_VERSION:
            raise SnapshotError(f"snapshot state: {path}: PCI root state version {version}")
        address = f.get_int("address", 0, 0xFFFFFFFF)
        if address & ~_ADDRESS_MASK:
            raise SnapshotError(f"snapshot state: {path}.address {address:#x} has reserved bits")
        return cls(address)


class PciRoot:
    """Bus 0. `pio` is the BusDevice for ports 0xCF8-0xCFF, `mmio` the one for the BAR
    window; `add(function)` puts a function in the next free slot."""

    def __init__(
        self, window_base: int, window_size: int, io_window: tuple[int, int] | None = None
    ) -> None:
        self.window_base = window_base
        self.window_size = window_size
        self.io_window = io_window
        self.slots: list[PciFunction | None] = [None] * SLOTS
        self._address = 0
        self._lock = threading.Lock()
        self._next_bar = window_base
        self._next_io = io_window[0] if io_window else 0
        self.pio = PciConfigIo(self)
        self.mmio = PciMmioWindow(self)
        self.io = PciMmioWindow(self, io=True) if io_window else None
        self.add(HostBridge())

    def add(self, function: PciFunction) -> int:
        """Place `function` in the first free slot (function 0) and return the slot."""
        for slot, f in enumerate(self.slots):
            if f is None:
                self.slots[slot] = function
                function.window = (self.window_base, self.window_size)
                function.remap()
                return slot
        raise ValueError("PCI bus 0 is full")

    def allocate_bar(self, size: int) -> int:
        """An address for a BAR of `size` bytes in the window, naturally aligned (firmware's
        job on a PC; the guest keeps it unless it reassigns)."""
        addr = (self._next_bar + size - 1) & ~(size - 1)
        if addr + size > self.window_base + self.window_size:
            raise ValueError("PCI MMIO window full")
        self._next_bar = addr + size
        return addr

    def allocate_io_bar(self, size: int) -> int:
        """A port range of `size` for an I/O BAR in the I/O window, naturally aligned."""
        if self.io_window is None:
            raise ValueError("this PCI bus has no I/O window")
        base, length = self.io_window
        addr = (self._next_io + size - 1) & ~(size - 1)
        if addr + size > base + length:
            raise ValueError("PCI I/O window full")
        self._next_io = addr + size
        return addr

    def function(self, bus: int, slot: int, fn: int) -> PciFunction | None:
        if bus != 0 or fn != 0 or not 0 <= slot < SLOTS:
            return None  # single-function devices on bus 0 only
        return self.slots[slot]

    # -- mechanism #1
    def _target(self, port_offset: int) -> tuple[PciFunction | None, int]:
        with self._lock:
            address = self._address
        if not address & _ENABLE:
            return None, 0
        bus, slot, fn = (address >> 16) & 0xFF, (address >> 11) & 0x1F, (address >> 8) & 7
        return self.function(bus, slot, fn), (address & 0xFC) + port_offset

    def io_read(self, offset: int, data: memoryview) -> None:
        length = len(data)
        if offset == 0 and length == 4:
            with self._lock:
                struct.pack_into("<I", data, 0, self._address)
            return
        if offset >= 4 and offset + length <= CONFIG_PORTS and length in (1, 2, 4):
            function, reg = self._target(offset - 4)
            if function is not None:
                value = function.config_read(reg, length)
                data[:] = value.to_bytes(length, "little")
                return
        # No function there (or a stray access): all ones, as a master abort reads.
        data[:] = b"\xff" * length

    def io_write(self, offset: int, data: memoryview) -> None:
        length = len(data)
        if offset == 0 and length == 4:
            with self._lock:
                self._address = struct.unpack("<I", data)[0] & _ADDRESS_MASK
            return
        if offset >= 4 and offset + length <= CONFIG_PORTS and length in (1, 2, 4):
            function, reg = self._target(offset - 4)
            if function is not None:
                function.config_write(reg, length, int.from_bytes(data, "little"))

    # -- BAR window
    def find_bar(
        self, addr: int, length: int, *, io: bool = False
    ) -> tuple[PciFunction, int, int] | None:
        """(function, BAR index, offset in the BAR) of the enabled BAR holding all of
        [addr, addr+length): a memory BAR, or with `io` an I/O BAR (ports)."""
        for function in self.slots:
            if function is None:
                continue
            for start, size, bar in function.io_mapped if io else function.mapped:
                if start <= addr and addr + length <= start + size:
                    return function, bar, addr - start
        return None

    def save(self) -> PciRootState:
        with self._lock:
            return PciRootState(self._address)

    def restore(self, state: PciRootState) -> None:
        with self._lock:
            self._address = state.address


class PciConfigIo:
    """Ports 0xCF8-0xCFF as a BusDevice."""

    def __init__(self, root: PciRoot) -> None:
        self.root = root

    def read(self, offset: int, data: memoryview) -> None:
        self.root.io_read(offset, data)

    def write(self, offset: int, data: memoryview) -> None:
        self.root.io_write(offset, data)


class PciMmioWindow:
    """A BAR window as a BusDevice: offsets are relative to the window base. The memory
    window by default; with `io`, the I/O window on the port bus."""

    def __init__(self, root: PciRoot, *, io: bool = False) -> None:
        self.root = root
        self.io = io
        if io:
            assert root.io_window is not None
            self.base = root.io_window[0]
        else:
            self.base = root.window_base

    def read(self, offset: int, data: memoryview) -> None:
        hit = self.root.find_bar(self.base + offset, len(data), io=self.io)
        if hit is None:
            data[:] = b"\xff" * len(data)  # nothing decodes it: all ones, as a PC bus reads
            return
        function, bar, off = hit
        function.bar_read(bar, off, data)

    def write(self, offset: int, data: memoryview) -> None:
        hit = self.root.find_bar(self.base + offset, len(data), io=self.io)
        if hit is not None:
            function, bar, off = hit
            function.bar_write(bar, off, data)
