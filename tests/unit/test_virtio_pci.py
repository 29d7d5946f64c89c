"""The PCI root and the virtio-pci transport driven the way a guest does: configuration
mechanism #1 on the port bus, the capability chain walked as Linux's virtio_pci_modern does,
then BAR0 accessed through the MMIO bus (virtio 1.2 §4.1, PCI Local Bus 3.0 §6). The
devices are the real ones (virtio-rng, virtio-blk over a file); interrupts are real eventfds
whose counters show what the guest would have received."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from virtio_mock import AVAIL_BASE, DESC_BASE, MEM_SIZE, USED_BASE, MockDriver, new_memory

from kvmkit.arch.x86_64 import layout
from kvmkit.devices.bus import Bus
from kvmkit.devices.irq import EventFdIrq, IrqLine
from kvmkit.devices.pci.root import PciRoot
from kvmkit.devices.virtio import pci as vp
from kvmkit.devices.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VirtioBlk
from kvmkit.devices.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    Budget,
    VirtioDevice,
)
from kvmkit.devices.virtio.rng import VirtioRng
from kvmkit.kvm.routing import FIRST_MSI_GSI, GsiRouter

MSI_ADDR = 0xFEE0_0000
NO_VECTOR = vp.VIRTIO_MSI_NO_VECTOR


def irq_count(line: IrqLine) -> int:
    """How many times the line fired since the last call (the eventfd counter)."""
    assert isinstance(line, EventFdIrq)
    try:
        return os.eventfd_read(line.fd)
    except BlockingIOError:
        return 0


class PciGuest:
    """The guest side: the machine's buses with a PCI root, and the accesses a driver makes."""

    def __init__(self) -> None:
        self.mem = new_memory()
        self.pio = Bus("pio")
        self.mmio = Bus("mmio")
        self.root = PciRoot(layout.PCI_MMIO_BASE, layout.PCI_MMIO_SIZE)
        self.pio.insert(self.root.pio, 0xCF8, 8)
        self.mmio.insert(self.root.mmio, layout.PCI_MMIO_BASE, layout.PCI_MMIO_SIZE)
        self.router = GsiRouter(None)
        self.lines: list[EventFdIrq] = []

    def add(self, dev: VirtioDevice) -> vp.VirtioPci:
        gsis = [self.router.allocate() for _ in range(len(dev.queues) + 1)]
        lines = [EventFdIrq(g) for g in gsis]
        self.lines += lines
        function = vp.VirtioPci(
            dev, self.mem, bar_address=self.root.allocate_bar(vp.BAR_SIZE), gsis=gsis,
            lines=list(lines), routing=self.router,
        )  # fmt: skip
        self.root.add(function)
        return function

    def close(self) -> None:
        for line in self.lines:
            line.close()
        self.mem.close()

    # -- configuration mechanism #1
    def cfg_read(self, slot: int, reg: int, size: int = 4, bus: int = 0) -> int:
        self.outl(0xCF8, 0x8000_0000 | bus << 16 | slot << 11 | (reg & 0xFC))
        buf = bytearray(size)
        assert self.pio.read(0xCFC + (reg & 3), memoryview(buf))
        return int.from_bytes(buf, "little")

    def cfg_write(self, slot: int, reg: int, value: int, size: int = 4) -> None:
        self.outl(0xCF8, 0x8000_0000 | slot << 11 | (reg & 0xFC))
        self.pio.write(0xCFC + (reg & 3), memoryview(bytearray(value.to_bytes(size, "little"))))

    def outl(self, port: int, value: int) -> None:
        self.pio.write(port, memoryview(bytearray(struct.pack("<I", value))))

    # -- memory accesses
    def rd(self, addr: int, size: int) -> int:
        buf = bytearray(size)
        assert self.mmio.read(addr, memoryview(buf))
        return int.from_bytes(buf, "little")

    def wr(self, addr: int, value: int, size: int) -> None:
        self.mmio.write(addr, memoryview(bytearray(value.to_bytes(size, "little"))))

    # -- what Linux's virtio_pci_modern probe does
    def capabilities(self, slot: int) -> list[tuple[int, int]]:
        """(offset, cap id) along the list from the capabilities pointer (PCI §6.7)."""
        assert self.cfg_read(slot, 0x06, 2) & 0x10  # status: capability list present
        caps = []
        ptr = self.cfg_read(slot, 0x34, 1)
        while ptr:
            assert ptr >= 0x40 and ptr % 4 == 0 and len(caps) < 48
            caps.append((ptr, self.cfg_read(slot, ptr, 1)))
            ptr = self.cfg_read(slot, ptr + 1, 1)
        return caps

    def virtio_caps(self, slot: int) -> dict[int, tuple[int, int, int, int]]:
        """cfg_type -> (bar, offset, length, notify_off_multiplier): the first of each type,
        as the spec tells drivers to use (§4.1.4)."""
        found: dict[int, tuple[int, int, int, int]] = {}
        for ptr, cap_id in self.capabilities(slot):
            if cap_id != 0x09:
                continue
            cfg_type = self.cfg_read(slot, ptr + 3, 1)
            bar = self.cfg_read(slot, ptr + 4, 1)
            offset, length = self.cfg_read(slot, ptr + 8), self.cfg_read(slot, ptr + 12)
            mult = self.cfg_read(slot, ptr + 16) if cfg_type == vp.VIRTIO_PCI_CAP_NOTIFY_CFG else 0
            found.setdefault(cfg_type, (bar, offset, length, mult))
        return found

    def bar0(self, slot: int) -> int:
        return self.cfg_read(slot, 0x10) & ~0xF


