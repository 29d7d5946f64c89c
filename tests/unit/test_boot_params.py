"""The boot structures' layouts against the documented offsets.

No kernel headers on the build hosts, so instead of compiling a C program these tables copy
the offsets and sizes from the documents:
- setup_header: Documentation/arch/x86/boot.rst, "The Real-Mode Kernel Header" (offsets in the
  kernel image and in boot_params, which are the same);
- boot_params: Documentation/arch/x86/zero-page.rst (and bootparam.h's offset comments);
- hvm_start_info & co: xen/include/public/arch-x86/hvm/start_info.h (its layout comment).
"""

from __future__ import annotations

import ctypes

import pytest

from kvmkit.boot.bootparams import boot_e820_entry, boot_params, setup_header
from kvmkit.boot.pvh import hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info

# boot.rst: Offset/Size, Name (offsets from the start of the image / boot_params)
SETUP_HEADER = [
    (0x1F1, 1, "setup_sects"),
    (0x1F2, 2, "root_flags"),
    (0x1F4, 4, "syssize"),
    (0x1F8, 2, "ram_size"),
    (0x1FA, 2, "vid_mode"),
    (0x1FC, 2, "root_dev"),
    (0x1FE, 2, "boot_flag"),
    (0x200, 2, "jump"),
    (0x202, 4, "header"),
    (0x206, 2, "version"),
    (0x208, 4, "realmode_swtch"),
    (0x20C, 2, "start_sys_seg"),
    (0x20E, 2, "kernel_version"),
    (0x210, 1, "type_of_loader"),
    (0x211, 1, "loadflags"),
    (0x212, 2, "setup_move_size"),
    (0x214, 4, "code32_start"),
    (0x218, 4, "ramdisk_image"),
    (0x21C, 4, "ramdisk_size"),
    (0x220, 4, "bootsect_kludge"),
    (0x224, 2, "heap_end_ptr"),
    (0x226, 1, "ext_loader_ver"),
    (0x227, 1, "ext_loader_type"),
    (0x228, 4, "cmd_line_ptr"),
    (0x22C, 4, "initrd_addr_max"),
    (0x230, 4, "kernel_alignment"),
    (0x234, 1, "relocatable_kernel"),
    (0x235, 1, "min_alignment"),
    (0x236, 2, "xloadflags"),
    (0x238, 4, "cmdline_size"),
    (0x23C, 4, "hardware_subarch"),
    (0x240, 8, "hardware_subarch_data"),
    (0x248, 4, "payload_offset"),
    (0x24C, 4, "payload_length"),
    (0x250, 8, "setup_data"),
    (0x258, 8, "pref_address"),
    (0x260, 4, "init_size"),
    (0x264, 4, "handover_offset"),
    (0x268, 4, "kernel_info_offset"),
]

# zero-page.rst: Offset/Size, Name
ZERO_PAGE = [
    (0x000, 0x40, "screen_info"),
    (0x040, 0x14, "apm_bios_info"),
    (0x058, 0x08, "tboot_addr"),
    (0x060, 0x10, "ist_info"),
    (0x070, 0x08, "acpi_rsdp_addr"),
    (0x080, 0x10, "hd0_info"),
    (0x090, 0x10, "hd1_info"),
    (0x0A0, 0x10, "sys_desc_table"),
    (0x0B0, 0x10, "olpc_ofw_header"),
    (0x0C0, 0x04, "ext_ramdisk_image"),
    (0x0C4, 0x04, "ext_ramdisk_size"),
    (0x0C8, 0x04, "ext_cmd_line_ptr"),
    (0x13C, 0x04, "cc_blob_address"),
    (0x140, 0x80, "edid_info"),
    (0x1C0, 0x20, "efi_info"),
    (0x1E0, 0x04, "alt_mem_k"),
    (0x1E4, 0x04, "scratch"),
    (0x1E8, 0x01, "e820_entries"),
    (0x1E9, 0x01, "eddbuf_entries"),
    (0x1EA, 0x01, "edd_mbr_sig_buf_entries"),
    (0x1EB, 0x01, "kbd_status"),
    (0x1EC, 0x01, "secure_boot"),
    (0x1EF, 0x01, "sentinel"),
    (0x1F1, 0x7B, "hdr"),  # boot.rst: the setup header spans 0x1F1..0x26C in protocol 2.15
    (0x290, 0x40, "edd_mbr_sig_buffer"),
    (0x2D0, 0xA00, "e820_table"),  # 128 entries of 20 bytes
    (0xD00, 0x1EC, "eddbuf"),  # 6 edd_info of 82 bytes
]

# start_info.h: the structure's layout comment (offsets in bytes)
HVM_START_INFO = [
    (0x00, 4, "magic"),
    (0x04, 4, "version"),
    (0x08, 4, "flags"),
    (0x0C, 4, "nr_modules"),
    (0x10, 8, "modlist_paddr"),
    (0x18, 8, "cmdline_paddr"),
    (0x20, 8, "rsdp_paddr"),
    (0x28, 8, "memmap_paddr"),
    (0x30, 4, "memmap_entries"),
    (0x34, 4, "reserved"),
]
HVM_MODLIST_ENTRY = [(0x00, 8, "paddr"), (0x08, 8, "size"), (0x10, 8, "cmdline_paddr"),
                     (0x18, 8, "reserved")]  # fmt: skip
HVM_MEMMAP_ENTRY = [(0x00, 8, "addr"), (0x08, 8, "size"), (0x10, 4, "type"),
                    (0x14, 4, "reserved")]  # fmt: skip


def _check(struct: type[ctypes.Structure], base: int, table: list[tuple[int, int, str]]) -> None:
    for offset, size, name in table:
        field = getattr(struct, name)
        assert (field.offset + base, field.size) == (offset, size), name


@pytest.mark.parametrize(
    ("struct", "base", "table", "total"),
    [
        (setup_header, 0x1F1, SETUP_HEADER, 0x26C - 0x1F1),
        (boot_params, 0, ZERO_PAGE, 4096),
        (hvm_start_info, 0, HVM_START_INFO, 56),
        (hvm_modlist_entry, 0, HVM_MODLIST_ENTRY, 32),
        (hvm_memmap_table_entry, 0, HVM_MEMMAP_ENTRY, 24),
    ],
)
def test_layout_matches_the_documents(
    struct: type[ctypes.Structure], base: int, table: list[tuple[int, int, str]], total: int
) -> None:
    _check(struct, base, table)
    assert ctypes.sizeof(struct) == total


def test_setup_header_inside_boot_params_sits_at_0x1f1() -> None:
    # The same offsets hold whether read from the image or from boot_params.hdr.
    _check(setup_header, boot_params.hdr.offset, SETUP_HEADER)


def test_e820_entry_is_20_packed_bytes() -> None:
    assert ctypes.sizeof(boot_e820_entry) == 20
    assert (boot_e820_entry.addr.offset, boot_e820_entry.size.offset,
            boot_e820_entry.type.offset) == (0, 8, 16)  # fmt: skip
