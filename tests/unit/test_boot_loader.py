"""load_linux: the zero page, e820, initrd, command line, PVH start info, bad input.

Uses Debian's generic kernel as the lane unpacked it (fetched through the lane's asset code
when missing), and the vmlinux extracted from it for PVH.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmkit.arch.x86_64 import layout
from kvmkit.boot.bootparams import LOADED_HIGH, XLF_KERNEL_64, BootError, setup_header
from kvmkit.boot.bzimage import parse_bzimage
from kvmkit.boot.elf import ElfFile
from kvmkit.boot.loader import BootSetup, load_linux, memory_map
from kvmkit.boot.pvh import XEN_HVM_START_MAGIC_VALUE, pvh_entry
from kvmkit.boot.vmlinux import compression_of, extract_vmlinux
from kvmkit.lane.assets import LaneKernel, ensure_kernel
from kvmkit.memory.guest import GuestMemory

MIB = 1 << 20
GIB = 1 << 30
RAM, RESERVED = 1, 2


@pytest.fixture(scope="module")
def debian_kernel() -> LaneKernel:
    """Debian's generic kernel, unpacked by the lane's asset code (fetched if missing)."""
    return ensure_kernel()


@pytest.fixture(scope="module")
def vmlinux(debian_kernel: LaneKernel, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ELF vmlinux extracted from Debian's bzImage by kvmkit.boot.vmlinux."""
    path = tmp_path_factory.mktemp("vmlinux") / "vmlinux"
    path.write_bytes(extract_vmlinux(debian_kernel.vmlinuz.read_bytes()))
    return path


def guest_memory(mem_size: int) -> GuestMemory:
    mem = GuestMemory()
    for start, size in layout.ram_ranges(mem_size):
        mem.add_anonymous(start, size)
    return mem


@pytest.fixture
def mem512() -> Iterator[GuestMemory]:
    mem = guest_memory(512 * MIB)
    yield mem
    mem.close()


@pytest.fixture
def initrd(tmp_path: Path) -> Path:
    path = tmp_path / "initrd.img"
    path.write_bytes(bytes(range(256)) * 4096 + b"tail")  # 1 MiB + 4 bytes: not page-sized
    return path


def u8(mem: GuestMemory, addr: int) -> int:
    return mem.read_u8(addr)


def u16(mem: GuestMemory, addr: int) -> int:
    return mem.read_u16(addr)


def u32(mem: GuestMemory, addr: int) -> int:
    return mem.read_u32(addr)


def u64(mem: GuestMemory, addr: int) -> int:
    return mem.read_u64(addr)


def e820_from_zero_page(mem: GuestMemory) -> list[tuple[int, int, int]]:
    zp = layout.ZERO_PAGE_ADDR
    count = u8(mem, zp + 0x1E8)  # zero-page.rst 1E8 e820_entries
    return [
        struct.unpack("<QQI", mem.read(zp + 0x2D0 + i * 20, 20))  # 2D0 e820_table
        for i in range(count)
    ]


# -- the memory map


def test_e820_512mib() -> None:
    assert memory_map(512 * MIB) == [
        (0, 0x9FC00, RAM),
        (0x9FC00, 0x100000 - 0x9FC00, RESERVED),  # EBDA/MP table, VGA hole, ACPI, BIOS
        (0x100000, 512 * MIB - 0x100000, RAM),
    ]


def test_e820_4gib_puts_ram_above_4gib() -> None:
    assert memory_map(4 * GIB) == [
        (0, 0x9FC00, RAM),
        (0x9FC00, 0x60400, RESERVED),
        (0x100000, 3 * GIB - 0x100000, RAM),
        (4 * GIB, 1 * GIB, RAM),  # the part of the 4 GiB that the MMIO gap displaced
    ]


