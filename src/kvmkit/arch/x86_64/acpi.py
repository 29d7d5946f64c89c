"""ACPI tables for a microVM (ACPI 6.5), written into [ACPI_ADDR, ACPI_END).

kvmkit describes a classic ACPI PC with PM1a event/control blocks (kvmkit.devices.legacy.power)
rather than a hardware-reduced one: with HW_REDUCED_ACPI Linux installs no legacy PIC and maps
no ISA IRQs (acpi_generic_reduced_hw_init), and the 8250 at IRQ 4 then fails to get its
interrupt unless it is described in AML (seen booting Debian's 6.1 kernel: user-space console
output never left the guest). No PM timer and no GPE blocks; the SCI (IRQ 9) is never raised.

    layout.ACPI_ADDR  RSDP    (rev 2, 36 bytes; Linux scans 0xE0000-0xFFFFF for it, and the
                               boot protocol's acpi_rsdp_addr / PVH rsdp_paddr point at it)
                      XSDT    -> FADT, MADT
                      FADT    (rev 6.5, RESET_REG_SUP, PM1a blocks, FACS, X_DSDT -> DSDT)
                      FACS    (64 bytes, 64-byte aligned; no firmware waking vector)
                      DSDT    (AML: Name (_S5_, Package (4) {5, 5, 0, 0}))
                      MADT    (local APIC or x2APIC per vCPU, IOAPIC, overrides, NMI)
                      SRAT    (guest NUMA only: CPU and memory affinity)
                      SLIT    (guest NUMA only: distances between the nodes)

Section numbers below are ACPI 6.5's.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvmkit.arch.x86_64 import layout
from kvmkit.devices.legacy.power import RESET_VALUE, S5_SLEEP_TYPE
from kvmkit.memory.guest import GuestMemory

OEM_ID = b"KVMKIT"
OEM_TABLE_ID = b"KVMKITVM"
OEM_REVISION = 1
CREATOR_ID = b"KVMK"
CREATOR_REVISION = 1

HEADER = struct.Struct("<4sIBB6s8sI4sI")  # 5.2.6, 36 bytes
RSDP = struct.Struct("<8sB6sBIIQB3s")  # 5.2.5.3, 36 bytes
assert HEADER.size == 36 and RSDP.size == 36

# Generic Address Structure (5.2.3.2)
GAS = struct.Struct("<BBBBQ")
SPACE_SYSTEM_IO = 1
ACCESS_BYTE = 1

# FADT (5.2.9, table 5.9): offsets of the fields kvmkit sets; length 276 (revision 6).
FADT_REVISION = 6
FADT_MINOR_REVISION = 5
FADT_LENGTH = 276
FADT_FIRMWARE_CTRL = 36
FADT_DSDT = 40
FADT_SCI_INT = 46
FADT_PM1A_EVT_BLK = 56
FADT_PM1A_CNT_BLK = 64
FADT_PM1_EVT_LEN = 88
FADT_PM1_CNT_LEN = 89
FADT_CENTURY = 108
FADT_IAPC_BOOT_ARCH = 109
FADT_FLAGS = 112
FADT_RESET_REG = 116
FADT_RESET_VALUE = 128
FADT_MINOR_VERSION = 131
FADT_X_FIRMWARE_CTRL = 132
FADT_X_DSDT = 140
FADT_SLEEP_CONTROL_REG = 244
FADT_SLEEP_STATUS_REG = 256
FADT_HYPERVISOR_VENDOR = 268
# Fixed feature flags (table 5.10)
FADT_F_WBINVD = 1 << 0
FADT_F_PWR_BUTTON = 1 << 4  # power button is a control-method device (there is none)
FADT_F_SLP_BUTTON = 1 << 5
FADT_F_RESET_REG_SUP = 1 << 10
FADT_F_HW_REDUCED_ACPI = 1 << 20
# IA-PC boot architecture flags (5.2.9.3, table 5.11)
IAPC_LEGACY_DEVICES = 1 << 0
IAPC_8042 = 1 << 1
IAPC_VGA_NOT_PRESENT = 1 << 2
CMOS_CENTURY_INDEX = 0x32  # the RTC's century register (kvmkit.devices.legacy.rtc)

# MADT (5.2.12)
MADT_REVISION = 5
MADT_PCAT_COMPAT = 1 << 0
MADT_LOCAL_APIC = 0  # 5.2.12.2
MADT_IOAPIC = 1  # 5.2.12.3
MADT_INTERRUPT_OVERRIDE = 2  # 5.2.12.5
MADT_LOCAL_APIC_NMI = 4  # 5.2.12.7
MADT_LOCAL_X2APIC = 9  # 5.2.12.12
MADT_LOCAL_X2APIC_NMI = 0xA  # 5.2.12.13
LAPIC_ENABLED = 1 << 0
# 5.2.12.12: processors with APIC IDs below 255 are described by Local APIC structures, the
# others by Local x2APIC structures (8-bit APIC ID and processor UID fields).
X2APIC_FROM = 255
ALL_PROCESSORS_UID8 = 0xFF  # 5.2.12.7: the NMI structure applies to every processor
ALL_PROCESSORS_UID32 = 0xFFFF_FFFF  # 5.2.12.13, the same for x2APIC processors

# SRAT (5.2.16) and SLIT (5.2.17)
SRAT_REVISION = 3
SRAT_LOCAL_APIC_AFFINITY = 0  # 5.2.16.1, 16 bytes
SRAT_MEMORY_AFFINITY = 1  # 5.2.16.2, 40 bytes
SRAT_X2APIC_AFFINITY = 2  # 5.2.16.3, 24 bytes
SRAT_ENABLED = 1 << 0
SLIT_REVISION = 1
SLIT_LOCAL = 10  # 5.2.17: the distance of a locality to itself is 10
SLIT_REMOTE = 20  # what QEMU and Cloud Hypervisor give other nodes unless told otherwise
# MPS INTI flags (table 5.26): polarity bits 1:0, trigger mode bits 3:2
INTI_CONFORMS = 0
INTI_ACTIVE_HIGH = 0b01
INTI_LEVEL = 0b11 << 2

SCI_IRQ = 9
DSDT_REVISION = 2  # 64-bit AML integers
ALIGN = 16


def checksum(data: bytes | bytearray) -> int:
    """The byte that makes `data` (including it) sum to 0 modulo 256 (5.2.5.3, 5.2.6)."""
    return (-sum(data)) & 0xFF


def _pad(raw: bytes, width: int) -> bytes:
    return raw[:width].ljust(width, b" ")


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    """A system description table: the 36-byte header (5.2.6) with length and checksum."""
    header = HEADER.pack(
        signature, HEADER.size + len(body), revision, 0, _pad(OEM_ID, 6),
        _pad(OEM_TABLE_ID, 8), OEM_REVISION, CREATOR_ID, CREATOR_REVISION,
    )  # fmt: skip
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


def gas_io8(port: int) -> bytes:
    """A Generic Address Structure for one 8-bit I/O port."""
    return GAS.pack(SPACE_SYSTEM_IO, 8, 0, ACCESS_BYTE, port)


# -- AML (ACPI Machine Language, section 20) -- just what the DSDT needs.
AML_ZERO = 0x00
AML_ONE = 0x01
AML_BYTE_PREFIX = 0x0A
AML_WORD_PREFIX = 0x0B
AML_DWORD_PREFIX = 0x0C
AML_QWORD_PREFIX = 0x0E
AML_NAME_OP = 0x08
AML_PACKAGE_OP = 0x12


def aml_pkg_length(length: int) -> bytes:
    """PkgLength (20.2.4) for `length` bytes of content; the encoding counts itself."""
    if length + 1 < 0x40:
        return bytes([length + 1])
    for extra in (1, 2, 3):
        total = length + 1 + extra
        if total < 1 << (4 + 8 * extra):
            lead = (extra << 6) | (total & 0xF)
            rest = (total >> 4).to_bytes(extra, "little")
            return bytes([lead]) + rest
    raise ValueError(f"AML package of {length} bytes is too long")


def aml_name_seg(name: str) -> bytes:
    """A NameSeg (20.2.2): 4 characters, lead A-Z or _, then A-Z, 0-9 or _; padded with _."""
    raw = name.encode("ascii")
    if not 1 <= len(raw) <= 4:
        raise ValueError(f"bad AML name segment {name!r}")
    raw = raw.ljust(4, b"_")
    ok_lead = raw[:1].isupper() or raw[:1] == b"_"
    if not ok_lead or not all(c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_" for c in raw):
        raise ValueError(f"bad AML name segment {name!r}")
    return raw


def aml_integer(value: int) -> bytes:
    """ComputationalData for an integer (20.2.3): ZeroOp, OneOp or the shortest prefix."""
    if value == 0:
        return bytes([AML_ZERO])
    if value == 1:
        return bytes([AML_ONE])
    for prefix, size in (
        (AML_BYTE_PREFIX, 1),
        (AML_WORD_PREFIX, 2),
        (AML_DWORD_PREFIX, 4),
        (AML_QWORD_PREFIX, 8),
    ):
        if 0 <= value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise ValueError(f"AML integer {value} out of range")


def aml_package(elements: list[bytes]) -> bytes:
    """DefPackage (20.2.5.4): PackageOp PkgLength NumElements PackageElementList."""
    if len(elements) > 255:
        raise ValueError("AML package with more than 255 elements")
    content = bytes([len(elements)]) + b"".join(elements)
    return bytes([AML_PACKAGE_OP]) + aml_pkg_length(len(content)) + content


def aml_name(name: str, data: bytes) -> bytes:
    """DefName (20.2.5.1): NameOp NameString DataRefObject."""
    return bytes([AML_NAME_OP]) + aml_name_seg(name) + data


def aml_string(text: str) -> bytes:
    """String (20.2.3): StringPrefix AsciiCharList NullChar."""
    return b"\x0d" + text.encode("ascii") + b"\0"


def aml_buffer(data: bytes) -> bytes:
    """DefBuffer (20.2.5.4): BufferOp PkgLength BufferSize ByteList."""
    content = aml_integer(len(data)) + data
    return b"\x11" + aml_pkg_length(len(content)) + content


def aml_device(name: str, body: bytes) -> bytes:
    """DefDevice (20.2.5.2): ExtOpPrefix DeviceOp PkgLength NameString TermList."""
    content = aml_name_seg(name) + body
    return b"\x5b\x82" + aml_pkg_length(len(content)) + content


def aml_scope(path: bytes, body: bytes) -> bytes:
    """DefScope (20.2.5.1): ScopeOp PkgLength NameString TermList."""
    content = path + body
    return b"\x10" + aml_pkg_length(len(content)) + content


def virtio_mmio_device_aml(index: int, base: int, size: int, irq: int) -> bytes:
    """A virtio-mmio device as Linux's virtio_mmio driver matches it from ACPI: _HID
    "LNRO0005" with a _CRS of Memory32Fixed (6.4.3.4) and an edge, active-high Extended
    Interrupt (6.4.3.6) (what QEMU's and Firecracker's DSDTs describe)."""
    mem32 = struct.pack("<BHBII", 0x86, 9, 1, base, size)  # read-write
    intr = struct.pack("<BHBBI", 0x89, 6, 0x03, 1, irq)  # consumer, edge, active high
    crs = mem32 + intr + b"\x79\x00"  # End Tag, checksum 0 (treated as valid)
    body = (
        aml_name("_HID", aml_string("LNRO0005"))
        + aml_name("_UID", aml_integer(index))
        + aml_name("_CRS", aml_buffer(crs))
    )
    return aml_device(f"VR{index:02X}", body)


# EISA ID "PNP0A03" (PCI host bridge) as AML encodes EisaId(): compressed vendor letters
# then the product number, stored little-endian (ACPI 6.5 19.6.35).
EISAID_PNP0A03 = 0x030AD041


def pci_routing_table_aml() -> bytes:
    """_PRT (ACPI 6.5 §6.2.13) for every slot of bus 0: Package {Address (slot << 16 |
    0xFFFF: any function), Pin (0 = INTA), Source (0: SourceIndex is a GSI), SourceIndex},
    the GSIs of layout.pci_intx_gsi (level-triggered, active low, as _PRT GSIs are)."""
    entries = []
    for slot in range(32):
        for pin in range(1, 5):
            address, gsi = (slot << 16) | 0xFFFF, layout.pci_intx_gsi(slot, pin)
            fields = [aml_integer(address), aml_integer(pin - 1), aml_integer(0), aml_integer(gsi)]
            entries.append(aml_package(fields))
    return aml_name("_PRT", aml_package(entries))


def pci_host_bridge_aml(
    window_base: int, window_size: int, *, io_window: tuple[int, int] | None = None,
    intx: bool = False,
) -> bytes:  # fmt: skip
    """\\_SB_.PCI0: the root of PCI segment 0, bus 0 (a conventional PCI host bridge, so _OSC
    is optional for Linux). Linux with ACPI finds PCI root buses only here (acpi_pci_root,
    "PNP0A03"); its _CRS gives the bus range and the memory window BARs live in (Linux
    keeps BARs inside a window and reassigns those outside). Config space is reached by
    mechanism #1 on 0xCF8 (no MCFG: no ECAM). Address space descriptors: 6.4.3.5.3 (Word,
    bus numbers) and 6.4.3.5.2 (DWord, memory); general flags 0x0C: producer, fixed
    minimum and maximum, positive decode. `io_window` (base, size) adds a Word I/O range
    for I/O BARs; `intx` a _PRT routing the slots' INTx pins to GSIs (passthrough devices
    use INTx; kvmkit's virtio-pci functions have none)."""
    if window_size <= 0 or window_base + window_size > 1 << 32:
        raise ValueError("PCI window must lie below 4 GiB")
    bus = struct.pack("<BHBBBHHHHH", 0x88, 13, 2, 0x0C, 0, 0, 0, 0, 0, 1)
    # Type-specific flags 0x01: read-write, non-cacheable.
    mem = struct.pack(
        "<BHBBBIIIII", 0x87, 23, 0, 0x0C, 0x01, 0, window_base,
        window_base + window_size - 1, 0, window_size,
    )  # fmt: skip
    io = b""
    if io_window is not None:
        io_base, io_size = io_window
        if io_size <= 0 or io_base + io_size > 0x10000:
            raise ValueError("PCI I/O window must lie below 64 KiB")
        # Resource type 1 (I/O), type-specific flags 0x03: ISA and non-ISA ranges.
        io = struct.pack(
            "<BHBBBHHHHH", 0x88, 13, 1, 0x0C, 0x03, 0, io_base, io_base + io_size - 1, 0,
            io_size,
        )  # fmt: skip
    crs = bus + mem + io + b"\x79\x00"
    body = (
        aml_name("_HID", aml_integer(EISAID_PNP0A03))
        + aml_name("_UID", aml_integer(0))
        + aml_name("_SEG", aml_integer(0))
        + aml_name("_BBN", aml_integer(0))
        + aml_name("_CRS", aml_buffer(crs))
    )
    if intx:
        body += pci_routing_table_aml()
    return aml_device("PCI0", body)


