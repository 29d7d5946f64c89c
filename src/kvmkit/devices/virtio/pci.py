"""The modern virtio-pci transport (virtio 1.2 §4.1), non-transitional.

A `VirtioPci` is a PCI function (vendor 0x1AF4, device 0x1040 + virtio device ID, revision
1, §4.1.2) with one 32-bit memory BAR that holds every structure:

    BAR0 + 0x0000  common configuration   (§4.1.4.3, 0x40 bytes)
           0x1000  ISR status             (§4.1.4.5, 1 byte, read-to-clear)
           0x2000  device configuration   (§4.1.4.6, the device's config space)
           0x3000  notifications          (§4.1.4.4, queue i at 4 * i; KVM ioeventfds)
           0x4000  MSI-X table            (PCI 3.0 §6.8.2, one entry per queue + config)
           0x5000  MSI-X pending bits
    size   0x8000

and the vendor capabilities (ID 0x09, §4.1.4) that point the driver at them, plus the MSI-X
capability. Interrupts are MSI-X only (§4.1.5.1.2): each vector is a GSI with an MSI route
and an irqfd; VIRTIO_MSI_NO_VECTOR means the event raises no interrupt. There is no INTx
(interrupt pin 0), so a driver that cannot enable MSI-X gets no interrupts; Linux always
can. The device itself (`VirtioDevice`) is the same object the virtio-mmio transport uses.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from kvmkit.devices.irq import IrqLine
from kvmkit.devices.pci.config import (
    CAP_ID_VENDOR,
    COMMAND,
    COMMAND_MEMORY,
    PciConfigSpace,
    PciConfigState,
)
from kvmkit.devices.pci.msix import MsiRouting, Msix, MsixState
from kvmkit.devices.pci.root import PciFunction
from kvmkit.devices.virtio.device import INT_CONFIG, INT_VRING, VirtioDevice
from kvmkit.devices.virtio.queue import QueueArea
from kvmkit.memory import GuestMemory
from kvmkit.snapshot.format import Fields, SnapshotError

log = logging.getLogger(__name__)

VENDOR_ID = 0x1AF4  # §4.1.2: PCI vendor of every virtio device
DEVICE_ID_BASE = 0x1040  # §4.1.2: modern devices are 0x1040 + the virtio device ID
REVISION = 1  # §4.1.2.1: non-transitional devices have revision ID 1 or higher

# PCI class codes per virtio device type (what QEMU reports; informational, Linux's
# virtio_pci matches vendor/device only).
_CLASS = {
    1: 0x020000,  # network controller, Ethernet
    2: 0x010000,  # mass storage, SCSI
    3: 0x078000,  # communication, other (console)
    4: 0xFF0000,  # unclassified (entropy)
    19: 0x078000,  # communication, other (vsock)
}
CLASS_OTHER = 0xFF0000

# Capability cfg_type values (§4.1.4)
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

VIRTIO_MSI_NO_VECTOR = 0xFFFF  # §4.1.5.1.2

BAR_INDEX = 0
BAR_SIZE = 0x8000
COMMON_OFFSET = 0x0000
COMMON_LENGTH = 0x40  # struct virtio_pci_common_cfg incl. queue_notify_data, queue_reset
ISR_OFFSET = 0x1000
ISR_LENGTH = 1
DEVICE_OFFSET = 0x2000
DEVICE_LENGTH = 0x1000
NOTIFY_OFFSET = 0x3000
NOTIFY_OFF_MULTIPLIER = 4  # §4.1.4.4: each queue its own dword: its own ioeventfd
MSIX_TABLE_OFFSET = 0x4000
MSIX_PBA_OFFSET = 0x5000
MAX_QUEUES = 0x1000 // NOTIFY_OFF_MULTIPLIER  # the notify area is one page

# Common configuration fields (§4.1.4.3): offset -> width
DEVICE_FEATURE_SELECT = 0x00
DEVICE_FEATURE = 0x04
DRIVER_FEATURE_SELECT = 0x08
DRIVER_FEATURE = 0x0C
CONFIG_MSIX_VECTOR = 0x10
NUM_QUEUES = 0x12
DEVICE_STATUS = 0x14
CONFIG_GENERATION = 0x15
QUEUE_SELECT = 0x16
QUEUE_SIZE = 0x18
QUEUE_MSIX_VECTOR = 0x1A
QUEUE_ENABLE = 0x1C
QUEUE_NOTIFY_OFF = 0x1E
QUEUE_DESC = 0x20
QUEUE_DRIVER = 0x28
QUEUE_DEVICE = 0x30
QUEUE_NOTIFY_DATA = 0x38
QUEUE_RESET = 0x3A
_QUEUE_AREAS = {QUEUE_DESC: QueueArea.DESC, QUEUE_DRIVER: QueueArea.DRIVER,
                QUEUE_DEVICE: QueueArea.DEVICE}  # fmt: skip
_FIELDS = {
    DEVICE_FEATURE_SELECT: 4, DEVICE_FEATURE: 4, DRIVER_FEATURE_SELECT: 4,
    DRIVER_FEATURE: 4, CONFIG_MSIX_VECTOR: 2, NUM_QUEUES: 2, DEVICE_STATUS: 1,
    CONFIG_GENERATION: 1, QUEUE_SELECT: 2, QUEUE_SIZE: 2, QUEUE_MSIX_VECTOR: 2,
    QUEUE_ENABLE: 2, QUEUE_NOTIFY_OFF: 2, QUEUE_DESC: 8, QUEUE_DRIVER: 8, QUEUE_DEVICE: 8,
    QUEUE_NOTIFY_DATA: 2, QUEUE_RESET: 2,
}  # fmt: skip


class IoEventFds(Protocol):
    """What the transport needs of the VM (`kvmkit.kvm.Vm` has it)."""

    def ioeventfd(
        self, fd: int, addr: int, length: int, *, pio: bool = False,
        datamatch: int | None = None, deassign: bool = False,
    ) -> None: ...  # fmt: skip


def _virtio_cap(cfg_type: int, offset: int, length: int, extra: bytes = b"") -> bytes:
    """struct virtio_pci_cap (§4.1.4) after cap_vndr/cap_next: cap_len, cfg_type, bar, id,
    padding[2], offset, length (+ notify_off_multiplier for the notify capability)."""
    cap_len = 16 + len(extra)
    return struct.pack("<BBBBxxII", cap_len, cfg_type, BAR_INDEX, 0, offset, length) + extra


# Version of PciTransportState's data. Files written before it had one (kvmkit before the
# typed states) hold the same fields and load as version 1.
TRANSPORT_STATE_VERSION = 1


@dataclass(frozen=True)
class PciTransportState:
    """What the virtio-pci transport adds to a device's snapshot: the function's config
    space, its MSI-X table, the common-configuration selectors and vectors, the ISR."""

    KIND: ClassVar[str] = "pci"

    config: PciConfigState
    msix: MsixState
    device_feature_select: int
    driver_feature_select: int
    queue_select: int
    config_vector: int
    queue_vectors: tuple[int, ...]
    isr: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": TRANSPORT_STATE_VERSION, "config": self.config.to_dict(),
            "msix": self.msix.to_dict(), "device_feature_select": self.device_feature_select,
            "driver_feature_select": self.driver_feature_select,
            "queue_select": self.queue_select, "config_vector": self.config_vector,
            "queue_vectors": list(self.queue_vectors), "isr": self.isr,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, obj: Any, path: str = "virtio-pci") -> PciTransportState:
        f = Fields(obj, path)
        version = f.get_int("version", 0, 2**32 - 1) if f.has("version") else 1
        if version != TRANSPORT_STATE_VERSION:
            raise SnapshotError(f"snapshot state: {path}: virtio-pci state version {version}")
        msix = MsixState.from_dict(f.obj.get("msix"), f"{path}.msix")
        # §4.1.4.3: 16-bit vector registers (VIRTIO_MSI_NO_VECTOR or a table index).
        vectors = f.get_ints("queue_vectors", MAX_QUEUES, width=16)
        if len(vectors) + 1 != len(msix.table):
            raise SnapshotError(
                f"snapshot state: {path}: {len(vectors)} queue vectors for an MSI-X table of "
                f"{len(msix.table)} (one per queue plus one)"
            )
        return cls(
            config=PciConfigState.from_dict(f.obj.get("config"), f"{path}.config"), msix=msix,
            device_feature_select=f.get_int("device_feature_select", 0, 0xFFFFFFFF),
            driver_feature_select=f.get_int("driver_feature_select", 0, 0xFFFFFFFF),
            queue_select=f.get_int("queue_select", 0, 0xFFFF),
            config_vector=f.get_int("config_vector", 0, 0xFFFF), queue_vectors=tuple(vectors),
            isr=f.get_int("isr", 0, INT_VRING | INT_CONFIG),  # §4.1.4.5: bits 0 and 1
        )  # fmt: skip


class VirtioPci(PciFunction):
    KIND: ClassVar[str] = "pci"  # the transport's name in a snapshot (TransportState)

    def __init__(
        self, device: VirtioDevice, mem: GuestMemory, *, bar_address: int,
        gsis: list[int], lines: list[IrqLine], routing: MsiRouting | None,
    ) -> None:  # fmt: skip
        nqueues = len(device.queues)
        if not 1 <= nqueues <= MAX_QUEUES:
            raise ValueError(f"virtio-pci: {nqueues} queues")
        if len(gsis) != nqueues + 1:
            raise ValueError("virtio-pci needs one MSI-X vector per queue plus one")
        config = PciConfigSpace(
            vendor=VENDOR_ID, device=DEVICE_ID_BASE + device.DEVICE_ID,
            class_code=_CLASS.get(device.DEVICE_ID, CLASS_OTHER), revision=REVISION,
            subsystem_vendor=VENDOR_ID, subsystem=DEVICE_ID_BASE + device.DEVICE_ID,
        )  # fmt: skip
        super().__init__(config)
        self.device = device
        config.add_mem_bar(BAR_INDEX, BAR_SIZE, bar_address)
        config.add_capability(
            CAP_ID_VENDOR, _virtio_cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, COMMON_LENGTH)
        )
        notify_length = NOTIFY_OFF_MULTIPLIER * nqueues
        config.add_capability(
            CAP_ID_VENDOR,
            _virtio_cap(
                VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET, notify_length,
                struct.pack("<I", NOTIFY_OFF_MULTIPLIER),
            ),
        )  # fmt: skip
        config.add_capability(
            CAP_ID_VENDOR, _virtio_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, ISR_LENGTH)
        )
        config.add_capability(
            CAP_ID_VENDOR, _virtio_cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET, DEVICE_LENGTH)
        )
        self.msix = Msix(
            config, bar=BAR_INDEX, table_offset=MSIX_TABLE_OFFSET, pba_offset=MSIX_PBA_OFFSET,
            gsis=gsis, lines=lines, routing=routing,
        )  # fmt: skip
        # Firmware leaves the BAR assigned and memory decoding on (as SeaBIOS does); Linux
        # keeps that placement when it lies in the host bridge's _CRS window.
        config.write(COMMAND, 2, COMMAND_MEMORY)
        device.mem = mem
        device.interrupt = self
        # Transport state, plain data (snapshots): selectors, MSI-X vector per queue and
        # for configuration changes, the ISR bits.
        self.device_feature_select = 0
        self.driver_feature_select = 0
        self.queue_select = 0
        self.config_vector = VIRTIO_MSI_NO_VECTOR
        self.queue_vectors = [VIRTIO_MSI_NO_VECTOR] * nqueues
        self.isr = 0
        self._isr_lock = threading.Lock()
        self.vm: IoEventFds | None = None
        self._notify_base: int | None = None  # guest address the ioeventfds are on

    @property
    def bar_address(self) -> int:
        return self.config.bar_address(BAR_INDEX)

    # -- KVM wiring
    def attach(self, vm: IoEventFds) -> None:
        """Queue notifications become ioeventfds at the BAR's current address, moved
        whenever the guest moves the BAR or turns memory decoding off."""
        with self.lock:
            self.vm = vm
            self._place_ioeventfds()

    def mapping_changed(
        self, old: list[tuple[int, int, int]], new: list[tuple[int, int, int]]
    ) -> None:
        self._place_ioeventfds()

    def _place_ioeventfds(self) -> None:
        vm = self.vm
        if vm is None:
            return
        base = next((start for start, _, bar in self.mapped if bar == BAR_INDEX), None)
        if base == self._notify_base:
            return
        fds = self.device.notify_fds
        if self._notify_base is not None:
            for index, fd in enumerate(fds):
                vm.ioeventfd(fd, self._notify_base + NOTIFY_OFFSET + 4 * index, 2, deassign=True)
            self._notify_base = None
        if base is None:
            return
        try:
            for index, fd in enumerate(fds):
                # 2 bytes, no datamatch: the driver writes the 16-bit queue index to the
                # queue's own address (§4.1.4.4); other widths exit and are served below.
                vm.ioeventfd(fd, base + NOTIFY_OFFSET + 4 * index, 2)
        except OSError as err:
            # Another function's BAR overlaps (the guest placed them so): KVM refuses the
            # duplicate; notifications still work through MMIO exits.
            self.device.glog.warning("virtio-pci %s: ioeventfd at %#x: %s", self.device.name, base,
                                     err)  # fmt: skip
            for index, fd in enumerate(fds):
                try:
                    vm.ioeventfd(fd, base + NOTIFY_OFFSET + 4 * index, 2, deassign=True)
                except OSError:
                    pass
            return
        self._notify_base = base

    # -- Interrupt (called by the device, any thread)
    def signal(self, cause: int, queue: int = 0) -> None:
        with self._isr_lock:
            self.isr |= cause & (INT_VRING | INT_CONFIG)
        if cause & INT_CONFIG:
            vector = self.config_vector
        elif 0 <= queue < len(self.queue_vectors):
            vector = self.queue_vectors[queue]
        else:
            return
        if vector != VIRTIO_MSI_NO_VECTOR:  # §4.1.5.1.2: NO_VECTOR: no interrupt
            self.msix.notify(vector)

    # -- configuration space hooks
    def config_written(self, offset: int, length: int) -> None:
        cap = self.msix.cap_offset
        if offset < cap + 4 and offset + length > cap + 2:
            self.msix.control_written()

    # -- BAR0
    def bar_read(self, bar: int, offset: int, data: memoryview) -> None:
        length = len(data)
        if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_LENGTH:
            value = self._common_read(offset - COMMON_OFFSET, length)
            data[:] = (value & ((1 << (8 * length)) - 1)).to_bytes(length, "little")
        elif offset == ISR_OFFSET:
            # §4.1.4.5: reading the ISR status clears it.
            with self._isr_lock:
                value, self.isr = self.isr, 0
            data[:] = value.to_bytes(length, "little")
        elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_LENGTH:
            with self.device.lock:
                data[:] = self.device.read_config(offset - DEVICE_OFFSET, length)
        elif self.msix.covers(offset):
            self.msix.read(offset, data)
        else:
            data[:] = bytes(length)

    def bar_write(self, bar: int, offset: int, data: memoryview) -> None:
        length = len(data)
        value = int.from_bytes(data, "little")
        if COMMON_OFFSET <= offset < COMMON_OFFSET + COMMON_LENGTH:
            self._common_write(offset - COMMON_OFFSET, length, value)
        elif NOTIFY_OFFSET <= offset < NOTIFY_OFFSET + NOTIFY_OFF_MULTIPLIER * len(
            self.device.notify_fds
        ):
            # A notify write that was not an ioeventfd (no VM, other width): the queue is
            # the one whose address was written (§4.1.4.4), not the value.
            index = (offset - NOTIFY_OFFSET) // NOTIFY_OFF_MULTIPLIER
            if (offset - NOTIFY_OFFSET) % NOTIFY_OFF_MULTIPLIER == 0:
                os.eventfd_write(self.device.notify_fds[index], 1)
        elif DEVICE_OFFSET <= offset < DEVICE_OFFSET + DEVICE_LENGTH:
            with self.device.lock:
                self.device.config_write(offset - DEVICE_OFFSET, bytes(data))
        elif self.msix.covers(offset):
            self.msix.write(offset, data)
        # ISR is read-only; anything else in the BAR is reserved: ignored.

    # -- common configuration (§4.1.4.3)
    @staticmethod
    def _field(offset: int, length: int) -> tuple[int, int] | None:
        """(field offset, byte offset in it) for an access of `length` at `offset`: the
        driver uses each field's natural width, or two dwords for a 64-bit field
        (§4.1.3.1); other accesses are not decoded."""
        width = _FIELDS.get(offset)
        if width is not None and length == width:
            return offset, 0
        if length == 4:
            high = offset - 4
            if _FIELDS.get(high) == 8:
                return high, 4
            if _FIELDS.get(offset) == 8:
                return offset, 0
        return None

    def _common_read(self, offset: int, length: int) -> int:
        hit = self._field(offset, length)
        if hit is None:
            return 0
        field, byte = hit
        dev = self.device
        with dev.lock:
            q = dev.queues[self.queue_select] if self.queue_select < len(dev.queues) else None
            if field == DEVICE_FEATURE_SELECT:
                return self.device_feature_select
            if field == DEVICE_FEATURE:
                if self.device_feature_select > 1:
                    return 0
                return (dev.device_features >> (32 * self.device_feature_select)) & 0xFFFFFFFF
            if field == DRIVER_FEATURE_SELECT:
                return self.driver_feature_select
            if field == DRIVER_FEATURE:
                if self.driver_feature_select > 1:
                    return 0
                return (dev.driver_features >> (32 * self.driver_feature_select)) & 0xFFFFFFFF
            if field == CONFIG_MSIX_VECTOR:
                return self.config_vector
            if field == NUM_QUEUES:
                return len(dev.queues)
            if field == DEVICE_STATUS:
                return dev.status
            if field == CONFIG_GENERATION:
                return dev.config_generation & 0xFF
            if field == QUEUE_SELECT:
                return self.queue_select
            if q is None:
                # §4.1.4.3.1: queue_size reads 0 for a queue that does not exist; so does
                # every other queue field here.
                return 0
            if field == QUEUE_SIZE:
                return q.size
            if field == QUEUE_MSIX_VECTOR:
                return self.queue_vectors[self.queue_select]
            if field == QUEUE_ENABLE:
                return int(q.ready)
            if field == QUEUE_NOTIFY_OFF:
                return self.queue_select  # notify address = base + 4 * queue index
            if field in _QUEUE_AREAS:
                return q.address(_QUEUE_AREAS[field]) >> (8 * byte)
            return 0  # queue_notify_data, queue_reset: features not offered

    def _valid_vector(self, vector: int) -> int:
        """§4.1.5.1.2.1: a vector the table does not have maps to NO_VECTOR, which the
        driver reads back (Linux then gives up on that layout)."""
        return vector if vector < self.msix.count else VIRTIO_MSI_NO_VECTOR

    def _common_write(self, offset: int, length: int, value: int) -> None:
        hit = self._field(offset, length)
        if hit is None:
            return  # §4.1.3.1: not a field at its natural width: ignored
        field, byte = hit
        dev = self.device
        if field == DEVICE_STATUS:
            dev.set_status(value)
            if value & 0xFF == 0:
                self._reset_transport()
            return
        if field == DRIVER_FEATURE:
            dev.write_driver_features(self.driver_feature_select, value)
            return
        index = self.queue_select
        if field == QUEUE_SIZE:
            # Checked when the queue goes live (power of two, <= the maximum: §2.7,
            # §4.1.4.3.2).
            dev.queue_set_size(index, value)
        elif field == QUEUE_ENABLE:
            # §4.1.4.3.2: the driver MUST NOT write 0 to queue_enable (disabling is a reset
            # or queue_reset, not offered); a 0 is ignored.
            if value == 1:
                dev.queue_set_ready(index, True)
        elif field in _QUEUE_AREAS:
            # A 64-bit field: written whole, or as two dwords (§4.1.3.1), low or high half.
            dev.queue_set_address(index, _QUEUE_AREAS[field], value, shift=8 * byte,
                                  width=8 * length)  # fmt: skip
        else:
            with dev.lock:
                if field == DEVICE_FEATURE_SELECT:
                    self.device_feature_select = value
                elif field == DRIVER_FEATURE_SELECT:
                    self.driver_feature_select = value
                elif field == CONFIG_MSIX_VECTOR:
                    self.config_vector = self._valid_vector(value)
                elif field == QUEUE_SELECT:
                    self.queue_select = value
                elif field == QUEUE_MSIX_VECTOR and index < len(dev.queues):
                    self.queue_vectors[index] = self._valid_vector(value)
            # read-only fields (device_feature, num_queues, ...) and writes for a queue
            # that does not exist are ignored

    def _reset_transport(self) -> None:
        """§4.1.4.3 / §2.4: a reset (status 0) also forgets the vectors and selectors."""
        with self.device.lock:
            self.device_feature_select = self.driver_feature_select = self.queue_select = 0
            self.config_vector = VIRTIO_MSI_NO_VECTOR
            self.queue_vectors = [VIRTIO_MSI_NO_VECTOR] * len(self.queue_vectors)
        with self._isr_lock:
            self.isr = 0

    # -- snapshots (TransportState)
    def save(self) -> PciTransportState:
        with self.device.lock:
            return PciTransportState(
                config=self.config.save(), msix=self.msix.save(),
                device_feature_select=self.device_feature_select,
                driver_feature_select=self.driver_feature_select,
                queue_select=self.queue_select, config_vector=self.config_vector,
                queue_vectors=tuple(self.queue_vectors), isr=self.isr,
            )  # fmt: skip

    def restore(self, state: PciTransportState) -> None:
        """Take over a checked state: config space (its writable bits), MSI-X table (the
        routes follow), selectors and vectors; SnapshotError (nothing changed) if it does
        not fit this device's queues."""
        if len(state.queue_vectors) != len(self.queue_vectors):
            raise SnapshotError(
                f"snapshot state: virtio-pci state has {len(state.queue_vectors)} queue "
                f"vectors, the device {len(self.queue_vectors)} queues"
            )
        if len(state.msix.table) != self.msix.count:
            raise SnapshotError("snapshot state: virtio-pci MSI-X table does not fit the device")
        with self.lock, self.device.lock:
            self.config.restore(state.config)
            self.msix.restore(state.msix)
            self.device_feature_select = state.device_feature_select
            self.driver_feature_select = state.driver_feature_select
            self.queue_select = state.queue_select
            self.config_vector = self._valid_vector(state.config_vector)
            self.queue_vectors = [self._valid_vector(v) for v in state.queue_vectors]
            self.isr = state.isr
            self.remap()
