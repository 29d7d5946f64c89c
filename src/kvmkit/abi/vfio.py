"""ctypes mirrors of the VFIO userspace API kvmkit uses (`include/uapi/linux/vfio.h`), and
the PCI configuration-space constants the VFIO device model needs (`include/uapi/linux/
pci_regs.h`). No logic: `tests/unit/test_abi_layout.py` compiles a C program against the
system's headers and compares every size, offset, ioctl number and constant here.

VFIO ioctls are `_IO(';', 100 + n)`: the argument's size is not part of the number, each
structure starts with `argsz` instead, which the caller sets to the size it passes.
"""

from __future__ import annotations

import enum
from ctypes import c_int32, c_uint8, c_uint16, c_uint32, c_uint64

from kvmkit.abi.ioctl import IO
from kvmkit.abi.structs import KvmStruct, _sized

VFIO_API_VERSION = 0
VFIO_TYPE = ord(";")
VFIO_BASE = 100

# IOMMU models (VFIO_CHECK_EXTENSION / VFIO_SET_IOMMU)
VFIO_TYPE1_IOMMU = 1
VFIO_TYPE1v2_IOMMU = 3

# ioctl numbers: container
GET_API_VERSION = IO(VFIO_TYPE, VFIO_BASE + 0)
CHECK_EXTENSION = IO(VFIO_TYPE, VFIO_BASE + 1)
SET_IOMMU = IO(VFIO_TYPE, VFIO_BASE + 2)
IOMMU_GET_INFO = IO(VFIO_TYPE, VFIO_BASE + 12)
IOMMU_MAP_DMA = IO(VFIO_TYPE, VFIO_BASE + 13)
IOMMU_UNMAP_DMA = IO(VFIO_TYPE, VFIO_BASE + 14)
# group
GROUP_GET_STATUS = IO(VFIO_TYPE, VFIO_BASE + 3)
GROUP_SET_CONTAINER = IO(VFIO_TYPE, VFIO_BASE + 4)
GROUP_UNSET_CONTAINER = IO(VFIO_TYPE, VFIO_BASE + 5)
GROUP_GET_DEVICE_FD = IO(VFIO_TYPE, VFIO_BASE + 6)
# device
DEVICE_GET_INFO = IO(VFIO_TYPE, VFIO_BASE + 7)
DEVICE_GET_REGION_INFO = IO(VFIO_TYPE, VFIO_BASE + 8)
DEVICE_GET_IRQ_INFO = IO(VFIO_TYPE, VFIO_BASE + 9)
DEVICE_SET_IRQS = IO(VFIO_TYPE, VFIO_BASE + 10)
DEVICE_RESET = IO(VFIO_TYPE, VFIO_BASE + 11)

ALL_IOCTLS: dict[str, int] = {
    "VFIO_GET_API_VERSION": GET_API_VERSION,
    "VFIO_CHECK_EXTENSION": CHECK_EXTENSION,
    "VFIO_SET_IOMMU": SET_IOMMU,
    "VFIO_IOMMU_GET_INFO": IOMMU_GET_INFO,
    "VFIO_IOMMU_MAP_DMA": IOMMU_MAP_DMA,
    "VFIO_IOMMU_UNMAP_DMA": IOMMU_UNMAP_DMA,
    "VFIO_GROUP_GET_STATUS": GROUP_GET_STATUS,
    "VFIO_GROUP_SET_CONTAINER": GROUP_SET_CONTAINER,
    "VFIO_GROUP_UNSET_CONTAINER": GROUP_UNSET_CONTAINER,
    "VFIO_GROUP_GET_DEVICE_FD": GROUP_GET_DEVICE_FD,
    "VFIO_DEVICE_GET_INFO": DEVICE_GET_INFO,
    "VFIO_DEVICE_GET_REGION_INFO": DEVICE_GET_REGION_INFO,
    "VFIO_DEVICE_GET_IRQ_INFO": DEVICE_GET_IRQ_INFO,
    "VFIO_DEVICE_SET_IRQS": DEVICE_SET_IRQS,
    "VFIO_DEVICE_RESET": DEVICE_RESET,
}


class GroupFlag(enum.IntFlag):
    VIABLE = 1 << 0  # every device of the group is bound to a VFIO driver (or none)
    CONTAINER_SET = 1 << 1


class DeviceFlag(enum.IntFlag):
    RESET = 1 << 0
    PCI = 1 << 1
    CAPS = 1 << 7


