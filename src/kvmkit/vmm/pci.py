"""The machine's PCI bus (when virtio devices use the PCI transport): the root on ports
0xCF8-0xCFF and the BAR window on the MMIO bus, MSI-X vectors as GSIs with irqfds, and
each virtio device as a `VirtioPci` function in the next slot."""

from __future__ import annotations

from kvmkit.arch.x86_64 import layout
from kvmkit.devices.bus import Bus
from kvmkit.devices.irq import EventFdIrq, IrqLine
from kvmkit.devices.pci.root import CONFIG_ADDRESS_PORT, CONFIG_PORTS, PciRoot, PciRootState
from kvmkit.devices.virtio.device import VirtioDevice
from kvmkit.devices.virtio.pci import BAR_SIZE, PciTransportState, VirtioPci
from kvmkit.kvm.routing import GsiRouter
from kvmkit.kvm.vm import Vm
from kvmkit.memory import GuestMemory
from kvmkit.snapshot.format import SnapshotError


class MachinePci:
    def __init__(self, vm: Vm, mem: GuestMemory, pio: Bus, mmio: Bus) -> None:
        self.vm = vm
        self.mem = mem
        self.root = PciRoot(layout.PCI_MMIO_BASE, layout.PCI_MMIO_SIZE)
        self.router = GsiRouter(vm)
        self.irqs: list[EventFdIrq] = []
        self.functions: list[VirtioPci] = []
        pio.insert(self.root.pio, CONFIG_ADDRESS_PORT, CONFIG_PORTS, "pci-conf1")
        mmio.insert(self.root.mmio, layout.PCI_MMIO_BASE, layout.PCI_MMIO_SIZE, "pci-bars")

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

    def close(self) -> None:
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
