"""The x86 Linux boot protocol's data structures: `setup_header` and `boot_params`.

ctypes mirrors of `arch/x86/include/uapi/asm/bootparam.h` (field names as there), laid out as
Documentation/arch/x86/boot.rst ("The Real-Mode Kernel Header") and
Documentation/arch/x86/zero-page.rst document them. The kernel headers are not installed on
the build hosts, so `tests/unit/test_boot_params.py` checks every offset against the tables of
those two documents instead of compiling a C program.

`BootError` lives here (the lowest module of `kvmkit.boot`'s Linux loader) so that the bzImage,
PVH and vmlinux modules can raise it; `kvmkit.boot.loader` re-exports it.
"""

from __future__ import annotations

import ctypes
from ctypes import c_uint8, c_uint16, c_uint32, c_uint64

from kvmkit.errors import UserError


class BootError(UserError):
    """A kernel, initrd or command line that cannot be booted: one line for the user."""


# -- boot.rst, "The Real-Mode Kernel Header" / "Details of Header Fields"
SETUP_HEADER_OFFSET = 0x1F1  # boot_params.hdr and the header's place in the kernel file
BOOT_FLAG_OFFSET = 0x1FE
BOOT_FLAG = 0xAA55  # boot_flag: the boot sector signature
HEADER_MAGIC_OFFSET = 0x202
HEADER_MAGIC = b"HdrS"  # header: 0x53726448 "HdrS"
BOOT_PARAMS_SIZE = 4096  # boot.rst "64-bit Boot Protocol": boot_params is one 4 KiB page
DEFAULT_SETUP_SECTS = 4  # boot.rst "setup_sects": "if this field is 0, the real value is 4"

# loadflags (boot.rst "loadflags")
LOADED_HIGH = 1 << 0  # protected-mode code is loaded at 0x100000 (a bzImage)
KASLR_FLAG = 1 << 1
QUIET_FLAG = 1 << 5
KEEP_SEGMENTS = 1 << 6
CAN_USE_HEAP = 1 << 7  # heap_end_ptr is valid

# xloadflags (boot.rst "xloadflags", protocol 2.12+)
XLF_KERNEL_64 = 1 << 0  # has the legacy 64-bit entry point at load address + 0x200
XLF_CAN_BE_LOADED_ABOVE_4G = 1 << 1
XLF_EFI_HANDOVER_32 = 1 << 2
XLF_EFI_HANDOVER_64 = 1 << 3
XLF_EFI_KEXEC = 1 << 4
XLF_5LEVEL = 1 << 5
XLF_5LEVEL_ENABLED = 1 << 6

# type_of_loader (boot.rst "type_of_loader"): 0xFF is "undefined" (no assigned ID)
LOADER_TYPE_UNDEFINED = 0xFF

# E820 (bootparam.h E820_MAX_ENTRIES_ZEROPAGE; the ACPI spec's address range types)
E820_MAX_ENTRIES_ZEROPAGE = 128
E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3
E820_NVS = 4
E820_UNUSABLE = 5

EDD_MBR_SIG_MAX = 16
EDDMAXNR = 6
EDD_INFO_SIZE = 82  # sizeof(struct edd_info)


def protocol_str(version: int) -> str:
    """`0x020F` -> "2.15" (boot.rst "version": major in the high byte, minor in the low)."""
    return f"{version >> 8}.{version & 0xFF:02d}"


