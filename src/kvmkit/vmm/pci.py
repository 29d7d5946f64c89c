"""The machine's PCI bus (when virtio devices use the PCI transport, or with passthrough
devices): the root on ports 0xCF8-0xCFF and the BAR window on the MMIO bus (with an I/O
window on the port bus for passthrough I/O BARs), MSI-X vectors as GSIs with irqfds, each
virtio device as a `VirtioPci` function and each VFIO device as a `VfioPci` function in the
next slot.

For VFIO functions this is their `VfioPlatform`: BAR pages become KVM memory slots numbered
from DEVICE_SLOT_BASE (GuestMemory numbers RAM slots from 0), interrupts irqfds and routes.
"""

from __future__ import annotations

import threading

from kvmkit.abi.constants import Cap
from kvmkit.arch.x86_64 import layout
from kvmkit.devices.bus import Bus
from kvmkit.devices.irq import EventFdIrq, IrqLine
from kvmkit.devices.pci.root import CONFIG_ADDRESS_PORT, CONFIG_PORTS, PciRoot, PciRootState
from kvmkit.devices.vfio.pci import VfioPci
from kvmkit.devices.virtio.device import VirtioDevice
from kvmkit.devices.virtio.pci import BAR_SIZE, PciTransportState, VirtioPci
from kvmkit.kvm.routing import GsiRouter
from kvmkit.kvm.vm import Vm
from kvmkit.memory import GuestMemory
from kvmkit.snapshot.format import SnapshotError
from kvmkit.vfio.handles import VfioDevice

# KVM memory slots for passthrough BAR pages: well above the few RAM slots, and below
# KVM_CAP_NR_MEMSLOTS (509 on old kernels, 32764 on 6.x).
DEVICE_SLOT_BASE = 64


class MachinePci:
    def __init__(
        self, vm: Vm, mem: GuestMemory, pio: Bus, mmio: Bus, *, io_window: bool = False
    ) -> None:
        self.vm = vm
        self.mem = mem
        window = (layout.PCI_IO_BASE, layout.PCI_IO_SIZE) if io_window else None
        self.root = PciRoot(layout.PCI_MMIO_BASE, layout.PCI_MMIO_SIZE, window)
        self.router = GsiRouter(vm)
        self.irqs: list[EventFdIrq] = []
        self.functions: list[VirtioPci] = []
        self.vfio: list[VfioPci] = []
        self._slots_lock = threading.Lock()
        self._free_slots: set[int] = set()
        self._next_slot = DEVICE_SLOT_BASE
        self._max_slots = vm.check_extension(Cap.NR_MEMSLOTS) or 509
        pio.insert(self.root.pio, CONFIG_ADDRESS_PORT, CONFIG_PORTS, "pci-conf1")
        mmio.insert(self.root.mmio, layout.PCI_MMIO_BASE, layout.PCI_MMIO_SIZE, "pci-bars")
        if self.root.io is not None and window is not None:
            pio.insert(self.root.io, window[0], window[1], "pci-io")

    def add_virtio(self, device: VirtioDevice) -> VirtioPci:
        """`device` in the next slot: one MSI-X vector (GSI + irqfd) per queue plus one for
        configuration changes, its BAR placed in the window, notifications as ioeventfds."""
        gsis = [self.router.allocate() for _ in range(len(device.queues) + 1)]
        lines: list[IrqLine] = []
        for gsi in gsis:
            irq = EventFdIrq(gsi)
            self.irqs.append(irq)
            self.vm.irqfd(irq.fd, gsi)
            lines.append(irq)
        function = VirtioPci(
            device, self.mem, bar_address=self.root.allocate_bar(BAR_SIZE), gsis=gsis,
            lines=lines, routing=self.router,
        )  # fmt: skip
        self.root.add(function)
        function.attach(self.vm)
        self.functions.append(function)
        return function

    def add_vfio(self, device: VfioDevice) -> VfioPci:
        """The VFIO device in the next slot, its BARs placed in the windows."""
        function = VfioPci(
            device, self, allocate_mem=self.root.allocate_bar,
            allocate_io=self.root.allocate_io_bar if self.root.io_window else None,
        )  # fmt: skip
        try:
            slot = self.root.add(function)
            function.attach(slot)
        except BaseException:
            function.close()
            raise
        self.vfio.append(function)
        return function

    # -- VfioPlatform
    def map_mmio(self, gpa: int, size: int, host_addr: int) -> int:
        with self._slots_lock:
            if self._free_slots:
                slot = min(self._free_slots)
                self._free_slots.discard(slot)
            elif self._next_slot < self._max_slots:
                slot = self._next_slot
                self._next_slot += 1
            else:
                raise OSError(f"no KVM memory slot left for a BAR mapping at {gpa:#x}")
            try:
                self.vm.set_user_memory_region(slot, gpa, size, host_addr)
            except OSError:
                self._free_slots.add(slot)
                raise
        return slot

    def unmap_mmio(self, handle: int) -> None:
        with self._slots_lock:
            self.vm.set_user_memory_region(handle, 0, 0, 0)  # size 0 deletes the slot
            self._free_slots.add(handle)

    def allocate_gsi(self) -> int:
        return self.router.allocate()

    def set_msi(self, gsi: int, address: int, data: int) -> None:
        self.router.set_msi(gsi, address, data)

    def irqfd(
        self, fd: int, gsi: int, *, resample_fd: int | None = None, deassign: bool = False
    ) -> None:
        self.vm.irqfd(fd, gsi, resample_fd=resample_fd, deassign=deassign)

    def intx_gsi(self, slot: int, pin: int) -> int:
        return layout.pci_intx_gsi(slot, pin)

    def close(self) -> None:
        for function in self.vfio:
            function.close()
        self.vfio.clear()
        for irq in self.irqs:
            irq.close()
        self.irqs.clear()

    # -- snapshots: typed plain data (the routes and ioeventfds are rebuilt from it)
    def save(self) -> tuple[PciRootState, list[PciTransportState]]:
        return self.root.save(), [f.save() for f in self.functions]

    def restore(self, root: PciRootState, functions: list[PciTransportState]) -> None:
        if len(functions) != len(self.functions):
            raise SnapshotError("snapshot state: PCI state does not match the virtio devices")
        self.root.restore(root)
        for function, saved in zip(self.functions, functions, strict=True):
            function.restore(saved)
