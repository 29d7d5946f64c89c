"""Intel MultiProcessor Specification 1.4 tables: how a guest without ACPI (or with `acpi=off`)
finds its vCPUs and the IOAPIC.

Linux looks for the MP floating pointer in the first KiB of the EBDA, the last KiB of base
memory (639 KiB) and 0xF0000-0xFFFFF (MP spec 4.0; arch/x86/kernel/mpparse.c). kvmkit puts
it at `layout.MPTABLE_ADDR` (0x9FC00, the last KiB below 640 KiB) with the configuration
table right behind it:

    floating pointer (16 bytes, MP spec 4.1)
    configuration table header (44 bytes, 4.2)
    processor entries, one per vCPU with its APIC ID, vCPU 0 the BSP (4.3.1)
    bus entry: bus 0 "ISA" (4.3.2)
    I/O APIC entry: id one past the highest APIC ID, version 0x11, at layout.IOAPIC_ADDR
        (4.3.3)
    I/O interrupt entries: ISA IRQ 0 -> INTIN 2 (KVM routes the PIT to IOAPIC pin 2),
        IRQ 1, 3..15 -> INTIN of the same number (4.3.4)
    local interrupt entries: ExtINT -> LINT0 of every local APIC, NMI -> LINT1 (4.3.5)

The MP table names APICs with 8-bit IDs and must fit the reserved last KiB below 640 KiB
(40 vCPUs): `describes` says whether it can describe a machine. Where it cannot (more vCPUs,
or APIC IDs an xAPIC cannot hold), kvmkit writes none and the guest uses ACPI's MADT, as
Linux does whenever ACPI is there.
"""

from __future__ import annotations

import struct

from kvmkit.arch.x86_64 import layout
from kvmkit.arch.x86_64.topology import MAX_XAPIC_ID
from kvmkit.memory.guest import GuestMemory

MP_SPEC_REV = 4  # version 1.4
APIC_VERSION = 0x14  # integrated local APIC (xAPIC)
IOAPIC_VERSION = 0x11
# CPU signature and feature flags of the processor entries: family 6 with FPU and APIC
# (MP spec 4.3.1 says they come from CPUID; Linux only prints them).
CPU_SIGNATURE = 0x600
CPU_FEATURES = (1 << 0) | (1 << 9)  # FPU, APIC

ENTRY_PROCESSOR = 0
ENTRY_BUS = 1
ENTRY_IOAPIC = 2
ENTRY_IO_INTERRUPT = 3
ENTRY_LOCAL_INTERRUPT = 4

CPU_ENABLED = 1 << 0
CPU_BOOTSTRAP = 1 << 1
IOAPIC_ENABLED = 1 << 0

INT_TYPE_INT = 0
INT_TYPE_NMI = 1
INT_TYPE_EXTINT = 3

ISA_BUS_ID = 0
ISA_IRQS = 16
ALL_LAPICS = 0xFF

_FLOATING = struct.Struct("<4sIBBB5s")  # MP spec table 4-1
_HEADER = struct.Struct("<4sHBB8s12sIHHIHBB")  # table 4-2
_PROCESSOR = struct.Struct("<BBBBII8s")  # table 4-4
_BUS = struct.Struct("<BB6s")  # table 4-8
_IOAPIC = struct.Struct("<BBBBI")  # table 4-10
_INTERRUPT = struct.Struct("<BBHBBBB")  # tables 4-12 and 4-14

OEM_ID = b"KVMKIT  "
PRODUCT_ID = b"kvmkit 0.1  "


def _checksum(data: bytes | bytearray) -> int:
    """The byte that makes the sum of `data` (with it) zero modulo 256."""
    return (-sum(data)) & 0xFF


def isa_irq_to_pin(irq: int) -> int:
    """IOAPIC input of ISA IRQ `irq`: IRQ 0 (PIT) is wired to pin 2, the rest 1:1 (the
    routing of KVM's in-kernel irqchip, and the override the ACPI MADT announces)."""
    return 2 if irq == 0 else irq


def mptable_size(nvcpus: int) -> int:
    interrupts = (ISA_IRQS - 1) + 2  # IRQ 2 (cascade) has no entry; ExtINT and NMI
    return (
        _FLOATING.size
        + _HEADER.size
        + nvcpus * _PROCESSOR.size
        + _BUS.size
        + _IOAPIC.size
        + interrupts * _INTERRUPT.size
    )