def test_e820_extra_reserved_ranges_are_carved_out() -> None:
    assert memory_map(512 * MIB, [(0x200000, 0x1000), (0xD000_0000, 0x1000)]) == [
        (0, 0x9FC00, RAM),
        (0x9FC00, 0x60400, RESERVED),
        (0x100000, 0x100000, RAM),
        (0x200000, 0x1000, RESERVED),
        (0x201000, 512 * MIB - 0x201000, RAM),
        (0xD000_0000, 0x1000, RESERVED),  # outside RAM (MMIO window): reserved only
    ]


# -- bzImage through the 64-bit boot protocol


def test_zero_page_fields_by_offset(
    debian_kernel: LaneKernel, mem512: GuestMemory, initrd: Path
) -> None:
    data = debian_kernel.vmlinuz.read_bytes()
    image = parse_bzimage(data)
    setup = load_linux(
        mem512, debian_kernel.vmlinuz, initrd=initrd, cmdline="console=ttyS0 quiet",
        mem_size=512 * MIB, rsdp_addr=0xE0000,
    )  # fmt: skip
    assert setup == BootSetup(
        "linux64", 0x100200, layout.ZERO_PAGE_ADDR, setup.kernel_range, setup.initrd_range,
        b"console=ttyS0 quiet",
    )  # fmt: skip
    assert setup.entry == layout.KERNEL_LOAD_ADDR + 0x200  # boot.rst: 64-bit entry
    zp = layout.ZERO_PAGE_ADDR
    # Offsets from boot.rst's header table and zero-page.rst.
    assert mem512.read(zp + 0x202, 4) == b"HdrS"
    assert u16(mem512, zp + 0x1FE) == 0xAA55
    assert u16(mem512, zp + 0x206) == image.version
    assert u8(mem512, zp + 0x1F1) == data[0x1F1]  # setup_sects copied from the image
    assert u8(mem512, zp + 0x210) == 0xFF  # type_of_loader: undefined
    assert u8(mem512, zp + 0x211) == data[0x211] | 0x80  # loadflags |= CAN_USE_HEAP
    assert u8(mem512, zp + 0x211) & LOADED_HIGH
    assert u16(mem512, zp + 0x224) == 0xDE00  # heap_end_ptr = 0xE000 - 0x200
    assert u32(mem512, zp + 0x228) == layout.CMDLINE_ADDR  # cmd_line_ptr
    assert u32(mem512, zp + 0x0C8) == 0  # ext_cmd_line_ptr
    assert setup.initrd_range is not None
    start, end = setup.initrd_range
    assert u32(mem512, zp + 0x218) == start  # ramdisk_image
    assert u32(mem512, zp + 0x21C) == end - start == initrd.stat().st_size  # ramdisk_size
    assert u32(mem512, zp + 0x0C0) == u32(mem512, zp + 0x0C4) == 0  # ext_ramdisk_*
    assert u64(mem512, zp + 0x070) == 0xE0000  # acpi_rsdp_addr
    assert u16(mem512, zp + 0x236) & XLF_KERNEL_64  # xloadflags copied
    assert u32(mem512, zp + 0x238) == image.cmdline_size
    # Outside the header everything else is zero (a clean boot_params), e.g. the sentinel.
    assert u8(mem512, zp + 0x1EF) == 0
    assert mem512.read(zp, 0x40) == bytes(0x40)
    assert e820_from_zero_page(mem512) == memory_map(512 * MIB)
    # The command line, NUL-terminated, and the kernel where the header says.
    assert mem512.read(layout.CMDLINE_ADDR, 20) == b"console=ttyS0 quiet\0"
    assert mem512.read(layout.KERNEL_LOAD_ADDR, 4096) == image.kernel[:4096]
    assert setup.kernel_range == image.footprint()


def test_initrd_placement(debian_kernel: LaneKernel, mem512: GuestMemory, initrd: Path) -> None:
    setup = load_linux(mem512, debian_kernel.vmlinuz, initrd=initrd, cmdline="",
                       mem_size=512 * MIB)  # fmt: skip
    assert setup.initrd_range is not None
    start, end = setup.initrd_range
    assert start % 4096 == 0
    assert end <= 512 * MIB  # top of low RAM...
    assert 512 * MIB - end < 4096  # ...as high as page alignment allows
    assert start >= setup.kernel_range[1]  # above the kernel's init_size footprint
    assert mem512.read(start, end - start) == initrd.read_bytes()


