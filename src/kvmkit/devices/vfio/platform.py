"""What a passthrough function needs of the machine it sits in. `kvmkit.vmm.pci.MachinePci`
provides it over the VM (memory slots, irqfds, the GSI routing table); the device code
never touches the KVM wrappers (ARCHITECTURE.md: devices reach KVM through eventfds)."""

from __future__ import annotations

import logging
import os
from typing import Protocol

from kvmkit.abi import vfio as abi
from kvmkit.guestlog import GuestLog
from kvmkit.vfio.handles import VfioDevice

log = logging.getLogger(__name__)
# Lines a guest can cause (its config and BAR writes), rate-limited (kvmkit.guestlog).
glog = GuestLog(log)


class VfioPlatform(Protocol):
    def map_mmio(self, gpa: int, size: int, host_addr: int) -> int:
        """Back guest-physical [gpa, gpa+size) with host memory at `host_addr` (a device
        BAR mapping) so guest accesses need no exit; returns a handle for unmap_mmio."""
        ...

    def unmap_mmio(self, handle: int) -> None: ...

    def allocate_gsi(self) -> int:
        """A GSI for one MSI/MSI-X vector (no route until set_msi)."""
        ...

    def set_msi(self, gsi: int, address: int, data: int) -> None:
        """Route `gsi` to the MSI message (address, data); (0, 0) removes the route."""
        ...

    def irqfd(
        self, fd: int, gsi: int, *, resample_fd: int | None = None, deassign: bool = False
    ) -> None:
        """Wire eventfd `fd` to `gsi` in the kernel (with `resample_fd`: level-triggered,
        `resample_fd` is signalled when the guest ends the interrupt)."""
        ...

    def intx_gsi(self, slot: int, pin: int) -> int:
        """The GSI the firmware tables route INTx `pin` (1-4) of bus-0 slot `slot` to."""
        ...


def new_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def eventfd_pending(fd: int) -> bool:
    """Whether eventfd `fd` has been signalled, leaving it signalled (a peek)."""
    try:
        value = os.eventfd_read(fd)
    except BlockingIOError:
        return False
    os.eventfd_write(fd, value)
    return True


def irqs_off(device: VfioDevice, index: abi.PciIrq) -> None:
    """Turn VFIO's interrupt `index` (INTx, MSI, MSI-X) off: SET_IRQS TRIGGER with count 0.
    A failure is only logged: nothing more can be done about it."""
    try:
        device.set_irqs(index, abi.IrqSetFlag.ACTION_TRIGGER, count=0)
    except OSError as err:
        glog.warning("%s: turning %s off failed: %s", device.name, index.name, err)
