"""A mock virtio driver (the guest side, tests only): it lays out a split virtqueue in a
GuestMemory and makes descriptor chains available the way a driver does (virtio 1.2 §2.7.13),
and can also write arbitrary (hostile) descriptors."""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Any

from kvmkit.devices.irq import NoIrq
from kvmkit.devices.virtio import mmio as r
from kvmkit.devices.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VirtioDevice,
    VirtioState,
)
from kvmkit.devices.virtio.mmio import MmioTransportState, VirtioMmio
from kvmkit.devices.virtio.queue import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    SplitQueue,
)
from kvmkit.devices.virtio.worker import VirtioWorkers
from kvmkit.memory import GuestMemory

MEM_SIZE = 1 << 20
DESC_BASE = 0x1000
AVAIL_BASE = 0x9000
USED_BASE = 0xA000
DATA_BASE = 0x20000


def new_memory() -> GuestMemory:
    mem = GuestMemory()
    mem.add_anonymous(0, MEM_SIZE)
    return mem


def restore_as_new_process(
    guest: Any, device: VirtioDevice, worker: VirtioWorkers, memory: bytes,
    state: dict[str, Any], transport_state: dict[str, Any],
) -> None:  # fmt: skip
    """What a restoring process does, for a test's mock guest (`mem`, `dev`, `transport` and
    its queues' drivers `q`): the guest's memory copied, `device` on a new virtio-mmio
    transport and on `worker` (not yet started), both given their saved state, the ready
    queues kicked, then the worker started."""
    mem = new_memory()
    mem.write(0, memory)
    guest.mem, guest.dev = mem, device
    for drv in guest.q:
        drv.mem = mem
    guest.transport = VirtioMmio(device, mem, NoIrq())
    worker.add(device)
    device.restore(VirtioState.from_dict(state, "virtio", type(device)))
    guest.transport.restore(MmioTransportState.from_dict(transport_state))
    device.kick_ready_queues()
    worker.start()


