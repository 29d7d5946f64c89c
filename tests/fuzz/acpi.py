"""Fuzz target: the ACPI and MP table writers' inputs (kvmkit.arch.x86_64.acpi, mptable), as
Machine.build derives them from a checked configuration: the vCPU count, `--topology`
(APIC IDs), `--numa` nodes (SRAT, SLIT), the virtio devices and their transport (DSDT
devices, the PCI host bridge). The input is the configuration as text:

    VCPUS MEM_MIB mmio|pci RNG(0/1) NETS BOOT_TIMER(0/1)
    TOPOLOGY or -
    NUMA node spec, one per line (optional)

A configuration MachineConfig.validate_shapes refuses (UserError) is rejected; one it
accepts must produce tables that fit their area, checksums right."""

from __future__ import annotations

from kvmkit.arch.x86_64 import layout, mptable
from kvmkit.arch.x86_64.acpi import checksum, write_acpi_tables
from kvmkit.arch.x86_64.numa import NumaNode, numa_tables
from kvmkit.arch.x86_64.topology import Topology
from kvmkit.devices.legacy.power import AcpiPower
from kvmkit.devices.virtio.net import NetConfig
from kvmkit.errors import UserError
from kvmkit.memory import GuestMemory
from kvmkit.vmm.config import MachineConfig
from kvmkit.vmm.machine import Machine

_MEM = GuestMemory()
_MEM.add_anonymous(0, layout.ACPI_END)


def _config(text: str) -> MachineConfig | None:
    lines = text.splitlines()
    fields = (lines[0].split() if lines else []) + ["1", "128", "mmio", "0", "0", "0"]
    try:
        vcpus, mem_mib, nets, = int(fields[0]), int(fields[1]), int(fields[4])
        topology = None
        if len(lines) > 1 and lines[1].strip() not in ("", "-"):
            topology = Topology.parse(lines[1].strip())
        numa = [NumaNode.parse(spec) for spec in lines[2:10] if spec.strip()]
    except ValueError:
        return None  # the CLI's option parsing refuses it
    if not 0 <= nets <= 8 or fields[2] not in ("mmio", "pci"):
        return None
    return MachineConfig(
        vcpus=vcpus, mem_mib=mem_mib, topology=topology, numa=numa,
        virtio_transport=fields[2], rng=fields[3] == "1", boot_timer=fields[5] == "1",
        nets=[NetConfig(f"tap{i}") for i in range(nets)],
    )  # fmt: skip


def TestOneInput(data: bytes) -> None:
    cfg = _config(data[:4096].decode("utf-8", "replace"))
    if cfg is None:
        return
    try:
        cfg.validate_shapes()
    except UserError:
        return
    machine = Machine(cfg)
    apic_ids = cfg.cpu_topology.apic_ids()
    mem_size = cfg.mem_mib << 20
    rsdp = write_acpi_tables(
        _MEM, apic_ids, pm_port=AcpiPower.PM1_EVT_PORT, reset_port=AcpiPower.RESET_PORT,
        virtio_mmio=[(b, layout.VIRTIO_MMIO_SIZE, irq) for b, irq in machine.virtio_slots()],
        pci_window=(layout.PCI_MMIO_BASE, layout.PCI_MMIO_SIZE) if machine.uses_pci() else None,
        numa=numa_tables(cfg.numa, cfg.vcpus, mem_size) if cfg.numa else None,
    )  # fmt: skip
    assert checksum(_MEM.read(rsdp, 20)) == 0 and checksum(_MEM.read(rsdp, 36)) == 0
    if mptable.describes(apic_ids) is None:
        mptable.write_mptable(_MEM, apic_ids)
