"""virtio-balloon, the traditional memory balloon (virtio 1.2 §5.5), as Firecracker's
`/balloon` drives it (docs/virtio.md, docs/api.md).

The host sets a target, `num_pages` in the configuration space (§5.5.4); the guest's driver
allocates that many 4 KiB pages and lists their page frame numbers on the inflate queue,
then reports how many it holds in `actual`. kvmkit gives each inflated page's memory back
to the host (`MemoryRegion.discard`: MADV_DONTNEED, or MADV_REMOVE for the shmem memfd that
backs a machine's RAM), so the VMM's RSS drops. Pages listed on the deflate queue are the
guest's again; they need nothing from the host (a touch faults a fresh page in).

Queues (§5.5.2): 0 inflateq, 1 deflateq and, with VIRTIO_BALLOON_F_STATS_VQ (offered when a
statistics interval is set), 2 statsq. Features (§5.5.3): STATS_VQ and DEFLATE_ON_OOM, as
configured; not MUST_TELL_HOST (§5.5.6.1: without it the driver may reuse deflated pages
before telling the device, which is fine here: the device does nothing on deflate).

Statistics (§5.5.6.3): the driver makes one buffer of `le16 tag; le64 val` records
available; the device keeps it, and every `stats_polling_interval_s` seconds gives it back
(used, length 0), upon which the driver refills it with fresh values and makes it available
again. The interval is a timerfd watched by the stats queue's worker.

Every guest-given value is checked: a buffer whose length is not a whole number of records,
longer than the cap, or a PFN outside guest RAM puts the device in its error state
(NEEDS_RESET, §2.1.2); nothing is discarded for that buffer. `parse_pfns`, `pfn_runs` and
`parse_stats` are pure functions of the guest's bytes (the fuzz targets' entry points).
"""

from __future__ import annotations

import errno
import os
import selectors
import struct
from dataclasses import dataclass
from typing import Any

from kvmkit.devices.virtio.device import INT_CONFIG, STATUS_DRIVER_OK, Budget, VirtioDevice
from kvmkit.devices.virtio.queue import DescriptorChain, QueueError
from kvmkit.devices.virtio.ratelimit import timerfd_arm, timerfd_open
from kvmkit.memory import GuestMemory, GuestMemoryError
from kvmkit.snapshot.format import Fields, SnapshotError

VIRTIO_ID_BALLOON = 5  # §5.5.1
# §5.5.3 feature bits
VIRTIO_BALLOON_F_MUST_TELL_HOST = 1 << 0
VIRTIO_BALLOON_F_STATS_VQ = 1 << 1
VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 1 << 2
INFLATEQ, DEFLATEQ, STATSQ = 0, 1, 2  # §5.5.2
QUEUE_SIZE = 256
# §5.5.6: "the page size is 4096 bytes" whatever the guest's own page size; PFNs are le32.
PFN_SHIFT = 12
BALLOON_PAGE = 1 << PFN_SHIFT
PAGES_PER_MIB = (1 << 20) >> PFN_SHIFT
_PFN = struct.Struct("<I")
# §5.5.6.3: struct virtio_balloon_stat { le16 tag; le64 val; } (packed, 10 bytes).
_STAT = struct.Struct("<HQ")
# Caps on one buffer: Linux sends at most 256 PFNs (1 KiB, VIRTIO_BALLOON_ARRAY_PFNS_MAX) and
# one record per tag it knows (16 in Linux 6.x). A guest cannot make the VMM read more.
MAX_PFN_BYTES = 64 * 1024
MAX_STATS_BYTES = 64 * _STAT.size
# §5.5.6.3 tags, by the names of Firecracker's GET /balloon/statistics (BalloonStats).
STAT_NAMES = {
    0: "swap_in", 1: "swap_out", 2: "major_faults", 3: "minor_faults", 4: "free_memory",
    5: "total_memory", 6: "available_memory", 7: "disk_caches", 8: "hugetlb_allocations",
    9: "hugetlb_failures", 10: "oom_kill", 11: "alloc_stall", 12: "async_scan",
    13: "direct_scan", 14: "async_reclaim", 15: "direct_reclaim",
}  # fmt: skip
STATE_VERSION = 1


