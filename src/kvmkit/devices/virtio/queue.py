"""Split virtqueues (virtio 1.2 §2.7), device side, as pure code over `GuestMemory`.

    descriptor table  16 bytes each: addr u64, len u32, flags u16, next u16      (§2.7.5)
    driver area       flags u16, idx u16, ring[size] u16, used_event u16         (§2.7.6)
    device area       flags u16, idx u16, ring[size] {id u32, len u32},
                      avail_event u16                                             (§2.7.8)

Everything in these structures is written by the guest, which may be hostile: every index,
length, address and chain is checked before it is used, and a violation raises `QueueError`.
A device that sees one sets NEEDS_RESET (§2.1.2) and stops using the queue; the VMM keeps
running. Guest memory is only ever reached through `GuestMemory`'s bounds-checked accessors,
so no guest value can reach host memory outside guest RAM.

Ordering: the driver writes ring entries before the index that publishes them and reads the
used index before the used entries; on x86 (TSO) plain loads and stores keep that order. The
two places that need a store-load barrier (publishing used.idx then reading used_event, and
writing avail_event then re-reading avail.idx) go through `full_fence()`.
"""

from __future__ import annotations

import enum
import logging
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from kvmkit.memory import GuestMemory
from kvmkit.memory.region import GuestMemoryError
from kvmkit.snapshot.format import Fields, SnapshotError

log = logging.getLogger(__name__)

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

DESC_SIZE = 16
MAX_QUEUE_SIZE = 32768  # §2.7: "The maximum Queue Size value is 32768"
# The longest indirect table accepted (a 64 KiB table). Linux makes one per request with
# one entry per segment, far fewer than this.
MAX_INDIRECT_ENTRIES = 4096

_DESC = struct.Struct("<QIHH")
_USED_ELEM = struct.Struct("<II")
_U16 = struct.Struct("<H")

_fence_lock = threading.Lock()


def full_fence() -> None:
    """A full memory barrier: taking a lock executes a locked instruction (x86: a full
    fence), so a store before this call is visible before any load after it."""
    with _fence_lock:
        pass


class QueueArea(enum.Enum):
    """The three parts of a split virtqueue whose guest addresses the driver sets (§2.7)."""

    DESC = "descriptor table"
    DRIVER = "driver area"  # the available ring
    DEVICE = "device area"  # the used ring


class QueueError(Exception):
    """The driver broke a rule of §2.7; the device must enter NEEDS_RESET (§2.1.2)."""


class Buffer(NamedTuple):
    """One guest buffer of a chain: `length` bytes at guest-physical `addr`. (A NamedTuple:
    chains are built per request on the data path, and a tuple is the cheapest record.)"""

    addr: int
    length: int
    writable: bool