@pytest.fixture
def guest() -> Iterator[PciGuest]:
    g = PciGuest()
    yield g
    g.close()


class Driver:
    """A virtio-pci driver for one function (virtio 1.2 §3.1.1 over §4.1.4.3)."""

    def __init__(self, guest: PciGuest, slot: int) -> None:
        self.g = guest
        self.slot = slot
        caps = guest.virtio_caps(slot)
        base = guest.bar0(slot)
        self.common = base + caps[vp.VIRTIO_PCI_CAP_COMMON_CFG][1]
        self.isr = base + caps[vp.VIRTIO_PCI_CAP_ISR_CFG][1]
        self.device = base + caps[vp.VIRTIO_PCI_CAP_DEVICE_CFG][1]
        _, notify_off, _, self.mult = caps[vp.VIRTIO_PCI_CAP_NOTIFY_CFG]
        self.notify = base + notify_off
        msix = next(p for p, cap_id in guest.capabilities(slot) if cap_id == 0x11)
        self.msix_cap = msix
        table = guest.cfg_read(slot, msix + 4)
        assert table & 7 == 0  # BIR 0
        self.table = base + (table & ~7)
        self.pba = base + (guest.cfg_read(slot, msix + 8) & ~7)
        self.ring = MockDriver(guest.mem, 16)

    def c(self, off: int, size: int) -> int:
        return self.g.rd(self.common + off, size)

    def cw(self, off: int, value: int, size: int) -> None:
        self.g.wr(self.common + off, value, size)

    def enable_msix(self, vectors: int) -> None:
        ctrl = self.g.cfg_read(self.slot, self.msix_cap + 2, 2)
        assert (ctrl & 0x7FF) + 1 >= vectors
        # Linux's order: enable with the function masked, program the entries, unmask.
        self.g.cfg_write(self.slot, self.msix_cap + 2, ctrl | 0xC000, 2)
        for v in range(vectors):
            entry = self.table + 16 * v
            self.g.wr(entry, MSI_ADDR, 4)
            self.g.wr(entry + 4, 0, 4)
            self.g.wr(entry + 8, 0x40 + v, 4)
            self.g.wr(entry + 12, 0, 4)
        self.g.cfg_write(self.slot, self.msix_cap + 2, (ctrl | 0x8000) & ~0x4000, 2)

    def init(self, *, queue_size: int = 16, desc: int = DESC_BASE) -> None:
        self.cw(vp.DEVICE_STATUS, 0, 1)
        assert self.c(vp.DEVICE_STATUS, 1) == 0
        self.cw(vp.DEVICE_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER, 1)
        self.cw(vp.DEVICE_FEATURE_SELECT, 1, 4)
        assert self.c(vp.DEVICE_FEATURE, 4) & 1  # VIRTIO_F_VERSION_1 (bit 32)
        self.cw(vp.DRIVER_FEATURE_SELECT, 1, 4)
        self.cw(vp.DRIVER_FEATURE, VIRTIO_F_VERSION_1 >> 32, 4)
        self.cw(vp.DEVICE_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK, 1)
        assert self.c(vp.DEVICE_STATUS, 1) & STATUS_FEATURES_OK
        self.enable_msix(self.c(vp.NUM_QUEUES, 2) + 1)
        self.cw(vp.CONFIG_MSIX_VECTOR, 0, 2)
        assert self.c(vp.CONFIG_MSIX_VECTOR, 2) == 0
        self.cw(vp.QUEUE_SELECT, 0, 2)
        assert self.c(vp.QUEUE_SIZE, 2) >= queue_size
        self.cw(vp.QUEUE_SIZE, queue_size, 2)
        self.cw(vp.QUEUE_MSIX_VECTOR, 1, 2)
        assert self.c(vp.QUEUE_MSIX_VECTOR, 2) == 1
        # 64-bit fields as two dwords, low then high (what Linux's vp_iowrite64_twopart does).
        for field, addr in ((vp.QUEUE_DESC, desc), (vp.QUEUE_DRIVER, AVAIL_BASE),
                            (vp.QUEUE_DEVICE, USED_BASE)):  # fmt: skip
            self.cw(field, addr & 0xFFFFFFFF, 4)
            self.cw(field + 4, addr >> 32, 4)
        self.cw(vp.QUEUE_ENABLE, 1, 2)
        self.cw(vp.DEVICE_STATUS, 15, 1)

    def kick(self, queue: int) -> None:
        off = self.c(vp.QUEUE_NOTIFY_OFF, 2) if self.c(vp.QUEUE_SELECT, 2) == queue else queue
        self.g.wr(self.notify + off * self.mult, queue, 2)