class setup_header(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [
        ("setup_sects", c_uint8),  # 0x1F1
        ("root_flags", c_uint16),  # 0x1F2
        ("syssize", c_uint32),  # 0x1F4
        ("ram_size", c_uint16),  # 0x1F8
        ("vid_mode", c_uint16),  # 0x1FA
        ("root_dev", c_uint16),  # 0x1FC
        ("boot_flag", c_uint16),  # 0x1FE
        ("jump", c_uint16),  # 0x200
        ("header", c_uint32),  # 0x202
        ("version", c_uint16),  # 0x206
        ("realmode_swtch", c_uint32),  # 0x208
        ("start_sys_seg", c_uint16),  # 0x20C
        ("kernel_version", c_uint16),  # 0x20E
        ("type_of_loader", c_uint8),  # 0x210
        ("loadflags", c_uint8),  # 0x211
        ("setup_move_size", c_uint16),  # 0x212
        ("code32_start", c_uint32),  # 0x214
        ("ramdisk_image", c_uint32),  # 0x218
        ("ramdisk_size", c_uint32),  # 0x21C
        ("bootsect_kludge", c_uint32),  # 0x220
        ("heap_end_ptr", c_uint16),  # 0x224
        ("ext_loader_ver", c_uint8),  # 0x226
        ("ext_loader_type", c_uint8),  # 0x227
        ("cmd_line_ptr", c_uint32),  # 0x228
        ("initrd_addr_max", c_uint32),  # 0x22C
        ("kernel_alignment", c_uint32),  # 0x230
        ("relocatable_kernel", c_uint8),  # 0x234
        ("min_alignment", c_uint8),  # 0x235
        ("xloadflags", c_uint16),  # 0x236
        ("cmdline_size", c_uint32),  # 0x238
        ("hardware_subarch", c_uint32),  # 0x23C
        ("hardware_subarch_data", c_uint64),  # 0x240
        ("payload_offset", c_uint32),  # 0x248
        ("payload_length", c_uint32),  # 0x24C
        ("setup_data", c_uint64),  # 0x250
        ("pref_address", c_uint64),  # 0x258
        ("init_size", c_uint32),  # 0x260
        ("handover_offset", c_uint32),  # 0x264
        ("kernel_info_offset", c_uint32),  # 0x268
    ]


class boot_e820_entry(ctypes.LittleEndianStructure):
    _pack_ = 1
    _fields_ = [("addr", c_uint64), ("size", c_uint64), ("type", c_uint32)]


class boot_params(ctypes.LittleEndianStructure):
    """The "zero page". Nested structures the loader never fills (screen_info, apm_bios_info,
    ist_info, edid_info, efi_info, edd_info...) are byte arrays of their size."""

    _pack_ = 1
    _fields_ = [
        ("screen_info", c_uint8 * 0x40),  # 0x000
        ("apm_bios_info", c_uint8 * 0x14),  # 0x040
        ("_pad2", c_uint8 * 4),  # 0x054
        ("tboot_addr", c_uint64),  # 0x058
        ("ist_info", c_uint8 * 0x10),  # 0x060
        ("acpi_rsdp_addr", c_uint64),  # 0x070
        ("_pad3", c_uint8 * 8),  # 0x078
        ("hd0_info", c_uint8 * 16),  # 0x080
        ("hd1_info", c_uint8 * 16),  # 0x090
        ("sys_desc_table", c_uint8 * 16),  # 0x0A0
        ("olpc_ofw_header", c_uint8 * 16),  # 0x0B0
        ("ext_ramdisk_image", c_uint32),  # 0x0C0
        ("ext_ramdisk_size", c_uint32),  # 0x0C4
        ("ext_cmd_line_ptr", c_uint32),  # 0x0C8
        ("_pad4", c_uint8 * 112),  # 0x0CC
        ("cc_blob_address", c_uint32),  # 0x13C
        ("edid_info", c_uint8 * 0x80),  # 0x140
        ("efi_info", c_uint8 * 0x20),  # 0x1C0
        ("alt_mem_k", c_uint32),  # 0x1E0
        ("scratch", c_uint32),  # 0x1E4
        ("e820_entries", c_uint8),  # 0x1E8
        ("eddbuf_entries", c_uint8),  # 0x1E9
        ("edd_mbr_sig_buf_entries", c_uint8),  # 0x1EA
        ("kbd_status", c_uint8),  # 0x1EB
        ("secure_boot", c_uint8),  # 0x1EC
        ("_pad5", c_uint8 * 2),  # 0x1ED
        ("sentinel", c_uint8),  # 0x1EF
        ("_pad6", c_uint8 * 1),  # 0x1F0
        ("hdr", setup_header),  # 0x1F1
        ("_pad7", c_uint8 * (0x290 - 0x1F1 - 0x7B)),  # 0x26C
        ("edd_mbr_sig_buffer", c_uint32 * EDD_MBR_SIG_MAX),  # 0x290
        ("e820_table", boot_e820_entry * E820_MAX_ENTRIES_ZEROPAGE),  # 0x2D0
        ("_pad8", c_uint8 * 48),  # 0xCD0
        ("eddbuf", c_uint8 * (EDD_INFO_SIZE * EDDMAXNR)),  # 0xD00
        ("_pad9", c_uint8 * 276),  # 0xEEC
    ]


assert ctypes.sizeof(setup_header) == 0x7B
assert ctypes.sizeof(boot_params) == BOOT_PARAMS_SIZE
