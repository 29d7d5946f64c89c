"""MSI and MSI-X of a passthrough function, emulated by kvmkit and delivered without Python
on the path: the host kernel's vfio-pci signals one eventfd per vector (VFIO_DEVICE_SET_IRQS)
and each eventfd is a KVM irqfd on a GSI whose route is the message the guest programmed.

The guest's capability registers live only in kvmkit's copy of the configuration space (the
device is programmed by the host kernel with the host's own messages). What the guest writes
decides the routes, whether VFIO's MSI/MSI-X is on, and, for masking, whether a vector's
irqfd is assigned: a masked vector's eventfd is detached from KVM, so its interrupts wait in
the eventfd and are delivered the moment the vector is unmasked and the irqfd reattached (KVM
injects at once when an irqfd is assigned to a signalled eventfd). Pending bits read as that
eventfd state. (PCI Local Bus 3.0 §6.8.1 MSI, §6.8.2 MSI-X.)
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable

from kvmkit.abi import vfio as abi
from kvmkit.devices.irq import IrqLine, NoIrq
from kvmkit.devices.pci.config import PciConfigSpace
from kvmkit.devices.pci.msix import ENTRY_SIZE, VECTOR_CTRL_MASKED, Msix
from kvmkit.devices.vfio.platform import VfioPlatform, eventfd_pending, irqs_off, new_eventfd
from kvmkit.guestlog import GuestLog
from kvmkit.vfio.handles import VfioDevice

log = logging.getLogger(__name__)
# Lines a guest can cause (its config and BAR writes), rate-limited (kvmkit.guestlog).
glog = GuestLog(log)

MAX_MSI_VECTORS = 32  # §6.8.1.3: Multiple Message Capable is at most 101b (32)


def _u16(config: PciConfigSpace, offset: int) -> int:
    return config.u16(offset)


class _Vectors:
    """GSIs and eventfds of one interrupt index, and which are wired to KVM right now."""

    def __init__(self, platform: VfioPlatform, count: int) -> None:
        self.platform = platform
        self.gsis: list[int] = []
        self.fds: list[int] = []
        try:
            for _ in range(count):
                self.gsis.append(platform.allocate_gsi())
                self.fds.append(new_eventfd())
        except BaseException:
            self.close()
            raise
        self.assigned = [False] * count

    def wire(self, vector: int, on: bool) -> None:
        if self.assigned[vector] == on:
            return
        try:
            self.platform.irqfd(self.fds[vector], self.gsis[vector], deassign=not on)
            self.assigned[vector] = on
        except OSError as err:
            glog.warning("irqfd for GSI %d: %s", self.gsis[vector], err)

    def unwire_all(self) -> None:
        for vector in range(len(self.fds)):
            self.wire(vector, False)

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)
        self.fds = []


class VfioMsi:
    """The MSI capability at `cap` of `config` (kvmkit's copy), emulated."""

    def __init__(
        self, config: PciConfigSpace, emulated: bytearray, cap: int, device: VfioDevice,
        platform: VfioPlatform, intx_off: Callable[[], None], intx_on: Callable[[], None],
    ) -> None:  # fmt: skip
        self.config, self.cap, self.device, self.platform = config, cap, device, platform
        self.intx_off, self.intx_on = intx_off, intx_on
        control = _u16(config, cap + abi.PCI_MSI_FLAGS)
        self.is64 = bool(control & abi.PCI_MSI_FLAGS_64BIT)
        self.maskable = bool(control & abi.PCI_MSI_FLAGS_MASKBIT)
        self.max_vectors = min(1 << ((control & abi.PCI_MSI_FLAGS_QMASK) >> 1), MAX_MSI_VECTORS)
        self.address_hi = cap + abi.PCI_MSI_ADDRESS_HI if self.is64 else None
        self.data_at = cap + (abi.PCI_MSI_DATA_64 if self.is64 else abi.PCI_MSI_DATA_32)
        self.mask_at = cap + (abi.PCI_MSI_MASK_64 if self.is64 else abi.PCI_MSI_MASK_32)
        self.pending_at = self.mask_at + 4
        self.end = self.pending_at + 4 if self.maskable else self.data_at + 2
        self._fixed = control & (
            abi.PCI_MSI_FLAGS_QMASK | abi.PCI_MSI_FLAGS_64BIT | abi.PCI_MSI_FLAGS_MASKBIT
        )
        emulated[cap + 2 : self.end] = b"\x01" * (self.end - cap - 2)
        self._wmask(cap + abi.PCI_MSI_FLAGS, 2, abi.PCI_MSI_FLAGS_ENABLE | abi.PCI_MSI_FLAGS_QSIZE)
        self._wmask(cap + abi.PCI_MSI_ADDRESS_LO, 4, 0xFFFFFFFC)  # bits 1:0 reserved
        if self.address_hi is not None:
            self._wmask(self.address_hi, 4, 0xFFFFFFFF)
        self._wmask(self.data_at, 2, 0xFFFF)
        if self.maskable:
            self._wmask(self.mask_at, 4, (1 << self.max_vectors) - 1)
        self.vectors: _Vectors | None = None  # allocated at the first enable
        self.active = 0  # vectors VFIO signals now (0: MSI off at the host)
        self.reset()

    def _wmask(self, offset: int, length: int, mask: int) -> None:
        self.config.wmask[offset : offset + length] = mask.to_bytes(length, "little")

    def reset(self) -> None:
        """Registers as after reset (§6.8.1: MSI disabled, one message), MSI off at VFIO."""
        self._disable()
        self.config.data[self.cap + 2 : self.end] = bytes(self.end - self.cap - 2)
        struct.pack_into("<H", self.config.data, self.cap + abi.PCI_MSI_FLAGS, self._fixed)

    def covers(self, offset: int, length: int) -> bool:
        return offset < self.end and offset + length > self.cap + 2

    # -- guest state
    def _message(self) -> tuple[bool, int, int, int, int]:
        c = self.config
        control = c.u16(self.cap + abi.PCI_MSI_FLAGS)
        enabled = bool(control & abi.PCI_MSI_FLAGS_ENABLE)
        n = min(1 << ((control & abi.PCI_MSI_FLAGS_QSIZE) >> 4), self.max_vectors)
        address = c.u32(self.cap + abi.PCI_MSI_ADDRESS_LO)
        if self.address_hi is not None:
            address |= c.u32(self.address_hi) << 32
        data = c.u16(self.data_at)
        mask = c.u32(self.mask_at) if self.maskable else 0
        return enabled, n, address, data, mask

    def written(self) -> None:
        """The guest wrote the capability: follow enable, vector count, message, masks."""
        enabled, n, address, data, mask = self._message()
        if self.active and (not enabled or n != self.active):
            self._disable()
        if enabled and not self.active:
            self._enable(n)
        if not self.active or self.vectors is None:
            return
        for i in range(self.active):
            # §6.8.1.6: with N messages the function sets the low log2(N) bits of the data.
            self.platform.set_msi(self.vectors.gsis[i], address, (data & ~(self.active - 1)) | i)
            self.vectors.wire(i, not mask & (1 << i))

    def refresh_pending(self) -> None:
        """Pending bits (read-only): masked vectors whose interrupt is waiting."""
        if not self.maskable:
            return
        bits = 0
        if self.vectors is not None:
            for i in range(self.active):
                if not self.vectors.assigned[i] and eventfd_pending(self.vectors.fds[i]):
                    bits |= 1 << i
        struct.pack_into("<I", self.config.data, self.pending_at, bits)

    def _enable(self, n: int) -> None:
        if self.vectors is None:
            self.vectors = _Vectors(self.platform, self.max_vectors)
        self.intx_off()  # VFIO switches between INTx and MSI, never both (vfio_pci_intrs.c)
        try:
            self.device.set_irqs(
                abi.PciIrq.MSI, abi.IrqSetFlag.ACTION_TRIGGER, eventfds=self.vectors.fds[:n]
            )
        except OSError as err:
            glog.warning("%s: enabling %d MSI vector(s) failed: %s", self.device.name, n, err)
            self.intx_on()
            return
        self.active = n

    def _disable(self) -> None:
        if not self.active:
            return
        irqs_off(self.device, abi.PciIrq.MSI)
        if self.vectors is not None:
            self.vectors.unwire_all()
            for gsi in self.vectors.gsis:
                self.platform.set_msi(gsi, 0, 0)
        self.active = 0
        self.intx_on()

    def close(self) -> None:
        self._disable()
        if self.vectors is not None:
            self.vectors.close()
            self.vectors = None


class VfioMsix(Msix):
    """The device's MSI-X capability (at `cap`), its table and PBA emulated by `Msix`; the
    vectors are VFIO eventfds wired to KVM while enabled and unmasked."""

    def __init__(
        self, config: PciConfigSpace, emulated: bytearray, cap: int, device: VfioDevice,
        platform: VfioPlatform, intx_off: Callable[[], None], intx_on: Callable[[], None],
    ) -> None:  # fmt: skip
        control = config.u16(cap + abi.PCI_MSIX_FLAGS)
        table = config.u32(cap + abi.PCI_MSIX_TABLE)
        pba = config.u32(cap + abi.PCI_MSIX_PBA)
        count = (control & abi.PCI_MSIX_FLAGS_QSIZE) + 1
        self.device, self.platform = device, platform
        self.intx_off, self.intx_on = intx_off, intx_on
        self.table_bar = table & abi.PCI_MSIX_TABLE_BIR
        self.pba_bar = pba & abi.PCI_MSIX_TABLE_BIR
        self.vectors = _Vectors(platform, count)
        self.active = False
        # Delivery is the device's (VFIO's eventfds), never kvmkit's: these lines stay unused.
        lines: list[IrqLine] = [NoIrq() for _ in range(count)]
        try:
            super().__init__(
                config, bar=self.table_bar, table_offset=table & abi.PCI_MSIX_TABLE_OFFSET,
                pba_offset=pba & abi.PCI_MSIX_TABLE_OFFSET, gsis=self.vectors.gsis,
                lines=lines, routing=platform, cap_offset=cap,
            )  # fmt: skip
        except ValueError:
            self.vectors.close()
            raise
        # Msix wrote the PBA's BIR as the table's; keep the device's own.
        struct.pack_into("<I", config.data, cap + abi.PCI_MSIX_PBA, pba)
        emulated[cap + 2 : cap + 12] = b"\x01" * 10

    # -- where the table and PBA are (they may be in different BARs)
    def in_table(self, bar: int, offset: int) -> bool:
        return bar == self.table_bar and 0 <= offset - self.table_offset < self.table_size

    def in_pba(self, bar: int, offset: int) -> bool:
        return bar == self.pba_bar and 0 <= offset - self.pba_offset < self.pba_size

    def holes(self, bar: int) -> list[tuple[int, int]]:
        """(offset, size) of what of BAR `bar` kvmkit must trap."""
        out = []
        if bar == self.table_bar:
            out.append((self.table_offset, self.table_size))
        if bar == self.pba_bar:
            out.append((self.pba_offset, self.pba_size))
        return out

    # -- accesses (Msix checks sizes and alignment)
    def bar_read(self, bar: int, offset: int, data: memoryview) -> None:
        if self.in_table(bar, offset):
            super().read(offset, data)
            return
        length = len(data)
        if length not in (4, 8) or offset % length:
            data[:] = bytes(length)
            return
        bit0 = (offset - self.pba_offset) * 8
        bits = 0
        for i in range(8 * length):
            v = bit0 + i
            if v < self.count and not self.vectors.assigned[v] and self.active:
                if eventfd_pending(self.vectors.fds[v]):
                    bits |= 1 << i
        data[:] = bits.to_bytes(length, "little")

    def bar_write(self, bar: int, offset: int, data: memoryview) -> None:
        if not self.in_table(bar, offset):
            return  # the PBA is read-only (§6.8.2.10)
        super().write(offset, data)
        self._sync((offset - self.table_offset) // ENTRY_SIZE)

    def _deliver_unmasked(self) -> None:
        """Msix calls this on an unmask: here pending interrupts wait in the eventfds, and
        bar_write/control_written reattach the irqfds, which delivers them."""

    def _sync_all(self) -> None:
        for vector in range(self.count):
            self._sync(vector)

    def _sync(self, vector: int) -> None:
        if not 0 <= vector < self.count:
            return
        masked = self.function_masked or self.table[vector][3] & VECTOR_CTRL_MASKED
        self.vectors.wire(vector, self.active and not masked)

    def control_written(self) -> None:
        if self.enabled and not self.active:
            self.intx_off()
            try:
                self.device.set_irqs(
                    abi.PciIrq.MSIX, abi.IrqSetFlag.ACTION_TRIGGER, eventfds=self.vectors.fds
                )
                self.active = True
            except OSError as err:
                glog.warning("%s: enabling MSI-X failed: %s", self.device.name, err)
                self.intx_on()
        elif not self.enabled and self.active:
            self._disable()
        self._sync_all()

    def _disable(self) -> None:
        if not self.active:
            return
        irqs_off(self.device, abi.PciIrq.MSIX)
        self.active = False
        self.vectors.unwire_all()
        self.intx_on()

    def reset(self) -> None:
        """As after reset (§6.8.2.3: MSI-X off, function unmasked; every entry masked)."""
        self._disable()
        cap = self.cap_offset + abi.PCI_MSIX_FLAGS
        control = self.config.u16(cap) & ~(abi.PCI_MSIX_FLAGS_ENABLE | abi.PCI_MSIX_FLAGS_MASKALL)
        struct.pack_into("<H", self.config.data, cap, control)
        with self._lock:
            self.table = [[0, 0, 0, VECTOR_CTRL_MASKED] for _ in range(self.count)]
        for gsi in self.gsis:
            self.platform.set_msi(gsi, 0, 0)

    def close(self) -> None:
        self._disable()
        self.vectors.close()