def serve(dev: VirtioDevice, queue: int = 0) -> None:
    """What the worker thread does when the queue's notify eventfd fires."""
    os.eventfd_read(dev.notify_fds[queue])
    dev.serve_queue(queue, Budget())


# -- the root and mechanism #1


def test_host_bridge_and_mechanism_one(guest: PciGuest) -> None:
    # Linux's pci_check_type1: a byte write to 0xCFB, then the dword latch reads back.
    guest.pio.write(0xCFB, memoryview(bytearray(b"\x01")))
    guest.outl(0xCF8, 0x8000_0000)
    buf = bytearray(4)
    guest.pio.read(0xCF8, memoryview(buf))
    assert struct.unpack("<I", buf)[0] == 0x8000_0000
    # 00:00.0 is a host bridge (class 06/00), which pci_sanity_check looks for.
    assert guest.cfg_read(0, 0x0A, 2) == 0x0600
    assert guest.cfg_read(0, 0x00, 2) == 0x1B36
    # Empty slots, other buses and other functions read as all ones (master abort).
    assert guest.cfg_read(5, 0x00) == 0xFFFF_FFFF
    assert guest.cfg_read(0, 0x00, bus=1) == 0xFFFF_FFFF
    guest.outl(0xCF8, 0x8000_0100)  # 00:00.1
    guest.pio.read(0xCFC, memoryview(buf))
    assert buf == b"\xff" * 4
    # With the enable bit clear, the data port reaches nothing.
    guest.outl(0xCF8, 0x0000_0000)
    guest.pio.read(0xCFC, memoryview(buf))
    assert buf == b"\xff" * 4


def test_virtio_ids_class_and_sub_dword_config_reads(guest: PciGuest) -> None:
    guest.add(VirtioRng())
    assert guest.cfg_read(1, 0x00) == 0x1044_1AF4  # 0x1040 + VIRTIO_ID_RNG (4)
    assert guest.cfg_read(1, 0x08, 1) == 1  # revision 1: non-transitional
    assert guest.cfg_read(1, 0x08) == 0xFF00_0001  # class ff/00/00 (unclassified), rev 1
    assert guest.cfg_read(1, 0x2C, 2) == 0x1AF4
    assert guest.cfg_read(1, 0x3D, 1) == 0  # no INTx pin: MSI-X only
    # Byte and word reads at every lane of 0xCFC-0xCFF see the same bytes as a dword read.
    dword = guest.cfg_read(1, 0x00)
    assert [guest.cfg_read(1, i, 1) for i in range(4)] == list(dword.to_bytes(4, "little"))
    assert guest.cfg_read(1, 0x02, 2) == 0x1044


