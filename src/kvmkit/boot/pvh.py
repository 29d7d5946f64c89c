"""Boot an uncompressed ELF `vmlinux` through the PVH entry point.

A kernel built with CONFIG_PVH=y carries an ELF note named "Xen" of type
XEN_ELFNOTE_PHYS32_ENTRY (18) whose descriptor is the physical address of its 32-bit entry
(xen/include/public/elfnote.h). The loader copies the PT_LOAD segments to their physical
addresses, writes `struct hvm_start_info` (xen/include/public/arch-x86/hvm/start_info.h) and
enters in 32-bit protected mode, paging off, with EBX pointing at it (docs/misc/pvh.pandoc).
"""

from __future__ import annotations

import ctypes
from ctypes import c_uint32, c_uint64

from kvmkit.arch.x86_64 import layout
from kvmkit.boot.bootparams import BootError
from kvmkit.boot.elf import PT_LOAD, ElfError, ElfFile
from kvmkit.memory.guest import GuestMemory

XEN_ELFNOTE_PHYS32_ENTRY = 18  # xen/include/public/elfnote.h
XEN_NOTE_NAME = b"Xen"
# start_info.h: "C representation of the x86/HVM start info layout"
XEN_HVM_START_MAGIC_VALUE = 0x336EC578
HVM_START_INFO_VERSION = 1  # version 1 adds memmap_paddr / memmap_entries
# start_info.h XEN_HVM_MEMMAP_TYPE_* (the E820 types)
XEN_HVM_MEMMAP_TYPE_RAM = 1
XEN_HVM_MEMMAP_TYPE_RESERVED = 2
XEN_HVM_MEMMAP_TYPE_ACPI = 3
XEN_HVM_MEMMAP_TYPE_NVS = 4
XEN_HVM_MEMMAP_TYPE_UNUSABLE = 5


class hvm_start_info(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("magic", c_uint32),  # 0x00
        ("version", c_uint32),  # 0x04
        ("flags", c_uint32),  # 0x08 SIF_xxx
        ("nr_modules", c_uint32),  # 0x0C
        ("modlist_paddr", c_uint64),  # 0x10 array of hvm_modlist_entry
        ("cmdline_paddr", c_uint64),  # 0x18 NUL-terminated ASCII
        ("rsdp_paddr", c_uint64),  # 0x20 ACPI RSDP
        ("memmap_paddr", c_uint64),  # 0x28 array of hvm_memmap_table_entry (version 1)
        ("memmap_entries", c_uint32),  # 0x30
        ("reserved", c_uint32),  # 0x34 must be zero
    ]


class hvm_modlist_entry(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("paddr", c_uint64),
        ("size", c_uint64),
        ("cmdline_paddr", c_uint64),
        ("reserved", c_uint64),
    ]


class hvm_memmap_table_entry(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("addr", c_uint64),
        ("size", c_uint64),
        ("type", c_uint32),
        ("reserved", c_uint32),
    ]


assert ctypes.sizeof(hvm_start_info) == 56
assert ctypes.sizeof(hvm_modlist_entry) == 32
assert ctypes.sizeof(hvm_memmap_table_entry) == 24


def pvh_entry(elf: ElfFile) -> int | None:
    """The 32-bit physical PVH entry from the XEN_ELFNOTE_PHYS32_ENTRY note, or None."""
    try:
        notes = elf.notes()
    except ElfError as err:
        raise BootError(f"corrupt kernel: {err}") from err
    for note in notes:
        if note.name == XEN_NOTE_NAME and note.type == XEN_ELFNOTE_PHYS32_ENTRY:
            # Linux emits it with _ASM_PTR (8 bytes on x86_64); others with .long.
            if len(note.desc) not in (4, 8):
                raise BootError(
                    f"corrupt kernel: PVH entry note has a {len(note.desc)}-byte descriptor"
                )
            entry = int.from_bytes(note.desc, "little")
            if entry >= 1 << 32:
                raise BootError(f"corrupt kernel: PVH entry {entry:#x} is not a 32-bit address")
            return entry
    return None


def load_elf_kernel(mem: GuestMemory, elf: ElfFile, ram_end: int) -> tuple[int, int]:
    """Copy every PT_LOAD segment to its physical address (zeroing the rest of its memory
    size). All must lie in [KERNEL_LOAD_ADDR, ram_end). Returns the [start, end) they cover."""
    segments = [s for s in elf.segments if s.type == PT_LOAD and s.memsz]
    if not segments:
        raise BootError("not a bootable kernel: the ELF file has no loadable segments")
    for seg in segments:
        if seg.paddr < layout.KERNEL_LOAD_ADDR or seg.paddr + seg.memsz > ram_end:
            raise BootError(
                f"kernel segment {seg.paddr:#x}-{seg.paddr + seg.memsz:#x} lies outside RAM "
                f"from {layout.KERNEL_LOAD_ADDR:#x} to {ram_end:#x} "
                f"({ram_end >> 20} MiB of low memory)"
            )
    for seg in segments:
        try:
            data = elf.segment_data(seg)
        except ElfError as err:
            raise BootError(f"corrupt kernel: {err}") from err
        mem.write(seg.paddr, data)
        if seg.memsz > seg.filesz:
            mem.fill(seg.paddr + seg.filesz, seg.memsz - seg.filesz)
    return min(s.paddr for s in segments), max(s.paddr + s.memsz for s in segments)


def write_start_info(
    mem: GuestMemory,
    *,
    cmdline_addr: int,
    memmap: list[tuple[int, int, int]],
    initrd: tuple[int, int] | None = None,
    rsdp_addr: int | None = None,
) -> int:
    """Write hvm_start_info at PVH_INFO_ADDR, its memory map at PVH_MEMMAP_ADDR and the
    initrd's module entry at PVH_MODLIST_ADDR. `memmap` is (addr, size, type); returns the
    start info's address (the guest's EBX)."""
    if len(memmap) > layout.PVH_MEMMAP_MAX:
        raise BootError(
            f"too many memory map entries for PVH ({len(memmap)}, at most {layout.PVH_MEMMAP_MAX})"
        )
    info = hvm_start_info()
    info.magic = XEN_HVM_START_MAGIC_VALUE
    info.version = HVM_START_INFO_VERSION
    info.cmdline_paddr = cmdline_addr
    info.rsdp_paddr = rsdp_addr or 0
    table = (hvm_memmap_table_entry * len(memmap))()
    for i, (addr, size, type_) in enumerate(memmap):
        table[i].addr, table[i].size, table[i].type = addr, size, type_
    mem.write(layout.PVH_MEMMAP_ADDR, bytes(table))
    info.memmap_paddr = layout.PVH_MEMMAP_ADDR
    info.memmap_entries = len(memmap)
    if initrd is not None:
        module = hvm_modlist_entry(paddr=initrd[0], size=initrd[1])
        mem.write(layout.PVH_MODLIST_ADDR, bytes(module))
        info.nr_modules = 1
        info.modlist_paddr = layout.PVH_MODLIST_ADDR
    mem.write(layout.PVH_INFO_ADDR, bytes(info))
    return layout.PVH_INFO_ADDR