def dsdt_aml(
    s5_sleep_type: int = S5_SLEEP_TYPE, virtio_mmio: list[tuple[int, int, int]] | None = None,
    pci_window: tuple[int, int] | None = None, pci_io_window: tuple[int, int] | None = None,
    pci_intx: bool = False,
) -> bytes:  # fmt: skip
    """The DSDT's definition block. \\_S5_ (7.4.2): Package {SLP_TYPa, SLP_TYPb, reserved,
    reserved}; the OS writes SLP_TYPa into PM1a_CNT's SLP_TYP field. `virtio_mmio`: (base,
    size, irq) of virtio-mmio devices, described under \\_SB_; `pci_window`: (base, size)
    of the PCI host bridge's memory window, when there is a PCI bus (`pci_io_window` and
    `pci_intx`: see pci_host_bridge_aml)."""
    s5 = aml_package([aml_integer(s5_sleep_type)] * 2 + [aml_integer(0)] * 2)
    aml = aml_name("_S5_", s5)
    devices = b""
    if virtio_mmio:
        devices += b"".join(
            virtio_mmio_device_aml(i, base, size, irq)
            for i, (base, size, irq) in enumerate(virtio_mmio)
        )
    if pci_window is not None:
        devices += pci_host_bridge_aml(*pci_window, io_window=pci_io_window, intx=pci_intx)
    if devices:
        aml += aml_scope(b"\\_SB_", devices)
    return aml


