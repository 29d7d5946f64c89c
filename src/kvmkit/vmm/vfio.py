"""A machine's passthrough devices (`MachineConfig.vfio`): one type-1 VFIO container, the
IOMMU groups of the devices joined to it, all guest RAM DMA-mapped at its guest-physical
address (IOVA = GPA: the guest has no IOMMU, so its drivers program guest-physical addresses
into the device), and each device as a `VfioPci` on the machine's PCI bus.

The order is VFIO's (Documentation/driver-api/vfio.rst, "VFIO Usage Example"): open the
container, check the API version and the IOMMU model, open each group and check it is
viable, add it to the container, set the IOMMU model (only possible once a group is in),
map DMA, then get the device file descriptors. Each group is also announced to KVM through
its KVM-VFIO device (Documentation/virt/kvm/devices/vfio.rst), as QEMU and Cloud Hypervisor
do: KVM then knows the VM may have non-coherent DMA and honours the guest's memory types
(on Intel hosts whose IOMMU cannot enforce snooping). Every failure before the VM runs is one line
for the user (`VfioHostError`, exit status 2) and releases what was opened; `close()`
releases everything (device fds, groups, then the container, which drops the DMA maps and
unpins guest RAM), and a process that dies releases it all through its file descriptors.
"""

from __future__ import annotations

import ctypes
import errno
import logging

from kvmkit.abi import vfio as abi
from kvmkit.abi.constants import (
    KVM_DEV_TYPE_VFIO,
    KVM_DEV_VFIO_GROUP,
    KVM_DEV_VFIO_GROUP_ADD,
    KVM_DEV_VFIO_GROUP_DEL,
)
from kvmkit.kvm.device import KvmDevice
from kvmkit.kvm.errors import KvmError, VfioError
from kvmkit.memory import GuestMemory
from kvmkit.vfio.handles import CONTAINER_PATH, VfioContainer, VfioDevice, VfioGroup
from kvmkit.vfio.sysfs import (
    HostPciDevice,
    VfioHostError,
    check_assignable,
    group_devices,
    not_viable_message,
)
from kvmkit.vmm.pci import MachinePci

log = logging.getLogger(__name__)


def _explain(what: str, err: OSError) -> VfioHostError:
    advice = {
        errno.EBUSY: "it is in use by another process (another VMM?)",
        errno.EACCES: "no permission (run as root or give your user the device node)",
        errno.EPERM: "no permission (run as root or give your user the device node)",
        errno.ENOENT: "it does not exist (is the vfio module loaded?)",
        errno.ENOMEM: "pinning guest RAM needs a locked-memory limit of at least the guest's "
        "memory (ulimit -l, or run as root)",
    }.get(err.errno or 0, "")
    return VfioHostError(f"{what}: {err}" + (f": {advice}" if advice else ""))


