"""The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2).

One 4 KiB page of registers per device on the MMIO bus; its queue notifications are KVM
ioeventfds (no vCPU exit, `attach(vm)`) and its interrupt an irqfd GSI. Linux finds the
device from the ACPI DSDT (`LNRO0005`, see arch/x86_64/acpi.py) or, for kernels built with
CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES, from `virtio_mmio.device=<size>@<addr>:<irq>`.
"""

from __future__ import annotations

import os
import struct
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

from kvmkit.devices.irq import IrqLine
from kvmkit.devices.virtio.device import INT_CONFIG, INT_VRING, VirtioDevice
from kvmkit.devices.virtio.queue import QueueArea
from kvmkit.kvm.vm import Vm
from kvmkit.memory import GuestMemory
from kvmkit.snapshot.format import Fields, SnapshotError

MMIO_SIZE = 0x1000
MAGIC = 0x74726976  # "virt"
VERSION = 2
VENDOR_ID = 0x4B564D4B  # "KMVK" (any value; Linux does not check it)

# Register offsets (§4.2.2, table "MMIO Device Register Layout")
MAGIC_VALUE = 0x000
VERSION_REG = 0x004
DEVICE_ID = 0x008
VENDOR_ID_REG = 0x00C
DEVICE_FEATURES = 0x010
DEVICE_FEATURES_SEL = 0x014
DRIVER_FEATURES = 0x020
DRIVER_FEATURES_SEL = 0x024
QUEUE_SEL = 0x030
QUEUE_NUM_MAX = 0x034
QUEUE_NUM = 0x038
QUEUE_READY = 0x044
QUEUE_NOTIFY = 0x050
INTERRUPT_STATUS = 0x060
INTERRUPT_ACK = 0x064
STATUS = 0x070
QUEUE_DESC_LOW = 0x080
QUEUE_DESC_HIGH = 0x084
QUEUE_DRIVER_LOW = 0x090
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC
SHM_LEN_LOW = 0x0B0
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
CONFIG_GENERATION = 0x0FC
CONFIG = 0x100


TRANSPORT_STATE_VERSION = 1


@dataclass(frozen=True)
class MmioTransportState:
    """The virtio-mmio registers a snapshot keeps (the device's state is beside it)."""

    KIND: ClassVar[str] = "mmio"

    isr: int
    features_sel: int
    driver_features_sel: int
    queue_sel: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": TRANSPORT_STATE_VERSION, "isr": self.isr,
            "features_sel": self.features_sel, "driver_features_sel": self.driver_features_sel,
            "queue_sel": self.queue_sel,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, obj: Any, path: str = "mmio") -> MmioTransportState:
        f = Fields(obj, path)
        version = f.get_int("version", 0, 2**32 - 1)
        if version != TRANSPORT_STATE_VERSION:
            raise SnapshotError(f"snapshot state: {path}: virtio-mmio state version {version}")
        # The selectors are whatever 32-bit value the driver wrote (§4.2.2); reads with an
        # out-of-range one are answered as such.
        sels = [f.get_int(k, 0, 0xFFFFFFFF)
                for k in ("features_sel", "driver_features_sel", "queue_sel")]  # fmt: skip
        return cls(f.get_int("isr", 0, INT_VRING | INT_CONFIG), *sels)  # §4.2.2 bits 0-1