def test_read_only_fields_ignore_writes(guest: PciGuest) -> None:
    guest.add(VirtioRng())
    guest.cfg_write(1, 0x00, 0x1234_5678)
    guest.cfg_write(1, 0x08, 0xFFFF_FFFF)
    guest.cfg_write(1, 0x34, 0x00, 1)
    assert guest.cfg_read(1, 0x00) == 0x1044_1AF4
    assert guest.cfg_read(1, 0x08, 1) == 1
    assert guest.cfg_read(1, 0x34, 1) == 0x40
    guest.cfg_write(1, 0x3C, 0x0B, 1)  # interrupt line: a scratch register the OS writes
    assert guest.cfg_read(1, 0x3C, 1) == 0x0B


def test_bar_sizing_and_memory_enable(guest: PciGuest) -> None:
    guest.add(VirtioRng())
    addr = guest.bar0(1)
    assert addr >= layout.PCI_MMIO_BASE and addr % vp.BAR_SIZE == 0
    assert guest.rd(addr + vp.COMMON_OFFSET + vp.NUM_QUEUES, 2) == 1
    # Sizing as Linux's __pci_read_base does: decoding off, all ones, read, restore.
    guest.cfg_write(1, 0x04, 0x0000, 2)
    assert guest.rd(addr + vp.NUM_QUEUES, 2) == 0xFFFF  # memory decoding off: nothing answers
    guest.cfg_write(1, 0x10, 0xFFFF_FFFF)
    assert guest.cfg_read(1, 0x10) == (~(vp.BAR_SIZE - 1)) & 0xFFFF_FFFF
    guest.cfg_write(1, 0x10, addr)
    assert guest.cfg_read(1, 0x10) == addr  # 32-bit, non-prefetchable memory BAR
    # BARs 1-5 and the ROM BAR are not implemented: they size to 0.
    guest.cfg_write(1, 0x14, 0xFFFF_FFFF)
    guest.cfg_write(1, 0x30, 0xFFFF_FFFF)
    assert guest.cfg_read(1, 0x14) == 0 and guest.cfg_read(1, 0x30) == 0
    guest.cfg_write(1, 0x04, 0x0006, 2)
    assert guest.cfg_read(1, 0x04, 2) == 0x0006
    assert guest.rd(addr + vp.NUM_QUEUES, 2) == 1


def test_guest_moves_the_bar(guest: PciGuest) -> None:
    function = guest.add(VirtioRng())
    old = guest.bar0(1)
    new = layout.PCI_MMIO_BASE + 0x10_0000
    guest.cfg_write(1, 0x10, new)
    assert function.bar_address == new
    assert guest.rd(old + vp.NUM_QUEUES, 2) == 0xFFFF
    assert guest.rd(new + vp.NUM_QUEUES, 2) == 1
    # Moved outside the host bridge window: not served anywhere (and no crash).
    guest.cfg_write(1, 0x10, 0x1000_0000)
    assert function.mapped == []
    assert guest.rd(new + vp.NUM_QUEUES, 2) == 0xFFFF


def test_capability_chain_as_a_driver_parses_it(guest: PciGuest) -> None:
    guest.add(VirtioRng())
    caps = guest.capabilities(1)
    assert [cap_id for _, cap_id in caps].count(0x09) == 4
    assert [cap_id for _, cap_id in caps].count(0x11) == 1
    virtio = guest.virtio_caps(1)
    assert set(virtio) == {1, 2, 3, 4}
    for cfg_type, (bar, offset, length, _) in virtio.items():
        assert bar == 0, cfg_type
        assert offset + length <= vp.BAR_SIZE and offset % 4 == 0
    assert virtio[vp.VIRTIO_PCI_CAP_COMMON_CFG][2] >= 0x38  # sizeof(virtio_pci_common_cfg)
    assert virtio[vp.VIRTIO_PCI_CAP_ISR_CFG][2] >= 1
    assert virtio[vp.VIRTIO_PCI_CAP_NOTIFY_CFG][3] == 4  # notify_off_multiplier
    msix = next(p for p, cap_id in caps if cap_id == 0x11)
    assert guest.cfg_read(1, msix + 2, 2) & 0x7FF == 1  # 2 vectors: config + 1 queue