def wait_for(cond: Callable[[], object], timeout: float = 5.0) -> None:
    """Poll `cond` until it is true (the device works on its worker thread)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.002)


class MmioGuest:
    """A driver of one device over virtio-mmio: one MockDriver per queue (rings at 0x1000,
    0x8000, 0xC000 + 0x1000 per queue), register access, the initialisation of §3.1.1 and
    receive buffers `rx_buf` bytes each at `rx_data` + slot * `rx_buf` on queue `rx_queue`."""

    rx_queue = 0
    rx_data = 0x20000
    rx_buf = 4096

    def __init__(self, dev: VirtioDevice, queues: int, size: int = 16, **data: int) -> None:
        self.mem = new_memory()
        self.dev = dev
        self.transport = VirtioMmio(dev, self.mem, NoIrq())
        self.q = [
            MockDriver(self.mem, size, rings=(0x1000 + 0x1000 * i, 0x8000 + 0x1000 * i,
                                              0xC000 + 0x1000 * i), **data)
            for i in range(queues)
        ]  # fmt: skip
        self.size = size
        self.rx_slot = 0

    def wr(self, off: int, value: int) -> None:
        self.transport.write(off, memoryview(bytearray(struct.pack("<I", value))))

    def rd(self, off: int) -> int:
        buf = bytearray(4)
        self.transport.read(off, memoryview(buf))
        return int(struct.unpack("<I", buf)[0])

    def offered(self) -> int:
        out = 0
        for sel in (0, 1):
            self.wr(r.DEVICE_FEATURES_SEL, sel)
            out |= self.rd(r.DEVICE_FEATURES) << (32 * sel)
        return out

    def init(self, features: int | None = None) -> None:
        """Reset, negotiate `features` (default: all the device offers), lay out every
        queue and set DRIVER_OK."""
        if features is None:
            features = self.offered()
        self.wr(r.STATUS, 0)
        self.wr(r.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        for sel in (0, 1):
            self.wr(r.DRIVER_FEATURES_SEL, sel)
            self.wr(r.DRIVER_FEATURES, (features >> (32 * sel)) & 0xFFFFFFFF)
        self.wr(r.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        for i, drv in enumerate(self.q):
            # A driver lays its rings out afresh after a reset (§3.1.1 step 7).
            for area in (drv.desc_base, drv.avail_base, drv.used_base):
                self.mem.write(area, bytes(0x1000))
            drv.avail_idx = drv.free_head = drv.used_seen = 0
            self.wr(r.QUEUE_SEL, i)
            self.wr(r.QUEUE_NUM, self.size)
            for low, addr in ((r.QUEUE_DESC_LOW, drv.desc_base),
                              (r.QUEUE_DRIVER_LOW, drv.avail_base),
                              (r.QUEUE_DEVICE_LOW, drv.used_base)):  # fmt: skip
                self.wr(low, addr)
                self.wr(low + 4, 0)
            self.wr(r.QUEUE_READY, 1)
        self.wr(
            r.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
        )

    def give_rx(self, count: int, length: int | None = None) -> None:
        drv = self.q[self.rx_queue]
        for _ in range(count):
            slot = self.rx_slot % self.size
            self.rx_slot += 1
            size = self.rx_buf if length is None else length
            drv.write_desc(
                drv.desc_base, slot, self.rx_data + slot * self.rx_buf, size, VIRTQ_DESC_F_WRITE, 0
            )
            drv.publish(slot)
        self.wr(r.QUEUE_NOTIFY, self.rx_queue)


class MockDriver:
    """One queue's driver side. A device with several queues gets one MockDriver per queue,
    each with its own `base` (ring areas at base + 0x1000/0x9000/0xA000 below DATA_BASE
    would overlap: pass distinct bases) and data window [data_base, data_end), reused
    from its start once full (chains complete before the window wraps in the tests)."""

    def __init__(
        self, mem: GuestMemory, size: int = 16, *, rings: tuple[int, int, int] | None = None,
        data_base: int = DATA_BASE, data_end: int = MEM_SIZE,
    ) -> None:  # fmt: skip
        self.mem = mem
        self.size = size
        self.desc_base, self.avail_base, self.used_base = rings or (
            DESC_BASE,
            AVAIL_BASE,
            USED_BASE,
        )
        self.avail_idx = 0
        self.free_head = 0
        self.data_base, self.data_end = data_base, data_end
        self.next_data = data_base
        self.used_seen = 0

    def setup(self, queue: SplitQueue, *, event_idx: bool = False, indirect: bool = True) -> None:
        queue.size = self.size
        queue.desc_addr, queue.avail_addr, queue.used_addr = (
            self.desc_base, self.avail_base, self.used_base,
        )  # fmt: skip
        queue.event_idx, queue.indirect = event_idx, indirect
        queue.validate(self.mem)
        queue.ready = True

    def alloc(self, data: bytes | int) -> tuple[int, int]:
        """Guest memory holding `data` (or int: that many zero bytes): (addr, len)."""
        raw = bytes(data) if isinstance(data, int) else data
        if self.next_data + len(raw) > self.data_end:
            self.next_data = self.data_base
        addr = self.next_data
        self.mem.write(addr, raw)
        self.next_data += (len(raw) + 15) & ~15 or 16
        return addr, len(raw)

    def write_desc(
        self, table: int, index: int, addr: int, length: int, flags: int, nxt: int
    ) -> None:
        self.mem.write(table + 16 * index, struct.pack("<QIHH", addr, length, flags, nxt))

    def publish(self, head: int) -> None:
        self.mem.write_u16(self.avail_base + 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write_u16(self.avail_base + 2, self.avail_idx)

    def add_chain(
        self, readable: list[bytes], writable: list[int], *, indirect: bool = False
    ) -> int:
        """Make a chain available: device-readable buffers then device-writable ones of the
        given sizes. Returns the head index."""
        bufs = [(*self.alloc(r), 0) for r in readable]
        bufs += [(*self.alloc(w), VIRTQ_DESC_F_WRITE) for w in writable]
        head = self.free_head
        if indirect:
            table, _ = self.alloc(16 * len(bufs))
            for i, (addr, length, flags) in enumerate(bufs):
                more = VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0
                self.write_desc(table, i, addr, length, flags | more, i + 1)
            self.write_desc(self.desc_base, head, table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT, 0)
            self.free_head = (head + 1) % self.size
        else:
            for i, (addr, length, flags) in enumerate(bufs):
                index = (head + i) % self.size
                more = VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0
                self.write_desc(
                    self.desc_base, index, addr, length, flags | more, (index + 1) % self.size
                )
            self.free_head = (head + len(bufs)) % self.size
        self.publish(head)
        return head

    def used(self) -> list[tuple[int, int]]:
        """New used-ring entries (id, len) since the last call."""
        idx = self.mem.read_u16(self.used_base + 2)
        out = []
        while self.used_seen != idx:
            slot = self.used_seen % self.size
            out.append(struct.unpack("<II", self.mem.read(self.used_base + 4 + 8 * slot, 8)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def set_used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail_base + 4 + 2 * self.size, value)

    def avail_event(self) -> int:
        return self.mem.read_u16(self.used_base + 4 + 8 * self.size)
