"""The guest-memory file of a snapshot, and restoring guest memory from it lazily.

Layout: the regions of guest memory one after the other, each at a page-aligned file offset
(recorded in the state file with its guest-physical address and size). The file is sparse:

- a full snapshot writes every region; pages that are zero are left as holes (a 1 GiB guest
  that touched 10 MiB makes a file with 10 MiB of data);
- a diff snapshot writes only the pages dirtied since the previous snapshot (KVM's dirty log
  plus the pages the VMM wrote, `GuestMemory.dirty_pages`) at their offsets, and the state
  file lists those pages. It is applied on top of the memory file of the snapshot before it
  (`restore_memory(..., base=...)` or `merge_diff`).

Restore maps each region of the file with MAP_PRIVATE (`kvmkit.memory.file_region`): pages
are read from the file when the guest first touches them and guest writes stay private to
the process, so restore time does not grow with memory size and the file is never changed.
A machine on huge pages cannot map a regular file that way (hugetlbfs pages only come from
hugetlbfs): its regions are new hugetlb memfds and the file's data is copied in at restore.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvmkit.kvm import Vm
from kvmkit.memory import PAGE_SIZE, GuestMemory, MemoryRegion, file_region, memfd_region
from kvmkit.snapshot.format import Fields, SnapshotError, b64

MAX_REGIONS = 64
MAX_MEMORY = 1 << 46  # 64 TiB: more than any host kvmkit runs on
_CHUNK = 1 << 20
_ZERO_CHUNK = bytes(_CHUNK)


@dataclass
class RegionLayout:
    gpa: int
    size: int
    offset: int
    dirty: bytes | None = None  # diff snapshots: bitmap of the pages present in the file


@dataclass
class MemoryState:
    regions: list[RegionLayout]
    diff: bool

    @property
    def file_size(self) -> int:
        return max((r.offset + r.size for r in self.regions), default=0)

    def to_dict(self) -> dict[str, Any]:
        regions = []
        for r in self.regions:
            d: dict[str, Any] = {"gpa": r.gpa, "size": r.size, "offset": r.offset}
            if r.dirty is not None:
                d["dirty"] = b64(r.dirty)
            regions.append(d)
        return {"page_size": PAGE_SIZE, "diff": self.diff, "regions": regions}

    @classmethod
    def from_dict(cls, obj: Any, path: str = "memory") -> MemoryState:
        f = Fields(obj, path)
        if f.get_int("page_size") != PAGE_SIZE:
            raise SnapshotError(f"snapshot state: {path}.page_size must be {PAGE_SIZE}")
        diff = f.get_bool("diff")
        regions: list[RegionLayout] = []
        for i, raw in enumerate(f.get_list("regions", MAX_REGIONS)):
            rf = Fields(raw, f"{path}.regions[{i}]")
            gpa, size = rf.get_int("gpa", 0, MAX_MEMORY), rf.get_int("size", PAGE_SIZE, MAX_MEMORY)
            offset = rf.get_int("offset", 0, MAX_MEMORY)
            if gpa % PAGE_SIZE or size % PAGE_SIZE or offset % PAGE_SIZE:
                raise SnapshotError(f"snapshot state: {rf.path} is not page-aligned")
            dirty = None
            if diff:
                nbytes = (size // PAGE_SIZE + 7) // 8
                dirty = rf.get_blob("dirty", nbytes, max_size=nbytes)
            regions.append(RegionLayout(gpa, size, offset, dirty))
        ordered = sorted(regions, key=lambda r: r.gpa)
        for a, b in itertools.pairwise(ordered):
            if a.gpa + a.size > b.gpa:
                raise SnapshotError(f"snapshot state: {path} regions overlap")
        by_offset = sorted(regions, key=lambda r: r.offset)
        for a, b in itertools.pairwise(by_offset):
            if a.offset + a.size > b.offset:
                raise SnapshotError(f"snapshot state: {path} regions overlap in the file")
        return cls(regions, diff)

    def check_file(self, path: str | os.PathLike[str]) -> None:
        """The memory file exists and is large enough for every region (before any VM work)."""
        try:
            size = os.stat(path).st_size
        except OSError as err:
            raise SnapshotError(f"memory file {os.fspath(path)}: {err.strerror}") from None
        if size < self.file_size:
            raise SnapshotError(
                f"memory file {os.fspath(path)}: {size} bytes, the state needs {self.file_size} "
                "(truncated, or the memory file of another snapshot)"
            )


def _layout(mem: GuestMemory) -> list[RegionLayout]:
    out, offset = [], 0
    for region in mem.regions:
        out.append(RegionLayout(region.guest_phys_addr, region.size, offset))
        offset += region.size
    return out


def _mapping_is_file_truth(region: MemoryRegion) -> bool:
    """True for shared file/memfd mappings, where the file holds exactly what the guest sees
    (so its holes can be skipped with SEEK_DATA); false for anonymous and private mappings."""
    if region.fd < 0:
        return False
    return fcntl.fcntl(region.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR


def data_ranges(region: MemoryRegion) -> list[tuple[int, int]]:
    """Ranges of the region that may hold non-zero data (the whole region by default)."""
    if not _mapping_is_file_truth(region):
        return [(0, region.size)]
    ranges, pos = [], 0
    while pos < region.size:
        try:
            start = os.lseek(region.fd, pos, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:  # only holes from here on
                break
            return [(0, region.size)]
        if start >= region.size:
            break
        end = min(os.lseek(region.fd, start, os.SEEK_HOLE), region.size)
        ranges.append((start, end))
        pos = end
    return ranges


class SnapshotCancelled(Exception):
    """A snapshot being written was given up (the VMM is closing: SIGTERM); its temporary
    file is removed and nothing exists under the final name."""


def _write_full(fd: int, region: MemoryRegion, offset: int,
                cancel: Callable[[], bool] | None = None) -> None:  # fmt: skip
    view = memoryview(region.mapping)
    try:
        for start, end in data_ranges(region):
            for at in range(start, end, _CHUNK):
                if cancel is not None and cancel():
                    raise SnapshotCancelled("the snapshot was cancelled")
                n = min(_CHUNK, end - at)
                chunk = view[at : at + n]
                if chunk.tobytes() == _ZERO_CHUNK[:n]:
                    continue  # leave a hole: zero pages cost nothing in the file
                os.pwrite(fd, chunk, offset + at)
    finally:
        view.release()


def write_memory(
    mem: GuestMemory, path: str | os.PathLike[str], *, vm: Vm | None = None, diff: bool = False,
    cancel: Callable[[], bool] | None = None,
) -> MemoryState:  # fmt: skip
    """Write guest memory (the VM must be paused). Full: every region; diff: the pages dirtied
    since the last snapshot (needs dirty logging, see `enable_dirty_log`). Either way the
    dirty log is reset, so the next diff starts from this snapshot.

    The file is written under a temporary name beside `path` (`path.tmpPID`), synced, then
    renamed: a process killed or failing half-way (ENOSPC, EIO, SIGTERM) leaves no partial
    file under `path`; the temporary one is removed on any error. `cancel` is polled between
    chunks of a full snapshot: when it returns True the write stops (SnapshotCancelled)."""
    layout = _layout(mem)
    dirty_gpas: list[int] = []
    if diff:
        if vm is None:
            raise ValueError("a diff snapshot needs the VM (its dirty log)")
        if not all(r.log_dirty for r in mem.regions):
            raise ValueError("a diff snapshot needs dirty logging (enable_dirty_log) first")
        dirty_gpas = list(mem.dirty_pages(vm))
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    done = False
    try:
        os.ftruncate(fd, layout[-1].offset + layout[-1].size if layout else 0)
        if diff:
            bitmaps = [bytearray((e.size // PAGE_SIZE + 7) // 8) for e in layout]
            for gpa in dirty_gpas:
                region = mem.region_for(gpa, PAGE_SIZE)
                i = mem.regions.index(region)
                off = gpa - region.guest_phys_addr
                page = off // PAGE_SIZE
                bitmaps[i][page >> 3] |= 1 << (page & 7)
                os.pwrite(fd, region.mapping[off : off + PAGE_SIZE], layout[i].offset + off)
            for entry, bitmap in zip(layout, bitmaps, strict=True):
                entry.dirty = bytes(bitmap)
        else:
            for region, entry in zip(mem.regions, layout, strict=True):
                _write_full(fd, region, entry.offset, cancel)
            if vm is not None and any(r.log_dirty for r in mem.regions):
                for _ in mem.dirty_pages(vm):  # reset the log: the next diff starts here
                    pass
        os.fsync(fd)
        os.replace(tmp, path)
        done = True
    finally:
        os.close(fd)
        if not done:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return MemoryState(layout, diff)


def enable_dirty_log(mem: GuestMemory, vm: Vm) -> None:
    """Turn on KVM dirty logging for every region (re-registers the slots with the flag) and
    VMM-side dirty tracking, so diff snapshots can be taken from now on."""
    mem.set_dirty_logging(vm, True)
    mem.start_vmm_dirty_tracking()


def _pages(bitmap: bytes) -> list[int]:
    return [i * 8 + b for i, byte in enumerate(bitmap) if byte for b in range(8) if byte >> b & 1]


def _copy_in(region: MemoryRegion, path: str | os.PathLike[str], offset: int) -> None:
    """Copy a region's bytes from the memory file (at `offset`) into its mapping, leaving the
    file's holes (zero pages) untouched."""
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        pos, end = offset, offset + region.size
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
                stop = min(os.lseek(fd, start, os.SEEK_HOLE), end)
            except OSError as err:
                if err.errno != errno.ENXIO:  # ENXIO: only holes from pos on
                    raise
                break
            if start >= end:
                break
            for at in range(start, stop, _CHUNK):
                data = os.pread(fd, min(_CHUNK, stop - at), at)
                if len(data) != min(_CHUNK, stop - at):
                    raise SnapshotError(f"memory file {os.fspath(path)}: short read at {at:#x}")
                region.mapping[at - offset : at - offset + len(data)] = data
            pos = stop


