"""Virtio device state in snapshots: a device (and its virtio-mmio transport) saved with the
worker paused and restored into a new device over a copy of guest memory carries on without a
reset, serves a request the driver queued before the pause, and a malformed or mismatched
saved state is refused with SnapshotError before anything changes."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_virtio_devices import Driver, attach, blk_header
from virtio_mock import MEM_SIZE, new_memory

from kvmkit.devices.irq import NoIrq
from kvmkit.devices.virtio import mmio as r
from kvmkit.devices.virtio.blk import (
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VirtioBlk,
)
from kvmkit.devices.virtio.device import (
    STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
    VirtioState,
)
from kvmkit.devices.virtio.rng import VirtioRng
from kvmkit.devices.virtio.worker import VirtioWorkers
from kvmkit.snapshot.format import SnapshotError


@pytest.fixture
def worker() -> Iterator[VirtioWorkers]:
    w = VirtioWorkers()
    w.start()
    yield w
    w.close()


def wait_used(drv: Driver, n: int, timeout: float = 5.0) -> list[tuple[int, int]]:
    got: list[tuple[int, int]] = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        got += drv.used()
        time.sleep(0.002)
    return got


def test_blk_restored_without_reset_serves_the_request_queued_before_the_pause(
    tmp_path: Path, worker: VirtioWorkers
) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(64 * 1024))
    dev = VirtioBlk(img, serial="snap")
    drv = attach(dev, worker)
    drv.init()
    used, _ = drv.request([blk_header(VIRTIO_BLK_T_OUT, 1), b"A" * 512], [1])
    assert len(used) == 1

    # Pause: the worker parks; a request made now is notified but not served.
    assert worker.pause()
    start = drv.next_data
    drv.add_chain([blk_header(VIRTIO_BLK_T_OUT, 2), b"B" * 512], [1])
    drv.wr(r.QUEUE_NOTIFY, 0)
    time.sleep(0.1)
    assert drv.used() == []
    dev.quiesce()
    # Plain data that survives JSON (what the state file holds).
    dev_state = VirtioState.from_dict(json.loads(json.dumps(dev.save().to_dict())), "d")
    mmio_state = r.MmioTransportState.from_dict(
        json.loads(json.dumps(drv.transport.save().to_dict()))
    )
    memory = drv.mem.read(0, MEM_SIZE)
    status = drv.rd(r.STATUS)

    # "Another process": a new device, transport, worker and a copy of guest memory.
    dev2 = VirtioBlk(img, serial="snap")
    worker2 = VirtioWorkers()
    try:
        mem2 = new_memory()
        mem2.write(0, memory)
        drv.mem, drv.dev = mem2, dev2
        drv.transport = r.VirtioMmio(dev2, mem2, drv.irq)
        dev2.restore(dev_state)
        drv.transport.restore(mmio_state)
        worker2.add(dev2)
        dev2.kick_ready_queues()
        worker2.start()
        # No reset: the driver sees the status it set, the queue still ready.
        assert drv.rd(r.STATUS) == status and status & STATUS_DRIVER_OK
        assert drv.rd(r.QUEUE_READY) == 1
        # The kick served the request queued before the pause.
        used = wait_used(drv, 1)
        assert len(used) == 1 and used[0][1] == 1
        status_addr = start + 16 + 512
        assert mem2.read(status_addr, 1) == bytes([VIRTIO_BLK_S_OK])
        assert img.read_bytes()[1024:1536] == b"B" * 512
        # And the queue goes on from the saved indexes.
        used, bufs = drv.request([blk_header(VIRTIO_BLK_T_IN, 1)], [1024, 1])
        assert used and used[0][1] == 1025
        assert mem2.read(bufs[0][0], 1024) == b"A" * 512 + b"B" * 512
        assert dev2.queues[0].next_used == 3 and dev2.errors == []
    finally:
        worker2.close()
        dev2.close()
        dev.close()


def test_worker_pause_holds_notifications_until_resume(worker: VirtioWorkers) -> None:
    dev = VirtioRng()
    drv = attach(dev, worker)
    drv.init()
    assert worker.pause() and worker.paused
    drv.add_chain([], [32])
    drv.wr(r.QUEUE_NOTIFY, 0)
    time.sleep(0.1)
    assert drv.used() == []
    worker.resume()
    assert len(wait_used(drv, 1)) == 1
    assert not worker.paused
    worker.pause()
    dev.close()


def test_transport_restore_reraises_a_pending_interrupt(worker: VirtioWorkers) -> None:
    dev = VirtioRng()
    drv = attach(dev, worker)
    drv.init()
    drv.request([], [16])
    state = drv.transport.save()
    assert state.isr == 1  # not acknowledged by the driver
    irq = NoIrq()
    dev2 = VirtioRng()
    t2 = r.VirtioMmio(dev2, drv.mem, irq)
    t2.restore(state)
    assert irq.count == 1  # the interrupt may not have reached the saved IOAPIC
    worker.pause()
    dev.close()
    dev2.close()


def _active_rng_state(worker: VirtioWorkers) -> dict[str, Any]:
    dev = VirtioRng()
    drv = attach(dev, worker)
    drv.init()
    drv.request([], [16])
    state = dev.save().to_dict()
    worker.pause()  # parked: it no longer waits on the eventfds closed below
    dev.close()
    return state


def _set(path: str, value: Any) -> Any:
    def apply(state: dict[str, Any]) -> None:
        *keys, last = path.split(".")
        obj: Any = state
        for k in keys:
            obj = obj[int(k)] if k.isdigit() else obj[k]
        obj[last] = value

    return apply


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_set("version", 2), "version 2"),
        (_set("queues.0.size", 12), "not a power of 2"),
        (_set("queues.0.size", 65536), "must be an integer in"),
        (_set("queues.0.size", 1024), "exceeds"),
        (_set("queues.0.next_used", 70000), "next_used must be an integer"),
        (_set("queues.0.last_avail", 40), "in flight"),
        (_set("queues.0.desc_addr", 0x1008), "not 16-byte aligned"),
        (_set("queues.0.desc_addr", MEM_SIZE - 16), "outside guest memory"),
        (_set("queues.0.event_idx", False), "negotiated"),
        (_set("driver_features", 1 << 60), "did not offer"),
        (_set("device_features", 2**64 - 1), "offered features"),
        (_set("status", 0x4F), "active device with status"),
        (_set("device_id", 2), "not 4"),
        (_set("queues", []), "has 0 queues"),
        (_set("queues", [{}] * 100), "at most 64"),
        (_set("device", "x"), "must be an object"),
    ],
)
def test_malformed_state_is_refused_and_changes_nothing(
    worker: VirtioWorkers, change: Any, message: str
) -> None:
    state = copy.deepcopy(_active_rng_state(worker))
    change(state)
    dev = VirtioRng()
    Driver(dev)  # a transport and guest memory, as in a restore
    try:
        with pytest.raises(SnapshotError, match=message):
            dev.restore(VirtioState.from_dict(state, "virtio"))
        # Nothing was taken over.
        assert dev.status == 0 and not dev.activated and not dev.queues[0].ready
        assert dev.queues[0].next_used == 0 and dev.driver_features == 0
    finally:
        dev.close()


def test_state_is_checked_without_a_device() -> None:
    with pytest.raises(SnapshotError, match="must be an object"):
        VirtioState.from_dict([], "devices.virtio[0].device")
    with pytest.raises(SnapshotError, match="status must be an integer"):
        VirtioState.from_dict({"version": 1, "status": "4"}, "d")


def test_blk_restore_refuses_a_resized_image_or_other_options(
    tmp_path: Path, worker: VirtioWorkers
) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(bytes(8192))
    dev = VirtioBlk(img)
    attach(dev, worker).init()
    state = dev.save()
    worker.pause()
    dev.close()
    with img.open("ab") as f:
        f.write(bytes(512))
    dev2 = VirtioBlk(img)
    Driver(dev2)
    with pytest.raises(SnapshotError, match="8704 bytes, it was 8192"):
        dev2.restore(state)
    dev2.close()
    img.write_bytes(bytes(8192))
    dev3 = VirtioBlk(img, serial="other")
    Driver(dev3)
    with pytest.raises(SnapshotError, match="serial differs"):
        dev3.restore(state)
    dev3.close()
    dev4 = VirtioBlk(img, read_only=True)
    Driver(dev4)
    with pytest.raises(SnapshotError, match="offered features"):  # RO changes the features
        dev4.restore(state)
    dev4.close()
    dev5 = VirtioBlk(img)
    Driver(dev5)
    dev5.restore(state)
    assert dev5.status & STATUS_FEATURES_OK and dev5.activated
    dev5.close()