FACS_LENGTH = 64


def build_facs() -> bytes:
    """Firmware ACPI Control Structure (5.2.10): no header checksum, version 2."""
    raw = bytearray(FACS_LENGTH)
    struct.pack_into("<4sI", raw, 0, b"FACS", FACS_LENGTH)
    raw[32] = 2  # version
    return bytes(raw)


def build_fadt(
    dsdt_addr: int,
    *,
    pm_port: int,
    reset_port: int,
    reset_value: int,
    i8042: bool,
    facs_addr: int = 0,
) -> bytes:
    body = bytearray(FADT_LENGTH - HEADER.size)

    def put(offset: int, fmt: str, *values: int | bytes) -> None:
        struct.pack_into(fmt, body, offset - HEADER.size, *values)

    put(FADT_FIRMWARE_CTRL, "<I", facs_addr)
    put(FADT_DSDT, "<I", dsdt_addr if dsdt_addr < 1 << 32 else 0)
    put(FADT_SCI_INT, "<H", SCI_IRQ)
    # PM1a event block (status + enable) at pm_port, control block at pm_port + 4; the
    # 32-bit legacy fields with their lengths (ACPICA derives the X_ fields from them).
    put(FADT_PM1A_EVT_BLK, "<I", pm_port)
    put(FADT_PM1A_CNT_BLK, "<I", pm_port + 4)
    put(FADT_PM1_EVT_LEN, "<B", 4)
    put(FADT_PM1_CNT_LEN, "<B", 2)
    put(FADT_CENTURY, "<B", CMOS_CENTURY_INDEX)
    # No VGA; the 8042 flag tells Linux whether to probe the PS/2 controller at all.
    put(FADT_IAPC_BOOT_ARCH, "<H", IAPC_VGA_NOT_PRESENT | (IAPC_8042 if i8042 else 0))
    flags = FADT_F_WBINVD | FADT_F_PWR_BUTTON | FADT_F_SLP_BUTTON | FADT_F_RESET_REG_SUP
    put(FADT_FLAGS, "<I", flags)
    body[FADT_RESET_REG - HEADER.size : FADT_RESET_REG - HEADER.size + GAS.size] = gas_io8(
        reset_port
    )
    put(FADT_RESET_VALUE, "<B", reset_value & 0xFF)
    put(FADT_MINOR_VERSION, "<B", FADT_MINOR_REVISION)
    put(FADT_X_FIRMWARE_CTRL, "<Q", facs_addr)
    put(FADT_X_DSDT, "<Q", dsdt_addr)
    put(FADT_HYPERVISOR_VENDOR, "<8s", b"KVMKIT")
    return sdt(b"FACP", FADT_REVISION, bytes(body))