def test_initrd_below_initrd_addr_max_with_4gib(debian_kernel: LaneKernel, initrd: Path) -> None:
    mem = guest_memory(4 * GIB)
    try:
        load_linux(mem, debian_kernel.vmlinuz, initrd=initrd, cmdline="", mem_size=4 * GIB)
        zp = layout.ZERO_PAGE_ADDR
        image_max = parse_bzimage(debian_kernel.vmlinuz.read_bytes()).initrd_addr_max
        start = u32(mem, zp + 0x218)
        size = u32(mem, zp + 0x21C)
        assert start + size - 1 <= min(image_max, 3 * GIB - 1)
        assert min(image_max + 1, 3 * GIB) - (start + size) < 4096
        e820 = e820_from_zero_page(mem)
        assert e820 == memory_map(4 * GIB)
        assert (4 * GIB, 1 * GIB, RAM) in e820
    finally:
        mem.close()


def test_initrd_too_large(debian_kernel: LaneKernel, tmp_path: Path) -> None:
    big = tmp_path / "big.img"
    with open(big, "wb") as fh:
        fh.truncate(60 * MIB)  # sparse: no disk used
    mem = guest_memory(128 * MIB)
    try:
        # The kernel's footprint ends at 16 MiB + init_size (~80 MiB): 60 MiB does not fit.
        with pytest.raises(BootError, match=r"initrd too large for 128 MiB of memory: .* is "
                                            r"60 MiB, \d+ MiB are free"):  # fmt: skip
            load_linux(mem, debian_kernel.vmlinuz, initrd=big, cmdline="", mem_size=128 * MIB)
    finally:
        mem.close()


def test_cmdline_length_limit(debian_kernel: LaneKernel, mem512: GuestMemory) -> None:
    limit = parse_bzimage(debian_kernel.vmlinuz.read_bytes()).cmdline_size
    ok = load_linux(mem512, debian_kernel.vmlinuz, initrd=None, cmdline="x" * limit,
                    mem_size=512 * MIB)  # fmt: skip
    assert len(ok.cmdline) == limit
    assert mem512.read(layout.CMDLINE_ADDR + limit, 1) == b"\0"
    with pytest.raises(BootError, match=rf"command line too long: {limit + 1} bytes, .* {limit}"):
        load_linux(mem512, debian_kernel.vmlinuz, initrd=None, cmdline="x" * (limit + 1),
                   mem_size=512 * MIB)  # fmt: skip


def test_memory_too_small_for_the_kernel(debian_kernel: LaneKernel) -> None:
    mem = guest_memory(64 * MIB)
    try:
        with pytest.raises(BootError, match=r"kernel needs \d+ MiB of low memory.* 64 MiB"):
            load_linux(mem, debian_kernel.vmlinuz, initrd=None, cmdline="", mem_size=64 * MIB)
    finally:
        mem.close()


def test_bad_files(tmp_path: Path, mem512: GuestMemory, debian_kernel: LaneKernel) -> None:
    def load(kernel: Path, initrd: Path | None = None) -> BootSetup:
        return load_linux(mem512, kernel, initrd=initrd, cmdline="", mem_size=512 * MIB)

    with pytest.raises(BootError, match=r"kernel not found: .*nope"):
        load(tmp_path / "nope")
    with pytest.raises(BootError, match="cannot read kernel"):
        load(tmp_path)  # a directory
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(BootError, match="empty"):
        load(tmp_path / "empty")
    (tmp_path / "text").write_text("hello world\n" * 200)
    with pytest.raises(BootError, match="not a Linux kernel"):
        load(tmp_path / "text")
    (tmp_path / "short").write_bytes(debian_kernel.vmlinuz.read_bytes()[:100_000])
    with pytest.raises(BootError, match="truncated kernel"):
        load(tmp_path / "short")
    (tmp_path / "bad.elf").write_bytes(b"\x7fELF\x02\x01\x01" + bytes(20))
    with pytest.raises(BootError, match="not a bootable kernel"):
        load(tmp_path / "bad.elf")
    with pytest.raises(BootError, match="initrd not found"):
        load(debian_kernel.vmlinuz, tmp_path / "no-initrd")
    with pytest.raises(BootError, match=r"initrd .*empty"):
        load(debian_kernel.vmlinuz, tmp_path / "empty")


