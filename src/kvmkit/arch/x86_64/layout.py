"""Guest-physical memory map of a Linux microVM (Firecracker's layout, with ACPI).

    0x0000_0000 +---------------------------------+
                | real-mode IVT, BDA              |
    0x0000_0500 | boot GDT                        |  BOOT_GDT_ADDR
    0x0000_0520 | boot IDT (empty)                |  BOOT_IDT_ADDR
    0x0000_6000 | PVH hvm_start_info + memmap     |  PVH_INFO_ADDR, PVH_MEMMAP_ADDR
    0x0000_6400 | PVH module list (initrd)        |  PVH_MODLIST_ADDR
    0x0000_7000 | boot_params ("zero page")       |  ZERO_PAGE_ADDR
    0x0000_8ff0 | boot stack top                  |  BOOT_STACK_TOP
    0x0000_9000 | PML4, PDPT, PD (identity 1 GiB) |  PML4_ADDR ...
    0x0002_0000 | kernel command line (<= 64 KiB)  |  CMDLINE_ADDR, CMDLINE_MAX
    0x0009_fc00 | MP table (in the EBDA)          |  MPTABLE_ADDR
    0x000a_0000 | legacy VGA / ROM hole (not RAM) |
    0x000e_0000 | ACPI RSDP and tables            |  ACPI_ADDR .. 0x000f_ffff
    0x0010_0000 | kernel (bzImage protected-mode  |  KERNEL_LOAD_ADDR
                |   part, or vmlinux segments)    |
                | ... RAM ...                     |
                | initrd (top of low RAM)         |
    0xc000_0000 +---------------------------------+  MMIO_GAP_START (3 GiB)
                | device MMIO (virtio-mmio, PCI   |
                |   BARs, IOAPIC 0xfec0_0000,     |
                |   LAPIC 0xfee0_0000)            |
    0x1_0000_0000 +-------------------------------+  RAM above 4 GiB when mem > 3 GiB
"""

from __future__ import annotations

BOOT_GDT_ADDR = 0x500
BOOT_IDT_ADDR = 0x520
PVH_INFO_ADDR = 0x6000
PVH_MEMMAP_ADDR = 0x6040
PVH_MEMMAP_MAX = 32
# hvm_modlist_entry array (the initrd), after the memmap (0x6040 + 32 * 24 = 0x6340).
PVH_MODLIST_ADDR = 0x6400
PVH_MODLIST_MAX = 8
ZERO_PAGE_ADDR = 0x7000
BOOT_STACK_TOP = 0x8FF0
PML4_ADDR = 0x9000
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
EBDA_START = 0x9FC00
MPTABLE_ADDR = EBDA_START
LOW_RAM_END = 0xA0000
ACPI_ADDR = 0xE0000
ACPI_END = 0x100000
KERNEL_LOAD_ADDR = 0x100000
MMIO_GAP_START = 0xC000_0000
MMIO_GAP_END = 0x1_0000_0000
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000
# Device MMIO windows inside the gap, below the IOAPIC.
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_SIZE = 0x1000  # one page of registers per virtio-mmio device, back to back
# Their interrupts: free ISA IRQs (edge, active high both for the MP table and ACPI).  Not 9:
# that is the ACPI SCI, which the MADT overrides to level-triggered (acpi.SCI_IRQ), and Linux
# refuses an edge-triggered _CRS Interrupt on a pin already set up as level ("virtio-mmio
# LNRO0005:03: error -EINVAL: IRQ index 0 not found": the fourth device never probed).
VIRTIO_MMIO_IRQS = (5, 6, 7, 10, 11, 12, 13, 14, 15)
PCI_MMIO_BASE = 0xE000_0000
PCI_MMIO_SIZE = 0x1000_0000 - 0x0100_0000  # stops short of 0xEF00_0000
# Port window for the I/O BARs of passthrough devices (the host bridge's _CRS announces it);
# far above the legacy ports kvmkit emulates (serial 0x3F8, ACPI PM 0x600, 0xCF8 config).
PCI_IO_BASE = 0xC000
PCI_IO_SIZE = 0x4000
# PCI INTx lines: IOAPIC inputs 16-23, after the ISA IRQs, level-triggered and active low
# as the DSDT's _PRT routes them (PCI Local Bus 3.0 §2.2.6; ACPI 6.5 §6.2.13).
PCI_INTX_GSI_BASE = 16
PCI_INTX_GSIS = 8

# Identity-map the first GiB at boot: enough for the kernel, its page tables and the
# zero page; Linux builds its own tables right away (boot protocol, 64-bit entry).
BOOT_IDENTITY_MAP = 1 << 30


def pci_intx_gsi(slot: int, pin: int) -> int:
    """The GSI of INTx pin `pin` (1 = INTA .. 4 = INTD) of the device in bus-0 slot `slot`:
    the pins rotate over the eight inputs by slot (the usual swizzle), so neighbouring
    devices do not share a line."""
    if not 0 <= slot < 32 or not 1 <= pin <= 4:
        raise ValueError(f"no INTx line for slot {slot}, pin {pin}")
    return PCI_INTX_GSI_BASE + (slot + pin - 1) % PCI_INTX_GSIS


def ram_ranges(mem_size: int) -> list[tuple[int, int]]:
    """(start, size) of guest RAM for `mem_size` bytes: below the 3 GiB MMIO gap, the rest
    from 4 GiB."""
    if mem_size <= 0:
        raise ValueError("memory size must be positive")
    low = min(mem_size, MMIO_GAP_START)
    ranges = [(0, low)]
    if mem_size > low:
        ranges.append((MMIO_GAP_END, mem_size - low))
    return ranges


def ram_pieces(offset: int, size: int, mem_size: int) -> list[tuple[int, int]]:
    """The guest-physical (start, size) pieces of RAM bytes [offset, offset + size), counting
    RAM from its lowest address upwards (the ranges of `ram_ranges(mem_size)` one after the
    other): how a guest NUMA node's share of memory lands around the MMIO gap."""
    if offset < 0 or size <= 0 or offset + size > mem_size:
        raise ValueError(f"RAM bytes {offset:#x}+{size:#x} outside {mem_size:#x} bytes of RAM")
    pieces = []
    seen = 0
    for start, length in ram_ranges(mem_size):
        lo, hi = max(offset, seen), min(offset + size, seen + length)
        if lo < hi:
            pieces.append((start + lo - seen, hi - lo))
        seen += length
    return pieces
