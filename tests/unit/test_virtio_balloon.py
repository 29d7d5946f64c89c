"""virtio-balloon (virtio 1.2 §5.5) driven by the mock driver: inflate gives the pages'
memory back to the host (anonymous memory and the shmem memfd kvmkit's guest RAM is),
deflate, the config space, statistics, hostile buffers, snapshot state; and the pure
parsers the fuzz targets call."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from virtio_mock import MEM_SIZE, MmioGuest, wait_for

from kvmkit.devices.irq import NoIrq
from kvmkit.devices.virtio import mmio as r
from kvmkit.devices.virtio.balloon import (
    DEFLATEQ,
    INFLATEQ,
    MAX_PFN_BYTES,
    STATSQ,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM,
    VIRTIO_BALLOON_F_STATS_VQ,
    BalloonConfig,
    BalloonError,
    VirtioBalloon,
    parse_pfns,
    parse_stats,
    pfn_runs,
)
from kvmkit.devices.virtio.device import STATUS_NEEDS_RESET, VirtioState
from kvmkit.devices.virtio.mmio import VirtioMmio
from kvmkit.devices.virtio.worker import VirtioWorkers
from kvmkit.errors import UserError
from kvmkit.memory import GuestMemory
from kvmkit.snapshot.format import SnapshotError
from kvmkit.vmm.config import MachineConfig
from kvmkit.vmm.persist import config_from_dict, config_to_dict

PAGES = range(0xC0, 0xD0)  # 16 pages at 0xC0000, clear of the mock's rings and buffers


@pytest.fixture
def worker() -> Iterator[VirtioWorkers]:
    w = VirtioWorkers()
    w.start()
    yield w
    w.close()


def attach(dev: VirtioBalloon, worker: VirtioWorkers, backing: str = "anonymous") -> MmioGuest:
    g = MmioGuest(dev, len(dev.queues))
    if backing == "memfd":  # what Machine gives a guest (vmm/placement.py)
        mem = GuestMemory()
        mem.add_memfd(0, MEM_SIZE)
        g.mem, g.transport = mem, VirtioMmio(dev, mem, NoIrq())
        for q in g.q:
            q.mem = mem
    worker.add(dev)
    g.init()
    return g


def pfns(*numbers: int) -> bytes:
    return struct.pack(f"<{len(numbers)}I", *numbers)


def send(g: MmioGuest, queue: int, data: bytes) -> None:
    g.q[queue].add_chain([data], [])
    g.wr(r.QUEUE_NOTIFY, queue)


def config(g: MmioGuest) -> tuple[int, int]:
    return g.rd(r.CONFIG), g.rd(r.CONFIG + 4)


# -- the pure parsers (fuzz entry points)

def test_parsers_take_whole_records_and_refuse_the_rest() -> None:
    assert parse_pfns(pfns(1, 2, 3, 7, 8, 0xFFFFFFFF)) == [1, 2, 3, 7, 8, 0xFFFFFFFF]
    assert pfn_runs([1, 2, 3, 7, 8, 5]) == [(1, 3), (7, 2), (5, 1)]
    assert pfn_runs([]) == []
    with pytest.raises(BalloonError, match="whole number"):
        parse_pfns(b"\x01\x02\x03")
    with pytest.raises(BalloonError, match="at most"):
        parse_pfns(bytes(MAX_PFN_BYTES + 4))
    stats = struct.pack("<HQHQHQ", 4, 1000, 99, 5, 5, 2000)
    assert parse_stats(stats) == {4: 1000, 5: 2000}  # tag 99 is not one of §5.5.6.3's
    with pytest.raises(BalloonError, match="whole records"):
        parse_stats(stats[:-1])


# -- the device

@pytest.mark.parametrize("backing", ["anonymous", "memfd"])
def test_inflate_gives_pages_back_and_deflate_returns_them(
    worker: VirtioWorkers, backing: str
) -> None:
    dev = VirtioBalloon(1, deflate_on_oom=True)
    g = attach(dev, worker, backing)
    assert dev.driver_features & VIRTIO_BALLOON_F_DEFLATE_ON_OOM
    assert not dev.device_features & VIRTIO_BALLOON_F_STATS_VQ and len(dev.queues) == 2
    assert config(g) == (256, 0)  # 1 MiB = 256 pages of 4 KiB (§5.5.6)
    region = g.mem.regions[0]
    for pfn in PAGES:
        g.mem.write(pfn << 12, b"\xa5" * 4096)
    g.mem.write(0x20000, bytes(4096))  # the page the PFN array goes in, allocated first
    blocks = os.fstat(region.fd).st_blocks if backing == "memfd" else 0
    send(g, INFLATEQ, pfns(*PAGES))
    wait_for(lambda: g.q[INFLATEQ].used())
    assert dev.inflate_count == 1 and dev.discarded_bytes == len(PAGES) * 4096
    # The memory is gone from the host: the memfd holds 16 pages fewer (MADV_DONTNEED
    # alone would have left them in it), and the pages read zeros (which, on shmem, gives
    # them a fresh zero page each again: checked after the count).
    if backing == "memfd":
        assert blocks - os.fstat(region.fd).st_blocks == len(PAGES) * 4096 // 512
    assert all(g.mem.read(pfn << 12, 4096) == bytes(4096) for pfn in PAGES)
    assert g.mem.read(0xBF000, 1) == b"\0" and g.mem.read(0xD0000, 1) == b"\0"
    g.wr(r.CONFIG + 4, len(PAGES))  # the driver reports what it holds
    assert config(g) == (256, 16) and dev.statistics()["actual_pages"] == 16
    send(g, DEFLATEQ, pfns(*PAGES))
    wait_for(lambda: g.q[DEFLATEQ].used())
    assert dev.deflate_count == 1
    g.mem.write(PAGES[0] << 12, b"back")  # the guest's again
    assert g.mem.read(PAGES[0] << 12, 4) == b"back"
    assert dev.errors == [] and not g.rd(r.STATUS) & STATUS_NEEDS_RESET


def test_a_new_target_reaches_the_driver_by_a_config_interrupt(worker: VirtioWorkers) -> None:
    dev = VirtioBalloon(0)
    g = attach(dev, worker)
    generation, irqs = g.rd(r.CONFIG_GENERATION), g.transport.irq.count  # type: ignore[attr-defined]
    dev.set_target(64)
    assert config(g) == (64 * 256, 0)
    assert g.rd(r.CONFIG_GENERATION) != generation
    assert g.transport.irq.count > irqs  # type: ignore[attr-defined]
    assert g.rd(r.INTERRUPT_STATUS) & 2  # §4.2.2: configuration change
    g.wr(r.CONFIG, 5)  # num_pages is the device's: a driver write is ignored
    assert config(g)[0] == 64 * 256


@pytest.mark.parametrize(
    ("data", "needle"),
    [(pfns(0xC0, MEM_SIZE >> 12), "outside guest memory"), (b"\x01\x02\x03", "whole number"),
     (pfns(*range(MAX_PFN_BYTES // 4 + 1)), "at most")],
)  # fmt: skip
def test_a_hostile_inflate_buffer_is_a_device_error_and_frees_nothing(
    worker: VirtioWorkers, data: bytes, needle: str
) -> None:
    dev = VirtioBalloon(1)
    g = attach(dev, worker)
    g.mem.write(0xC0000, b"kept")
    send(g, INFLATEQ, data)
    wait_for(lambda: g.rd(r.STATUS) & STATUS_NEEDS_RESET)
    assert needle in dev.errors[-1] and dev.event_fails == 1
    assert g.mem.read(0xC0000, 4) == b"kept" and dev.discarded_bytes == 0
    g.init()  # a reset brings the device back
    send(g, INFLATEQ, pfns(0xC0))
    wait_for(lambda: g.q[INFLATEQ].used())
    assert g.mem.read(0xC0000, 4) == bytes(4)


def stats_buffer(g: MmioGuest, free: int) -> None:
    send(g, STATSQ, struct.pack("<HQHQHQ", 4, free, 5, 2 << 20, 77, 1))


def test_statistics_are_held_given_back_on_time_and_refreshed(worker: VirtioWorkers) -> None:
    dev = VirtioBalloon(2, stats_polling_interval_s=1)
    g = attach(dev, worker)
    assert dev.driver_features & VIRTIO_BALLOON_F_STATS_VQ and len(dev.queues) == 3
    stats_buffer(g, 1000)
    wait_for(lambda: dev.stats_updates_count == 1)
    got = dev.statistics()
    assert got == {"target_pages": 512, "actual_pages": 0, "target_mib": 2, "actual_mib": 0,
                   "free_memory": 1000, "total_memory": 2 << 20}  # fmt: skip
    assert g.q[STATSQ].used() == [] and dev.held_chains() == {STATSQ: 1}
    # The interval passes (1 s): the buffer comes back for the driver to refill.
    wait_for(lambda: g.q[STATSQ].used(), timeout=5)
    stats_buffer(g, 1500)
    wait_for(lambda: dev.stats_updates_count == 2)
    assert dev.statistics()["free_memory"] == 1500
    # A new interval gives the held buffer back at once (Firecracker: "the first statistics
    # update scheduled immediately").
    dev.set_stats_interval(30)
    wait_for(lambda: g.q[STATSQ].used(), timeout=0.5)
    assert dev.errors == []


def test_a_malformed_statistics_buffer_is_a_device_error(worker: VirtioWorkers) -> None:
    dev = VirtioBalloon(2, stats_polling_interval_s=5)
    g = attach(dev, worker)
    send(g, STATSQ, bytes(15))
    wait_for(lambda: g.rd(r.STATUS) & STATUS_NEEDS_RESET)
    assert dev.stats_update_fails == 1 and "statistics" in dev.errors[-1]


def test_state_round_trips_and_bad_state_is_refused(worker: VirtioWorkers) -> None:
    dev = VirtioBalloon(2, stats_polling_interval_s=5)
    g = attach(dev, worker)
    stats_buffer(g, 7)
    wait_for(lambda: dev.stats_updates_count == 1)
    dev.set_target(1)
    g.wr(r.CONFIG + 4, 3)
    worker.pause()
    state = VirtioState.from_dict(dev.save().to_dict(), "virtio", VirtioBalloon)
    worker.resume()
    # The held stats buffer is saved as not taken: the restored device takes it again.
    assert state.queues[STATSQ].last_avail == 0
    other = VirtioBalloon(2, stats_polling_interval_s=5)
    other.mem = g.mem
    other.restore(state)
    assert (other.num_pages, other.actual, other.stats) == (256, 3, {4: 7, 5: 2 << 20})
    no_stats = VirtioBalloon(2)
    no_stats.mem = g.mem
    with pytest.raises(SnapshotError):
        no_stats.restore(state)  # another device: no statistics queue
    bad = state.to_dict()
    bad["device"]["stats"] = {"1000": 1}
    with pytest.raises(SnapshotError, match="unknown tag"):
        VirtioState.from_dict(bad, "virtio", VirtioBalloon)
    for d in (other, no_stats):
        d.close()


def test_machine_config_rules_and_saved_config() -> None:
    cfg = MachineConfig(mem_mib=128, balloon=BalloonConfig(64, True, 3))
    cfg.validate_shapes()
    assert cfg.virtio_count == 1
    back, _ = config_from_dict(config_to_dict(cfg, ()))
    assert back.balloon == cfg.balloon
    with pytest.raises(UserError, match="Amount of pages requested is too large"):
        MachineConfig(mem_mib=128, balloon=BalloonConfig(129)).validate_shapes()
    with pytest.raises(UserError, match="huge pages support is incompatible"):
        MachineConfig(mem_mib=128, huge_pages="2M", balloon=BalloonConfig(1)).validate_shapes()


# -- the API's pre-boot rules (Firecracker's messages)

def test_balloon_api_before_boot() -> None:
    from kvmkit.api.actions import ApiError, Vmm
    from kvmkit.api.balloon import TOO_LARGE

    vmm = Vmm()
    try:
        def fault(fn: Callable[[], object]) -> str:
            with pytest.raises(ApiError) as err:
                fn()
            return err.value.message

        assert fault(vmm.get_balloon) == "No balloon device found."
        vmm.put_machine_config({"vcpu_count": 1, "mem_size_mib": 256})
        too_large = {"amount_mib": 257, "deflate_on_oom": False}
        assert fault(lambda: vmm.put_balloon(too_large)) == TOO_LARGE
        assert "free_page_reporting" in fault(lambda: vmm.put_balloon(
            {"amount_mib": 1, "deflate_on_oom": False, "free_page_reporting": True}))
        assert "stats_polling_interval_s" in fault(lambda: vmm.put_balloon(
            {"amount_mib": 1, "deflate_on_oom": False, "stats_polling_interval_s": 65536}))
        vmm.put_balloon({"amount_mib": 64, "deflate_on_oom": True})
        want = {"amount_mib": 64, "deflate_on_oom": True, "stats_polling_interval_s": 0}
        assert vmm.get_balloon() == want and vmm.vm_config()["balloon"] == want
        # Firecracker allows these after boot only.
        assert "before starting" in fault(lambda: vmm.patch_balloon({"amount_mib": 1}))
        assert "before starting" in fault(
            lambda: vmm.patch_balloon_statistics({"stats_polling_interval_s": 1}))
        assert "before starting" in fault(lambda: vmm.request("GET", "/balloon/statistics"))
        # The memory must keep holding the target; no huge pages with a balloon.
        assert "smaller than the previously set balloon" in fault(
            lambda: vmm.patch_machine_config({"mem_size_mib": 63}))
        assert "huge pages support is incompatible" in fault(
            lambda: vmm.patch_machine_config({"huge_pages": "2M"}))
        vmm.set_command(["true"])
        config = vmm._machine_config()  # what InstanceStart builds
        assert config.balloon == BalloonConfig(64, True, 0)
        assert "after configuring boot-specific" in fault(
            lambda: vmm.snapshot_load({"snapshot_path": "x", "mem_file_path": "y"}))
    finally:
        vmm.close()
    other = Vmm()
    try:
        other.apply_config({"machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
                            "balloon": {"amount_mib": 8, "deflate_on_oom": False,
                                        "stats_polling_interval_s": 2}})  # fmt: skip
        assert other.get_balloon()["stats_polling_interval_s"] == 2
    finally:
        other.close()


# The device's threads under kvmkit's default seccomp filters (docs/security.md): the main
# thread under `vmm`, the workers under `virtio`; a forbidden call ends the process (148).
UNDER_FILTERS = """
import struct, sys
sys.path.insert(0, sys.argv[1])
from virtio_mock import MmioGuest, wait_for
from kvmkit import seccomp
from kvmkit.devices.virtio import mmio as r
from kvmkit.devices.virtio.balloon import INFLATEQ, DEFLATEQ, STATSQ, VirtioBalloon
from kvmkit.devices.virtio.worker import VirtioWorkers