def test_rng_over_pci_end_to_end_with_msix(guest: PciGuest) -> None:
    dev = VirtioRng()
    function = guest.add(dev)
    drv = Driver(guest, 1)
    drv.init()
    assert drv.c(vp.DEVICE_STATUS, 1) == 15
    assert drv.c(vp.QUEUE_ENABLE, 2) == 1
    q = dev.queues[0]
    assert (q.desc_addr, q.avail_addr, q.used_addr) == (DESC_BASE, AVAIL_BASE, USED_BASE)
    # The driver programmed the MSI-X entries: each vector's GSI now routes to its message.
    gsis = function.msix.gsis
    assert guest.router.msi[gsis[1]] == (MSI_ADDR, 0x41)
    routes = guest.router.routes()
    assert [(e.gsi, e.u.msi.data) for e in routes if e.gsi >= FIRST_MSI_GSI] == [
        (gsis[0], 0x40), (gsis[1], 0x41)
    ]  # fmt: skip
    assert sum(1 for e in routes if e.gsi < FIRST_MSI_GSI) == 40  # the irqchip's defaults
    head = drv.ring.add_chain([], [64])
    drv.kick(0)
    serve(dev)
    assert drv.ring.used() == [(head, 64)]
    assert irq_count(function.msix.lines[1]) == 1  # the queue's vector
    assert irq_count(function.msix.lines[0]) == 0  # not the config vector


def test_blk_reads_its_image_over_pci(guest: PciGuest, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(b"sector zero over pci".ljust(4096, b"\0"))
    dev = VirtioBlk(image)
    try:
        guest.add(dev)
        drv = Driver(guest, 1)
        # The device configuration structure is the blk config: capacity in sectors.
        assert guest.rd(drv.device, 8) == 8
        drv.init()
        header = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)
        start = drv.ring.next_data  # the mock driver lays out header, data, status in order
        head = drv.ring.add_chain([header], [512, 1])
        drv.kick(0)
        serve(dev)
        assert drv.ring.used() == [(head, 513)]
        assert guest.mem.read(start + 16, 20) == b"sector zero over pci"
        assert guest.mem.read(start + 16 + 512, 1)[0] == VIRTIO_BLK_S_OK
    finally:
        dev.close()


def test_msix_masking_pending_bits_and_function_mask(guest: PciGuest) -> None:
    dev = VirtioRng()
    function = guest.add(dev)
    drv = Driver(guest, 1)
    drv.init()
    line = function.msix.lines[1]
    entry = drv.table + 16
    guest.wr(entry + 12, 1, 4)  # mask vector 1
    function.signal(1, 0)
    assert irq_count(line) == 0
    assert guest.rd(drv.pba, 8) == 0b10  # pending bit of vector 1 (§6.8.2.10)
    guest.wr(entry + 12, 0, 4)  # unmask: the pending message goes out
    assert irq_count(line) == 1
    assert guest.rd(drv.pba, 8) == 0
    # Function mask (Message Control bit 14) holds every vector.
    ctrl = guest.cfg_read(1, drv.msix_cap + 2, 2)
    guest.cfg_write(1, drv.msix_cap + 2, ctrl | 0x4000, 2)
    function.signal(1, 0)
    assert irq_count(line) == 0
    guest.cfg_write(1, drv.msix_cap + 2, ctrl & ~0x4000, 2)
    assert irq_count(line) == 1
    # MSI-X disabled: no message at all (there is no INTx to fall back to).
    guest.cfg_write(1, drv.msix_cap + 2, ctrl & ~0x8000, 2)
    function.signal(1, 0)
    assert irq_count(line) == 0
    # The table reads back what was written (qword and dword reads).
    assert guest.rd(entry, 8) == MSI_ADDR
    assert guest.rd(entry + 8, 4) == 0x41


