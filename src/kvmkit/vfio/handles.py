"""Typed handles on VFIO file descriptors (Documentation/driver-api/vfio.rst): the
container (`/dev/vfio/vfio`, the IOMMU context), a group (`/dev/vfio/N`) and a device (from
VFIO_GROUP_GET_DEVICE_FD). As with `kvmkit.kvm`, each method issues one ioctl (or one
pread/pwrite/mmap of a device region) and a failure raises `VfioError(op, errno)`.

Info structures that may carry capabilities (region info, IOMMU info) are fetched twice when
the kernel says the answer is longer than the fixed part (`argsz` grows), and the capability
chain is walked with every offset checked against the buffer.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass, field

from kvmkit.abi import vfio as abi
from kvmkit.abi.structs import KvmStruct
from kvmkit.kvm._ioctl import close_fd, ioctl_int, ioctl_ptr
from kvmkit.kvm.errors import VfioError

CONTAINER_PATH = "/dev/vfio/vfio"
_MAX_INFO = 1 << 16  # no info structure with its capabilities is anywhere near 64 KiB
_MAX_CAPS = 64  # a capability chain longer than this is a loop


def _caps(buf: bytes | bytearray, first: int, floor: int) -> dict[int, int]:
    """{capability id: offset} of the chain starting at `first` in `buf` (offsets below
    `floor`, the fixed part, are not capabilities)."""
    found: dict[int, int] = {}
    offset = first
    hdr = ctypes.sizeof(abi.vfio_info_cap_header)
    for _ in range(_MAX_CAPS):
        if offset == 0 or offset < floor or offset + hdr > len(buf) or offset % 4:
            break
        cap = abi.vfio_info_cap_header.from_buffer_copy(buf, offset)
        found.setdefault(int(cap.id), offset)
        if cap.next <= offset:
            break
        offset = int(cap.next)
    return found


def _cap_entries(
    buf: bytes | bytearray, at: int, head: type[KvmStruct], count: int,
    entry: type[KvmStruct],
) -> list[KvmStruct]:  # fmt: skip
    """The `count` `entry` structures after the capability header `head` at `at`, as many
    as the buffer holds."""
    size = ctypes.sizeof(entry)
    first = at + ctypes.sizeof(head)
    n = max(0, min(count, (len(buf) - first) // size))
    return [entry.from_buffer_copy(buf, first + i * size) for i in range(n)]


def _open(path: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as err:
        raise VfioError(f"open {path}", err.errno or errno.EIO) from None


def _full_info(fd: int, op: str, request: int, first: KvmStruct) -> bytearray:
    """Ask again with a buffer of the size the kernel said (first.argsz), the same input
    fields: the fixed part and its capabilities."""
    buf = bytearray(first.argsz)
    buf[: ctypes.sizeof(first)] = bytes(first)
    ioctl_ptr(fd, op, request, buf, error=VfioError)
    return buf


@dataclass(frozen=True)
class IovaRange:
    start: int
    end: int  # inclusive, as the kernel reports it


@dataclass(frozen=True)
class IommuInfo:
    page_sizes: int  # bitmap of the IOMMU's page sizes
    iova_ranges: tuple[IovaRange, ...]  # empty: the kernel did not say (all of it usable)


class VfioContainer:
    """`/dev/vfio/vfio`: one IOMMU context that groups join and DMA maps live in."""

    def __init__(self, path: str = CONTAINER_PATH) -> None:
        self.fd = _open(path)

    def close(self) -> None:
        if self.fd >= 0:
            close_fd(self.fd)  # the kernel drops every DMA mapping and unpins the pages
            self.fd = -1

    def api_version(self) -> int:
        return ioctl_int(self.fd, "VFIO_GET_API_VERSION", abi.GET_API_VERSION, error=VfioError)

    def check_extension(self, extension: int) -> int:
        return ioctl_int(
            self.fd, "VFIO_CHECK_EXTENSION", abi.CHECK_EXTENSION, extension, error=VfioError
        )

    def set_iommu(self, model: int) -> None:
        """Choose the IOMMU model (after a group joined: VFIO needs one to know the IOMMU)."""
        ioctl_int(self.fd, "VFIO_SET_IOMMU", abi.SET_IOMMU, model, error=VfioError)

    def iommu_info(self) -> IommuInfo:
        info = abi.vfio_iommu_type1_info()
        info.argsz = ctypes.sizeof(info)
        ioctl_ptr(self.fd, "VFIO_IOMMU_GET_INFO", abi.IOMMU_GET_INFO, info, error=VfioError)
        ranges: list[IovaRange] = []
        if info.flags & abi.IommuInfoFlag.CAPS and ctypes.sizeof(info) < info.argsz <= _MAX_INFO:
            buf = _full_info(self.fd, "VFIO_IOMMU_GET_INFO", abi.IOMMU_GET_INFO, info)
            full = abi.vfio_iommu_type1_info.from_buffer_copy(buf)
            caps = _caps(buf, int(full.cap_offset), ctypes.sizeof(full))
            at = caps.get(abi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE)
            if at is not None:
                head = abi.vfio_iommu_type1_info_cap_iova_range
                count = int(head.from_buffer_copy(buf, at).nr_iovas)
                for r in _cap_entries(buf, at, head, count, abi.vfio_iova_range):
                    ranges.append(IovaRange(int(r.start), int(r.end)))
        pgsizes = int(info.iova_pgsizes) if info.flags & abi.IommuInfoFlag.PGSIZES else 0
        return IommuInfo(pgsizes, tuple(ranges))

    def map_dma(self, vaddr: int, iova: int, size: int, *, writable: bool = True) -> None:
        """Let the devices of this container reach [iova, iova+size) as the process memory at
        `vaddr` (pinned until unmapped or the container closes)."""
        m = abi.vfio_iommu_type1_dma_map()
        m.argsz = ctypes.sizeof(m)
        m.flags = abi.DmaMapFlag.READ | (abi.DmaMapFlag.WRITE if writable else 0)
        m.vaddr, m.iova, m.size = vaddr, iova, size
        ioctl_ptr(self.fd, "VFIO_IOMMU_MAP_DMA", abi.IOMMU_MAP_DMA, m, error=VfioError)

    def unmap_dma(self, iova: int, size: int) -> int:
        """Remove the mappings in [iova, iova+size); returns the bytes unmapped."""
        u = abi.vfio_iommu_type1_dma_unmap()
        u.argsz = ctypes.sizeof(u)
        u.iova, u.size = iova, size
        ioctl_ptr(self.fd, "VFIO_IOMMU_UNMAP_DMA", abi.IOMMU_UNMAP_DMA, u, error=VfioError)
        return int(u.size)


class VfioGroup:
    """`/dev/vfio/N`: the unit of isolation; its devices are opened through it."""

    def __init__(self, number: int, dev_vfio: str = "/dev/vfio") -> None:
        self.number = number
        self.fd = _open(f"{dev_vfio}/{number}")

    def close(self) -> None:
        if self.fd >= 0:
            close_fd(self.fd)  # leaves the container too
            self.fd = -1

    def status(self) -> abi.GroupFlag:
        s = abi.vfio_group_status()
        s.argsz = ctypes.sizeof(s)
        ioctl_ptr(self.fd, "VFIO_GROUP_GET_STATUS", abi.GROUP_GET_STATUS, s, error=VfioError)
        return abi.GroupFlag(s.flags)

    def set_container(self, container: VfioContainer) -> None:
        fd = ctypes.c_int32(container.fd)
        ioctl_ptr(self.fd, "VFIO_GROUP_SET_CONTAINER", abi.GROUP_SET_CONTAINER, fd, error=VfioError)

    def unset_container(self) -> None:
        ioctl_int(self.fd, "VFIO_GROUP_UNSET_CONTAINER", abi.GROUP_UNSET_CONTAINER,
                  error=VfioError)  # fmt: skip

    def device_fd(self, name: str) -> int:
        """A file descriptor for the group's device `name` (its sysfs name, the BDF)."""
        buf = ctypes.create_string_buffer(name.encode())
        return ioctl_ptr(
            self.fd, "VFIO_GROUP_GET_DEVICE_FD", abi.GROUP_GET_DEVICE_FD, buf, error=VfioError
        )