def restore_memory(
    state: MemoryState, path: str | os.PathLike[str], *, base: str | os.PathLike[str] | None = None,
    huge_page_size: int = 0, prepare: Callable[[GuestMemory], None] | None = None,
) -> GuestMemory:  # fmt: skip
    """Guest memory for a restored VM, mapped MAP_PRIVATE from the memory file (lazy). A diff
    snapshot is applied on top of `base` (the memory file it was taken after): the base is
    mapped and only the diff's pages are copied in.

    `huge_page_size`: the machine's memory is on huge pages; its regions are hugetlb memfds
    filled from the file. `prepare` runs once every region is mapped and before any page of
    them is touched here (the place to set a NUMA memory policy)."""
    if state.diff and base is None:
        raise SnapshotError("a diff snapshot restores on top of its base memory file (base=...)")
    source = base if state.diff else path
    assert source is not None
    state.check_file(source)
    if state.diff:
        state.check_file(path)
    mem = GuestMemory()
    try:
        for entry in state.regions:
            if huge_page_size:
                mem.add(memfd_region(entry.gpa, entry.size, huge_page_size=huge_page_size))
            else:
                mem.add(file_region(entry.gpa, entry.size, source, offset=entry.offset,
                                    private=True))  # fmt: skip
        if prepare is not None:
            prepare(mem)
        if huge_page_size:
            for entry in state.regions:
                _copy_in(mem.region_for(entry.gpa, entry.size), source, entry.offset)
        if state.diff:
            with open(path, "rb", buffering=0) as f:
                for entry in state.regions:
                    region = mem.region_for(entry.gpa, entry.size)
                    assert entry.dirty is not None
                    for page in _pages(entry.dirty):
                        off = page * PAGE_SIZE
                        if off >= entry.size:
                            raise SnapshotError("diff snapshot: dirty page outside its region")
                        data = os.pread(f.fileno(), PAGE_SIZE, entry.offset + off)
                        region.mapping[off : off + PAGE_SIZE] = data.ljust(PAGE_SIZE, b"\0")
    except BaseException:
        mem.close()
        raise
    return mem


def merge_diff(state: MemoryState, diff_path: str | os.PathLike[str],
               base_path: str | os.PathLike[str]) -> None:  # fmt: skip
    """Write a diff snapshot's pages into its base memory file, in place (the base then is a
    full memory file for the diff's state file)."""
    if not state.diff:
        raise SnapshotError("merge_diff needs the state of a diff snapshot")
    state.check_file(diff_path)
    state.check_file(base_path)
    with open(diff_path, "rb", buffering=0) as src, open(base_path, "r+b", buffering=0) as dst:
        for entry in state.regions:
            assert entry.dirty is not None
            for page in _pages(entry.dirty):
                off = entry.offset + page * PAGE_SIZE
                os.pwrite(dst.fileno(), os.pread(src.fileno(), PAGE_SIZE, off), off)