def build_madt(apic_ids: list[int], *, sci_irq: int = SCI_IRQ) -> bytes:
    """The MADT for vCPUs with `apic_ids` (in vCPU order: the ACPI processor UID is the vCPU
    index, and Linux numbers its CPUs in table order)."""
    body = bytearray(struct.pack("<II", layout.LAPIC_ADDR, MADT_PCAT_COMPAT))
    for uid, apic_id in enumerate(apic_ids):
        if apic_id < X2APIC_FROM:
            # Processor Local APIC: type, length, ACPI processor UID, APIC ID, flags.
            body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, uid, apic_id, LAPIC_ENABLED)
        else:
            # Processor Local x2APIC: type, length, reserved, x2APIC ID, flags, UID.
            body += struct.pack("<BBHIII", MADT_LOCAL_X2APIC, 16, 0, apic_id, LAPIC_ENABLED, uid)
    # I/O APIC: type, length, id, reserved, address, global system interrupt base. Same id as
    # the MP table: one past the highest APIC ID, no clash with the local APICs (0 when that
    # does not fit 8 bits: x2APIC machines have no shared 8-bit APIC ID space).
    body += struct.pack("<BBBBII", MADT_IOAPIC, 12, ioapic_id(apic_ids), 0, layout.IOAPIC_ADDR, 0)
    # Interrupt source overrides: ISA IRQ 0 (PIT) is IOAPIC pin 2 (KVM's in-kernel routing);
    # the SCI is level-triggered, active high (as QEMU describes it).
    body += struct.pack("<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, 0, 2, INTI_CONFORMS)
    body += struct.pack(
        "<BBBBIH", MADT_INTERRUPT_OVERRIDE, 10, 0, sci_irq, sci_irq, INTI_ACTIVE_HIGH | INTI_LEVEL
    )
    # Local APIC NMI: all processors, flags conform, LINT1; and its x2APIC twin when there are
    # x2APIC processors.
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS_UID8, INTI_CONFORMS, 1)
    if any(a >= X2APIC_FROM for a in apic_ids):
        body += struct.pack(
            "<BBHIB3s", MADT_LOCAL_X2APIC_NMI, 12, INTI_CONFORMS, ALL_PROCESSORS_UID32, 1,
            bytes(3),
        )  # fmt: skip
    return sdt(b"APIC", MADT_REVISION, bytes(body))