def test_booterror_is_a_user_error() -> None:
    from kvmkit.errors import UserError

    assert issubclass(BootError, UserError) and BootError("x").exit_status == 2


# -- the vmlinux inside the bzImage, and PVH


def test_extracted_vmlinux_is_the_kernel_elf(debian_kernel: LaneKernel, vmlinux: Path) -> None:
    data = vmlinux.read_bytes()
    image = parse_bzimage(debian_kernel.vmlinuz.read_bytes())
    assert len(data) == int.from_bytes(image.payload[-4:], "little")
    elf = ElfFile(data)
    assert elf.is64 and elf.machine == 62  # EM_X86_64
    # The lane writes the same extraction (with liblzma) for QEMU; when present, they agree.
    if debian_kernel.vmlinux.is_file():
        assert debian_kernel.vmlinux.stat().st_size == len(data)


def test_pvh_note_matches_config_pvh(debian_kernel: LaneKernel, vmlinux: Path) -> None:
    config = (debian_kernel.root / "boot" / f"config-{debian_kernel.kver}").read_text()
    entry = pvh_entry(ElfFile(vmlinux.read_bytes()))
    assert ("\nCONFIG_PVH=y\n" in config) == (entry is not None)
    assert entry is not None, "Debian's generic kernel is built with CONFIG_PVH=y"
    assert 0x1000000 <= entry < 1 << 32


def test_pvh_start_info(vmlinux: Path, mem512: GuestMemory, initrd: Path) -> None:
    setup = load_linux(mem512, vmlinux, initrd=initrd, cmdline="console=ttyS0",
                       mem_size=512 * MIB, rsdp_addr=0xE0000)  # fmt: skip
    elf = ElfFile(vmlinux.read_bytes())
    assert setup.protocol == "pvh"
    assert setup.entry == pvh_entry(elf)
    assert setup.params_addr == layout.PVH_INFO_ADDR
    si = layout.PVH_INFO_ADDR
    # start_info.h: magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap...
    assert u32(mem512, si + 0x00) == XEN_HVM_START_MAGIC_VALUE == 0x336EC578
    assert u32(mem512, si + 0x04) == 1
    assert u32(mem512, si + 0x08) == 0
    assert u32(mem512, si + 0x0C) == 1
    assert u64(mem512, si + 0x10) == layout.PVH_MODLIST_ADDR
    assert u64(mem512, si + 0x18) == layout.CMDLINE_ADDR
    assert u64(mem512, si + 0x20) == 0xE0000
    assert u64(mem512, si + 0x28) == layout.PVH_MEMMAP_ADDR
    count = u32(mem512, si + 0x30)
    assert u32(mem512, si + 0x34) == 0
    table = [
        struct.unpack("<QQII", mem512.read(layout.PVH_MEMMAP_ADDR + i * 24, 24))
        for i in range(count)
    ]
    assert [(a, s, t) for a, s, t, _r in table] == memory_map(512 * MIB)
    assert all(r == 0 for *_x, r in table)
    assert setup.initrd_range is not None
    start, end = setup.initrd_range
    mod = struct.unpack("<QQQQ", mem512.read(layout.PVH_MODLIST_ADDR, 32))
    assert mod == (start, end - start, 0, 0)
    assert mem512.read(start, end - start) == initrd.read_bytes()
    assert mem512.read(layout.CMDLINE_ADDR, 14) == b"console=ttyS0\0"
    # Every PT_LOAD segment is at its physical address.
    for seg in elf.load_segments:
        assert mem512.read(seg.paddr, min(seg.filesz, 4096)) == elf.segment_data(seg)[:4096]
    assert start >= setup.kernel_range[1]