seccomp.install(seccomp.default_filters())
dev = VirtioBalloon(1, stats_polling_interval_s=1)
w = VirtioWorkers()
w.start()
g = MmioGuest(dev, 3)
w.add(dev)
g.init()
for q, data in ((INFLATEQ, struct.pack("<2I", 0xC0, 0xC1)), (DEFLATEQ, struct.pack("<I", 0xC0)),
                (STATSQ, struct.pack("<HQ", 4, 99))):
    g.q[q].add_chain([data], [])
    g.wr(r.QUEUE_NOTIFY, q)
    wait_for(lambda: dev.inflate_count + dev.deflate_count + dev.stats_updates_count > q)
wait_for(lambda: dev.stats_updates_count == 1 and dev.deflate_count == 1)
wait_for(lambda: g.q[STATSQ].used(), timeout=5)  # the timer
g.q[STATSQ].add_chain([struct.pack("<HQ", 4, 98)], [])
g.wr(r.QUEUE_NOTIFY, STATSQ)
wait_for(lambda: dev.stats_updates_count == 2)
dev.set_stats_interval(5)
wait_for(lambda: g.q[STATSQ].used(), timeout=5)
w.close()
print("OK", dev.inflate_count, dev.deflate_count, dev.stats_updates_count, dev.errors)
"""


def test_the_balloon_runs_under_the_default_seccomp_filters() -> None:
    run = subprocess.run([sys.executable, "-c", UNDER_FILTERS, str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("OK 1 1 2 "), run.stdout
