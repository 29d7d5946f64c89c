"""Device work off the register path, and devices that cannot starve each other: virtio-blk
over a real slow disk (a FUSE file this test serves and can hold), driven with the mock
driver over virtio-mmio and served by the real worker threads.

Needs root and /dev/fuse (the FUSE mount): skipped otherwise."""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from virtio_mock import MmioGuest, wait_for

from kvmkit.devices.virtio import mmio as r
from kvmkit.devices.virtio.blk import VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VirtioBlk
from kvmkit.devices.virtio.device import STATUS_NEEDS_RESET
from kvmkit.devices.virtio.worker import VirtioWorkers
from kvmkit.testing.fusefile import FuseFile

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse"
)


@pytest.fixture
def workers() -> Iterator[VirtioWorkers]:
    w = VirtioWorkers()
    yield w
    w.close()


@pytest.fixture
def slow_disk(tmp_path: Path) -> Iterator[FuseFile]:
    with FuseFile(tmp_path / "mnt", 1 << 20) as f:
        yield f


def timed(fn: Callable[[], object], limit: float) -> float:
    """Run `fn` on another thread (a vCPU's register access); the seconds it took, or
    `limit` if it had not returned by then."""
    start = time.monotonic()
    done = threading.Event()

    def body() -> None:
        fn()
        done.set()

    threading.Thread(target=body, daemon=True).start()
    done.wait(limit)
    return time.monotonic() - start if done.is_set() else limit


def read_request(g: MmioGuest, sector: int = 0) -> int:
    """Queue a 512-byte read of `sector`; returns the address of its status byte."""
    drv = g.q[0]
    header = struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, sector)
    start = drv.next_data
    drv.add_chain([header], [512, 1], indirect=True)  # one ring slot per request
    return start + 16 + 512  # header and data buffer are 16-byte aligned (MockDriver.alloc)


def test_register_access_does_not_wait_for_disk_io(
    slow_disk: FuseFile, workers: VirtioWorkers
) -> None:
    """A vCPU's register reads and writes complete while the device's worker is blocked in
    a disk read: device I/O runs outside the register lock."""
    dev = VirtioBlk(slow_disk.path)
    g = MmioGuest(dev, 1)
    workers.add(dev)
    workers.start()
    g.init()
    slow_disk.hold()
    status = read_request(g)
    g.wr(r.QUEUE_NOTIFY, 0)
    assert slow_disk.wait_waiting(1)  # the worker is inside preadv(2) now
    try:
        assert timed(lambda: g.rd(r.INTERRUPT_STATUS), 5.0) < 1.0
        assert timed(lambda: g.rd(r.CONFIG), 5.0) < 1.0  # the config space (capacity)
        assert timed(lambda: g.wr(r.INTERRUPT_ACK, 1), 5.0) < 1.0
        assert timed(lambda: g.rd(r.QUEUE_READY), 5.0) < 1.0
    finally:
        slow_disk.release()
    wait_for(lambda: g.q[0].used())
    assert g.mem.read(status, 1) == bytes([VIRTIO_BLK_S_OK])
    dev.close()


def test_a_busy_device_does_not_starve_another_and_pause_stays_prompt(
    tmp_path: Path, slow_disk: FuseFile, workers: VirtioWorkers
) -> None:
    """One drive's ring is full of slow requests (50 ms each: 12.8 s of work); a request on
    a second drive is served within a second, and a pause parks every worker between
    requests within a second too (not after the slow ring drained)."""
    slow = VirtioBlk(slow_disk.path, name="vda")
    img = tmp_path / "fast.img"
    img.write_bytes(bytes(1 << 20))
    fast = VirtioBlk(img, name="vdb")
    g_slow, g_fast = MmioGuest(slow, 1, size=256), MmioGuest(fast, 1)
    for dev in (slow, fast):
        workers.add(dev)
    workers.start()
    g_slow.init()
    g_fast.init()
    slow_disk.delay = 0.05
    for i in range(256):
        read_request(g_slow, i)
    g_slow.wr(r.QUEUE_NOTIFY, 0)
    wait_for(lambda: slow_disk.requests >= 2)
    start = time.monotonic()
    status = read_request(g_fast)
    g_fast.wr(r.QUEUE_NOTIFY, 0)
    wait_for(lambda: g_fast.q[0].used(), timeout=15)
    assert time.monotonic() - start < 1.0
    assert g_fast.mem.read(status, 1) == bytes([VIRTIO_BLK_S_OK])
    start = time.monotonic()
    assert workers.pause(timeout=10)
    assert time.monotonic() - start < 1.0
    taken = slow.queues[0].last_avail
    time.sleep(0.3)
    assert slow.queues[0].last_avail == taken  # parked: nothing is served while paused
    assert taken < 256 and slow.queues[0].next_used == taken  # between requests, not in one
    workers.resume()
    slow_disk.delay = 0
    wait_for(lambda: slow.queues[0].next_used == 256, timeout=15)
    assert not g_slow.rd(r.STATUS) & STATUS_NEEDS_RESET
    for dev in (slow, fast):
        dev.close()


def test_closing_does_not_wait_for_a_hung_disk(slow_disk: FuseFile) -> None:
    """A worker stuck in a disk request that never returns is left behind by close() after
    its bounded wait (the process can end); a driver reset meanwhile would wait for it (the
    request in progress finishes before the rings are reset), so the test releases it."""
    workers = VirtioWorkers()
    dev = VirtioBlk(slow_disk.path)
    g = MmioGuest(dev, 1)
    workers.add(dev)
    workers.start()
    g.init()
    slow_disk.hold()
    read_request(g)
    g.wr(r.QUEUE_NOTIFY, 0)
    assert slow_disk.wait_waiting(1)
    start = time.monotonic()
    assert not workers.stop(timeout=1.0)
    workers.close()
    assert time.monotonic() - start < 3.0
    slow_disk.release()
    wait_for(lambda: g.q[0].used())  # the request completes once the disk answers
    dev.close()
