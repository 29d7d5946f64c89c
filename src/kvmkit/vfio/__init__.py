"""VFIO on the host side: sysfs checks (`sysfs`) and typed handles on the container, group
and device file descriptors (`handles`). The PCI function a guest sees is
`kvmkit.devices.vfio`; the wiring into a machine is `kvmkit.vmm.vfio`."""

from kvmkit.kvm.errors import VfioError
from kvmkit.vfio.handles import IrqInfo, RegionInfo, VfioContainer, VfioDevice, VfioGroup
from kvmkit.vfio.sysfs import VfioHostError, check_assignable, parse_bdf

__all__ = [
    "IrqInfo",
    "RegionInfo",
    "VfioContainer",
    "VfioDevice",
    "VfioError",
    "VfioGroup",
    "VfioHostError",
    "check_assignable",
    "parse_bdf",
]