def test_no_vector_means_no_interrupt_and_isr_read_clears(guest: PciGuest) -> None:
    dev = VirtioRng()
    function = guest.add(dev)
    drv = Driver(guest, 1)
    drv.init()
    drv.cw(vp.QUEUE_SELECT, 0, 2)
    drv.cw(vp.QUEUE_MSIX_VECTOR, NO_VECTOR, 2)
    assert drv.c(vp.QUEUE_MSIX_VECTOR, 2) == NO_VECTOR
    function.signal(1, 0)
    assert [irq_count(line) for line in function.msix.lines] == [0, 0]
    # ISR status (§4.1.4.5): bit 0 set by the used-buffer event, cleared by the read.
    assert guest.rd(drv.isr, 1) == 1
    assert guest.rd(drv.isr, 1) == 0
    # A configuration change goes to config_msix_vector and sets ISR bit 1.
    function.signal(2)
    assert irq_count(function.msix.lines[0]) == 1
    assert guest.rd(drv.isr, 1) == 2


def test_reset_clears_vectors_and_queues(guest: PciGuest) -> None:
    dev = VirtioRng()
    function = guest.add(dev)
    drv = Driver(guest, 1)
    drv.init()
    drv.cw(vp.DEVICE_STATUS, 0, 1)
    assert drv.c(vp.DEVICE_STATUS, 1) == 0
    assert drv.c(vp.CONFIG_MSIX_VECTOR, 2) == NO_VECTOR
    assert drv.c(vp.QUEUE_MSIX_VECTOR, 2) == NO_VECTOR
    assert drv.c(vp.QUEUE_ENABLE, 2) == 0
    assert function.queue_vectors == [NO_VECTOR]


def test_save_restore_plain_data(guest: PciGuest) -> None:
    dev = VirtioRng()
    function = guest.add(dev)
    drv = Driver(guest, 1)
    drv.init()
    guest.cfg_write(1, 0x10, layout.PCI_MMIO_BASE + 0x20_0000)
    # Plain data only: survives a JSON round trip as the snapshot format would store it.
    state = vp.PciTransportState.from_dict(json.loads(json.dumps(function.save().to_dict())))
    other = PciGuest()
    try:
        twin = other.add(VirtioRng())
        twin.restore(state)
        assert twin.bar_address == layout.PCI_MMIO_BASE + 0x20_0000
        assert twin.queue_vectors == [1] and twin.config_vector == 0
        assert twin.msix.enabled
        assert other.router.msi[twin.msix.gsis[1]] == (MSI_ADDR, 0x41)
    finally:
        other.close()


# -- a hostile guest: every bad value ends in NEEDS_RESET or an ignored access


def test_bad_queue_size_sets_needs_reset(guest: PciGuest) -> None:
    dev = VirtioRng()
    guest.add(dev)
    drv = Driver(guest, 1)
    drv.init(queue_size=3)  # §2.7: not a power of two
    assert drv.c(vp.DEVICE_STATUS, 1) & STATUS_NEEDS_RESET
    assert not dev.activated


def test_ring_outside_ram_sets_needs_reset(guest: PciGuest) -> None:
    dev = VirtioRng()
    function = guest.add(dev)
    drv = Driver(guest, 1)
    drv.init(desc=MEM_SIZE + 0x1000)  # §2.7: the descriptor table must be in guest memory
    assert drv.c(vp.DEVICE_STATUS, 1) & STATUS_NEEDS_RESET
    # The driver is told by a configuration-change interrupt (§2.1.2).
    assert irq_count(function.msix.lines[0]) == 1


