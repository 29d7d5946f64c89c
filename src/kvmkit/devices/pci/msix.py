"""MSI-X (PCI Local Bus 3.0 §6.8.2): the capability, the vector table and the pending-bit
array, each vector delivered through KVM as an MSI route plus an irqfd.

    capability   ID 0x11 | next | Message Control (table size - 1, bit 14 function mask,
                 bit 15 enable) | Table offset/BIR | PBA offset/BIR
    table entry  Message Address (lo, hi) | Message Data | Vector Control (bit 0: masked)

Delivery: the device asks for vector N; if MSI-X is enabled and neither the function nor the
entry is masked, the vector's eventfd is written (an irqfd on its own GSI, which the GSI
routing table maps to the entry's address/data, so KVM injects the MSI with no exit);
otherwise the vector's pending bit is set and the message is sent when it is unmasked
(§6.8.2.9). The route follows the entry: a guest write to its address or data reprograms
the GSI (through `MsiRouting`, the VMM's routing table).
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass
from typing import Any, Protocol

from kvmkit.devices.irq import IrqLine
from kvmkit.devices.pci.config import CAP_ID_MSIX, PciConfigSpace
from kvmkit.snapshot.format import Fields, SnapshotError

ENTRY_SIZE = 16
MAX_VECTORS = 2048  # §6.8.2.3: Table Size is 11 bits (N - 1)
CONTROL_FUNCTION_MASK = 1 << 14
CONTROL_ENABLE = 1 << 15
VECTOR_CTRL_MASKED = 1

_ENTRY = struct.Struct("<IIII")


@dataclass(frozen=True)
class MsixState:
    """The vector table (four dwords per entry) and pending bits in a snapshot."""

    table: tuple[tuple[int, ...], ...]
    pending: tuple[bool, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"table": [list(e) for e in self.table], "pending": list(self.pending)}

    @classmethod
    def from_dict(cls, obj: Any, path: str) -> MsixState:
        f = Fields(obj, path)
        raw = f.get_list("table", MAX_VECTORS)
        if not raw:
            raise SnapshotError(f"snapshot state: {path}.table is empty")
        table = []
        for row in raw:
            if (not isinstance(row, list) or len(row) != 4
                    or not all(type(x) is int and 0 <= x <= 0xFFFFFFFF for x in row)):  # fmt: skip
                raise SnapshotError(f"snapshot state: {path}.table entries must be 4 u32 values")
            table.append(tuple(row))
        pending = f.get_list("pending", MAX_VECTORS)
        if len(pending) != len(table) or not all(isinstance(p, bool) for p in pending):
            raise SnapshotError(f"snapshot state: {path}.pending must be a bool per vector")
        return cls(tuple(table), tuple(pending))


class MsiRouting(Protocol):
    def set_msi(self, gsi: int, address: int, data: int) -> None:
        """Route `gsi` to the MSI message (address, data)."""


class Msix:
    """MSI-X state of one function: `vectors` lines (one GSI each), the table and PBA in
    BAR `bar` at `table_offset` / `pba_offset`. The capability is added to `config`, or,
    with `cap_offset`, is the one already there (a passthrough device's own)."""

    def __init__(
        self, config: PciConfigSpace, *, bar: int, table_offset: int, pba_offset: int,
        gsis: list[int], lines: list[IrqLine], routing: MsiRouting | None,
        cap_offset: int | None = None,
    ) -> None:  # fmt: skip
        count = len(gsis)
        if not 1 <= count <= MAX_VECTORS or len(lines) != count:
            raise ValueError(f"MSI-X with {count} vectors")
        if table_offset % 8 or pba_offset % 8:
            raise ValueError("MSI-X table and PBA must be 8-byte aligned (§6.8.2.4)")
        self.config = config
        self.bar = bar
        self.table_offset = table_offset
        self.pba_offset = pba_offset
        self.gsis = gsis
        self.lines = lines
        self.routing = routing
        self._lock = threading.Lock()
        # Plain data (snapshots): each entry's four dwords, and the pending bits.
        self.table: list[list[int]] = [[0, 0, 0, VECTOR_CTRL_MASKED] for _ in range(count)]
        self.pending: list[bool] = [False] * count
        body = struct.pack("<HII", count - 1, table_offset | bar, pba_offset | bar)
        # Only the function mask and enable bits are writable (§6.8.2.3).
        wmask = struct.pack("<HII", CONTROL_FUNCTION_MASK | CONTROL_ENABLE, 0, 0)
        if cap_offset is None:
            self.cap_offset = config.add_capability(CAP_ID_MSIX, body, wmask)
        else:
            if config.data[cap_offset] != CAP_ID_MSIX or cap_offset + 12 > len(config.data):
                raise ValueError(f"no MSI-X capability at {cap_offset:#x}")
            self.cap_offset = cap_offset
            config.data[cap_offset + 2 : cap_offset + 12] = body
            config.wmask[cap_offset + 2 : cap_offset + 12] = wmask

    @property
    def count(self) -> int:
        return len(self.gsis)

    @property
    def table_size(self) -> int:
        return ENTRY_SIZE * self.count

    @property
    def pba_size(self) -> int:
        return 8 * ((self.count + 63) // 64)

    def _control(self) -> int:
        return self.config.u16(self.cap_offset + 2)

    @property
    def enabled(self) -> bool:
        return bool(self._control() & CONTROL_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self._control() & CONTROL_FUNCTION_MASK)

    # -- delivery
    def notify(self, vector: int) -> None:
        """Send vector `vector` (an index the driver chose: checked here)."""
        if not 0 <= vector < self.count:
            return  # no such entry: nothing to send (the transport stores NO_VECTOR for it)
        with self._lock:
            if not self.enabled:
                return  # MSI-X off: the function signals nothing by MSI-X (§6.8.2)
            if self.function_masked or self.table[vector][3] & VECTOR_CTRL_MASKED:
                self.pending[vector] = True  # §6.8.2.9: held until unmasked
                return
        self.lines[vector].trigger()

    def _deliver_unmasked(self) -> None:
        """Send the pending messages whose vector is now unmasked (§6.8.2.9)."""
        fire: list[int] = []
        with self._lock:
            if not self.enabled or self.function_masked:
                return
            for i, pending in enumerate(self.pending):
                if pending and not self.table[i][3] & VECTOR_CTRL_MASKED:
                    self.pending[i] = False
                    fire.append(i)
        for i in fire:
            self.lines[i].trigger()

    def control_written(self) -> None:
        """The guest wrote Message Control: a cleared function mask or a new enable may
        release pending messages."""
        self._deliver_unmasked()

    # -- table and PBA accesses (offsets relative to the BAR; from the guest)
    def covers(self, offset: int) -> bool:
        return (
            self.table_offset <= offset < self.table_offset + self.table_size
            or self.pba_offset <= offset < self.pba_offset + self.pba_size
        )

    def read(self, offset: int, data: memoryview) -> None:
        length = len(data)
        # §6.8.2: software accesses the table and PBA with aligned dwords or qwords.
        if length not in (4, 8) or offset % length:
            data[:] = bytes(length)
            return
        with self._lock:
            if self.table_offset <= offset < self.table_offset + self.table_size:
                rel = offset - self.table_offset
                entry = self.table[rel // ENTRY_SIZE]
                words = [entry[(rel % ENTRY_SIZE) // 4 + i] for i in range(length // 4)]
            elif self.pba_offset <= offset < self.pba_offset + self.pba_size:
                bit0 = (offset - self.pba_offset) * 8
                bits = sum(
                    1 << i
                    for i in range(8 * length)
                    if bit0 + i < self.count and self.pending[bit0 + i]
                )
                words = [(bits >> (32 * i)) & 0xFFFFFFFF for i in range(length // 4)]
            else:
                words = [0] * (length // 4)
        struct.pack_into(f"<{len(words)}I", data, 0, *words)

    def write(self, offset: int, data: memoryview) -> None:
        length = len(data)
        if length not in (4, 8) or offset % length:
            return  # §6.8.2: other accesses are undefined; ignored
        if not self.table_offset <= offset < self.table_offset + self.table_size:
            return  # the PBA is read-only (§6.8.2.10)
        rel = offset - self.table_offset
        vector = rel // ENTRY_SIZE
        words = struct.unpack(f"<{length // 4}I", data)
        route: tuple[int, int] | None = None
        with self._lock:
            entry = self.table[vector]
            before = list(entry)
            for i, word in enumerate(words):
                field = (rel % ENTRY_SIZE) // 4 + i
                if field == 3:
                    word &= VECTOR_CTRL_MASKED  # other Vector Control bits are reserved
                entry[field] = word
            if entry[:3] != before[:3]:
                route = ((entry[1] << 32) | entry[0], entry[2])
        if route is not None and self.routing is not None:
            self.routing.set_msi(self.gsis[vector], *route)
        if before[3] & VECTOR_CTRL_MASKED and not entry[3] & VECTOR_CTRL_MASKED:
            self._deliver_unmasked()

    def reroute_all(self) -> None:
        """Program every vector's route from the table (after a restore)."""
        if self.routing is None:
            return
        for vector, entry in enumerate(self.table):
            self.routing.set_msi(self.gsis[vector], (entry[1] << 32) | entry[0], entry[2])

    def save(self) -> MsixState:
        with self._lock:
            return MsixState(tuple(tuple(e) for e in self.table), tuple(self.pending))

    def restore(self, state: MsixState) -> None:
        if len(state.table) != self.count:
            raise SnapshotError(
                f"snapshot state: MSI-X has {len(state.table)} vectors, the device {self.count}"
            )
        with self._lock:
            self.table = [list(row) for row in state.table]
            self.pending = list(state.pending)
        self.reroute_all()