class VirtioMmio:
    """A `BusDevice` exposing one `VirtioDevice` through the MMIO register layout."""

    KIND: ClassVar[str] = "mmio"

    def __init__(self, device: VirtioDevice, mem: GuestMemory, irq: IrqLine) -> None:
        self.device = device
        self.irq = irq
        self.base: int | None = None
        device.mem = mem
        device.interrupt = self
        self._isr = 0
        self._isr_lock = threading.Lock()
        self._features_sel = 0
        self._driver_features_sel = 0
        self._queue_sel = 0
        self._ioeventfds = False

    def attach(self, vm: Vm, base: int) -> None:
        """Register each queue's eventfd as an ioeventfd on QueueNotify with the queue index
        as datamatch: notifications then never leave the kernel."""
        self.base = base
        for index, fd in enumerate(self.device.notify_fds):
            vm.ioeventfd(fd, base + QUEUE_NOTIFY, 4, datamatch=index)
        self._ioeventfds = True

    # -- snapshots: the transport's own registers (the device saves the rest)
    def save(self) -> MmioTransportState:
        with self._isr_lock:
            isr = self._isr
        return MmioTransportState(isr, self._features_sel, self._driver_features_sel,
                                  self._queue_sel)  # fmt: skip

    def restore(self, state: MmioTransportState) -> None:
        """Take over saved registers; a pending interrupt status is raised again, because an
        irqfd write made just before the pause may not have reached the in-kernel IOAPIC
        when its state was saved (a second interrupt is harmless: the driver reads
        InterruptStatus and finds nothing new, §4.2.3.4)."""
        with self._isr_lock:
            self._isr = state.isr
        self._features_sel = state.features_sel
        self._driver_features_sel = state.driver_features_sel
        self._queue_sel = state.queue_sel
        if state.isr:
            self.irq.trigger()

    # -- Interrupt
    def signal(self, cause: int, queue: int = 0) -> None:
        with self._isr_lock:
            self._isr |= cause & (INT_VRING | INT_CONFIG)
        self.irq.trigger()

    # -- BusDevice
    def read(self, offset: int, data: memoryview) -> None:
        if offset >= CONFIG:
            with self.device.lock:
                data[:] = self.device.read_config(offset - CONFIG, len(data))
            return
        # §4.2.2.2: the driver MUST only use 32-bit wide and aligned reads for registers.
        if len(data) != 4 or offset % 4:
            data[:] = bytes(len(data))
            return
        struct.pack_into("<I", data, 0, self._read_reg(offset) & 0xFFFFFFFF)

    def _read_reg(self, offset: int) -> int:
        dev = self.device
        with dev.lock:
            q = dev.queues[self._queue_sel] if self._queue_sel < len(dev.queues) else None
            if offset == MAGIC_VALUE:
                return MAGIC
            if offset == VERSION_REG:
                return VERSION
            if offset == DEVICE_ID:
                return dev.DEVICE_ID
            if offset == VENDOR_ID_REG:
                return VENDOR_ID
            if offset == DEVICE_FEATURES:
                if self._features_sel > 1:
                    return 0
                return dev.device_features >> (32 * self._features_sel)
            if offset == QUEUE_NUM_MAX:
                return q.max_size if q is not None else 0  # 0: no such queue (§4.2.3.2)
            if offset == QUEUE_READY:
                return int(q.ready) if q is not None else 0
            if offset == INTERRUPT_STATUS:
                with self._isr_lock:
                    return self._isr
            if offset == STATUS:
                return dev.status
            if offset in (SHM_LEN_LOW, SHM_LEN_HIGH):
                return 0xFFFFFFFF  # no shared memory regions (§4.2.2: length -1)
            if offset == CONFIG_GENERATION:
                return dev.config_generation
            return 0

    def write(self, offset: int, data: memoryview) -> None:
        dev = self.device
        if offset >= CONFIG:
            with dev.lock:
                dev.config_write(offset - CONFIG, bytes(data))
            return
        if len(data) != 4 or offset % 4:
            return  # §4.2.2.2: 32-bit aligned accesses only; others are ignored
        value = struct.unpack("<I", data)[0]
        if offset == QUEUE_NOTIFY:
            # Without an ioeventfd (no VM, or a VM without it) the exit lands here.
            if value < len(dev.notify_fds):
                os.eventfd_write(dev.notify_fds[value], 1)
            return
        if offset == INTERRUPT_ACK:
            with self._isr_lock:
                self._isr &= ~value
            return
        if offset == STATUS:
            dev.set_status(value)
            if value == 0:
                with self._isr_lock:
                    self._isr = 0
                self._queue_sel = self._features_sel = self._driver_features_sel = 0
            return
        if offset in _QUEUE_AREAS:
            area, shift = _QUEUE_AREAS[offset]
            dev.queue_set_address(self._queue_sel, area, value, shift=shift, width=32)
        elif offset == QUEUE_NUM:
            dev.queue_set_size(self._queue_sel, value)
        elif offset == QUEUE_READY:
            # §4.2.2: 1 makes the queue live, 0 stops it (the driver's way to stop using it)
            dev.queue_set_ready(self._queue_sel, bool(value & 1))
        elif offset == DRIVER_FEATURES:
            dev.write_driver_features(self._driver_features_sel, value)
        else:
            with dev.lock:
                if offset == DEVICE_FEATURES_SEL:
                    self._features_sel = value
                elif offset == DRIVER_FEATURES_SEL:
                    self._driver_features_sel = value
                elif offset == QUEUE_SEL:
                    self._queue_sel = value


# The queue address registers (§4.2.2): area, and which half of its 64-bit address.
_QUEUE_AREAS = {
    QUEUE_DESC_LOW: (QueueArea.DESC, 0), QUEUE_DESC_HIGH: (QueueArea.DESC, 32),
    QUEUE_DRIVER_LOW: (QueueArea.DRIVER, 0), QUEUE_DRIVER_HIGH: (QueueArea.DRIVER, 32),
    QUEUE_DEVICE_LOW: (QueueArea.DEVICE, 0), QUEUE_DEVICE_HIGH: (QueueArea.DEVICE, 32),
}  # fmt: skip


def cmdline_entry(base: int, irq: int) -> str:
    """`virtio_mmio.device=` for one device (Linux virtio_mmio.c, CMDLINE_DEVICES)."""
    return f"virtio_mmio.device=4K@{base:#x}:{irq}"
