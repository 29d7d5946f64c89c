"""The source side of a live migration: pre-copy rounds, the stop-and-copy, the hand-over.

    result = send_vm(source, parse_address("unix:/tmp/mig.sock"), max_downtime_ms=300)

`source` is anything with guest memory, a KVM VM and the operations of a `Source` (a
`Machine` through kvmkit.migration.machine, a bare KVM VM through kvmkit.migration.bare).
The algorithm (docs/migration.md):

1. connect, exchange preambles, send SETUP (what to build, the memory layout); the
   destination checks it, allocates memory and answers READY;
2. dirty logging on (kvmkit.memory.dirty), then round 0: every page that may hold data (a
   memfd's holes are skipped: the destination's fresh memory reads zero there), zero pages
   as an 8-byte marker;
3. rounds of the pages dirtied meanwhile (each chunk re-protected just before it is read)
   until the pages still dirty would go out within `max_downtime_ms` at the bandwidth seen
   so far, or the rounds stop converging (no fewer dirty pages than the best of the last
   three rounds), or `max_rounds` is reached;
4. pause the guest, send the last dirty pages and the state (the snapshot state format:
   magic, version, CRC32), and wait: the destination checks the state (PREPARED), the source
   releases the host side of its devices (taps, vsock sockets: HANDOVER), the destination
   builds the machine and acknowledges (ACK). Only then does the source end its guest.

Any failure before the ACK (connection lost, the destination refused or died, a timeout)
gives the host devices back, resumes the guest if it was paused and raises MigrationError:
the guest runs on where it was. Downtime is measured from the pause to the ACK.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from kvmkit.errors import UserError
from kvmkit.kvm import KvmError, Vm
from kvmkit.memory import PAGE_SIZE, GuestMemory, MemoryRegion
from kvmkit.memory.dirty import CLEAR_ALIGN, DirtyLog, count_bits, set_bits
from kvmkit.migration.stream import (
    MAX_BATCH,
    PROTOCOL_VERSION,
    ZERO_PAGE,
    Address,
    Channel,
    Kind,
    MigrationError,
    Pacer,
    PageBatch,
    connect,
)
from kvmkit.snapshot.format import SnapshotError, encode
from kvmkit.snapshot.memory import data_ranges

MAX_ROUNDS = 30
# Once the rest fits the downtime target: up to this many more live rounds, while each
# leaves at most 3/4 of the pages of the one before and more than FINAL_PAGES are dirty.
EXTRA_ROUNDS = 2
FINAL_PAGES = 64
CONVERGE_WINDOW = 3  # rounds without a new low in dirty pages: not converging
CHUNK_PAGES = 16 * CLEAR_ALIGN  # pages re-protected and read together (4 MiB)
CONNECT_TIMEOUT = 10.0
IO_TIMEOUT = 60.0  # any single send or receive
BUILD_TIMEOUT = 120.0  # the destination building the machine (opening images, taps)
_MIB = 1 << 20
_ZERO_CHUNK_SIZE = _MIB
_ZERO_CHUNK = bytes(_ZERO_CHUNK_SIZE)


class Source(Protocol):
    """What the sender needs of the machine it moves."""

    mem: GuestMemory
    vm: Vm

    def setup(self) -> dict[str, Any]:
        """SETUP's payload: `kind`, and whatever the destination needs to build memory."""
        ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def capture(self) -> dict[str, Any]:
        """The paused guest's state payload (plain data; `kvmkit.snapshot.format`)."""
        ...

    def release(self) -> None:
        """Give up the host side of devices the destination will open (it checked the
        state); `reacquire` undoes it if the migration fails after all."""
        ...

    def reacquire(self) -> None: ...

    def committed(self, detail: str) -> None:
        """The destination acknowledged: end the guest here."""
        ...


@dataclass
class MigrationProgress:
    """What `GET /migration` and `kvmkit migrate` show while a migration runs."""

    state: str = "setup"  # setup, precopy, stop-and-copy, completed, failed
    round: int = 0
    pages_sent: int = 0  # pages that went out (data and zero markers), all rounds
    zero_pages: int = 0
    bytes_sent: int = 0
    dirty_pages: int = 0  # dirty at the end of the last round
    dirty_rate_mib_s: float = 0.0  # guest writes during the last round
    bandwidth_mib_s: float = 0.0  # throughput so far
    expected_downtime_ms: float = 0.0
    elapsed_s: float = 0.0
    # One entry per decision point (the end of each round): the fields above as they were.
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ROUNDED:
            out[key] = round(out[key], 3)
        return out

    def snapshot(self) -> dict[str, Any]:
        out = {k: v for k, v in self.to_dict().items() if k not in ("history", "state")}
        return out