@dataclass(slots=True)
class DescriptorChain:
    """A request the driver made available: device-readable buffers then device-writable
    ones (§2.7.4.2), and the head index to give back in the used ring."""

    head: int
    readable: list[Buffer] = field(default_factory=list)
    writable: list[Buffer] = field(default_factory=list)

    @property
    def readable_length(self) -> int:
        return sum(b.length for b in self.readable)

    @property
    def writable_length(self) -> int:
        return sum(b.length for b in self.writable)


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """§2.7.10 / 2.7.7.2: notify when `event_idx` lies in [old_idx, new_idx) modulo 2^16."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class SplitQueue:
    """One split virtqueue as configured by the driver through a transport."""

    def __init__(self, max_size: int) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size}: must be a power of 2 up to 32768")
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        self.size = self.max_size
        self.ready = False
        self.desc_addr = 0
        self.avail_addr = 0
        self.used_addr = 0
        self.event_idx = False  # VIRTIO_F_EVENT_IDX negotiated
        self.indirect = False  # VIRTIO_F_INDIRECT_DESC negotiated
        self.last_avail = 0  # next avail ring slot the device reads (free-running u16)
        self.next_used = 0  # used.idx the device publishes next (free-running u16)
        self._signalled_used: int | None = None  # used.idx at the last interrupt decision

    # -- snapshots: the device-side queue state as plain data (docs/snapshot.md)
    def save(self, *, held: int = 0) -> QueueState:
        """`held`: how many of the chains taken last the device holds unused; they are
        saved as not taken yet. Their avail ring slots are intact: the driver cannot get a
        whole ring ahead of the chains returned to it (§2.7.13.3)."""
        return QueueState(
            size=self.size, ready=self.ready, desc_addr=self.desc_addr,
            avail_addr=self.avail_addr, used_addr=self.used_addr, event_idx=self.event_idx,
            indirect=self.indirect, last_avail=(self.last_avail - held) & 0xFFFF,
            next_used=self.next_used, signalled_used=self._signalled_used,
        )  # fmt: skip

    def restore(self, state: QueueState) -> None:
        """Take over a checked `QueueState` as is: no reset, the indexes continue."""
        if state.size > self.max_size:
            raise SnapshotError(
                f"snapshot state: queue size {state.size} exceeds this device's {self.max_size}"
            )
        self.size, self.ready = state.size, state.ready
        self.desc_addr, self.avail_addr, self.used_addr = (
            state.desc_addr, state.avail_addr, state.used_addr,
        )  # fmt: skip
        self.event_idx, self.indirect = state.event_idx, state.indirect
        self.last_avail, self.next_used = state.last_avail, state.next_used
        self._signalled_used = state.signalled_used

    # -- set-up by the driver, through a transport's queue registers (§4.1.4.3, §4.2.2)
    def set_size(self, value: int) -> bool:
        """The driver's queue size (virtio-mmio QueueNum, virtio-pci queue_size). Refused
        (False) while the queue is ready: its layout is fixed then (§4.2.2.3, §4.1.4.3.2).
        The value is checked when the queue goes live (`enable`, `validate`: a power of 2 up
        to `max_size`, §2.7), so a driver that wrote a bad one learns it from NEEDS_RESET
        rather than having the device use a ring size the driver did not lay out."""
        if self.ready:
            return False
        self.size = value & 0xFFFFFFFF
        return True

    def set_address(self, area: QueueArea, value: int, *, shift: int = 0, width: int = 64) -> bool:
        """Write `width` bits of one area's 64-bit guest address, at bit `shift`: the whole
        address, or its low or high half (virtio-mmio's QueueDescLow/High ..., §4.2.2;
        virtio-pci's 64-bit fields written as two dwords, §4.1.3.1). Refused (False) while the
        queue is ready (§4.2.2.3, §4.1.4.3.2); alignment and placement are checked by
        `validate` when the queue goes live."""
        if self.ready or width not in (32, 64) or shift not in (0, 32) or shift + width > 64:
            return False
        mask = ((1 << width) - 1) << shift
        bits = (value << shift) & mask
        if area is QueueArea.DESC:
            self.desc_addr = (self.desc_addr & ~mask) | bits
        elif area is QueueArea.DRIVER:
            self.avail_addr = (self.avail_addr & ~mask) | bits
        else:
            self.used_addr = (self.used_addr & ~mask) | bits
        return True

    def address(self, area: QueueArea) -> int:
        if area is QueueArea.DESC:
            return self.desc_addr
        return self.avail_addr if area is QueueArea.DRIVER else self.used_addr

    def enable(self, mem: GuestMemory | None) -> None:
        """QueueReady / queue_enable = 1. With `mem` (the device is live, so the queue is
        used at once) the layout is checked first: on QueueError the queue stays not ready.
        Before DRIVER_OK (`mem` None) the check waits for activation."""
        if self.ready:
            return
        if mem is not None:
            self.validate(mem)
        self.ready = True

    def disable(self) -> None:
        """virtio-mmio QueueReady = 0 (§4.2.2: the driver stops using the queue)."""
        self.ready = False

    # -- activation checks
    def validate(self, mem: GuestMemory) -> None:
        """The checks a device makes before using the queue (§2.7, §2.7.5-2.7.8)."""
        size = self.size
        # §2.7: "Queue Size value is always a power of 2"; the driver may only lower it
        # (§4.2.2.2 QueueNum <= QueueNumMax, §4.1.4.3.2 queue_size).
        if not 1 <= size <= self.max_size or size & (size - 1):
            raise QueueError(f"queue size {size} is not a power of 2 <= {self.max_size}")
        # §2.7 table "Virtqueue Part, Alignment": descriptor table 16, driver area 2,
        # device area 4.
        for name, addr, align, length in (
            ("descriptor table", self.desc_addr, 16, DESC_SIZE * size),
            ("driver area", self.avail_addr, 2, 6 + 2 * size),
            ("device area", self.used_addr, 4, 6 + 8 * size),
        ):
            if addr % align:
                raise QueueError(f"{name} at {addr:#x} is not {align}-byte aligned")
            if not mem.is_valid(addr, length):
                raise QueueError(f"{name} {addr:#x}+{length:#x} is outside guest memory")

    # -- the driver area
    def _avail_idx(self, mem: GuestMemory) -> int:
        return mem.read_u16(self.avail_addr + 2)

    def _used_event(self, mem: GuestMemory) -> int:
        return mem.read_u16(self.avail_addr + 4 + 2 * self.size)

    def pending(self, mem: GuestMemory) -> int:
        """How many chains the driver made available and the device has not taken yet."""
        try:
            avail = self._avail_idx(mem)
        except GuestMemoryError as err:
            raise QueueError(str(err)) from None
        count = (avail - self.last_avail) & 0xFFFF
        # §2.7.13.3: the driver adds at most Queue Size entries before the device uses them;
        # an index further ahead is corrupt (QEMU: "Guest moved index from .. to ..").
        if count > self.size:
            raise QueueError(
                f"avail.idx {avail} is {count} entries ahead of the device's {self.last_avail} "
                f"(queue size {self.size})"
            )
        return count

    def pop(self, mem: GuestMemory) -> DescriptorChain | None:
        """The next available chain, or None when the driver has made none available
        (`pop_batch` of one: with VIRTIO_F_EVENT_IDX an empty queue re-arms notifications)."""
        chains = self.pop_batch(mem, 1)
        return chains[0] if chains else None

    def pop_batch(self, mem: GuestMemory, limit: int) -> list[DescriptorChain]:
        """Up to `limit` available chains in ring order, their ring entries read at once
        (one or two reads, at the ring's wrap).

        With VIRTIO_F_EVENT_IDX, an empty queue re-arms the driver's notifications: the
        device writes avail_event (§2.7.10) and looks again, so a chain added in between
        is not missed."""
        if not self.ready or limit <= 0:
            return []
        count = self.pending(mem)
        if count == 0:
            if not self.event_idx:
                return []
            self._set_avail_event(mem, self.last_avail)
            full_fence()
            count = self.pending(mem)
            if count == 0:
                return []
        count = min(count, limit)
        size, ring = self.size, self.avail_addr + 4
        start = self.last_avail % size
        first = min(count, size - start)  # entries before the ring wraps
        try:
            raw = mem.read(ring + 2 * start, 2 * first)
            if count > first:
                raw += mem.read(ring, 2 * (count - first))
        except GuestMemoryError as err:
            raise QueueError(str(err)) from None
        chains = []
        for (head,) in _U16.iter_unpack(raw):
            self.last_avail = (self.last_avail + 1) & 0xFFFF
            chains.append(self._walk(mem, head))
        return chains

    def notify_on_next(self, mem: GuestMemory) -> None:
        """Ask the driver to notify when it makes the next chain available, however
        VIRTIO_F_EVENT_IDX left avail_event (§2.7.10: it notifies when its index passes
        avail_event); without it the driver always notifies (the device never sets
        VIRTQ_USED_F_NO_NOTIFY)."""
        if self.event_idx:
            try:
                self._set_avail_event(mem, self._avail_idx(mem))
            except GuestMemoryError as err:
                raise QueueError(str(err)) from None
            full_fence()  # the caller looks at avail.idx again after this

    def _set_avail_event(self, mem: GuestMemory, value: int) -> None:
        try:
            mem.write_u16(self.used_addr + 4 + 8 * self.size, value)
        except GuestMemoryError as err:
            raise QueueError(str(err)) from None

    # -- descriptor chains
    def _walk(self, mem: GuestMemory, head: int) -> DescriptorChain:
        # §2.7.13.2 / §2.7.6: a ring entry is the index of a chain's head in the table.
        if head >= self.size:
            raise QueueError(f"chain head {head} is outside the table of {self.size}")
        chain = DescriptorChain(head)
        readable, writable = chain.readable, chain.writable
        # Descriptors of the ring's table are read one by one; an indirect table is read
        # whole (one copy, then unpacked from it): chains of many buffers are indirect.
        table_size, index = self.size, head
        desc_addr = self.desc_addr
        table: bytes | None = None
        # §2.7.5.3.1: "A driver MUST NOT create a descriptor chain longer than the Queue
        # Size of the device": counting descriptors also ends any loop.
        budget = self.size
        in_indirect = False
        unpack = _DESC.unpack_from
        region_for = mem.region_for
        while True:
            if budget == 0:
                raise QueueError(f"descriptor chain from {head} is longer than its table (loop?)")
            budget -= 1
            if table is None:
                try:
                    addr, length, flags, nxt = unpack(mem.read(desc_addr + DESC_SIZE * index, 16))
                except GuestMemoryError as err:
                    raise QueueError(str(err)) from None
            else:
                addr, length, flags, nxt = unpack(table, DESC_SIZE * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                # §2.7.5.3.1: "The driver MUST NOT set the VIRTQ_DESC_F_INDIRECT flag within
                # an indirect descriptor" and "MUST NOT set both VIRTQ_DESC_F_INDIRECT and
                # VIRTQ_DESC_F_NEXT in flags".
                if in_indirect:
                    raise QueueError("indirect descriptor inside an indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    raise QueueError("descriptor with both INDIRECT and NEXT")
                if not self.indirect:
                    raise QueueError("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                # §2.7.5.3.1: the table is len/16 descriptors; a partial one is an error.
                if length == 0 or length % DESC_SIZE:
                    raise QueueError(f"indirect table length {length} is not a multiple of 16")
                entries = length // DESC_SIZE
                if entries > MAX_INDIRECT_ENTRIES:
                    raise QueueError(f"indirect table of {entries} descriptors is too long")
                try:
                    table = mem.read(addr, length)
                except GuestMemoryError:
                    raise QueueError(
                        f"indirect table {addr:#x}+{length:#x} is outside memory"
                    ) from None
                # §2.7.5.3.2: the device ignores WRITE on the descriptor of the table itself.
                table_size, index = entries, 0
                budget = entries
                in_indirect = True
                continue
            # The buffer must lie in guest RAM (one region): the device touches it through
            # GuestMemory views only. An empty buffer too: GuestMemory refuses even a
            # zero-length access outside RAM, and devices read and write buffers as given
            # (a fuzzed chain of one empty buffer at 0xb0000 made virtio-blk's header read
            # raise GuestMemoryError out of the worker).
            try:
                region_for(addr, length)
            except GuestMemoryError:
                raise QueueError(f"buffer {addr:#x}+{length:#x} is outside guest memory") from None
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append(Buffer(addr, length, True))
            else:
                # §2.7.4.2: "The driver MUST place any device-writable descriptor elements
                # after any device-readable descriptor elements."
                if writable:
                    raise QueueError("device-readable buffer after a device-writable one")
                readable.append(Buffer(addr, length, False))
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            if nxt >= table_size:
                raise QueueError(f"descriptor next {nxt} is outside the table of {table_size}")
            index = nxt

    # -- the device area
    def push(self, mem: GuestMemory, head: int, written: int) -> None:
        """Return chain `head` to the driver with `written` bytes written into it (§2.7.8)."""
        self.push_batch(mem, ((head, written),))

    def push_batch(self, mem: GuestMemory, used: Sequence[tuple[int, int]]) -> None:
        """Return chains, (head, written) each, in order (§2.7.8): the elements first, in
        one or two writes (at the ring's wrap), then one used.idx write that publishes them."""
        count = len(used)
        if count == 0:
            return
        size = self.size
        if count > size:
            raise QueueError(f"{count} chains returned at once to a queue of {size}")
        data = b"".join([_USED_ELEM.pack(head, written) for head, written in used])
        start = self.next_used % size
        first = min(count, size - start)
        ring = self.used_addr + 4
        try:
            mem.write(ring + 8 * start, data[: 8 * first])
            if count > first:
                mem.write(ring, data[8 * first :])
            self.next_used = (self.next_used + count) & 0xFFFF
            mem.write_u16(self.used_addr + 2, self.next_used)
        except GuestMemoryError as err:
            raise QueueError(str(err)) from None

    def needs_interrupt(self, mem: GuestMemory) -> bool:
        """Whether the driver wants an interrupt for the chains pushed since the last call
        (§2.7.7.2: avail.flags NO_INTERRUPT, or used_event with VIRTIO_F_EVENT_IDX)."""
        full_fence()  # used.idx is visible before the driver's suppression is read
        try:
            if not self.event_idx:
                return not mem.read_u16(self.avail_addr) & VIRTQ_AVAIL_F_NO_INTERRUPT
            old, new = self._signalled_used, self.next_used
            self._signalled_used = new
            if old is None:
                return True
            return vring_need_event(self._used_event(mem), new, old)
        except GuestMemoryError as err:
            raise QueueError(str(err)) from None


@dataclass(frozen=True)
class QueueState:
    """A queue's saved state, checked (`parse`) before anything is restored: a snapshot file
    is hostile input like the guest's rings, and gets the same checks."""

    size: int
    ready: bool
    desc_addr: int
    avail_addr: int
    used_addr: int
    event_idx: bool
    indirect: bool
    last_avail: int
    next_used: int
    signalled_used: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size, "ready": self.ready, "desc_addr": self.desc_addr,
            "avail_addr": self.avail_addr, "used_addr": self.used_addr,
            "event_idx": self.event_idx, "indirect": self.indirect,
            "last_avail": self.last_avail, "next_used": self.next_used,
            "signalled_used": self.signalled_used,
        }  # fmt: skip

    @classmethod
    def parse(cls, obj: Any, path: str) -> QueueState:
        f = Fields(obj, path)
        size = f.get_int("size", 1, MAX_QUEUE_SIZE)
        # §2.7: "Queue Size value is always a power of 2. The maximum Queue Size value is
        # 32768."
        if size & (size - 1):
            raise SnapshotError(f"snapshot state: {path}.size {size} is not a power of 2")
        addrs = [f.get_int(k) for k in ("desc_addr", "avail_addr", "used_addr")]
        # §2.7 table "Virtqueue Part, Alignment": descriptor table 16, driver area 2, device
        # area 4 bytes (a ready queue passed these checks when the driver enabled it).
        ready = f.get_bool("ready")
        for name, addr, align in zip(("desc_addr", "avail_addr", "used_addr"), addrs,
                                     (16, 2, 4), strict=True):  # fmt: skip
            if ready and addr % align:
                raise SnapshotError(f"snapshot state: {path}.{name} is not {align}-byte aligned")
        # The indexes are free-running u16 (§2.7.6, §2.7.8).
        last_avail = f.get_int("last_avail", 0, 0xFFFF)
        next_used = f.get_int("next_used", 0, 0xFFFF)
        # The device cannot hold more chains than the ring has entries (§2.7.13.3: the driver
        # adds at most Queue Size entries before the device uses them).
        if (last_avail - next_used) & 0xFFFF > size:
            raise SnapshotError(
                f"snapshot state: {path}: {(last_avail - next_used) & 0xFFFF} chains in flight "
                f"in a queue of {size}"
            )
        signalled = None
        if f.obj.get("signalled_used") is not None:
            signalled = f.get_int("signalled_used", 0, 0xFFFF)
        return cls(
            size=size, ready=ready, desc_addr=addrs[0], avail_addr=addrs[1], used_addr=addrs[2],
            event_idx=f.get_bool("event_idx"), indirect=f.get_bool("indirect"),
            last_avail=last_avail, next_used=next_used, signalled_used=signalled,
        )  # fmt: skip