@dataclass(frozen=True)
class RegionInfo:
    index: int
    flags: abi.RegionFlag
    size: int
    offset: int  # of the region in the device file
    # Page ranges of the region that may be mmapped, (offset, size) relative to it: the
    # sparse-mmap capability's areas, or the whole region when it is mmap-able without one.
    mmap_areas: tuple[tuple[int, int], ...] = field(default=())
    msix_mappable: bool = False  # the MSI-X table may be mmapped too (the IOMMU remaps IRQs)


@dataclass(frozen=True)
class IrqInfo:
    index: int
    flags: abi.IrqInfoFlag
    count: int


class VfioDevice:
    """A device file descriptor. `name` is the device's sysfs name (its BDF)."""

    def __init__(self, fd: int, name: str) -> None:
        self.fd = fd
        self.name = name

    def close(self) -> None:
        if self.fd >= 0:
            close_fd(self.fd)
            self.fd = -1

    def info(self) -> abi.vfio_device_info:
        info = abi.vfio_device_info()
        info.argsz = ctypes.sizeof(info)
        ioctl_ptr(self.fd, "VFIO_DEVICE_GET_INFO", abi.DEVICE_GET_INFO, info, error=VfioError)
        return info

    def region_info(self, index: int) -> RegionInfo:
        info = abi.vfio_region_info()
        info.argsz = ctypes.sizeof(info)
        info.index = index
        op = "VFIO_DEVICE_GET_REGION_INFO"
        ioctl_ptr(self.fd, op, abi.DEVICE_GET_REGION_INFO, info, error=VfioError)
        flags = abi.RegionFlag(info.flags)
        areas: list[tuple[int, int]] = []
        sparse = False
        msix_mappable = False
        if flags & abi.RegionFlag.CAPS and ctypes.sizeof(info) < info.argsz <= _MAX_INFO:
            buf = _full_info(self.fd, op, abi.DEVICE_GET_REGION_INFO, info)
            full = abi.vfio_region_info.from_buffer_copy(buf, 0)
            caps = _caps(buf, int(full.cap_offset), ctypes.sizeof(full))
            msix_mappable = abi.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE in caps
            at = caps.get(abi.VFIO_REGION_INFO_CAP_SPARSE_MMAP)
            if at is not None:
                sparse = True
                cap_t = abi.vfio_region_info_cap_sparse_mmap
                count = int(cap_t.from_buffer_copy(buf, at).nr_areas)
                for a in _cap_entries(buf, at, cap_t, count, abi.vfio_region_sparse_mmap_area):
                    if a.size and a.offset + a.size <= info.size:
                        areas.append((int(a.offset), int(a.size)))
        if flags & abi.RegionFlag.MMAP and not sparse and info.size:
            areas = [(0, int(info.size))]
        return RegionInfo(
            index, flags, int(info.size), int(info.offset), tuple(areas), msix_mappable
        )

    def irq_info(self, index: int) -> IrqInfo:
        info = abi.vfio_irq_info()
        info.argsz = ctypes.sizeof(info)
        info.index = index
        ioctl_ptr(self.fd, "VFIO_DEVICE_GET_IRQ_INFO", abi.DEVICE_GET_IRQ_INFO, info,
                  error=VfioError)  # fmt: skip
        return IrqInfo(index, abi.IrqInfoFlag(info.flags), int(info.count))

    def set_irqs(
        self, index: int, action: abi.IrqSetFlag, *, start: int = 0,
        eventfds: list[int] | None = None, count: int = 0,
    ) -> None:  # fmt: skip
        """VFIO_DEVICE_SET_IRQS for `action` (TRIGGER, MASK or UNMASK) on IRQ `index`: with
        `eventfds`, signal them (-1: leave that vector without one); without, DATA_NONE on
        `count` vectors (count 0 with TRIGGER turns the index off)."""
        op = "VFIO_DEVICE_SET_IRQS"
        if eventfds is not None:
            req = abi.irq_set_eventfds_type(len(eventfds))()
            for i, fd in enumerate(eventfds):
                req.data[i] = fd
            req.flags = abi.IrqSetFlag.DATA_EVENTFD | action
            count = len(eventfds)
        else:
            req = abi.vfio_irq_set()
            req.flags = abi.IrqSetFlag.DATA_NONE | action
        req.argsz = ctypes.sizeof(req)
        req.index, req.start, req.count = index, start, count
        ioctl_ptr(self.fd, op, abi.DEVICE_SET_IRQS, req, error=VfioError)

    def reset(self) -> None:
        """VFIO_DEVICE_RESET: a function-level reset (or what the kernel has for this one)."""
        ioctl_int(self.fd, "VFIO_DEVICE_RESET", abi.DEVICE_RESET, error=VfioError)

    # -- region access (offsets in the device file: RegionInfo.offset + offset in region)
    def pread(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self.fd, length, offset)
        except OSError as err:
            raise VfioError(f"read {self.name}@{offset:#x}", err.errno or errno.EIO) from None
        if len(data) != length:
            raise VfioError(f"read {self.name}@{offset:#x}", errno.EIO, "short read")
        return data

    def pwrite(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        try:
            n = os.pwrite(self.fd, data, offset)
        except OSError as err:
            raise VfioError(f"write {self.name}@{offset:#x}", err.errno or errno.EIO) from None
        if n != len(data):
            raise VfioError(f"write {self.name}@{offset:#x}", errno.EIO, "short write")

    def mmap(self, offset: int, size: int) -> mmap.mmap:
        """Map `size` bytes of the device file at `offset` (a region's mmap-able area)."""
        try:
            return mmap.mmap(
                self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset
            )
        except OSError as err:
            raise VfioError(f"mmap {self.name}@{offset:#x}", err.errno or errno.EIO) from None