def ioapic_id(apic_ids: list[int]) -> int:
    """The IOAPIC's ID in the MADT and MP table: one past the highest local APIC ID while that
    is an 8-bit xAPIC ID, else 0."""
    after = max(apic_ids) + 1
    return after if after < X2APIC_FROM else 0


@dataclass(frozen=True)
class NumaTables:
    """What the SRAT and SLIT describe: the proximity domain (guest node) of each vCPU, in
    vCPU order like the APIC IDs; guest-physical memory ranges (gpa, size, node); and the
    distance matrix (row: from node, column: to node)."""

    cpu_nodes: list[int]
    memory: list[tuple[int, int, int]]
    distances: list[list[int]]


def build_srat(apic_ids: list[int], numa: NumaTables) -> bytes:
    """SRAT (5.2.16): after the header a reserved u32 that must be 1 and a reserved u64; then
    a Local APIC (or x2APIC, for IDs from 255) affinity structure per vCPU and a memory
    affinity structure per range."""
    if len(numa.cpu_nodes) != len(apic_ids):
        raise ValueError("SRAT: one node per vCPU")
    body = bytearray(struct.pack("<IQ", 1, 0))
    for apic_id, node in zip(apic_ids, numa.cpu_nodes, strict=True):
        if apic_id < X2APIC_FROM:
            # type, length, proximity domain [7:0], APIC ID, flags, local SAPIC EID,
            # proximity domain [31:8], clock domain
            body += struct.pack(
                "<BBBBIB3sI", SRAT_LOCAL_APIC_AFFINITY, 16, node & 0xFF, apic_id, SRAT_ENABLED,
                0, (node >> 8).to_bytes(3, "little"), 0,
            )  # fmt: skip
        else:
            # type, length, reserved, proximity domain, x2APIC ID, flags, clock domain, reserved
            body += struct.pack(
                "<BBHIIIII", SRAT_X2APIC_AFFINITY, 24, 0, node, apic_id, SRAT_ENABLED, 0, 0
            )
    for gpa, size, node in numa.memory:
        # type, length, proximity domain, reserved, base (low, high), length (low, high),
        # reserved, flags (enabled; not hot-pluggable, not non-volatile), reserved
        body += struct.pack(
            "<BBIHIIIIIIQ", SRAT_MEMORY_AFFINITY, 40, node, 0, gpa & 0xFFFF_FFFF, gpa >> 32,
            size & 0xFFFF_FFFF, size >> 32, 0, SRAT_ENABLED, 0,
        )  # fmt: skip
    return sdt(b"SRAT", SRAT_REVISION, bytes(body))


