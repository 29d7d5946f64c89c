"""One contiguous range of guest-physical memory backed by a host mapping.

Backings: anonymous memory, a memfd (shareable, e.g. with a helper process or for a snapshot;
on hugetlbfs for huge pages, kvmkit.memory.host), or a file mapped shared or private
(`MAP_PRIVATE` for lazy snapshot restore: pages are read from the file on first touch and
guest writes stay in this process).
"""

from __future__ import annotations

import ctypes
import errno
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
    huge_page_size: int = 0  # hugetlbfs page size of the backing, 0 for base pages
    # How the memory is backed, which decides how `discard` gives pages back to the host:
    # "anonymous", "memfd" (shared, on shmem or hugetlbfs), "file-private" (MAP_PRIVATE of a
    # file: a snapshot restored lazily) or "file-shared".
    backing: str = "anonymous"
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

    def discard(self, offset: int, length: int) -> None:
        """Give the host back the memory of [offset, offset+length) of this region (a
        balloon's inflated pages, page-aligned); the guest may touch the range again later
        and then reads zeros (or, for "file-private", the file's data). What frees the
        memory depends on the backing (madvise(2)):

        - anonymous and file-private: MADV_DONTNEED drops this process's pages (private
          copies of file pages included; a file page read again comes from the page cache);
        - memfd on shmem: MADV_DONTNEED would only unmap the pages, which stay in the memfd
          (the RSS drops, the host's memory does not), so MADV_REMOVE punches a hole in the
          memfd, freeing them;
        - hugetlbfs: a huge page cannot be freed a base page at a time: refused (ValueError),
          as Firecracker refuses a balloon with huge pages;
        - file-shared: MADV_DONTNEED; the data stays in the file (never punched: it is the
          user's file).

        The range is recorded as written by the VMM (its content changed under KVM's dirty
        log), so a migration or diff snapshot carries the change."""
        if self.huge_page_size:
            raise ValueError("huge pages cannot be discarded a base page at a time")
        if not 0 <= offset < offset + length <= self.size or (offset | length) % PAGE_SIZE:
            raise GuestMemoryError(
                f"discard {offset:#x}+{length:#x}: outside the region or unaligned"
            )
        advice = mmap.MADV_REMOVE if self.backing == "memfd" else mmap.MADV_DONTNEED
        self.mapping.madvise(advice, offset, length)
        self.mark_dirty(offset, length)

    def close(self) -> None:
        try:
            self.mapping.close()
        except BufferError:
            pass  # a memoryview of it is still alive; it goes with the last reference
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def host_address(mapping: mmap.mmap) -> int:
    """The address of a mapping in this process (what KVM and VFIO are given)."""
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
    return MemoryRegion(gpa, size, mapping, host_address(mapping))


class HugePagesError(GuestMemoryError):
    """Guest memory cannot be backed by huge pages (too few free, or no such size)."""


def memfd_region(
    gpa: int, size: int, name: str = "kvmkit-guest-ram", *, huge_page_size: int = 0
) -> MemoryRegion:
    """A memfd of `size` bytes mapped shared; with `huge_page_size` (bytes, a power of two) on
    hugetlbfs (memfd_create(2) MFD_HUGETLB with the size's log2 in the MFD_HUGE_* bits)."""
    _check_size(gpa, size)
    flags = os.MFD_CLOEXEC
    if huge_page_size:
        if huge_page_size & (huge_page_size - 1) or size % huge_page_size or gpa % huge_page_size:
            raise HugePagesError(
                f"region {gpa:#x}+{size:#x}: not aligned to {huge_page_size >> 20} MiB pages"
            )
        flags |= os.MFD_HUGETLB | (huge_page_size.bit_length() - 1) << os.MFD_HUGE_SHIFT
    try:
        fd = os.memfd_create(name, flags)
    except OSError as err:
        if huge_page_size:
            raise HugePagesError(
                f"no {huge_page_size >> 20} MiB huge pages on this host: {err.strerror}"
            ) from None
        raise
    try:
        os.ftruncate(fd, size)
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as err:
        os.close(fd)
        if huge_page_size and err.errno == errno.ENOMEM:
            # A shared hugetlb mapping reserves all its pages when it is made.
            raise HugePagesError(
                f"{size // huge_page_size} huge pages of {huge_page_size >> 20} MiB needed for "
                f"guest memory at {gpa:#x}, too few are free"
            ) from None
        raise
    except BaseException:
        os.close(fd)
        raise
    return MemoryRegion(
        gpa, size, mapping, host_address(mapping), fd=fd, huge_page_size=huge_page_size,
        backing="memfd",
    )


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
    return MemoryRegion(gpa, size, mapping, host_address(mapping), fd=fd,
                        backing="file-private" if private else "file-shared")
