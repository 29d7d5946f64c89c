"""A type-0 PCI configuration space (PCI Local Bus 3.0 §6.1, §6.2) as plain data.

256 bytes of registers plus a mask of the bits the guest may write: a write changes only
the writable bits, so read-only fields (IDs, class, capability structures) need no code.
BARs fall out of the same rule: the writable bits of a memory BAR are its address bits
above its size, so the all-ones write a driver uses for sizing (§6.2.5.1) reads back as
~(size - 1) | flags, the size mask.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from kvmkit.snapshot.format import Fields, SnapshotError

CONFIG_SIZE = 256  # conventional PCI (no extended space: mechanism #1 reaches 256 bytes)

# Header registers (§6.1, figure 6-1)
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09  # programming interface, then sub-class (0x0A) and base class (0x0B)
CACHE_LINE_SIZE = 0x0C
LATENCY_TIMER = 0x0D
HEADER_TYPE = 0x0E
BAR0 = 0x10
BAR_COUNT = 6
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

# Command register bits (§6.2.2)
COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
COMMAND_INTX_DISABLE = 1 << 10
# Status register (§6.2.3): a capability list is present (§6.7)
STATUS_CAP_LIST = 1 << 4

# Memory BAR flag bits (§6.2.5.1): bit 0 = 0 (memory), bits 2:1 type (00: 32-bit)
BAR_MEM_32 = 0x0
BAR_FLAG_BITS = 0xF
MIN_BAR_SIZE = 16  # §6.2.5.1: at least 16 bytes of memory space

CAP_ID_VENDOR = 0x09
CAP_ID_MSIX = 0x11
FIRST_CAP_OFFSET = 0x40  # capabilities live after the 64-byte header (§6.7)

_U32 = struct.Struct("<I")


@dataclass(frozen=True)
class PciConfigState:
    """A function's 256 configuration bytes in a snapshot (hex in the file)."""

    data: bytes

    def to_dict(self) -> dict[str, Any]:
        return {"data": self.data.hex()}

    @classmethod
    def from_dict(cls, obj: Any, path: str) -> PciConfigState:
        f = Fields(obj, path)
        text = f.get_str("data", 2 * CONFIG_SIZE)
        try:
            data = bytes.fromhex(text)
        except ValueError:
            raise SnapshotError(f"snapshot state: {path}.data is not hex") from None
        if len(data) != CONFIG_SIZE:
            raise SnapshotError(f"snapshot state: {path}.data must be {CONFIG_SIZE} bytes")
        return cls(data)