def describes(apic_ids: list[int], addr: int = layout.MPTABLE_ADDR) -> str | None:
    """None when an MP table at `addr` can describe vCPUs with `apic_ids`; else why not."""
    if not apic_ids:
        return "no vCPUs"
    if max(apic_ids) + 1 > MAX_XAPIC_ID:  # the IOAPIC takes the ID after the highest
        return f"APIC ID {max(apic_ids)} needs x2APIC (the MP table has 8-bit APIC IDs)"
    end = addr + mptable_size(len(apic_ids))
    if end > layout.LOW_RAM_END:
        return (
            f"{len(apic_ids)} vCPUs take {mptable_size(len(apic_ids))} bytes, more than fit "
            f"at {addr:#x} below {layout.LOW_RAM_END:#x}"
        )
    return None


def build_mptable(apic_ids: list[int], addr: int = layout.MPTABLE_ADDR) -> bytes:
    """The floating pointer and configuration table as they must appear at `addr`, for vCPUs
    with `apic_ids` (vCPU 0 is the BSP)."""
    if not apic_ids or len(set(apic_ids)) != len(apic_ids) or min(apic_ids) < 0:
        raise ValueError("the MP table needs at least one vCPU and distinct APIC IDs")
    if max(apic_ids) + 1 > MAX_XAPIC_ID:
        raise ValueError(f"the MP table cannot name APIC ID {max(apic_ids)} (8-bit IDs)")
    ioapic_id = max(apic_ids) + 1
    entries = bytearray()
    count = 0
    for cpu, apic_id in enumerate(apic_ids):
        flags = CPU_ENABLED | (CPU_BOOTSTRAP if cpu == 0 else 0)
        entries += _PROCESSOR.pack(
            ENTRY_PROCESSOR, apic_id, APIC_VERSION, flags, CPU_SIGNATURE, CPU_FEATURES, bytes(8)
        )
        count += 1
    entries += _BUS.pack(ENTRY_BUS, ISA_BUS_ID, b"ISA   ")
    entries += _IOAPIC.pack(
        ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED, layout.IOAPIC_ADDR
    )
    count += 2
    for irq in range(ISA_IRQS):
        if irq == 2:
            continue  # the cascade input of the 8259 pair: nothing to route
        # flags 0: polarity and trigger "conform to the bus" (ISA: edge, active high).
        entries += _INTERRUPT.pack(
            ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, ISA_BUS_ID, irq, ioapic_id, isa_irq_to_pin(irq)
        )
        count += 1
    entries += _INTERRUPT.pack(
        ENTRY_LOCAL_INTERRUPT, INT_TYPE_EXTINT, 0, ISA_BUS_ID, 0, ALL_LAPICS, 0
    )
    entries += _INTERRUPT.pack(ENTRY_LOCAL_INTERRUPT, INT_TYPE_NMI, 0, ISA_BUS_ID, 0, ALL_LAPICS, 1)
    count += 2

    table_addr = addr + _FLOATING.size
    length = _HEADER.size + len(entries)
    header = bytearray(
        _HEADER.pack(
            b"PCMP", length, MP_SPEC_REV, 0, OEM_ID, PRODUCT_ID, 0, 0, count,
            layout.LAPIC_ADDR, 0, 0, 0,
        )
    )  # fmt: skip
    table = header + entries
    table[7] = _checksum(table)

    # Floating pointer: length in 16-byte units (1), feature byte 1 = 0 (a configuration
    # table is present), feature byte 2 bit 7 IMCRP = 0 (virtual wire mode, no IMCR).
    floating = bytearray(_FLOATING.pack(b"_MP_", table_addr, 1, MP_SPEC_REV, 0, bytes(5)))
    floating[10] = _checksum(floating)
    return bytes(floating + table)


def write_mptable(mem: GuestMemory, apic_ids: list[int], addr: int = layout.MPTABLE_ADDR) -> int:
    """Write the MP tables at `addr` (16-byte aligned, below 640 KiB) and return the address
    just past them. At the default address (the last KiB of base memory) that is room for
    40 vCPUs (`describes` says whether a machine fits)."""
    if addr % 16:
        raise ValueError(f"MP floating pointer address {addr:#x} is not 16-byte aligned")
    data = build_mptable(apic_ids, addr)
    end = addr + len(data)
    if end > layout.LOW_RAM_END:
        raise ValueError(
            f"MP table for {len(apic_ids)} vCPUs ({len(data)} bytes at {addr:#x}) does not "
            f"fit below {layout.LOW_RAM_END:#x}"
        )
    mem.write(addr, data)
    return end