class RegionFlag(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


# Region capability IDs (vfio_info_cap_header.id)
VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
VFIO_REGION_INFO_CAP_MSIX_MAPPABLE = 3
VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE = 1


class IrqInfoFlag(enum.IntFlag):
    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlag(enum.IntFlag):
    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


class DmaMapFlag(enum.IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1


class IommuInfoFlag(enum.IntFlag):
    PGSIZES = 1 << 0
    CAPS = 1 << 1


class PciRegion(enum.IntEnum):
    """Region indexes of a vfio-pci device (fixed user ABI)."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


VFIO_PCI_NUM_REGIONS = 9


class PciIrq(enum.IntEnum):
    """IRQ indexes of a vfio-pci device."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


class vfio_info_cap_header(KvmStruct):
    _c_name_ = "struct vfio_info_cap_header"
    _fields_ = [("id", c_uint16), ("version", c_uint16), ("next", c_uint32)]


class vfio_group_status(KvmStruct):
    _c_name_ = "struct vfio_group_status"
    _fields_ = [("argsz", c_uint32), ("flags", c_uint32)]


class vfio_device_info(KvmStruct):
    _c_name_ = "struct vfio_device_info"
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("num_regions", c_uint32),
        ("num_irqs", c_uint32),
        ("cap_offset", c_uint32),
    ]


class vfio_region_info(KvmStruct):
    _c_name_ = "struct vfio_region_info"
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("index", c_uint32),
        ("cap_offset", c_uint32),
        ("size", c_uint64),
        ("offset", c_uint64),
    ]


class vfio_region_sparse_mmap_area(KvmStruct):
    _c_name_ = "struct vfio_region_sparse_mmap_area"
    _fields_ = [("offset", c_uint64), ("size", c_uint64)]


class vfio_region_info_cap_sparse_mmap(KvmStruct):
    """Header of the sparse-mmap capability; `nr_areas` vfio_region_sparse_mmap_area follow."""

    _c_name_ = "struct vfio_region_info_cap_sparse_mmap"
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("nr_areas", c_uint32),
        ("reserved", c_uint32),
    ]


class vfio_irq_info(KvmStruct):
    _c_name_ = "struct vfio_irq_info"
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("index", c_uint32),
        ("count", c_uint32),
    ]


class vfio_irq_set(KvmStruct):
    """Header of VFIO_DEVICE_SET_IRQS; `data` (bools or eventfds) follows, see
    irq_set_type."""

    _c_name_ = "struct vfio_irq_set"
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("index", c_uint32),
        ("start", c_uint32),
        ("count", c_uint32),
    ]


class vfio_iommu_type1_info(KvmStruct):
    _c_name_ = "struct vfio_iommu_type1_info"
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("iova_pgsizes", c_uint64),
        ("cap_offset", c_uint32),
    ]


class vfio_iova_range(KvmStruct):
    _c_name_ = "struct vfio_iova_range"
    _fields_ = [("start", c_uint64), ("end", c_uint64)]


class vfio_iommu_type1_info_cap_iova_range(KvmStruct):
    """Header of the IOVA-range capability; `nr_iovas` vfio_iova_range follow."""

    _c_name_ = "struct vfio_iommu_type1_info_cap_iova_range"
    _fields_ = [
        ("header", vfio_info_cap_header),
        ("nr_iovas", c_uint32),
        ("reserved", c_uint32),
    ]


class vfio_iommu_type1_dma_map(KvmStruct):
    _c_name_ = "struct vfio_iommu_type1_dma_map"
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("vaddr", c_uint64),
        ("iova", c_uint64),
        ("size", c_uint64),
    ]


class vfio_iommu_type1_dma_unmap(KvmStruct):
    _c_name_ = "struct vfio_iommu_type1_dma_unmap"
    _fields_ = [
        ("argsz", c_uint32),
        ("flags", c_uint32),
        ("iova", c_uint64),
        ("size", c_uint64),
    ]


def irq_set_eventfds_type(n: int) -> type[KvmStruct]:
    """vfio_irq_set with room for `n` eventfds (s32) in `data`."""
    return _sized(vfio_irq_set, c_int32, "data", n)


def irq_set_bools_type(n: int) -> type[KvmStruct]:
    """vfio_irq_set with room for `n` booleans (u8) in `data`."""
    return _sized(vfio_irq_set, c_uint8, "data", n)


ALL_STRUCTS: tuple[type[KvmStruct], ...] = tuple(
    obj
    for obj in list(globals().values())
    if isinstance(obj, type) and issubclass(obj, KvmStruct) and obj._c_name_
)

