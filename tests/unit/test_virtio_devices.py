"""virtio-mmio driven from Python like a driver does (virtio 1.2 §3.1.1, §4.2.3), with the
block device over real files and the entropy device, served by the real worker thread."""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from virtio_mock import AVAIL_BASE, DESC_BASE, USED_BASE, MockDriver, new_memory

from kvmkit.devices.irq import NoIrq
from kvmkit.devices.virtio import mmio as r
from kvmkit.devices.virtio.blk import (
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    DriveConfig,
    VirtioBlk,
)
from kvmkit.devices.virtio.device import (
    STATUS_ACKNOWLEDGE,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    STATUS_NEEDS_RESET,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
)
from kvmkit.devices.virtio.queue import VIRTQ_DESC_F_NEXT
from kvmkit.devices.virtio.rng import VirtioRng
from kvmkit.devices.virtio.worker import VirtioWorkers


class Driver(MockDriver):
    """The mock driver plus the virtio-mmio register interface."""

    def __init__(self, dev: VirtioDevice, size: int = 16) -> None:
        super().__init__(new_memory(), size)
        self.irq = NoIrq()
        self.transport = r.VirtioMmio(dev, self.mem, self.irq)
        self.dev = dev

    def rd(self, off: int) -> int:
        buf = bytearray(4)
        self.transport.read(off, memoryview(buf))
        return int(struct.unpack("<I", buf)[0])

    def wr(self, off: int, value: int) -> None:
        self.transport.write(off, memoryview(bytearray(struct.pack("<I", value))))

    def init(self, features: int | None = None) -> None:
        """§3.1.1 device initialization, queue 0 set up as in §4.2.3.2."""
        assert self.rd(r.MAGIC_VALUE) == r.MAGIC and self.rd(r.VERSION_REG) == 2
        self.wr(r.STATUS, 0)
        self.wr(r.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        offered = 0
        for sel in (0, 1):
            self.wr(r.DEVICE_FEATURES_SEL, sel)
            offered |= self.rd(r.DEVICE_FEATURES) << (32 * sel)
        self.offered = offered
        want = offered if features is None else features
        for sel in (0, 1):
            self.wr(r.DRIVER_FEATURES_SEL, sel)
            self.wr(r.DRIVER_FEATURES, (want >> (32 * sel)) & 0xFFFFFFFF)
        self.wr(r.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        if not self.rd(r.STATUS) & STATUS_FEATURES_OK:
            return
        self.wr(r.QUEUE_SEL, 0)
        assert self.rd(r.QUEUE_READY) == 0 and self.rd(r.QUEUE_NUM_MAX) >= self.size
        self.wr(r.QUEUE_NUM, self.size)
        for low, addr in (
            (r.QUEUE_DESC_LOW, DESC_BASE),
            (r.QUEUE_DRIVER_LOW, AVAIL_BASE),
            (r.QUEUE_DEVICE_LOW, USED_BASE),
        ):
            self.wr(low, addr)
            self.wr(low + 4, 0)
        self.wr(r.QUEUE_READY, 1)
        self.wr(
            r.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK
        )

    def request(
        self,
        readable: list[bytes],
        writable: list[int],
        *,
        indirect: bool = False,
        timeout: float = 5.0,
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """Submit a chain, notify, wait for the used entry. Returns (used entries, the
        writable buffers' (addr, len))."""
        start = self.next_data
        self.add_chain(readable, writable, indirect=indirect)
        self.wr(r.QUEUE_NOTIFY, 0)
        deadline = time.monotonic() + timeout
        used: list[tuple[int, int]] = []
        while not used and time.monotonic() < deadline:
            used = self.used()
            time.sleep(0.001)
        bufs = []
        addr = start
        for data in readable:
            addr += (len(data) + 15) & ~15 or 16
        for n in writable:
            bufs.append((addr, n))
            addr += (n + 15) & ~15 or 16
        return used, bufs


@pytest.fixture
def worker() -> Iterator[VirtioWorkers]:
    w = VirtioWorkers()
    w.start()
    yield w
    w.close()


def attach(dev: VirtioDevice, worker: VirtioWorkers) -> Driver:
    drv = Driver(dev)
    worker.add(dev)
    return drv


def blk_header(rtype: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", rtype, 0, sector)


def test_mmio_identity_and_feature_negotiation(tmp_path: Path, worker: VirtioWorkers) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    drv = attach(VirtioBlk(img), worker)
    assert drv.rd(r.DEVICE_ID) == 2
    drv.init()
    assert drv.offered & VIRTIO_F_VERSION_1 and drv.offered & VIRTIO_BLK_F_FLUSH
    assert drv.offered & VIRTIO_F_EVENT_IDX and drv.offered & VIRTIO_F_INDIRECT_DESC
    assert not drv.offered & VIRTIO_BLK_F_RO
    assert drv.rd(r.STATUS) & STATUS_DRIVER_OK
    # capacity (u64 at config offset 0) in 512-byte sectors
    assert drv.rd(r.CONFIG) == 8 and drv.rd(r.CONFIG + 4) == 0
    # a reset clears everything; the driver reads status 0 back (§4.2.3.1)
    drv.wr(r.STATUS, 0)
    assert drv.rd(r.STATUS) == 0 and drv.rd(r.QUEUE_READY) == 0


def test_features_ok_refused_without_version_1(tmp_path: Path, worker: VirtioWorkers) -> None:
    drv = attach(VirtioRng(), worker)
    drv.init(features=0)  # a legacy driver
    assert not drv.rd(r.STATUS) & STATUS_FEATURES_OK


@pytest.mark.parametrize("event_idx", [False, True])
def test_blk_write_read_flush_get_id(
    tmp_path: Path, worker: VirtioWorkers, event_idx: bool
) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(64 * 1024))
    dev = VirtioBlk(img, serial="disk-42")
    drv = attach(dev, worker)
    drv.init(None if event_idx else VIRTIO_F_VERSION_1 | VIRTIO_F_INDIRECT_DESC)
    assert dev.queues[0].event_idx == event_idx
    data = bytes(range(256)) * 4
    used, bufs = drv.request([blk_header(VIRTIO_BLK_T_OUT, 3), data], [1])
    assert used and used[0][1] == 1
    assert drv.mem.read(bufs[-1][0], 1) == bytes([VIRTIO_BLK_S_OK])
    assert img.read_bytes()[3 * 512 : 3 * 512 + len(data)] == data
    # read it back into two buffers, through an indirect table
    used, bufs = drv.request([blk_header(VIRTIO_BLK_T_IN, 3)], [600, 424, 1], indirect=True)
    assert used[0][1] == 1025
    got = drv.mem.read(bufs[0][0], 600) + drv.mem.read(bufs[1][0], 424)
    assert got == data and drv.mem.read(bufs[2][0], 1) == bytes([VIRTIO_BLK_S_OK])
    used, bufs = drv.request([blk_header(VIRTIO_BLK_T_FLUSH)], [1])
    assert drv.mem.read(bufs[0][0], 1) == bytes([VIRTIO_BLK_S_OK])
    used, bufs = drv.request([blk_header(VIRTIO_BLK_T_GET_ID)], [20, 1])
    assert drv.mem.read(bufs[0][0], 20) == b"disk-42".ljust(20, b"\0")
    assert drv.irq.count >= 1  # the device interrupted for used buffers
    assert dev.errors == []
    # Firecracker's block metrics (GET_ID is none of them)
    assert (dev.write_count, dev.write_bytes, dev.read_count, dev.read_bytes) == (1, 1024, 1, 1024)
    assert dev.flush_count == 1


def test_blk_out_of_range_unsupported_and_read_only(tmp_path: Path, worker: VirtioWorkers) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(b"A" * 4096)
    img.chmod(0o444)
    drv = attach(VirtioBlk(img, read_only=True), worker)
    drv.init()
    assert drv.offered & VIRTIO_BLK_F_RO
    _, bufs = drv.request([blk_header(VIRTIO_BLK_T_OUT, 0), b"B" * 512], [1])
    assert drv.mem.read(bufs[0][0], 1) == bytes([VIRTIO_BLK_S_IOERR])
    assert img.read_bytes() == b"A" * 4096
    blk = drv.dev
    assert isinstance(blk, VirtioBlk) and blk.write_count == 0 and blk.write_bytes == 0
    _, bufs = drv.request([blk_header(VIRTIO_BLK_T_IN, 7)], [1024, 1])  # past the end
    assert drv.mem.read(bufs[1][0], 1) == bytes([VIRTIO_BLK_S_IOERR])
    _, bufs = drv.request([blk_header(99)], [1])
    assert drv.mem.read(bufs[0][0], 1) == bytes([VIRTIO_BLK_S_UNSUPP])


def test_rng_fills_buffers(worker: VirtioWorkers) -> None:
    drv = attach(VirtioRng(), worker)
    drv.init()
    used, bufs = drv.request([], [256, 256])
    assert used[0][1] == 512
    data = drv.mem.read(bufs[0][0], 256) + drv.mem.read(bufs[1][0], 256)
    assert len(set(data)) > 64  # random, not zeros


def test_corrupt_queue_sets_needs_reset_and_device_recovers(worker: VirtioWorkers) -> None:
    dev = VirtioRng()
    drv = attach(dev, worker)
    drv.init()
    drv.write_desc(DESC_BASE, 0, 0x20000, 4, VIRTQ_DESC_F_NEXT, 0)  # a loop to itself
    drv.publish(0)
    drv.wr(r.QUEUE_NOTIFY, 0)
    deadline = time.monotonic() + 5
    while not drv.rd(r.STATUS) & STATUS_NEEDS_RESET and time.monotonic() < deadline:
        time.sleep(0.005)
    assert drv.rd(r.STATUS) & STATUS_NEEDS_RESET
    assert drv.rd(r.INTERRUPT_STATUS) & 2  # configuration change notification (§2.1.2)
    assert "longer" in dev.errors[0]
    # The driver resets and re-initializes the device: it works again.
    drv.avail_idx = drv.used_seen = drv.free_head = 0
    drv.mem.fill(AVAIL_BASE, 0x100)
    drv.mem.fill(USED_BASE, 0x100)
    drv.init()
    assert not drv.rd(r.STATUS) & STATUS_NEEDS_RESET
    used, _ = drv.request([], [16])
    assert used[0][1] == 16


def test_drive_option_parsing() -> None:
    d = DriveConfig.parse("/tmp/x.img,ro,serial=abc")
    assert (str(d.path), d.read_only, d.serial) == ("/tmp/x.img", True, "abc")
    with pytest.raises(ValueError, match="unknown option"):
        DriveConfig.parse("/tmp/x.img,rw")


def test_dsdt_describes_virtio_mmio_devices_for_linux() -> None:
    from kvmkit.arch.x86_64.acpi import dsdt_aml

    aml = dsdt_aml(5, [(0xD000_0000, 0x1000, 5), (0xD000_1000, 0x1000, 6)])
    assert aml.count(b"\x0dLNRO0005\x00") == 2  # _HID strings Linux's virtio_mmio matches
    assert b"\\_SB_" in aml  # the devices live in Scope (\_SB_)
    # _CRS: Memory32Fixed(RW, base, 4 KiB) then Interrupt(consumer, edge, high) {irq}
    for base, irq in ((0xD000_0000, 5), (0xD000_1000, 6)):
        crs = struct.pack("<BHBII", 0x86, 9, 1, base, 0x1000)
        crs += struct.pack("<BHBBI", 0x89, 6, 3, 1, irq) + b"\x79\x00"
        assert crs in aml
    assert b"LNRO" not in dsdt_aml(5)


def test_virtio_irqs_avoid_the_sci_and_other_overridden_pins(tmp_path: Path) -> None:
    # Linux refuses an edge-triggered device interrupt on the level-triggered SCI pin (the
    # fourth device used to get IRQ 9 and never probed); the PIT's override (pin 2) too.
    from kvmkit.arch.x86_64 import layout
    from kvmkit.arch.x86_64.acpi import SCI_IRQ
    from kvmkit.errors import UserError
    from kvmkit.vmm.config import MAX_VIRTIO_DEVICES, MachineConfig

    assert SCI_IRQ not in layout.VIRTIO_MMIO_IRQS
    assert not {0, 1, 2, 4, 8} & set(layout.VIRTIO_MMIO_IRQS)  # PIT, i8042, cascade, UART, RTC
    assert len(set(layout.VIRTIO_MMIO_IRQS)) == MAX_VIRTIO_DEVICES
    drives = [DriveConfig(tmp_path / f"d{i}.img") for i in range(MAX_VIRTIO_DEVICES)]
    for d in drives:
        d.path.write_bytes(bytes(512))
    MachineConfig(drives=drives).validate()  # one device per IRQ fits
    with pytest.raises(UserError, match=f"at most {MAX_VIRTIO_DEVICES} virtio devices"):
        MachineConfig(drives=drives, rng=True).validate()


def test_blk_discard_punches_a_hole(tmp_path: Path, worker: VirtioWorkers) -> None:
    from kvmkit.devices.virtio.blk import VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_T_DISCARD

    img = tmp_path / "d.img"
    img.write_bytes(b"\xff" * (1 << 20))
    drv = attach(VirtioBlk(img), worker)
    drv.init()
    assert drv.offered & VIRTIO_BLK_F_DISCARD
    assert drv.rd(r.CONFIG + 40) == 16  # max_discard_seg
    seg = struct.pack("<QII", 256, 512, 0)  # 256 KiB from 128 KiB
    _, bufs = drv.request([blk_header(VIRTIO_BLK_T_DISCARD), seg], [1])
    assert drv.mem.read(bufs[0][0], 1) == bytes([VIRTIO_BLK_S_OK])
    data = img.read_bytes()
    assert len(data) == 1 << 20
    assert data[128 * 1024 : 384 * 1024] == bytes(256 * 1024)  # a hole reads as zeros
    assert data[: 128 * 1024] == b"\xff" * (128 * 1024)
    assert data[384 * 1024 :] == b"\xff" * (640 * 1024)
    bad = struct.pack("<QII", 2040, 16, 0)  # past the end
    _, bufs = drv.request([blk_header(VIRTIO_BLK_T_DISCARD), bad], [1])
    assert drv.mem.read(bufs[0][0], 1) == bytes([VIRTIO_BLK_S_IOERR])
    flags = struct.pack("<QII", 0, 8, 2)  # an unknown flag
    _, bufs = drv.request([blk_header(VIRTIO_BLK_T_DISCARD), flags], [1])
    assert drv.mem.read(bufs[0][0], 1) == bytes([VIRTIO_BLK_S_UNSUPP])


@pytest.mark.parametrize(
    ("spec", "message"),
    [("/nonexistent.img", "not a regular file"), ("{img},bogus", "unknown option 'bogus'")],
)
def test_run_cli_rejects_bad_drives(tmp_path: Path, spec: str, message: str) -> None:
    import subprocess
    import sys

    img = tmp_path / "d.img"
    img.write_bytes(bytes(4096))
    proc = subprocess.run(
        [sys.executable, "-m", "kvmkit", "run", "--drive", spec.format(img=img), "--", "true"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


LIVE = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK


def test_status_bits_stay_set_until_a_reset(worker: VirtioWorkers) -> None:
    """§2.1.2: the driver never clears a status bit but by a reset; a write without
    DRIVER_OK leaves the device live (it neither stops nor activates a second time)."""
    dev = VirtioRng()
    drv = attach(dev, worker)
    drv.init()
    drv.wr(r.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    assert drv.rd(r.STATUS) == LIVE
    used, _ = drv.request([], [8])
    assert used and used[0][1] == 8
    drv.wr(r.STATUS, 0)
    assert drv.rd(r.STATUS) == 0 and not dev.activated


def test_status_bits_out_of_order_are_refused(worker: VirtioWorkers) -> None:
    """The order of §3.1.1: FEATURES_OK before DRIVER reads back clear; DRIVER_OK without
    FEATURES_OK is a device error; NEEDS_RESET is the device's own bit (§2.1.2)."""
    dev = VirtioRng()
    drv = attach(dev, worker)
    drv.wr(r.STATUS, 0)
    drv.wr(r.STATUS, STATUS_ACKNOWLEDGE | STATUS_NEEDS_RESET)
    assert drv.rd(r.STATUS) == STATUS_ACKNOWLEDGE
    drv.wr(r.DRIVER_FEATURES_SEL, 1)
    drv.wr(r.DRIVER_FEATURES, 1)  # VERSION_1
    drv.wr(r.STATUS, STATUS_ACKNOWLEDGE | STATUS_FEATURES_OK)
    assert drv.rd(r.STATUS) == STATUS_ACKNOWLEDGE
    drv.wr(r.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK)
    assert drv.rd(r.STATUS) & STATUS_NEEDS_RESET and not dev.activated
    assert dev.errors == ["DRIVER_OK without FEATURES_OK"]


def test_enabling_a_bad_queue_on_a_live_device_is_a_device_error(worker: VirtioWorkers) -> None:
    """A queue made ready after DRIVER_OK is checked before it is used (§2.7): a ring outside
    guest memory is NEEDS_RESET, and the queue never goes live."""
    rng = VirtioRng()
    drv = attach(rng, worker)
    drv.init()
    drv.wr(r.QUEUE_READY, 0)  # virtio-mmio lets a driver stop a queue (§4.2.2)
    drv.wr(r.QUEUE_DESC_LOW, 0)
    drv.wr(r.QUEUE_DESC_HIGH, 0x10)  # 64 GiB: outside the 1 MiB of guest memory
    drv.wr(r.QUEUE_READY, 1)
    assert drv.rd(r.STATUS) & STATUS_NEEDS_RESET
    assert drv.rd(r.QUEUE_READY) == 0 and not rng.queues[0].ready
    assert "outside guest memory" in rng.errors[0]


def test_a_guest_failing_over_and_over_grows_neither_memory_nor_the_log(
    worker: VirtioWorkers, caplog: pytest.LogCaptureFixture
) -> None:
    """A driver that corrupts its ring after every reset, 200 times: the device keeps a
    bounded record of its errors (the first and the last ones, and a count) and logs a
    burst of warnings, then about one per 10 s (kvmkit.guestlog), not one per error."""
    caplog.set_level(logging.WARNING, logger="kvmkit.devices.virtio.device")
    dev = VirtioRng()
    drv = attach(dev, worker)
    rounds = 200
    for _ in range(rounds):
        drv.avail_idx = drv.used_seen = drv.free_head = 0
        drv.mem.fill(AVAIL_BASE, 0x100)
        drv.mem.fill(USED_BASE, 0x100)
        drv.init()
        drv.write_desc(DESC_BASE, 0, 0x20000, 4, VIRTQ_DESC_F_NEXT, 0)  # a loop to itself
        drv.publish(0)
        drv.wr(r.QUEUE_NOTIFY, 0)
        deadline = time.monotonic() + 5
        while not drv.rd(r.STATUS) & STATUS_NEEDS_RESET and time.monotonic() < deadline:
            time.sleep(0.001)
        assert drv.rd(r.STATUS) & STATUS_NEEDS_RESET
    warnings = [rec for rec in caplog.records if "needs reset" in rec.getMessage()]
    assert len(warnings) <= 12
    assert len(dev.errors) <= 16 and "longer" in dev.errors[0] and "longer" in dev.errors[-1]
    assert dev.errors.count == rounds