class PciConfigSpace:
    """Registers and write mask of one function; every access is bounds-checked here."""

    def __init__(
        self, *, vendor: int, device: int, class_code: int, revision: int = 0,
        subsystem_vendor: int = 0, subsystem: int = 0,
    ) -> None:  # fmt: skip
        self.data = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        struct.pack_into("<HH", self.data, VENDOR_ID, vendor, device)
        struct.pack_into("<I", self.data, REVISION_ID, (class_code << 8) | (revision & 0xFF))
        struct.pack_into("<HH", self.data, SUBSYSTEM_VENDOR_ID, subsystem_vendor, subsystem)
        self.data[HEADER_TYPE] = 0x00  # type 0, single function
        # Memory space, bus master and INTx disable are the command bits drivers set (Linux
        # pci_enable_device, pci_set_master, pci_intx); no I/O BARs, so no I/O enable.
        self._set_wmask(COMMAND, 2, COMMAND_MEMORY | COMMAND_MASTER | COMMAND_INTX_DISABLE)
        # Scratch registers software may write (§6.2.4): cache line size, latency timer and
        # interrupt line (what the OS routed INTx to; informational for the device).
        self.wmask[CACHE_LINE_SIZE] = 0xFF
        self.wmask[LATENCY_TIMER] = 0xFF
        self.wmask[INTERRUPT_LINE] = 0xFF
        self.bar_sizes = [0] * BAR_COUNT
        self._last_cap = 0  # offset of the last capability (its next pointer is 0)
        self._next_free = FIRST_CAP_OFFSET

    def _set_wmask(self, offset: int, length: int, mask: int) -> None:
        self.wmask[offset : offset + length] = mask.to_bytes(length, "little")

    # -- building
    def add_mem_bar(self, index: int, size: int, address: int) -> None:
        """A 32-bit non-prefetchable memory BAR of `size` bytes (a power of two) at
        `address` (aligned to its size, as firmware would place it)."""
        if not 0 <= index < BAR_COUNT or self.bar_sizes[index]:
            raise ValueError(f"BAR{index}: bad index or already defined")
        if size < MIN_BAR_SIZE or size & (size - 1) or size > 1 << 31:
            raise ValueError(f"BAR{index}: size {size:#x} is not a power of two >= 16")
        if address % size or address + size > 1 << 32:
            raise ValueError(f"BAR{index}: {address:#x} not aligned to {size:#x}")
        self.bar_sizes[index] = size
        reg = BAR0 + 4 * index
        _U32.pack_into(self.data, reg, address | BAR_MEM_32)
        self._set_wmask(reg, 4, ~(size - 1) & 0xFFFFFFFF)

    def add_capability(self, cap_id: int, body: bytes, wmask: bytes | None = None) -> int:
        """Append a capability (§6.7): `body` is everything after the ID and next-pointer
        bytes; `wmask` the writable bits of the same bytes. Returns its offset."""
        length = 2 + len(body)
        offset = self._next_free
        if offset + length > CONFIG_SIZE:
            raise ValueError("PCI configuration space full")
        self.data[offset] = cap_id
        self.data[offset + 1] = 0
        self.data[offset + 2 : offset + length] = body
        if wmask is not None:
            if len(wmask) != len(body):
                raise ValueError("capability write mask must match its body")
            self.wmask[offset + 2 : offset + length] = wmask
        if self._last_cap:
            self.data[self._last_cap + 1] = offset
        else:
            self.data[CAPABILITIES_POINTER] = offset
            status = int.from_bytes(self.data[STATUS : STATUS + 2], "little")
            self.data[STATUS : STATUS + 2] = (status | STATUS_CAP_LIST).to_bytes(2, "little")
        self._last_cap = offset
        # Capabilities are dword aligned: the bottom two bits of a pointer are reserved.
        self._next_free = (offset + length + 3) & ~3
        return offset

    # -- guest accesses (offset and length come from the guest)
    def read(self, offset: int, length: int) -> int:
        if length not in (1, 2, 4) or offset < 0 or offset + length > CONFIG_SIZE:
            return (1 << (8 * length)) - 1 if 0 < length <= 8 else 0
        return int.from_bytes(self.data[offset : offset + length], "little")

    def write(self, offset: int, length: int, value: int) -> bool:
        """Apply a write through the mask; False if it was outside the space (ignored)."""
        if length not in (1, 2, 4) or offset < 0 or offset + length > CONFIG_SIZE:
            return False
        raw = (value & ((1 << (8 * length)) - 1)).to_bytes(length, "little")
        for i, byte in enumerate(raw):
            mask = self.wmask[offset + i]
            old = self.data[offset + i]
            self.data[offset + i] = (old & ~mask) | (byte & mask)
        return True

    # -- state the device acts on
    def u16(self, offset: int) -> int:
        return int.from_bytes(self.data[offset : offset + 2], "little")

    def u32(self, offset: int) -> int:
        return int(_U32.unpack_from(self.data, offset)[0])

    @property
    def command(self) -> int:
        return self.u16(COMMAND)

    def bar_address(self, index: int) -> int:
        return self.u32(BAR0 + 4 * index) & ~BAR_FLAG_BITS

    def save(self) -> PciConfigState:
        """For snapshots: only the registers change at run time."""
        return PciConfigState(bytes(self.data))

    def restore(self, state: PciConfigState) -> None:
        # Only the writable bits come from the snapshot: IDs and capabilities stay ours.
        for i, byte in enumerate(state.data):
            mask = self.wmask[i]
            self.data[i] = (self.data[i] & ~mask) | (byte & mask)