def build_slit(distances: list[list[int]]) -> bytes:
    """SLIT (5.2.17): the number of localities (u64), then the N x N distance bytes row by
    row; 10 to itself, more to others, 255 for unreachable."""
    n = len(distances)
    for i, row in enumerate(distances):
        if len(row) != n or row[i] != SLIT_LOCAL:
            raise ValueError("SLIT: a square matrix with 10 on its diagonal")
        if any(not SLIT_LOCAL < d <= 255 for j, d in enumerate(row) if j != i):
            raise ValueError("SLIT: distances to other nodes must be 11..255")
    body = struct.pack("<Q", n) + bytes(d for row in distances for d in row)
    return sdt(b"SLIT", SLIT_REVISION, body)


def build_rsdp(xsdt_addr: int) -> bytes:
    raw = bytearray(
        RSDP.pack(b"RSD PTR ", 0, _pad(OEM_ID, 6), 2, 0, RSDP.size, xsdt_addr, 0, bytes(3))
    )
    raw[8] = checksum(raw[:20])  # ACPI 1.0 checksum: first 20 bytes
    raw[32] = checksum(raw)  # extended checksum: the whole structure
    return bytes(raw)


def _align(value: int) -> int:
    return (value + ALIGN - 1) & ~(ALIGN - 1)


