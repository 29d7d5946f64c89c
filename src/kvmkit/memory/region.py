"""One contiguous range of guest-physical memory backed by a host mapping.

Backings: anonymous memory, a memfd (shareable, e.g. with a helper process or for a snapshot),
or a file mapped shared or private (`MAP_PRIVATE` for lazy snapshot restore: pages are read
from the file on first touch and guest writes stay in this process).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from dataclasses import dataclass, field

PAGE_SIZE = 4096


class GuestMemoryError(ValueError):
    """A guest-physical access outside guest memory or across a region boundary."""


@dataclass(eq=False)
class MemoryRegion:
    guest_phys_addr: int
    size: int
    mapping: mmap.mmap
    host_addr: int
    slot: int = -1
    fd: int = -1  # memfd or file descriptor backing the region, -1 for anonymous memory
    read_only: bool = False
    log_dirty: bool = False
    # Pages written by the VMM itself (device emulation), which KVM's dirty log cannot see:
    # one bit per page, empty while nobody tracks them. Device threads set bits while a
    # migration takes them (`take_vmm_dirty`): the lock keeps a bit set between the two
    # from being lost.
    vmm_dirty: bytearray = field(default_factory=bytearray)
    dirty_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def end(self) -> int:
        return self.guest_phys_addr + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.guest_phys_addr <= gpa and gpa + length <= self.end

    def mark_dirty(self, offset: int, length: int) -> None:
        if not self.vmm_dirty or length <= 0:
            return
        first, last = offset // PAGE_SIZE, (offset + length - 1) // PAGE_SIZE
        with self.dirty_lock:
            bitmap = self.vmm_dirty
            if not bitmap:  # tracking stopped meanwhile
                return
            for page in range(first, last + 1):
                bitmap[page >> 3] |= 1 << (page & 7)

    def take_vmm_dirty(self) -> bytes:
        """The VMM-dirty bitmap so far, cleared at once (b"" when nobody tracks)."""
        with self.dirty_lock:
            taken = bytes(self.vmm_dirty)
            if taken:
                self.vmm_dirty[:] = bytes(len(taken))
            return taken

    def close(self) -> None:
        try:
            self.mapping.close()
        except BufferError:
            pass  # a memoryview of it is still alive; it goes with the last reference
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _host_address(mapping: mmap.mmap) -> int:
    # ctypes needs a writable buffer; from_buffer keeps an export on the mapping for as long
    # as the ctypes object lives, which is only for this call.
    anchor = ctypes.c_char.from_buffer(mapping)
    addr = ctypes.addressof(anchor)
    del anchor
    return addr


def _check_size(gpa: int, size: int) -> None:
    if size <= 0 or size % PAGE_SIZE or gpa % PAGE_SIZE:
        raise GuestMemoryError(
            f"region {gpa:#x}+{size:#x}: address and size must be non-zero multiples of 4 KiB"
        )


def anonymous_region(gpa: int, size: int) -> MemoryRegion:
    _check_size(gpa, size)
    mapping = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return MemoryRegion(gpa, size, mapping, _host_address(mapping))


def memfd_region(gpa: int, size: int, name: str = "kvmkit-guest-ram") -> MemoryRegion:
    _check_size(gpa, size)
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return MemoryRegion(gpa, size, mapping, _host_address(mapping), fd=fd)


def file_region(
    gpa: int, size: int, path: str | os.PathLike[str], *, offset: int = 0, private: bool = True
) -> MemoryRegion:
    """Map `size` bytes of a file at `offset`. `private` (MAP_PRIVATE) leaves the file unchanged
    and loads pages lazily; shared mode writes guest changes back to the file."""
    _check_size(gpa, size)
    flags = os.O_RDONLY if private else os.O_RDWR
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        file_size = os.fstat(fd).st_size
        if offset < 0 or offset % mmap.ALLOCATIONGRANULARITY or offset + size > file_size:
            raise GuestMemoryError(
                f"{os.fspath(path)}: cannot map {size:#x} bytes at offset {offset:#x} "
                f"(file has {file_size:#x} bytes)"
            )
        mapping = mmap.mmap(
            fd, size, mmap.MAP_PRIVATE if private else mmap.MAP_SHARED,
            mmap.PROT_READ | mmap.PROT_WRITE, offset=offset,
        )  # fmt: skip
    except BaseException:
        os.close(fd)
        raise
    return MemoryRegion(gpa, size, mapping, _host_address(mapping), fd=fd)
