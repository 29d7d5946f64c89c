"""Dirty-page tracking of a running VM's guest memory, for pre-copy live migration.

Two sources of writes, one bitmap per region (bit n = page n, little-endian as KVM has it):

- the guest's, from KVM's dirty log (`KVM_MEM_LOG_DIRTY_PAGES` on every memory slot). With
  `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (Linux 5.4), `KVM_GET_DIRTY_LOG` only copies the bits
  and `KVM_CLEAR_DIRTY_LOG` clears and write-protects the pages range by range: the sender
  re-protects each chunk just before it reads it, so a page written after its chunk went out
  is caught for the next round and the guest does not take a write fault on every dirty page
  of the slot at once (KVM API doc, 4.117 KVM_CLEAR_DIRTY_LOG and 7.18). Without the
  capability, `KVM_GET_DIRTY_LOG` clears and re-protects the whole slot as it reads.
- the VMM's own writes through its mapping (virtio devices filling buffers and used rings),
  which KVM never sees: `GuestMemory` records them (`start_vmm_dirty_tracking`, see
  `GuestMemory.view` for writes that land after the view was made).

    log = DirtyLog(mem, vm)
    log.start()                 # logging on; every page counts as sent from here
    for region, bitmap in log.collect():     # pages dirtied since start / the last collect
        for first, bits, n in chunks(bitmap):
            log.protect(region, first, bits, n)   # then read those pages
    log.stop()
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from kvmkit.abi.constants import Cap, DirtyLogFlag
from kvmkit.kvm.errors import KvmError
from kvmkit.memory.guest import GuestMemory
from kvmkit.memory.region import PAGE_SIZE, MemoryRegion

if TYPE_CHECKING:
    from kvmkit.kvm.vm import Vm

# KVM_CLEAR_DIRTY_LOG takes ranges whose first page is a multiple of 64 (one bitmap word).
CLEAR_ALIGN = 64


class DirtyLog:
    def __init__(self, mem: GuestMemory, vm: Vm, *, manual: bool | None = None) -> None:
        self.mem = mem
        self.vm = vm
        supported = vm.check_extension(Cap.MANUAL_DIRTY_LOG_PROTECT2) > 0
        self.manual = supported if manual is None else (manual and supported)
        self._was_logging: dict[int, bool] = {}
        self._was_tracking = False
        self.active = False

    def start(self) -> None:
        """Dirty logging on for every slot, VMM-write tracking on. Bits KVM kept from an
        earlier user of the log (a diff snapshot's) are read and dropped: the caller sends
        every page after this."""
        self._was_logging = {id(r): r.log_dirty for r in self.mem.regions}
        self._was_tracking = all(r.vmm_dirty for r in self.mem.regions)
        if self.manual:
            self.vm.enable_manual_dirty_log(DirtyLogFlag.MANUAL_PROTECT_ENABLE)
        self.mem.set_dirty_logging(self.vm, True)
        self.mem.start_vmm_dirty_tracking()
        self.active = True
        for region, bitmap in self.collect():
            self._protect_all(region, bitmap)

    def collect(self) -> Iterator[tuple[MemoryRegion, bytearray]]:
        """Each region's pages dirtied since the last collect (by the guest or the VMM).
        In manual mode the guest's bits are cleared only by `protect`."""
        for region in self.mem.regions:
            npages = region.size // PAGE_SIZE
            bitmap = bytearray((npages + 7) // 8)
            if region.slot >= 0:
                kvm_bits = self.vm.get_dirty_log(region.slot, region.size)
                n = min(len(bitmap), len(kvm_bits))
                bitmap[:n] = kvm_bits[:n]
            vmm_bits = region.take_vmm_dirty()
            if vmm_bits:
                merged = int.from_bytes(bitmap, "little") | int.from_bytes(vmm_bits, "little")
                bitmap[:] = merged.to_bytes(len(bitmap), "little")
            if npages % 8:  # bits past the region's end (KVM pads to 64) are never pages
                bitmap[-1] &= (1 << (npages % 8)) - 1
            yield region, bitmap

    def protect(self, region: MemoryRegion, first_page: int, bits: bytes | bytearray,
                num_pages: int) -> None:  # fmt: skip
        """Clear the guest's dirty bits `bits` (one per page from `first_page`, a multiple of
        64) and write-protect those pages again, before they are read (manual mode; without
        it KVM did this when the bitmap was collected)."""
        if not self.manual or region.slot < 0 or not any(bits):
            return
        if first_page % CLEAR_ALIGN:
            raise ValueError(f"first page {first_page} is not a multiple of {CLEAR_ALIGN}")
        npages = region.size // PAGE_SIZE
        num_pages = min(num_pages, npages - first_page)
        if num_pages % CLEAR_ALIGN and first_page + num_pages != npages:
            raise ValueError("a cleared range ends on a multiple of 64 pages or the slot's end")
        words = bytearray((num_pages + 63) // 64 * 8)
        words[: len(bits)] = bits[: len(words)]
        self.vm.clear_dirty_log(region.slot, first_page, words, num_pages)

    def _protect_all(self, region: MemoryRegion, bitmap: bytes | bytearray) -> None:
        self.protect(region, 0, bitmap, region.size // PAGE_SIZE)

    def stop(self, *, everything_dirty: bool = False) -> None:
        """Logging back as it was before `start` (off, unless diff snapshots had it on).
        `everything_dirty`: the caller consumed bits a later diff snapshot needed (a
        migration that failed), so every page counts as dirty for it."""
        if not self.active:
            return
        self.active = False
        if self.manual:
            try:
                self.vm.enable_manual_dirty_log(0)
            except KvmError:
                pass  # the VM is going away
        if not any(self._was_logging.values()):
            self.mem.set_dirty_logging(self.vm, False)
        if not self._was_tracking:
            self.mem.stop_vmm_dirty_tracking()
        elif everything_dirty:
            for region in self.mem.regions:
                with region.dirty_lock:
                    if region.vmm_dirty:
                        region.vmm_dirty[:] = b"\xff" * len(region.vmm_dirty)


def set_bits(bitmap: bytes | bytearray) -> Iterator[int]:
    """Indexes of the set bits of a little-endian bitmap, in order."""
    value = int.from_bytes(bitmap, "little")
    while value:
        low = value & -value
        yield low.bit_length() - 1
        value ^= low


def count_bits(bitmap: bytes | bytearray) -> int:
    return int.from_bytes(bitmap, "little").bit_count()