def write_acpi_tables(
    mem: GuestMemory,
    apic_ids: list[int],
    *,
    pm_port: int,
    reset_port: int,
    reset_value: int = RESET_VALUE,
    s5_sleep_type: int = S5_SLEEP_TYPE,
    i8042: bool = False,
    addr: int = layout.ACPI_ADDR,
    virtio_mmio: list[tuple[int, int, int]] | None = None,
    pci_window: tuple[int, int] | None = None,
    pci_io_window: tuple[int, int] | None = None,
    pci_intx: bool = False,
    numa: NumaTables | None = None,
) -> int:
    """Write RSDP, XSDT, FADT, DSDT, MADT (and SRAT and SLIT when `numa` is given) from
    `addr` (16-byte aligned, tables must end below layout.ACPI_END) and return the RSDP's
    address (= addr).

    `apic_ids`: the vCPUs' APIC IDs in vCPU order (vCPU 0 boots). `pm_port`: the PM1a event
    block (4 ports; PM1a control at pm_port + 4); `reset_port` and `reset_value`: the FADT
    reset register. `i8042=False` (the default) clears the FADT's 8042 flag so Linux does not
    probe a PS/2 controller (no i8042 driver delays); the i8042 device still serves the reset
    line (0xFE on port 0x64)."""
    if not apic_ids or len(set(apic_ids)) != len(apic_ids) or min(apic_ids) < 0:
        raise ValueError("ACPI tables need at least one vCPU and distinct APIC IDs")
    if addr % ALIGN:
        raise ValueError(f"ACPI tables address {addr:#x} is not {ALIGN}-byte aligned")
    for name, port in (
        ("pm_port", pm_port),
        ("pm_port + 5", pm_port + 5),
        ("reset_port", reset_port),
    ):
        if not 0 <= port <= 0xFFFF:
            raise ValueError(f"{name} {port:#x} is not an I/O port")

    extra = [] if numa is None else [build_srat(apic_ids, numa), build_slit(numa.distances)]
    rsdp_addr = addr
    xsdt_addr = _align(rsdp_addr + RSDP.size)
    # The XSDT lists FADT, MADT and the extra tables: its size is known before their addresses.
    xsdt_size = HEADER.size + (2 + len(extra)) * 8
    fadt_addr = _align(xsdt_addr + xsdt_size)
    facs_addr = (fadt_addr + FADT_LENGTH + 63) & ~63  # the FACS must be 64-byte aligned
    dsdt_addr = _align(facs_addr + FACS_LENGTH)
    aml = dsdt_aml(s5_sleep_type, virtio_mmio, pci_window, pci_io_window, pci_intx)
    dsdt = sdt(b"DSDT", DSDT_REVISION, aml)
    madt_addr = _align(dsdt_addr + len(dsdt))
    madt = build_madt(apic_ids)
    placed: list[tuple[int, bytes]] = []
    end = madt_addr + len(madt)
    for table in extra:
        at = _align(end)
        placed.append((at, table))
        end = at + len(table)
    if end > layout.ACPI_END:
        raise ValueError(f"ACPI tables end at {end:#x}, past {layout.ACPI_END:#x}")

    fadt = build_fadt(
        dsdt_addr, pm_port=pm_port, reset_port=reset_port, reset_value=reset_value,
        i8042=i8042, facs_addr=facs_addr,
    )  # fmt: skip
    pointers = [fadt_addr, madt_addr, *(at for at, _ in placed)]
    xsdt = sdt(b"XSDT", 1, struct.pack(f"<{len(pointers)}Q", *pointers))
    assert len(xsdt) == xsdt_size and len(fadt) == FADT_LENGTH

    mem.fill(addr, end - addr)
    for at, table in (
        (rsdp_addr, build_rsdp(xsdt_addr)),
        (xsdt_addr, xsdt),
        (fadt_addr, fadt),
        (facs_addr, build_facs()),
        (dsdt_addr, dsdt),
        (madt_addr, madt),
        *placed,
    ):
        mem.write(at, table)
    return rsdp_addr