def test_hostile_accesses_are_ignored(guest: PciGuest) -> None:
    dev = VirtioRng()
    function = guest.add(dev)
    drv = Driver(guest, 1)
    drv.init()
    # A vector the MSI-X table does not have reads back as NO_VECTOR (§4.1.5.1.2.1).
    drv.cw(vp.QUEUE_MSIX_VECTOR, 999, 2)
    assert drv.c(vp.QUEUE_MSIX_VECTOR, 2) == NO_VECTOR
    drv.cw(vp.CONFIG_MSIX_VECTOR, 2, 2)
    assert drv.c(vp.CONFIG_MSIX_VECTOR, 2) == NO_VECTOR
    # A queue that does not exist: size 0 (§4.1.4.3.1), writes ignored.
    drv.cw(vp.QUEUE_SELECT, 77, 2)
    assert drv.c(vp.QUEUE_SIZE, 2) == 0
    drv.cw(vp.QUEUE_SIZE, 8, 2)
    drv.cw(vp.QUEUE_ENABLE, 1, 2)
    drv.cw(vp.QUEUE_MSIX_VECTOR, 0, 2)
    # A live queue's fields are fixed; queue_enable 0 is ignored (§4.1.4.3.2).
    drv.cw(vp.QUEUE_SELECT, 0, 2)
    drv.cw(vp.QUEUE_DESC, 0xDEAD_0000, 4)
    drv.cw(vp.QUEUE_SIZE, 2, 2)
    drv.cw(vp.QUEUE_ENABLE, 0, 2)
    assert dev.queues[0].desc_addr == DESC_BASE and dev.queues[0].size == 16
    assert drv.c(vp.QUEUE_ENABLE, 2) == 1
    # Odd widths and unaligned accesses to the common configuration: ignored / zero.
    drv.cw(vp.DEVICE_STATUS, 0, 4)
    drv.cw(vp.QUEUE_SIZE + 1, 0xFF, 1)
    assert drv.c(vp.DEVICE_STATUS, 1) == 15
    assert drv.c(vp.NUM_QUEUES + 1, 1) == 0
    # MSI-X: writes past the table, odd widths, the read-only PBA.
    guest.wr(drv.table + 16 * 5, 0x1234, 4)
    guest.wr(drv.table + 2, 0xFFFF, 2)
    guest.wr(drv.pba, 0xFFFF_FFFF, 4)
    assert guest.rd(drv.table, 4) == MSI_ADDR
    assert guest.rd(drv.pba, 4) == 0
    assert function.msix.table[1] == [MSI_ADDR, 0, 0x41, 0]
    # Notifications for queues that do not exist, at odd offsets, with odd widths.
    guest.wr(drv.notify + 4 * 9, 9, 2)
    guest.wr(drv.notify + 1, 0, 1)
    guest.wr(drv.notify + 0x800, 0, 4)
    # The device configuration beyond rng's (empty) space reads zeros; writes ignored.
    assert guest.rd(drv.device + 0x10, 4) == 0
    guest.wr(drv.device, 0xFFFF_FFFF, 4)
    # Configuration space: beyond 256 bytes (mechanism #1 cannot even address it), RO caps.
    guest.cfg_write(1, 0x48, 0xFFFF_FFFF)
    assert guest.virtio_caps(1)[vp.VIRTIO_PCI_CAP_COMMON_CFG][1] == 0
    assert drv.c(vp.DEVICE_STATUS, 1) == 15
    assert dev.errors == []
    assert not drv.c(vp.DEVICE_STATUS, 1) & STATUS_NEEDS_RESET
    assert drv.c(vp.DEVICE_STATUS, 1) & STATUS_DRIVER_OK


def test_balloon_over_pci_inflates_and_hears_a_new_target(guest: PciGuest) -> None:
    from kvmkit.devices.virtio.balloon import VirtioBalloon

    dev = VirtioBalloon(1)
    function = guest.add(dev)
    drv = Driver(guest, 1)
    drv.init()  # queue 0, the inflate queue
    assert guest.rd(drv.device, 4) == 256  # num_pages: 1 MiB of 4 KiB pages
    guest.mem.write(0xC0000, b"\x5a" * 8192)
    head = drv.ring.add_chain([struct.pack("<II", 0xC0, 0xC1)], [])
    drv.kick(0)
    serve(dev)
    assert drv.ring.used() == [(head, 0)] and dev.discarded_bytes == 8192
    assert guest.mem.read(0xC0000, 8192) == bytes(8192)
    guest.wr(drv.device + 4, 2, 4)  # the driver's `actual`
    assert dev.actual == 2
    dev.set_target(0)
    assert guest.rd(drv.device, 4) == 0
    assert irq_count(function.msix.lines[0]) == 1  # the configuration vector