def without_pvh_note(vmlinux: Path, out: Path) -> Path:
    """A copy of `vmlinux` whose PVH note is renamed to another note type: the kernels
    Firecracker's guides build have none."""
    data = bytearray(vmlinux.read_bytes())
    # The note header: namesz 4, descsz 8, type 18 (XEN_ELFNOTE_PHYS32_ENTRY), "Xen\0".
    note = struct.pack("<III", 4, 8, 18) + b"Xen\0"
    at = data.find(note)
    assert at > 0
    data[at + 8 : at + 12] = struct.pack("<I", 0x7F)
    out.write_bytes(bytes(data))
    return out


def test_elf_without_pvh_note_boots_through_the_64bit_protocol(
    vmlinux: Path, tmp_path: Path, mem512: GuestMemory, initrd: Path
) -> None:
    path = without_pvh_note(vmlinux, tmp_path / "vmlinux-nopvh")
    elf = ElfFile(path.read_bytes())
    assert pvh_entry(elf) is None
    setup = load_linux(
        mem512, path, initrd=initrd, cmdline="console=ttyS0 root=/dev/vda", mem_size=512 * MIB,
        rsdp_addr=0xE0000,
    )  # fmt: skip
    # boot.rst "64-bit Boot Protocol", as Firecracker boots a vmlinux: the ELF entry point
    # (phys_startup_64) with RSI at the zero page.
    assert setup.protocol == "linux64" and setup.entry == elf.entry == 0x1000000
    assert setup.params_addr == layout.ZERO_PAGE_ADDR
    zp = layout.ZERO_PAGE_ADDR
    assert mem512.read(zp + 0x202, 4) == b"HdrS" and u16(mem512, zp + 0x1FE) == 0xAA55
    assert u8(mem512, zp + 0x210) == 0xFF  # type_of_loader
    assert u32(mem512, zp + 0x230) == 0x1000000  # kernel_alignment
    assert u32(mem512, zp + 0x228) == layout.CMDLINE_ADDR  # cmd_line_ptr
    assert mem512.read(layout.CMDLINE_ADDR, 28) == b"console=ttyS0 root=/dev/vda\0"
    assert u64(mem512, zp + 0x070) == 0xE0000  # acpi_rsdp_addr
    assert e820_from_zero_page(mem512) == memory_map(512 * MIB)
    assert setup.initrd_range is not None
    start, end = setup.initrd_range
    assert u32(mem512, zp + 0x218) == start and u32(mem512, zp + 0x21C) == end - start
    assert start >= setup.kernel_range[1]
    for seg in elf.load_segments:
        assert mem512.read(seg.paddr, min(seg.filesz, 4096)) == elf.segment_data(seg)[:4096]


def test_elf_of_another_machine_is_refused(tmp_path: Path, mem512: GuestMemory) -> None:
    data = bytearray(b"\x7fELF\x01\x01\x01" + bytes(9))  # 32-bit, little-endian
    data += struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, 0x100000, 52, 0, 0, 52, 32, 1, 0, 0, 0)
    data += struct.pack("<IIIIIIII", 1, 0, 0x100000, 0x100000, 0, 0x1000, 5, 0x1000)
    path = tmp_path / "k32"
    path.write_bytes(bytes(data))
    with pytest.raises(BootError, match="not an x86-64 vmlinux"):
        load_linux(mem512, path, initrd=None, cmdline="", mem_size=512 * MIB)


# -- vmlinux extraction for every compression kvmkit handles

TINY_ELF = b"\x7fELF\x02\x01\x01" + bytes(57) + b"kernel" * 100


def bzimage_with_payload(payload: bytes) -> bytes:
    kernel = b"\x90" * 0x200
    body = kernel + payload
    hdr = setup_header(
        setup_sects=1, boot_flag=0xAA55, header=int.from_bytes(b"HdrS", "little"),
        version=0x020F, loadflags=LOADED_HIGH, xloadflags=XLF_KERNEL_64, jump=0x6AEB,
        init_size=0x100000, syssize=(len(body) + 15) // 16, payload_offset=len(kernel),
        payload_length=len(payload),
    )  # fmt: skip
    setup = bytearray(1024)
    setup[0x1F1 : 0x1F1 + len(bytes(hdr))] = bytes(hdr)
    return bytes(setup) + body + bytes(-len(body) % 16)