# Constants checked against the header by name.
CONSTANTS: dict[str, int] = {
    "VFIO_API_VERSION": VFIO_API_VERSION,
    "VFIO_TYPE1_IOMMU": VFIO_TYPE1_IOMMU,
    "VFIO_TYPE1v2_IOMMU": VFIO_TYPE1v2_IOMMU,
    "VFIO_GROUP_FLAGS_VIABLE": GroupFlag.VIABLE,
    "VFIO_GROUP_FLAGS_CONTAINER_SET": GroupFlag.CONTAINER_SET,
    "VFIO_DEVICE_FLAGS_RESET": DeviceFlag.RESET,
    "VFIO_DEVICE_FLAGS_PCI": DeviceFlag.PCI,
    "VFIO_DEVICE_FLAGS_CAPS": DeviceFlag.CAPS,
    "VFIO_REGION_INFO_FLAG_READ": RegionFlag.READ,
    "VFIO_REGION_INFO_FLAG_WRITE": RegionFlag.WRITE,
    "VFIO_REGION_INFO_FLAG_MMAP": RegionFlag.MMAP,
    "VFIO_REGION_INFO_FLAG_CAPS": RegionFlag.CAPS,
    "VFIO_REGION_INFO_CAP_SPARSE_MMAP": VFIO_REGION_INFO_CAP_SPARSE_MMAP,
    "VFIO_REGION_INFO_CAP_MSIX_MAPPABLE": VFIO_REGION_INFO_CAP_MSIX_MAPPABLE,
    "VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE": VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE,
    "VFIO_IRQ_INFO_EVENTFD": IrqInfoFlag.EVENTFD,
    "VFIO_IRQ_INFO_MASKABLE": IrqInfoFlag.MASKABLE,
    "VFIO_IRQ_INFO_AUTOMASKED": IrqInfoFlag.AUTOMASKED,
    "VFIO_IRQ_INFO_NORESIZE": IrqInfoFlag.NORESIZE,
    "VFIO_IRQ_SET_DATA_NONE": IrqSetFlag.DATA_NONE,
    "VFIO_IRQ_SET_DATA_BOOL": IrqSetFlag.DATA_BOOL,
    "VFIO_IRQ_SET_DATA_EVENTFD": IrqSetFlag.DATA_EVENTFD,
    "VFIO_IRQ_SET_ACTION_MASK": IrqSetFlag.ACTION_MASK,
    "VFIO_IRQ_SET_ACTION_UNMASK": IrqSetFlag.ACTION_UNMASK,
    "VFIO_IRQ_SET_ACTION_TRIGGER": IrqSetFlag.ACTION_TRIGGER,
    "VFIO_DMA_MAP_FLAG_READ": DmaMapFlag.READ,
    "VFIO_DMA_MAP_FLAG_WRITE": DmaMapFlag.WRITE,
    "VFIO_IOMMU_INFO_PGSIZES": IommuInfoFlag.PGSIZES,
    "VFIO_IOMMU_INFO_CAPS": IommuInfoFlag.CAPS,
    "VFIO_PCI_NUM_REGIONS": VFIO_PCI_NUM_REGIONS,
    **{f"VFIO_PCI_{r.name}_REGION_INDEX": r.value for r in PciRegion},
    **{f"VFIO_PCI_{i.name}_IRQ_INDEX": i.value for i in PciIrq},
}


# --- PCI configuration space (include/uapi/linux/pci_regs.h): what the VFIO model reads ---
PCI_BASE_ADDRESS_SPACE_IO = 0x01
PCI_BASE_ADDRESS_MEM_TYPE_MASK = 0x06
PCI_BASE_ADDRESS_MEM_TYPE_64 = 0x04
PCI_BASE_ADDRESS_MEM_PREFETCH = 0x08
PCI_ROM_ADDRESS_ENABLE = 0x01
PCI_CAP_ID_MSI = 0x05
PCI_CAP_ID_EXP = 0x10
PCI_CAP_ID_MSIX = 0x11
PCI_MSI_FLAGS = 2  # Message Control, from the capability's start
PCI_MSI_FLAGS_ENABLE = 0x0001
PCI_MSI_FLAGS_QMASK = 0x000E  # Multiple Message Capable
PCI_MSI_FLAGS_QSIZE = 0x0070  # Multiple Message Enable
PCI_MSI_FLAGS_64BIT = 0x0080
PCI_MSI_FLAGS_MASKBIT = 0x0100  # per-vector masking
PCI_MSI_ADDRESS_LO = 4
PCI_MSI_ADDRESS_HI = 8  # 64-bit capabilities only
PCI_MSI_DATA_32 = 8
PCI_MSI_DATA_64 = 12
PCI_MSI_MASK_32 = 12
PCI_MSI_MASK_64 = 16
PCI_MSIX_FLAGS = 2
PCI_MSIX_FLAGS_QSIZE = 0x07FF
PCI_MSIX_FLAGS_MASKALL = 0x4000
PCI_MSIX_FLAGS_ENABLE = 0x8000
PCI_MSIX_TABLE = 4
PCI_MSIX_PBA = 8
PCI_MSIX_TABLE_BIR = 0x00000007
PCI_MSIX_TABLE_OFFSET = 0xFFFFFFF8
PCI_EXP_DEVCAP = 4
PCI_EXP_DEVCAP_FLR = 0x10000000
PCI_EXP_DEVCTL = 8
PCI_EXP_DEVCTL_BCR_FLR = 0x8000

PCI_CONSTANTS: dict[str, int] = {
    name: value
    for name, value in list(globals().items())
    if name.startswith("PCI_") and isinstance(value, int) and name != "PCI_CONSTANTS"
}