ROUNDED = ("dirty_rate_mib_s", "bandwidth_mib_s", "expected_downtime_ms", "elapsed_s")


@dataclass
class MigrationResult:
    destination: str
    downtime_ms: float
    total_s: float
    rounds: int
    pages_sent: int
    zero_pages: int
    bytes_sent: int
    final_pages: int  # sent while the guest was paused
    converged: bool  # False: stopped by the round limit or a stall, not the downtime target
    stop_reason: str = "downtime target"  # or "not converging", "round limit"
    progress: MigrationProgress = field(default_factory=MigrationProgress)
    # Where the downtime went: pause, last pages, state capture, state check (sending the
    # state and the destination checking it), destination build (hand-over, build, ACK).
    phases_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "destination": self.destination, "downtime_ms": round(self.downtime_ms, 1),
            "total_s": round(self.total_s, 3), "rounds": self.rounds,
            "pages_sent": self.pages_sent, "zero_pages": self.zero_pages,
            "bytes_sent": self.bytes_sent, "final_pages": self.final_pages,
            "converged": self.converged, "stop_reason": self.stop_reason,
            "history": [dict(h) for h in self.progress.history],
            "downtime_phases_ms": {k: round(v, 1) for k, v in self.phases_ms.items()},
        }  # fmt: skip

    def summary(self) -> str:
        how = "" if self.converged else f", stop-and-copy forced: {self.stop_reason}"
        return (
            f"downtime {self.downtime_ms:.0f} ms, total {self.total_s:.2f} s "
            f"({self.rounds} rounds, {self.pages_sent} pages, "
            f"{self.bytes_sent / _MIB:.1f} MiB sent{how})"
        )


class _Sender:
    def __init__(self, source: Source, channel: Channel, pacer: Pacer,
                 progress: Callable[[MigrationProgress], None] | None) -> None:  # fmt: skip
        self.source = source
        self.ch = channel
        self.pacer = pacer
        self.report = progress
        self.progress = MigrationProgress()
        self.t0 = time.monotonic()
        self.send_time = 0.0  # seconds spent sending pages (for the bandwidth estimate)
        self.page_bytes = 0

    def publish(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self.progress, key, value)
        self.progress.elapsed_s = time.monotonic() - self.t0
        self.progress.bytes_sent = self.ch.bytes_sent
        if self.report is not None:
            copy = MigrationProgress(**asdict(self.progress))
            copy.history = [dict(h) for h in self.progress.history]
            self.report(copy)

    def bandwidth(self) -> float:
        """Bytes/s the stream has managed so far (the cap's rate before any page went)."""
        if self.send_time > 0 and self.page_bytes:
            measured = self.page_bytes / self.send_time
            return min(measured, self.pacer.rate) if self.pacer.rate else measured
        return self.pacer.rate or 100 * _MIB

    def flush(self, batch: PageBatch) -> PageBatch:
        if not batch:
            return batch
        t = time.monotonic()
        self.ch.send(Kind.PAGES, *batch.parts())
        self.pacer.spend(batch.wire_bytes)
        self.send_time += time.monotonic() - t
        self.page_bytes += batch.wire_bytes
        self.progress.pages_sent += len(batch)
        self.progress.zero_pages += batch.zero
        return PageBatch()

    def send_all(self) -> None:
        """Round 0: every page of every region that may hold data. Zero pages are not sent
        at all: the destination's memory starts zeroed (a page that is zero later, after the
        guest wrote it, goes as a marker in a dirty round)."""
        batch = PageBatch()
        for region in self.source.mem.regions:
            mapping, base = region.mapping, region.guest_phys_addr
            for start, end in data_ranges(region):
                for chunk in range(start, end, _ZERO_CHUNK_SIZE):
                    stop = min(chunk + _ZERO_CHUNK_SIZE, end)
                    if mapping[chunk:stop] == _ZERO_CHUNK[: stop - chunk]:
                        continue  # (one compare for 256 zero pages)
                    for off in range(chunk, stop, PAGE_SIZE):
                        page = mapping[off : off + PAGE_SIZE]
                        if page == ZERO_PAGE:
                            continue
                        batch.add(base + off, page)
                        if len(batch) >= MAX_BATCH:
                            batch = self.flush(batch)
                            self.maybe_publish()
        self.flush(batch)

    def send_dirty(self, log: DirtyLog, bitmaps: list[tuple[MemoryRegion, bytearray]], *,
                   protect: bool = True) -> int:  # fmt: skip
        """One round: the pages of `bitmaps`, chunk by chunk, each chunk re-protected in
        KVM's log before its pages are read (not in the stop-and-copy: the guest is paused
        and nothing is collected after it). Returns the number of pages sent."""
        batch, sent = PageBatch(), 0
        for region, bitmap in bitmaps:
            mapping, base = region.mapping, region.guest_phys_addr
            npages = region.size // PAGE_SIZE
            chunk_bytes = CHUNK_PAGES // 8
            for first_byte in range(0, len(bitmap), chunk_bytes):
                bits = bitmap[first_byte : first_byte + chunk_bytes]
                if not any(bits):
                    continue
                first = first_byte * 8
                if protect:
                    log.protect(region, first, bits, min(CHUNK_PAGES, npages - first))
                for i in set_bits(bits):
                    off = (first + i) * PAGE_SIZE
                    batch.add(base + off, mapping[off : off + PAGE_SIZE])
                    sent += 1
                    if len(batch) >= MAX_BATCH:
                        batch = self.flush(batch)
                        self.maybe_publish()
        self.flush(batch)
        return sent

    _last_publish = 0.0

    def maybe_publish(self) -> None:
        now = time.monotonic()
        if now - self._last_publish >= 0.5:
            self._last_publish = now
            self.publish()