def _sized(compressed: bytes, size: int = len(TINY_ELF)) -> bytes:
    return compressed + size.to_bytes(4, "little")  # scripts/Makefile.lib size_append


@pytest.mark.parametrize(
    ("name", "compress"),
    [
        ("gzip", gzip.compress),
        ("xz", lambda d: lzma.compress(d, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32)),
        ("lzma", lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE)),
        ("bzip2", bz2.compress),
    ],
)
def test_extract_stdlib_compressions(name: str, compress: object) -> None:
    assert callable(compress)
    payload = _sized(compress(TINY_ELF))
    assert compression_of(payload) == name
    assert extract_vmlinux(bzimage_with_payload(payload)) == TINY_ELF


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd CLI not installed")
def test_extract_zstd_through_the_cli() -> None:
    compressed = subprocess.run(["zstd", "-q", "-c"], input=TINY_ELF, capture_output=True,
                                check=True).stdout  # fmt: skip
    payload = _sized(compressed)
    assert compression_of(payload) == "zstd"
    assert extract_vmlinux(bzimage_with_payload(payload)) == TINY_ELF


def test_extract_errors() -> None:
    with pytest.raises(BootError, match="unsupported kernel compression lz4"):
        extract_vmlinux(bzimage_with_payload(_sized(b"\x02\x21\x4c\x18" + bytes(40))))
    with pytest.raises(BootError, match="does not decompress"):
        extract_vmlinux(bzimage_with_payload(_sized(b"\x1f\x8b" + bytes(40))))
    with pytest.raises(BootError, match="trailer says"):
        extract_vmlinux(bzimage_with_payload(_sized(gzip.compress(TINY_ELF), 12345)))
    with pytest.raises(BootError, match="implausible"):
        extract_vmlinux(bzimage_with_payload(_sized(gzip.compress(TINY_ELF), 0)))
    with pytest.raises(BootError, match="not an ELF"):
        extract_vmlinux(bzimage_with_payload(_sized(gzip.compress(b"x" * 100), 100)))
    with pytest.raises(BootError, match="does not describe its payload"):
        extract_vmlinux(bzimage_with_payload(b""))


# -- the boot page tables' reach, the same rule for both 64-bit ways in


def _elf64_segment_at(paddr: int, memsz: int) -> bytes:
    """An x86-64 ELF executable of one PT_LOAD segment (no PVH note), entry at its start."""
    header = b"\x7fELF\x02\x01\x01" + bytes(9) + struct.pack(
        "<HHIQQQIHHHHHH", 2, 62, 1, paddr, 64, 0, 0, 64, 56, 1, 0, 0, 0
    )
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, paddr, paddr, 16, memsz, 0x1000)
    return (header + phdr).ljust(0x1000, b"\0") + b"\x90" * 16


@pytest.mark.parametrize("kind", ["elf", "bzimage"])
def test_a_kernel_beyond_the_boot_identity_map_is_refused(kind: str, tmp_path: Path) -> None:
    from test_boot_bzimage import make_bzimage

    mem = GuestMemory()
    mem.add_anonymous(0, 2 << 30)
    path = tmp_path / kind
    if kind == "elf":
        path.write_bytes(_elf64_segment_at(layout.BOOT_IDENTITY_MAP - 0x1000, 0x2000))
    else:
        path.write_bytes(make_bzimage(init_size=layout.BOOT_IDENTITY_MAP))
    with pytest.raises(BootError, match=r"kernel needs 1\d\d\d MiB identity-mapped, the boot "
                                        r"page tables map 1024 MiB"):  # fmt: skip
        load_linux(mem, path, initrd=None, cmdline="", mem_size=2 << 30)
    mem.close()
