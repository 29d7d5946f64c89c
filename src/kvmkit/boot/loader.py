"""Load a Linux kernel, initrd and command line into guest memory and set up the boot vCPU.

Two ways in, chosen from the kernel file's format:

- a bzImage through the 64-bit Linux boot protocol (Documentation/arch/x86/boot.rst,
  "64-bit Boot Protocol"): the protected-mode kernel at KERNEL_LOAD_ADDR, a zero page
  (`boot_params`) with the e820 map, command line and initrd, and entry in 64-bit mode at the
  load address + 0x200 with RSI pointing at the zero page;
- an uncompressed ELF vmlinux with a PVH note through PVH (docs/misc/pvh.pandoc in Xen):
  segments at their physical addresses, `hvm_start_info` with a memory map, entry in 32-bit
  protected mode with EBX pointing at it;
- an ELF vmlinux without a PVH note (the kernels Firecracker's guides build) through the
  64-bit boot protocol, as Firecracker boots it: segments at their physical addresses, a zero
  page kvmkit fills itself (there is no setup header in the file), entry at the ELF entry
  point (`phys_startup_64`) in 64-bit mode with RSI pointing at the zero page.

Everything is placed by kvmkit.arch.x86_64.layout. Bad input raises `BootError` (one line).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from kvmkit.abi import structs
from kvmkit.arch.x86_64 import layout
from kvmkit.arch.x86_64 import regs as x86
from kvmkit.arch.x86_64.paging import build_identity_map
from kvmkit.arch.x86_64.segments import CODE32, CODE64, DATA, Descriptor, tss_descriptor
from kvmkit.boot.bootparams import (
    BOOT_FLAG,
    BOOT_PARAMS_SIZE,
    CAN_USE_HEAP,
    E820_MAX_ENTRIES_ZEROPAGE,
    E820_RAM,
    E820_RESERVED,
    HEADER_MAGIC,
    HEADER_MAGIC_OFFSET,
    LOADER_TYPE_UNDEFINED,
    SETUP_HEADER_OFFSET,
    BootError,
    boot_params,
    setup_header,
)
from kvmkit.boot.bzimage import ENTRY64_OFFSET, load_bzimage, parse_bzimage
from kvmkit.boot.elf import EM_X86_64, ElfError, ElfFile
from kvmkit.boot.pvh import load_elf_kernel, pvh_entry, write_start_info
from kvmkit.kvm.vcpu import Vcpu
from kvmkit.memory.guest import GuestMemory

__all__ = [
    "BootError",
    "BootSetup",
    "load_linux",
    "memory_map",
    "setup_boot_vcpu",
]

PAGE = 4096
MIB = 1 << 20
# boot.rst "Sample Boot Configuration": for a bzImage (protocol >= 2.02, LOADED_HIGH) the
# real-mode heap ends at 0xE000 and heap_end_ptr = heap_end - 0x200.
HEAP_END = 0xE000
HEAP_END_PTR = HEAP_END - 0x200
# boot.rst "acpi_rsdp_addr": protocol 2.14 and later read the RSDP address from boot_params.
ACPI_RSDP_PROTOCOL = 0x020E
# PVH has no header to tell the command line limit: x86 Linux's COMMAND_LINE_SIZE is 2048
# including the NUL (arch/x86/include/asm/setup.h), the value bzImages report as 2047.
PVH_CMDLINE_SIZE = 2047
# An ELF vmlinux has no setup header: kvmkit writes one into the zero page with the fields
# boot.rst asks a loader to fill and the kernel reads. Version 2.15 is what those fields are
# defined by (acpi_rsdp_addr 2.14); kernel_alignment is x86's default CONFIG_PHYSICAL_ALIGN
# (16 MiB), the value Firecracker writes too.
ELF_HEADER_VERSION = 0x020F
ELF_KERNEL_ALIGNMENT = 0x0100_0000

# boot.rst "64-bit Boot Protocol": "a GDT must be loaded with the descriptors for selectors
# __BOOT_CS(0x10) and __BOOT_DS(0x18); both descriptors must be 4G flat segment; __BOOT_CS
# must have execute/read permission, and __BOOT_DS must have read/write permission; CS must
# be __BOOT_CS and DS, ES, SS must be __BOOT_DS".
BOOT_CS = 0x10
BOOT_DS = 0x18
# PVH (pvh.pandoc): a flat 32-bit code and data segment, selector values unspecified; TR a
# 32-bit TSS with base 0 and limit 0x67.
PVH_CS = 0x08
PVH_DS = 0x10
PVH_TSS = 0x18
TSS32_LIMIT = 0x67

MemMap = list[tuple[int, int, int]]  # (addr, size, E820 type)


@dataclass
class BootSetup:
    protocol: Literal["linux64", "pvh"]
    entry: int  # guest RIP (linux64) / EIP (pvh)
    params_addr: int  # the zero page (RSI) for linux64, hvm_start_info (EBX) for pvh
    kernel_range: tuple[int, int] = (0, 0)  # [start, end) the kernel uses while booting
    initrd_range: tuple[int, int] | None = None  # [addr, addr + size)
    cmdline: bytes = b""


# -- memory map


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sort and merge overlapping or touching [start, end) ranges."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def memory_map(mem_size: int, reserved: list[tuple[int, int]] = []) -> MemMap:  # noqa: B006
    """The guest's E820 map: RAM from layout.ram_ranges(mem_size) minus the reserved ranges,
    plus the reserved ranges themselves: [EBDA_START, 1 MiB) (MP table, VGA hole, ACPI
    tables and BIOS area) and `reserved`, each (start, size). Sorted by address."""
    for start, size in reserved:
        if start < 0 or size < 0:
            raise ValueError(f"invalid reserved range {start:#x}+{size:#x}")
    holes = _merge(
        [(layout.EBDA_START, layout.KERNEL_LOAD_ADDR)]
        + [(start, start + size) for start, size in reserved if size]
    )
    entries: MemMap = [(start, end - start, E820_RESERVED) for start, end in holes]
    for base, size in layout.ram_ranges(mem_size):
        pieces = [(base, base + size)]
        for h_start, h_end in holes:
            cut: list[tuple[int, int]] = []
            for p_start, p_end in pieces:
                if h_end <= p_start or p_end <= h_start:
                    cut.append((p_start, p_end))
                    continue
                if p_start < h_start:
                    cut.append((p_start, h_start))
                if h_end < p_end:
                    cut.append((h_end, p_end))
            pieces = cut
        entries += [(s, e - s, E820_RAM) for s, e in pieces]
    return sorted(entries)


def _low_ram_end(mem_size: int) -> int:
    return layout.ram_ranges(mem_size)[0][1]


# -- files


def _read_kernel(path: Path) -> bytes:
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise BootError(f"kernel not found: {path}") from None
    except OSError as err:
        raise BootError(f"cannot read kernel {path}: {err.strerror or err}") from None
    if not data:
        raise BootError(f"not a Linux kernel: {path} is empty")
    return data


def _place_initrd(memmap: MemMap, size: int, low: int, high: int) -> int | None:
    """The highest page-aligned address where `size` bytes fit in RAM inside [low, high)."""
    for addr, length, type_ in reversed(memmap):
        if type_ != E820_RAM:
            continue
        start = max(addr, (low + PAGE - 1) // PAGE * PAGE)
        end = min(addr + length, high)
        if end - start >= size:
            at = (end - size) // PAGE * PAGE
            if at >= start:
                return at
    return None


def _largest_gap(memmap: MemMap, low: int, high: int) -> int:
    best = 0
    for addr, length, type_ in memmap:
        if type_ == E820_RAM:
            start = max(addr, (low + PAGE - 1) // PAGE * PAGE)
            best = max(best, (min(addr + length, high) - start) // PAGE * PAGE)
    return best


def _load_initrd(
    mem: GuestMemory, path: Path, memmap: MemMap, mem_size: int, low: int, high: int
) -> tuple[int, int]:
    """Read the initrd straight into guest memory at the top of [low, high)."""
    try:
        fh = open(path, "rb")
    except FileNotFoundError:
        raise BootError(f"initrd not found: {path}") from None
    except OSError as err:
        raise BootError(f"cannot read initrd {path}: {err.strerror or err}") from None
    with fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise BootError(f"initrd {path} is empty")
        addr = _place_initrd(memmap, size, low, high)
        if addr is None:
            room = _largest_gap(memmap, low, high)
            raise BootError(
                f"initrd too large for {mem_size // MIB} MiB of memory: {path} is "
                f"{(size + MIB - 1) // MIB} MiB, {room // MIB} MiB are free above the kernel"
            )
        view = mem.view(addr, size, write=True)
        try:
            got = fh.readinto(view)
        except OSError as err:
            raise BootError(f"cannot read initrd {path}: {err.strerror or err}") from None
        finally:
            view.release()
        if got != size:
            raise BootError(f"initrd {path} changed while being read ({got} of {size} bytes)")
    return addr, size


def _cmdline_bytes(cmdline: str, limit: int) -> bytes:
    raw = cmdline.encode()
    if b"\0" in raw:
        raise BootError("kernel command line contains a NUL character")
    limit = min(limit, layout.CMDLINE_MAX - 1)
    if len(raw) > limit:
        raise BootError(
            f"kernel command line too long: {len(raw)} bytes, the kernel accepts at most {limit}"
        )
    return raw


def _check_identity_mapped(end: int) -> None:
    """boot.rst "64-bit Boot Protocol": the kernel, from its load address to its end
    (init_size for a bzImage, the last segment for an ELF), must be identity-mapped by the
    boot page tables."""
    if end > layout.BOOT_IDENTITY_MAP:
        raise BootError(
            f"kernel needs {end // MIB} MiB identity-mapped, the boot page tables map "
            f"{layout.BOOT_IDENTITY_MAP // MIB} MiB"
        )


def _cmdline_and_initrd(
    mem: GuestMemory, cmd: bytes, initrd: Path | None, memmap: MemMap, mem_size: int,
    low: int, high: int,
) -> tuple[int, int] | None:  # fmt: skip
    """What every way in does after the kernel is in place: the command line at
    CMDLINE_ADDR, the initrd (if any) at the top of RAM in [low, high). The initrd's
    (start, end), or None."""
    mem.write(layout.CMDLINE_ADDR, cmd + b"\0")
    if initrd is None:
        return None
    addr, size = _load_initrd(mem, initrd, memmap, mem_size, low, high)
    return addr, addr + size


# -- the public API


def load_linux(
    mem: GuestMemory,
    kernel: Path,
    *,
    initrd: Path | None,
    cmdline: str,
    mem_size: int,
    rsdp_addr: int | None = None,
    reserved: list[tuple[int, int]] = [],  # noqa: B006 - never mutated
) -> BootSetup:
    """Load `kernel` (a bzImage, or an ELF vmlinux with a PVH note), `initrd` and `cmdline`
    into `mem` (RAM laid out by layout.ram_ranges(mem_size)) and write the boot parameters.

    `reserved` lists extra (start, size) ranges the guest must not use as RAM (they appear as
    E820 reserved). `rsdp_addr` is the ACPI RSDP's address, when the VMM wrote ACPI tables.
    """
    if mem_size < layout.KERNEL_LOAD_ADDR + MIB:
        raise BootError(f"memory size {mem_size} bytes is too small to boot Linux")
    data = _read_kernel(kernel)
    memmap = memory_map(mem_size, reserved)
    ram_end = _low_ram_end(mem_size)

    if data[:4] == b"\x7fELF":
        return _load_elf(mem, kernel, data, initrd, cmdline, mem_size, memmap, rsdp_addr)
    if data[HEADER_MAGIC_OFFSET : HEADER_MAGIC_OFFSET + 4] != HEADER_MAGIC:
        raise BootError(f"not a Linux kernel: {kernel} is neither a bzImage nor an ELF vmlinux")
    image = parse_bzimage(data)
    cmd = _cmdline_bytes(cmdline, image.cmdline_size)
    start, end = load_bzimage(mem, image, ram_end)
    _check_identity_mapped(end)
    initrd_range = _cmdline_and_initrd(mem, cmd, initrd, memmap, mem_size, end,
                                       min(image.initrd_addr_max + 1, ram_end))  # fmt: skip
    _write_zero_page(mem, image.setup_header_bytes(), image.version, memmap, initrd_range,
                     rsdp_addr)  # fmt: skip
    return BootSetup(
        protocol="linux64",
        entry=layout.KERNEL_LOAD_ADDR + ENTRY64_OFFSET,
        params_addr=layout.ZERO_PAGE_ADDR,
        kernel_range=(start, end),
        initrd_range=initrd_range,
        cmdline=cmd,
    )


def _write_zero_page(
    mem: GuestMemory,
    header: bytes,
    version: int,
    memmap: MemMap,
    initrd: tuple[int, int] | None,
    rsdp_addr: int | None,
) -> None:
    if len(memmap) > E820_MAX_ENTRIES_ZEROPAGE:
        raise BootError(
            f"too many memory map entries ({len(memmap)}, the zero page holds "
            f"{E820_MAX_ENTRIES_ZEROPAGE})"
        )
    # boot.rst "64-bit Boot Protocol": boot_params initialized to all zero, then the setup
    # header from the kernel image (0x1F1 up to 0x202 + the byte at 0x201) copied into it.
    raw = bytearray(BOOT_PARAMS_SIZE)
    raw[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + len(header)] = header
    bp = boot_params.from_buffer(raw)
    hdr = bp.hdr
    hdr.type_of_loader = LOADER_TYPE_UNDEFINED  # boot.rst "type_of_loader": 0xFF, no ID
    # boot.rst "loadflags" bit 7 CAN_USE_HEAP: heap_end_ptr is valid.
    hdr.loadflags |= CAN_USE_HEAP
    hdr.heap_end_ptr = HEAP_END_PTR
    # boot.rst "cmd_line_ptr" (2.02+): 32-bit linear address; high bits in ext_cmd_line_ptr.
    hdr.cmd_line_ptr = layout.CMDLINE_ADDR
    bp.ext_cmd_line_ptr = layout.CMDLINE_ADDR >> 32
    if initrd is not None:
        addr, end = initrd
        # boot.rst "ramdisk_image"/"ramdisk_size"; zero-page.rst ext_ramdisk_* high 32 bits.
        hdr.ramdisk_image = addr & 0xFFFFFFFF
        hdr.ramdisk_size = (end - addr) & 0xFFFFFFFF
        bp.ext_ramdisk_image = addr >> 32
        bp.ext_ramdisk_size = (end - addr) >> 32
    if rsdp_addr is not None and version >= ACPI_RSDP_PROTOCOL:
        bp.acpi_rsdp_addr = rsdp_addr  # zero-page.rst 0x070
    bp.e820_entries = len(memmap)  # zero-page.rst 0x1E8, table at 0x2D0
    for i, (addr, size, type_) in enumerate(memmap):
        entry = bp.e820_table[i]
        entry.addr, entry.size, entry.type = addr, size, type_
    mem.write(layout.ZERO_PAGE_ADDR, bytes(raw))


def _load_elf(
    mem: GuestMemory,
    kernel: Path,
    data: bytes,
    initrd: Path | None,
    cmdline: str,
    mem_size: int,
    memmap: MemMap,
    rsdp_addr: int | None,
) -> BootSetup:
    try:
        elf = ElfFile(data)
    except ElfError as err:
        raise BootError(f"not a bootable kernel: {kernel}: {err}") from None
    entry = pvh_entry(elf)
    if entry is None:
        return _load_elf_linux64(mem, kernel, elf, initrd, cmdline, mem_size, memmap, rsdp_addr)
    cmd = _cmdline_bytes(cmdline, PVH_CMDLINE_SIZE)
    ram_end = _low_ram_end(mem_size)
    start, end = load_elf_kernel(mem, elf, ram_end)
    if not start <= entry < end:
        raise BootError(f"corrupt kernel: PVH entry {entry:#x} is outside the kernel")
    initrd_range = _cmdline_and_initrd(mem, cmd, initrd, memmap, mem_size, end, ram_end)
    params = write_start_info(
        mem,
        cmdline_addr=layout.CMDLINE_ADDR,
        memmap=memmap,
        initrd=None if initrd_range is None else (initrd_range[0],
                                                  initrd_range[1] - initrd_range[0]),
        rsdp_addr=rsdp_addr,
    )
    return BootSetup(
        protocol="pvh",
        entry=entry,
        params_addr=params,
        kernel_range=(start, end),
        initrd_range=initrd_range,
        cmdline=cmd,
    )


def _load_elf_linux64(
    mem: GuestMemory,
    kernel: Path,
    elf: ElfFile,
    initrd: Path | None,
    cmdline: str,
    mem_size: int,
    memmap: MemMap,
    rsdp_addr: int | None,
) -> BootSetup:
    """An x86-64 ELF vmlinux without a PVH note, through the 64-bit boot protocol (boot.rst
    "64-bit Boot Protocol"; Firecracker's way): its PT_LOAD segments at their physical
    addresses, entered at e_entry (the linker script's `phys_startup_64`) in 64-bit mode."""
    if not elf.is64 or elf.machine != EM_X86_64:
        raise BootError(
            f"ELF kernel {kernel} is not an x86-64 vmlinux (class {elf.elf_class}, machine "
            f"{elf.machine})"
        )
    cmd = _cmdline_bytes(cmdline, PVH_CMDLINE_SIZE)
    ram_end = _low_ram_end(mem_size)
    start, end = load_elf_kernel(mem, elf, ram_end)
    entry = elf.entry
    if not any(s.paddr <= entry < s.paddr + s.memsz for s in elf.load_segments):
        raise BootError(f"corrupt kernel: ELF entry {entry:#x} is outside its loaded segments")
    _check_identity_mapped(end)
    initrd_range = _cmdline_and_initrd(mem, cmd, initrd, memmap, mem_size, end, ram_end)
    # boot.rst "Details of Header Fields": the fields a boot loader writes; the kernel reads
    # cmd_line_ptr, the ramdisk fields and the E820 table from the zero page.
    hdr = setup_header(
        boot_flag=BOOT_FLAG, header=int.from_bytes(HEADER_MAGIC, "little"),
        version=ELF_HEADER_VERSION, kernel_alignment=ELF_KERNEL_ALIGNMENT,
        cmdline_size=PVH_CMDLINE_SIZE,
    )  # fmt: skip
    _write_zero_page(mem, bytes(hdr), ELF_HEADER_VERSION, memmap, initrd_range, rsdp_addr)
    return BootSetup(
        protocol="linux64",
        entry=entry,
        params_addr=layout.ZERO_PAGE_ADDR,
        kernel_range=(start, end),
        initrd_range=initrd_range,
        cmdline=cmd,
    )


# -- the boot vCPU


def _write_gdt(mem: GuestMemory, table: list[Descriptor | None]) -> int:
    """Write the boot GDT at BOOT_GDT_ADDR; returns its limit."""
    raw = b"".join((d.encode() if d else 0).to_bytes(8, "little") for d in table)
    if layout.BOOT_GDT_ADDR + len(raw) > layout.BOOT_IDT_ADDR:
        raise AssertionError("boot GDT overflows into the boot IDT")
    mem.write(layout.BOOT_GDT_ADDR, raw)
    return len(raw) - 1


def setup_boot_vcpu(vcpu: Vcpu, setup: BootSetup, mem: GuestMemory) -> None:
    """Build the boot GDT (and for linux64 the IDT and identity page tables) in `mem` and
    put `vcpu` in the state its protocol's entry point expects."""
    sregs = vcpu.get_sregs()
    regs = structs.kvm_regs()
    regs.rip = setup.entry
    regs.rflags = x86.RFLAGS_RESERVED1  # IF=0: "interrupt must be disabled" (boot.rst)
    if setup.protocol == "linux64":
        # GDT: null, unused, __BOOT_CS (64-bit code), __BOOT_DS (flat data).
        limit = _write_gdt(mem, [None, None, CODE64, DATA])
        sregs.cs = CODE64.segment(BOOT_CS)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, DATA.segment(BOOT_DS))
        # The GDT has no room for a TSS (the IDT follows at 0x520); VM entry still wants a
        # usable busy TSS in TR, which the kernel replaces before it needs one.
        sregs.tr = tss_descriptor(0, TSS32_LIMIT).segment(0)
        sregs.gdt.base, sregs.gdt.limit = layout.BOOT_GDT_ADDR, limit
        # An empty IDT (one not-present gate): any exception before the kernel installs its
        # own ends in a triple fault, a clear failure, never a jump through garbage.
        mem.fill(layout.BOOT_IDT_ADDR, 16)
        sregs.idt.base, sregs.idt.limit = layout.BOOT_IDT_ADDR, 15
        # boot.rst "64-bit Boot Protocol": 64-bit mode with paging enabled, the kernel's
        # init_size range, the zero page and the command line identity-mapped.
        tables_end = build_identity_map(mem, layout.PML4_ADDR, layout.BOOT_IDENTITY_MAP)
        if tables_end > layout.CMDLINE_ADDR:
            raise AssertionError("boot page tables overflow into the command line")
        sregs.cr3 = layout.PML4_ADDR
        sregs.cr0 = x86.CR0_PE | x86.CR0_PG | x86.CR0_ET | x86.CR0_NE
        sregs.cr4 = x86.CR4_PAE
        sregs.efer = x86.EFER_LME | x86.EFER_LMA
        # "%rsi must hold the base address of the struct boot_params".
        regs.rsi = setup.params_addr
        regs.rsp = layout.BOOT_STACK_TOP
    elif setup.protocol == "pvh":
        # pvh.pandoc: cs a 32-bit read/exec flat code segment, ds/es/ss 32-bit read/write
        # flat data segments, tr a 32-bit TSS with base 0 and limit 0x67.
        tss = tss_descriptor(0, TSS32_LIMIT)
        limit = _write_gdt(mem, [None, CODE32, DATA, tss])
        sregs.cs = CODE32.segment(PVH_CS)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, DATA.segment(PVH_DS))
        sregs.tr = tss.segment(PVH_TSS)
        sregs.gdt.base, sregs.gdt.limit = layout.BOOT_GDT_ADDR, limit
        sregs.idt.base, sregs.idt.limit = 0, 0
        # pvh.pandoc: "cr0: bit 0 (PE) must be set. All the other writeable bits are cleared"
        # (ET is hard-wired to 1 on every CPU since the 486); "cr4: all bits are cleared".
        sregs.cr0 = x86.CR0_PE | x86.CR0_ET
        sregs.cr4 = 0
        sregs.cr3 = 0
        sregs.efer = 0
        # "ebx: contains the physical memory address where the loader has placed the boot
        # start info structure".
        regs.rbx = setup.params_addr
    else:
        raise ValueError(f"unknown boot protocol {setup.protocol!r}")
    vcpu.set_sregs(sregs)
    vcpu.set_regs(regs)