@dataclass(frozen=True)
class BalloonConfig:
    """Firecracker's `/balloon` body: the target in MiB, `deflate_on_oom`, and the statistics
    interval in seconds (0: no statistics queue)."""

    amount_mib: int
    deflate_on_oom: bool = False
    stats_polling_interval_s: int = 0

    def check(self, mem_mib: int) -> None:
        """ValueError with Firecracker's message for a target larger than guest RAM."""
        if not 0 <= self.amount_mib <= mem_mib:
            raise ValueError("Amount of pages requested is too large.")
        if not 0 <= self.stats_polling_interval_s <= 0xFFFF:  # Firecracker's u16
            raise ValueError("stats_polling_interval_s: at most 65535 seconds")

    def to_dict(self) -> dict[str, Any]:
        return {"amount_mib": self.amount_mib, "deflate_on_oom": self.deflate_on_oom,
                "stats_polling_interval_s": self.stats_polling_interval_s}  # fmt: skip


class BalloonError(ValueError):
    """Guest data the balloon refuses (the device then needs a reset)."""


# -- pure parsing of the guest's buffers (no device, no memory: the fuzz targets call these)

def parse_pfns(data: bytes) -> list[int]:
    """An inflate or deflate buffer: an array of le32 page frame numbers (§5.5.6)."""
    if len(data) % _PFN.size:
        raise BalloonError(f"a PFN buffer of {len(data)} bytes is not a whole number of le32")
    if len(data) > MAX_PFN_BYTES:
        raise BalloonError(f"a PFN buffer of {len(data)} bytes, at most {MAX_PFN_BYTES}")
    return [v for (v,) in _PFN.iter_unpack(data)]


def pfn_runs(pfns: list[int]) -> list[tuple[int, int]]:
    """(first PFN, count) of each run of consecutive PFNs, in the order given: one madvise
    per run instead of one per page (Linux lists its pages mostly in order)."""
    runs: list[tuple[int, int]] = []
    for pfn in pfns:
        if runs and runs[-1][0] + runs[-1][1] == pfn:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((pfn, 1))
    return runs


def parse_stats(data: bytes) -> dict[int, int]:
    """A statistics buffer (§5.5.6.3): tag -> value. Tags this device does not know are
    left out (a newer driver may send more); a tag given twice keeps its last value."""
    if len(data) % _STAT.size:
        raise BalloonError(f"a statistics buffer of {len(data)} bytes is not whole records")
    if len(data) > MAX_STATS_BYTES:
        raise BalloonError(f"a statistics buffer of {len(data)} bytes, at most {MAX_STATS_BYTES}")
    return {tag: val for tag, val in _STAT.iter_unpack(data) if tag in STAT_NAMES}


def mib_to_pages(mib: int) -> int:
    return mib * PAGES_PER_MIB


def check_runs(mem: GuestMemory, runs: list[tuple[int, int]]) -> None:
    """Every page of `runs` lies in guest RAM (GuestMemoryError names the first that does
    not): a hostile PFN never reaches host memory outside the guest's."""
    for pfn, count in runs:
        gpa, end = pfn << PFN_SHIFT, (pfn + count) << PFN_SHIFT
        while gpa < end:
            region = mem.region_for(gpa, BALLOON_PAGE)
            gpa = min(end, region.end)


def discard_runs(mem: GuestMemory, runs: list[tuple[int, int]]) -> int:
    """Give the runs' memory back to the host, region by region (runs checked). Returns the
    bytes given back (0 for memory that cannot give back base pages: huge pages)."""
    freed = 0
    for pfn, count in runs:
        gpa, end = pfn << PFN_SHIFT, (pfn + count) << PFN_SHIFT
        while gpa < end:
            region = mem.region_for(gpa, BALLOON_PAGE)
            upto = min(end, region.end)
            try:
                region.discard(gpa - region.guest_phys_addr, upto - gpa)
                freed += upto - gpa
            except ValueError:  # huge pages (refused at configuration; defensive)
                pass
            gpa = upto
    return freed


