"""Guest-physical memory: the regions of a VM and bounds-checked access to them.

Every access names a guest-physical address (GPA) and a length and is checked against the
regions before any host memory is touched: a guest-controlled address can never reach host
memory outside the region it falls in (rust-vmm vm-memory's rule). An access that spans two
regions or falls in a hole raises `GuestMemoryError`.
"""

from __future__ import annotations

import bisect
import struct
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

from kvmkit.abi.constants import MemFlag
from kvmkit.memory.region import (
    PAGE_SIZE,
    GuestMemoryError,
    MemoryRegion,
    anonymous_region,
    memfd_region,
)

if TYPE_CHECKING:
    from kvmkit.kvm.vm import Vm

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class GuestMemory:
    """The set of memory regions of one VM, sorted by address, non-overlapping."""

    def __init__(self) -> None:
        self.regions: list[MemoryRegion] = []
        self._starts: list[int] = []
        self._vm: Vm | None = None
        # (start, end, region) of the region the last lookup found: device queues touch the
        # same region again and again, and this check is much cheaper than a bisect. One
        # tuple, replaced whole, so threads sharing this object always see a consistent one.
        self._last: tuple[int, int, MemoryRegion] | None = None
        # Weak references to live write views while VMM writes are tracked (`view`).
        self._write_views: dict[int, weakref.ref[memoryview]] = {}

    # -- building
    def add(self, region: MemoryRegion) -> MemoryRegion:
        for other in self.regions:
            if region.guest_phys_addr < other.end and other.guest_phys_addr < region.end:
                raise GuestMemoryError(
                    f"region {region.guest_phys_addr:#x}-{region.end:#x} overlaps "
                    f"{other.guest_phys_addr:#x}-{other.end:#x}"
                )
        i = bisect.bisect(self._starts, region.guest_phys_addr)
        self.regions.insert(i, region)
        self._starts.insert(i, region.guest_phys_addr)
        if self._vm is not None:
            self._register(self._vm, region)
        return region

    def add_anonymous(self, gpa: int, size: int) -> MemoryRegion:
        return self.add(anonymous_region(gpa, size))

    def add_memfd(self, gpa: int, size: int, *, huge_page_size: int = 0) -> MemoryRegion:
        return self.add(memfd_region(gpa, size, huge_page_size=huge_page_size))

    def register(self, vm: Vm, *, log_dirty: bool = False) -> None:
        """Install every region (present and future) as a KVM memory slot of `vm`."""
        self._vm = vm
        for region in self.regions:
            region.log_dirty = region.log_dirty or log_dirty
            self._register(vm, region)

    def _register(self, vm: Vm, region: MemoryRegion) -> None:
        if region.slot < 0:
            used = {r.slot for r in self.regions}
            region.slot = next(s for s in range(len(self.regions) + 1) if s not in used)
        flags = MemFlag(0)
        if region.log_dirty:
            flags |= MemFlag.LOG_DIRTY_PAGES
        if region.read_only:
            flags |= MemFlag.READONLY
        vm.set_user_memory_region(
            region.slot, region.guest_phys_addr, region.size, region.host_addr, flags
        )

    def close(self) -> None:
        self._last = None
        for region in self.regions:
            region.close()
        self.regions.clear()
        self._starts.clear()

    @property
    def size(self) -> int:
        return sum(r.size for r in self.regions)

    # -- lookup
    def region_for(self, gpa: int, length: int = 1) -> MemoryRegion:
        """The region holding all of [gpa, gpa+length), or GuestMemoryError."""
        last = self._last
        # A zero-length access still needs its address inside the region (max(length, 1)).
        if last is not None and last[0] <= gpa and gpa + (length or 1) <= last[1] and length >= 0:
            return last[2]
        if length < 0 or gpa < 0:
            raise GuestMemoryError(f"invalid guest access {gpa:#x}+{length:#x}")
        i = bisect.bisect_right(self._starts, gpa) - 1
        if i >= 0:
            region = self.regions[i]
            if region.contains(gpa, max(length, 1)):
                self._last = (region.guest_phys_addr, region.end, region)
                return region
        raise GuestMemoryError(
            f"guest address range {gpa:#x}..{gpa + length:#x} is outside guest memory"
        )

    def is_valid(self, gpa: int, length: int = 1) -> bool:
        try:
            self.region_for(gpa, length)
        except GuestMemoryError:
            return False
        return True

    # -- access
    def view(self, gpa: int, length: int, *, write: bool = False) -> memoryview:
        """A zero-copy view of guest memory. With `write=True` the pages are recorded dirty,
        when the view is made and again when it is gone (see below)."""
        region = self.region_for(gpa, length)
        off = gpa - region.guest_phys_addr
        view = memoryview(region.mapping)[off : off + length]
        if write:
            region.mark_dirty(off, length)
            if region.vmm_dirty:
                # The device writes through the view after this call returns (a readv into
                # it): a migration round that takes the dirty bits in between would send the
                # page before the write and never again. Marking once more when the view is
                # released puts the page into the round after its last write.
                ref = weakref.ref(view, _ViewDone(self, region, off, length))
                self._write_views[id(ref)] = ref
        return view

    def read(self, gpa: int, length: int) -> bytes:
        region = self.region_for(gpa, length)
        off = gpa - region.guest_phys_addr
        return region.mapping[off : off + length]

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        region = self.region_for(gpa, length)
        off = gpa - region.guest_phys_addr
        region.mapping[off : off + length] = data
        region.mark_dirty(off, length)

    def fill(self, gpa: int, length: int, byte: int = 0) -> None:
        self.write(gpa, bytes([byte]) * length)

    def _read_struct(self, s: struct.Struct, gpa: int) -> int:
        region = self.region_for(gpa, s.size)
        value: int = s.unpack_from(region.mapping, gpa - region.guest_phys_addr)[0]
        return value

    def _write_struct(self, s: struct.Struct, gpa: int, value: int) -> None:
        region = self.region_for(gpa, s.size)
        off = gpa - region.guest_phys_addr
        s.pack_into(region.mapping, off, value & ((1 << (8 * s.size)) - 1))
        region.mark_dirty(off, s.size)

    def read_u8(self, gpa: int) -> int:
        return self._read_struct(_U8, gpa)

    def read_u16(self, gpa: int) -> int:
        return self._read_struct(_U16, gpa)

    def read_u32(self, gpa: int) -> int:
        return self._read_struct(_U32, gpa)

    def read_u64(self, gpa: int) -> int:
        return self._read_struct(_U64, gpa)

    def write_u8(self, gpa: int, value: int) -> None:
        self._write_struct(_U8, gpa, value)

    def write_u16(self, gpa: int, value: int) -> None:
        self._write_struct(_U16, gpa, value)

    def write_u32(self, gpa: int, value: int) -> None:
        self._write_struct(_U32, gpa, value)

    def write_u64(self, gpa: int, value: int) -> None:
        self._write_struct(_U64, gpa, value)

    def read_cstring(self, gpa: int, max_length: int) -> bytes:
        """Bytes up to (not including) a NUL, at most `max_length`, never past the region."""
        region = self.region_for(gpa, 1)
        off = gpa - region.guest_phys_addr
        end = min(off + max_length, region.size)
        raw = region.mapping[off:end]
        nul = raw.find(b"\0")
        return raw if nul < 0 else raw[:nul]

    # -- dirty tracking (for snapshots and migration)
    def start_vmm_dirty_tracking(self) -> None:
        """Record pages the VMM writes through this object (KVM's log only sees the guest)."""
        for region in self.regions:
            with region.dirty_lock:
                if not region.vmm_dirty:
                    region.vmm_dirty = bytearray((region.size // PAGE_SIZE + 7) // 8)

    def stop_vmm_dirty_tracking(self) -> None:
        for region in self.regions:
            with region.dirty_lock:
                region.vmm_dirty = bytearray()

    def set_dirty_logging(self, vm: Vm, on: bool) -> None:
        """Turn KVM dirty logging on or off for every registered region (each slot is
        registered again with or without KVM_MEM_LOG_DIRTY_PAGES; allowed while the VM runs,
        KVM API doc 4.35)."""
        for region in self.regions:
            if region.slot < 0 or region.log_dirty == on:
                continue
            region.log_dirty = on
            self._register(vm, region)

    def dirty_pages(self, vm: Vm) -> Iterator[int]:
        """GPAs of pages dirtied since the last call, by the guest (KVM's dirty log, which
        needs `register(vm, log_dirty=True)`) or by the VMM (start_vmm_dirty_tracking)."""
        for region in self.regions:
            bitmap = bytearray((region.size // PAGE_SIZE + 7) // 8)
            if region.log_dirty and region.slot >= 0:
                kvm_log = vm.get_dirty_log(region.slot, region.size)
                n = min(len(bitmap), len(kvm_log))
                bitmap[:n] = kvm_log[:n]
            for i, b in enumerate(region.take_vmm_dirty()):
                bitmap[i] |= b
            npages = region.size // PAGE_SIZE
            for byte_index, byte in enumerate(bitmap):
                if not byte:
                    continue
                for bit in range(8):
                    page = byte_index * 8 + bit
                    if byte & (1 << bit) and page < npages:
                        yield region.guest_phys_addr + page * PAGE_SIZE


class _ViewDone:
    """The weak-reference callback of a write view: its pages are dirty once more."""

    __slots__ = ("length", "mem", "offset", "region")

    def __init__(self, mem: GuestMemory, region: MemoryRegion, offset: int, length: int) -> None:
        self.mem, self.region, self.offset, self.length = mem, region, offset, length

    def __call__(self, ref: weakref.ref[memoryview]) -> None:
        self.mem._write_views.pop(id(ref), None)
        self.region.mark_dirty(self.offset, self.length)