class _Phases:
    """Milliseconds of each step of the stop-and-copy, from the pause on."""

    def __init__(self) -> None:
        self.start = self.last = time.monotonic()
        self.phases: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.monotonic()
        self.phases[name] = (now - self.last) * 1000
        self.last = now

    def total_ms(self) -> float:
        return (self.last - self.start) * 1000


def _union(a: list[tuple[MemoryRegion, bytearray]], b: list[tuple[MemoryRegion, bytearray]]
           ) -> list[tuple[MemoryRegion, bytearray]]:  # fmt: skip
    out = []
    for (region, x), (other, y) in zip(a, b, strict=True):
        assert region is other
        merged = int.from_bytes(x, "little") | int.from_bytes(y, "little")
        out.append((region, bytearray(merged.to_bytes(len(x), "little"))))
    return out


def _dirty(log: DirtyLog) -> tuple[list[tuple[MemoryRegion, bytearray]], int]:
    bitmaps = list(log.collect())
    return bitmaps, sum(count_bits(b) for _, b in bitmaps)


def send_vm(
    source: Source, address: Address, *, max_downtime_ms: float = 300,
    bandwidth_mib_s: float | None = None, max_rounds: int = MAX_ROUNDS,
    progress: Callable[[MigrationProgress], None] | None = None,
    manual_dirty_log: bool | None = None,
) -> MigrationResult:  # fmt: skip
    """Migrate `source` to the destination listening at `address` (module docstring).
    `manual_dirty_log=False` uses KVM_GET_DIRTY_LOG's own re-protection even where the
    kernel has manual protection (None: manual where it can)."""
    if max_downtime_ms <= 0:
        raise UserError("the downtime target must be positive")
    if bandwidth_mib_s is not None and bandwidth_mib_s <= 0:
        raise UserError("the bandwidth cap must be positive")
    t0 = time.monotonic()
    setup = source.setup()  # before connecting: a machine that cannot migrate says so
    ch = Channel(connect(address, CONNECT_TIMEOUT), f"the destination {address}", IO_TIMEOUT)
    pacer = Pacer(bandwidth_mib_s * _MIB if bandwidth_mib_s else None)
    s = _Sender(source, ch, pacer, progress)
    log = DirtyLog(source.mem, source.vm, manual=manual_dirty_log)
    paused = released = False
    try:
        ch.send_preamble()
        version = ch.read_preamble()
        if version != PROTOCOL_VERSION:
            raise MigrationError(
                f"the destination speaks migration protocol {version}, this kvmkit "
                f"{PROTOCOL_VERSION}"
            )
        ch.send_json(Kind.SETUP, setup)
        ch.recv_json(Kind.READY)
        log.start()
        collected = time.monotonic()
        s.publish(state="precopy", round=0)
        s.send_all()
        history: list[int] = []
        converged, stop_reason, extra = False, "downtime target", 0
        while True:
            bitmaps, dirty = _dirty(log)
            now = time.monotonic()
            # Pages the guest (and the devices) dirtied since the last collect, per second.
            rate = dirty * PAGE_SIZE / max(now - collected, 1e-6) / _MIB
            collected = now
            bandwidth = s.bandwidth()
            expected_ms = dirty * (PAGE_SIZE + 8) / bandwidth * 1000
            s.progress.dirty_pages, s.progress.bandwidth_mib_s = dirty, bandwidth / _MIB
            s.progress.expected_downtime_ms, s.progress.dirty_rate_mib_s = expected_ms, rate
            s.progress.elapsed_s = now - s.t0
            s.progress.history.append(s.progress.snapshot())
            s.publish()
            if expected_ms <= max_downtime_ms:
                converged = True
                # Within the target: a live round more is cheap and usually leaves fewer
                # pages for the pause, while it keeps shrinking the set.
                shrinking = not history or dirty < history[-1] * 3 // 4
                if extra >= EXTRA_ROUNDS or dirty <= FINAL_PAGES or not shrinking:
                    break
                extra += 1
            elif len(history) >= CONVERGE_WINDOW and dirty >= min(history[-CONVERGE_WINDOW:]):
                stop_reason = "not converging"
                break
            if s.progress.round + 1 >= max_rounds:
                stop_reason = "round limit"
                break
            history.append(dirty)
            s.progress.round += 1
            s.send_dirty(log, bitmaps)
            ch.send_json(Kind.ROUND, {"round": s.progress.round, "pages": dirty})
        # Stop and copy.
        s.publish(state="stop-and-copy")
        clock = _Phases()
        source.pause()
        paused = True
        clock.mark("pause")
        # The pages dirty at the last decision (not sent: pre-copy stopped there) and those
        # dirtied until the pause. (Without manual protection KVM cleared its bits of the
        # first collect already, and the VMM's bits are taken by every collect.)
        bitmaps = _union(bitmaps, _dirty(log)[0])
        final = s.send_dirty(log, bitmaps, protect=False)
        clock.mark("last pages")
        try:
            state = encode(source.capture())
        except (KvmError, SnapshotError) as err:
            raise MigrationError(f"cannot take the guest's state: {err}") from None
        clock.mark("state capture")
        ch.send(Kind.STATE, state)
        ch.settimeout(BUILD_TIMEOUT)
        if setup.get("handover"):
            ch.recv_json(Kind.PREPARED)
            clock.mark("state check")
            source.release()
            released = True
            ch.send_json(Kind.HANDOVER, {})
        ch.recv_json(Kind.ACK)
        clock.mark("destination build")
        downtime_ms = clock.total_ms()
    except BaseException as err:
        reason = str(err) if isinstance(err, UserError | OSError) else repr(err)
        if isinstance(err, MigrationError) and not err.remote:
            reason = ch.peek_error() or reason  # the destination may have said why it quit
        ch.close()
        log.stop(everything_dirty=True)
        if released:
            source.reacquire()
        if paused:
            source.resume()
        s.publish(state="failed")
        if isinstance(err, MigrationError | UserError | KvmError | OSError):
            raise MigrationError(f"migration failed, the guest runs on here: {reason}") from None
        raise
    ch.close()
    log.stop()
    s.publish(state="completed")
    result = MigrationResult(
        destination=str(address), downtime_ms=downtime_ms, total_s=time.monotonic() - t0,
        rounds=s.progress.round + 1, pages_sent=s.progress.pages_sent,
        zero_pages=s.progress.zero_pages, bytes_sent=ch.bytes_sent, final_pages=final,
        converged=converged, stop_reason=stop_reason, progress=s.progress,
        phases_ms=clock.phases,
    )  # fmt: skip
    source.committed(f"to {address}")
    return result