class VirtioBalloon(VirtioDevice):
    DEVICE_ID = VIRTIO_ID_BALLOON

    def __init__(self, amount_mib: int, deflate_on_oom: bool = False,
                 stats_polling_interval_s: int = 0, name: str = "balloon") -> None:  # fmt: skip
        stats = stats_polling_interval_s > 0
        features = (VIRTIO_BALLOON_F_DEFLATE_ON_OOM if deflate_on_oom else 0) | (
            VIRTIO_BALLOON_F_STATS_VQ if stats else 0
        )
        self.stats_enabled = stats  # before the base class asks for worker_groups
        # The statistics queue exists only when statistics are on (as in Firecracker): the
        # queue count follows the features (§5.5.2).
        super().__init__(name, [QUEUE_SIZE] * (3 if stats else 2), features)
        self.deflate_on_oom = deflate_on_oom
        self.stats_interval = stats_polling_interval_s
        self.num_pages = mib_to_pages(amount_mib)  # §5.5.4: the target, set by the host
        self.actual = 0  # §5.5.4: what the driver says it holds (guest-written)
        self.stats: dict[int, int] = {}
        self._stats_head: int | None = None  # the stats buffer the device holds
        # The polling timer: made, armed and watched by the stats worker only, so that the
        # vCPU threads (DRIVER_OK) and the API threads (PATCH) make no timer calls (their
        # seccomp filters need none; docs/security.md).
        self._timer = -1
        self._timer_watched = False
        self._rearm = False  # a new interval: give the held buffer back at once
        # Firecracker's `balloon` metrics group.
        self.inflate_count = 0
        self.deflate_count = 0
        self.stats_updates_count = 0
        self.stats_update_fails = 0
        self.event_fails = 0
        self.discarded_bytes = 0  # memory given back to the host so far (kvmkit's own)

    def worker_groups(self) -> list[list[int]]:
        # inflate and deflate on one thread (a driver waits for each buffer in turn, so
        # nothing runs in parallel there); statistics on their own with their timer.
        return [[INFLATEQ, DEFLATEQ]] + ([[STATSQ]] if self.stats_enabled else [])

    # -- configuration space (§5.5.4): le32 num_pages, le32 actual
    def config_bytes(self) -> bytes:
        return struct.pack("<II", self.num_pages, self.actual)

    def config_write(self, offset: int, data: bytes) -> None:
        """The driver writes `actual` (offset 4); `num_pages` is the device's."""
        if offset < 4 or offset + len(data) > 8:
            return
        with self.lock:
            raw = bytearray(struct.pack("<I", self.actual))
            raw[offset - 4 : offset - 4 + len(data)] = data
            self.actual = struct.unpack("<I", raw)[0]

    # -- the host's side (the API)
    def set_target(self, amount_mib: int) -> None:
        """PATCH /balloon: a new target; the driver hears of it by a configuration change
        interrupt (§5.5.6.1 "the device ... notifies the driver of a change in num_pages")."""
        with self.lock:
            self.num_pages = mib_to_pages(amount_mib)
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            if self.status & STATUS_DRIVER_OK and self.activated and self.interrupt is not None:
                self.interrupt.signal(INT_CONFIG)

    def set_stats_interval(self, seconds: int) -> None:
        """PATCH /balloon/statistics (statistics on at boot, `seconds` > 0: the API checks):
        the held buffer goes back at once (the first update now, as Firecracker's spec says),
        then every `seconds`. The stats worker does it (woken through the queue's eventfd)."""
        with self.lock:
            self.stats_interval = seconds
            self._rearm = True
        self.notify_queue(STATSQ)

    def statistics(self) -> dict[str, int]:
        """GET /balloon/statistics: the sizes from the config space, then the latest values
        the driver gave (missing tags keep their last value, Firecracker's rule)."""
        out = {
            "target_pages": self.num_pages, "actual_pages": self.actual,
            "target_mib": self.num_pages // PAGES_PER_MIB,
            "actual_mib": self.actual // PAGES_PER_MIB,
        }  # fmt: skip
        stats = dict(self.stats)
        out.update({STAT_NAMES[tag]: val for tag, val in sorted(stats.items())})
        return out

    def describe_device(self) -> str:
        return (f"target {self.num_pages} pages, actual {self.actual}, "
                f"{self.discarded_bytes >> 20} MiB given back")  # fmt: skip

    # -- device life
    def stop_host_io(self) -> None:
        watcher = self.queue_watcher(STATSQ) if self.stats_enabled else None
        if self._timer_watched and watcher is not None and self._timer >= 0:
            watcher.unwatch(self._timer)
        self._timer_watched = False

    def reset_device(self) -> None:
        # §2.4: the driver starts again; it holds no page after a reset (Linux deflates
        # everything before it lets the device go) and gives a new stats buffer.
        self._stats_head = None
        self.actual = 0

    def held_chains(self) -> dict[int, int]:
        # The stats buffer kept between updates: a snapshot saves it as not taken, so the
        # restored device takes it again (with the values the guest wrote into it).
        return {STATSQ: 1} if self._stats_head is not None else {}

    def close(self) -> None:
        self.stop_host_io()
        if self._timer >= 0:
            os.close(self._timer)
            self._timer = -1
        super().close()

    # -- the queues (worker threads)
    def _read(self, chain: DescriptorChain, cap: int) -> bytes:
        length = chain.readable_length
        if length > cap:
            raise BalloonError(f"a buffer of {length} bytes, at most {cap}")
        assert self.mem is not None
        return b"".join(self.mem.read(b.addr, b.length) for b in chain.readable)

    def process_queue(self, index: int, budget: Budget) -> None:
        assert self.mem is not None
        if index == STATSQ:
            self._serve_stats(budget)
            return
        queue, done = self.queues[index], False
        while budget.take():
            chain = queue.pop(self.mem)
            if chain is None:
                break
            try:
                runs = pfn_runs(parse_pfns(self._read(chain, MAX_PFN_BYTES)))
                check_runs(self.mem, runs)
            except (BalloonError, GuestMemoryError) as err:
                self.event_fails += 1
                what = "inflate" if index == INFLATEQ else "deflate"
                raise QueueError(f"{what}: {err}") from None
            if index == INFLATEQ:
                try:
                    self.discarded_bytes += discard_runs(self.mem, runs)
                except OSError as err:  # madvise refused: the pages stay, the guest goes on
                    self.event_fails += 1
                    self.glog.warning("virtio %s: cannot give pages back: %s", self.name,
                                      os.strerror(err.errno or errno.EIO))  # fmt: skip
                self.inflate_count += 1
            else:
                self.deflate_count += 1
            self.complete(index, chain.head, 0)
            done = True
        if done:
            self.signal_used(index)

    def _serve_stats(self, budget: Budget) -> None:
        assert self.mem is not None
        queue = self.queues[STATSQ]
        if self._rearm:
            self._rearm = False
            if self._stats_head is not None:
                self._give_back_stats()
        while budget.take():
            chain = queue.pop(self.mem)
            if chain is None:
                break
            if self._stats_head is not None:
                # A driver keeps one stats buffer in flight (§5.5.6.3); a second one means the
                # first is stale: give it back (Firecracker does the same).
                self.complete(STATSQ, self._stats_head, 0)
                self._stats_head = None
                self.stats_update_fails += 1
                self.signal_used(STATSQ)
            try:
                values = parse_stats(self._read(chain, MAX_STATS_BYTES))
            except BalloonError as err:
                self.stats_update_fails += 1
                raise QueueError(f"statistics: {err}") from None
            self.stats.update(values)
            self.stats_updates_count += 1
            self._stats_head = chain.head
            if self._timer < 0:
                self._timer = timerfd_open()
            if not self._timer_watched and (watcher := self.queue_watcher(STATSQ)) is not None:
                watcher.watch(self, self._timer, selectors.EVENT_READ, self._timer_fired)
                self._timer_watched = True
            timerfd_arm(self._timer, self.stats_interval * 1_000_000_000)

    def _timer_fired(self, events: int) -> None:
        """The polling interval passed (stats worker, serve lock held): give the buffer
        back so the driver refills it (§5.5.6.3)."""
        try:
            os.read(self._timer, 8)
        except BlockingIOError:
            return
        if self._stats_head is not None and self.mem is not None:
            self._give_back_stats()

    def _give_back_stats(self) -> None:
        assert self._stats_head is not None
        head, self._stats_head = self._stats_head, None
        self.complete(STATSQ, head, 0)
        self.signal_used(STATSQ)

    # -- snapshots
    def save_device(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION, "num_pages": self.num_pages, "actual": self.actual,
            "stats_interval": self.stats_interval,
            "stats": {str(tag): val for tag, val in sorted(self.stats.items())},
        }  # fmt: skip

    @classmethod
    def check_device_state(cls, state: dict[str, Any], path: str) -> None:
        cls._parse_state(state, path)

    @staticmethod
    def _parse_state(state: dict[str, Any], path: str) -> tuple[int, int, int, dict[int, int]]:
        f = Fields(state, path)
        if f.get_int("version", 0, 2**32 - 1) != STATE_VERSION:
            raise SnapshotError(f"snapshot state: {path}: balloon state version unknown")
        stats_obj = f.get_obj("stats")
        if len(stats_obj.obj) > len(STAT_NAMES):
            raise SnapshotError(f"snapshot state: {path}.stats: too many entries")
        stats = {}
        for key in stats_obj.obj:
            if not key.isdigit() or int(key) not in STAT_NAMES:
                raise SnapshotError(f"snapshot state: {path}.stats: unknown tag {key!r}")
            stats[int(key)] = stats_obj.get_int(key, 0, 2**64 - 1)
        return (f.get_int("num_pages", 0, 2**32 - 1), f.get_int("actual", 0, 2**32 - 1),
                f.get_int("stats_interval", 0, 2**16 - 1), stats)  # fmt: skip

    def restore_device(self, state: dict[str, Any], path: str) -> None:
        num_pages, actual, interval, stats = self._parse_state(state, path)
        if (interval > 0) != self.stats_enabled:
            raise SnapshotError(f"snapshot state: {path}: statistics were "
                                f"{'on' if interval else 'off'} in the saved balloon")  # fmt: skip
        self.num_pages, self.actual, self.stats_interval, self.stats = (
            num_pages, actual, interval, stats
        )