class MachineVfio:
    def __init__(self, bdfs: list[str], mem: GuestMemory, pci: MachinePci) -> None:
        self.bdfs = bdfs
        self.mem = mem
        self.pci = pci
        self.container: VfioContainer | None = None
        self.groups: dict[int, VfioGroup] = {}
        self.model = 0
        self.kvm_vfio: KvmDevice | None = None
        self._announced: list[int] = []  # group fds the KVM-VFIO device holds

    def open(self) -> None:
        """Open, check, map and attach everything; VfioHostError (all released) if not."""
        try:
            hosts = [check_assignable(b) for b in self.bdfs]
            self._open_container()
            for host in hosts:
                self._join_group(host)
            assert self.container is not None
            try:
                self.container.set_iommu(self.model)
            except VfioError as err:
                raise _explain("VFIO_SET_IOMMU (type-1)", err) from None
            self._map_guest_ram()
            self._announce_groups()
            for host in hosts:
                self._attach(host)
        except BaseException:
            self.close()
            raise

    def _open_container(self) -> None:
        try:
            self.container = container = VfioContainer()
        except VfioError as err:
            raise _explain(f"cannot open {CONTAINER_PATH}", err) from None
        version = container.api_version()
        if version != abi.VFIO_API_VERSION:
            raise VfioHostError(f"{CONTAINER_PATH} speaks VFIO API {version}, kvmkit needs 0")
        # Type-1 v2 (unmap semantics fixed) where the kernel has it, type-1 otherwise.
        for model in (abi.VFIO_TYPE1v2_IOMMU, abi.VFIO_TYPE1_IOMMU):
            if container.check_extension(model) > 0:
                self.model = model
                return
        raise VfioHostError(
            "the host's VFIO has no type-1 IOMMU driver (load vfio_iommu_type1; docs/vfio.md)"
        )

    def _join_group(self, host: HostPciDevice) -> None:
        assert host.group is not None and self.container is not None
        if host.group in self.groups:
            return
        try:
            group = VfioGroup(host.group)
        except VfioError as err:
            raise _explain(f"--vfio {host.bdf}: cannot open /dev/vfio/{host.group}", err) from None
        self.groups[host.group] = group
        if not group.status() & abi.GroupFlag.VIABLE:
            message = not_viable_message(host.group, group_devices(host.group))
            raise VfioHostError(f"--vfio {host.bdf}: {message}")
        try:
            group.set_container(self.container)
        except VfioError as err:
            raise _explain(f"--vfio {host.bdf}: IOMMU group {host.group}", err) from None

    def _map_guest_ram(self) -> None:
        assert self.container is not None
        info = self.container.iommu_info()
        for region in self.mem.regions:
            start, end = region.guest_phys_addr, region.end - 1
            if info.iova_ranges and not any(
                r.start <= start and end <= r.end for r in info.iova_ranges
            ):
                raise VfioHostError(
                    f"guest RAM {start:#x}-{end:#x} is outside the IOMMU's usable addresses "
                    + ", ".join(f"{r.start:#x}-{r.end:#x}" for r in info.iova_ranges)
                )
            try:
                self.container.map_dma(region.host_addr, region.guest_phys_addr, region.size)
            except VfioError as err:
                raise _explain(
                    f"VFIO_IOMMU_MAP_DMA of guest RAM {start:#x}+{region.size:#x}", err
                ) from None

    def _announce_groups(self) -> None:
        try:
            self.kvm_vfio = self.pci.vm.create_device(KVM_DEV_TYPE_VFIO)
            for group in self.groups.values():
                fd = ctypes.c_int32(group.fd)
                self.kvm_vfio.set_attr(KVM_DEV_VFIO_GROUP, KVM_DEV_VFIO_GROUP_ADD, fd)
                self._announced.append(group.fd)
        except KvmError as err:
            raise VfioHostError(f"the KVM-VFIO device: {err}") from None

    def _attach(self, host: HostPciDevice) -> None:
        group = self.groups[host.group or 0]
        try:
            fd = group.device_fd(host.bdf)
        except VfioError as err:
            raise _explain(f"--vfio {host.bdf}: VFIO_GROUP_GET_DEVICE_FD", err) from None
        device = VfioDevice(fd, host.bdf)
        try:
            self.pci.add_vfio(device)
        except ValueError as err:  # BAR windows full, an I/O BAR without a window, ...
            device.close()
            raise VfioHostError(f"--vfio {host.bdf}: {err}") from None
        except OSError as err:  # VFIO refused a region or IRQ query, KVM an irqfd
            device.close()
            raise _explain(f"--vfio {host.bdf}", err) from None
        log.info("--vfio %s (%s): attached", host.bdf, host.ids)

    def close(self) -> None:
        """Release everything; safe to call more than once and after a partial open."""
        for function in self.pci.vfio:
            function.close()
        self.pci.vfio.clear()
        if self.kvm_vfio is not None:
            # KVM holds a reference to each group it was told about until told otherwise
            # (or until the VM goes): take them back so the groups close now.
            for fd in self._announced:
                try:
                    value = ctypes.c_int32(fd)
                    self.kvm_vfio.set_attr(KVM_DEV_VFIO_GROUP, KVM_DEV_VFIO_GROUP_DEL, value)
                except KvmError:
                    pass
            self._announced.clear()
            self.kvm_vfio.close()
            self.kvm_vfio = None
        for group in self.groups.values():
            try:
                if group.fd >= 0 and group.status() & abi.GroupFlag.CONTAINER_SET:
                    group.unset_container()
            except VfioError:
                pass
            group.close()
        self.groups.clear()
        if self.container is not None:
            self.container.close()
            self.container = None
