"""Parse and load a Linux bzImage (Documentation/arch/x86/boot.rst).

A bzImage is the real-mode setup (boot sector + `setup_sects` sectors, holding the setup header
at 0x1F1) followed by the protected-mode kernel: a small decompressor plus the compressed
`vmlinux` (`payload_offset`/`payload_length`). kvmkit skips the real-mode setup and enters the
protected-mode part through the 64-bit boot protocol, so it needs protocol 2.12 or later with
XLF_KERNEL_64 (boot.rst "64-bit Boot Protocol"; Linux 3.8 and newer).

Every offset and length read from the file is checked against the file: a malformed file
raises `BootError`, never IndexError or struct.error.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from kvmkit.arch.x86_64 import layout
from kvmkit.boot.bootparams import (
    BOOT_FLAG,
    BOOT_FLAG_OFFSET,
    DEFAULT_SETUP_SECTS,
    HEADER_MAGIC,
    HEADER_MAGIC_OFFSET,
    LOADED_HIGH,
    SETUP_HEADER_OFFSET,
    XLF_KERNEL_64,
    BootError,
    protocol_str,
    setup_header,
)
from kvmkit.memory.guest import GuestMemory

MIN_PROTOCOL = 0x020C  # 2.12: xloadflags, hence XLF_KERNEL_64 (boot.rst "xloadflags")
SECTOR = 512
# boot.rst "64-bit Boot Protocol": the 64-bit entry is at the protected-mode kernel's load
# address + 0x200 (startup_64, after the 32-bit startup_32 at offset 0).
ENTRY64_OFFSET = 0x200
_HEADER_SIZE = ctypes.sizeof(setup_header)
# Protocol 2.12 defines the header up to init_size (0x260..0x264; boot.rst header table).
_INIT_SIZE_END = SETUP_HEADER_OFFSET + setup_header.init_size.offset + 4


@dataclass(frozen=True)
class BzImage:
    """The setup header of a bzImage, checked, and the file it came from."""

    data: bytes
    header: setup_header  # a copy of the file's setup header (0x1F1 .. 0x26C)
    header_end: int  # file offset just past the header: 0x202 + byte at 0x201 (boot.rst)

    @property
    def version(self) -> int:
        return int(self.header.version)

    @property
    def protocol(self) -> str:
        return protocol_str(self.version)

    @property
    def setup_sects(self) -> int:
        return int(self.header.setup_sects) or DEFAULT_SETUP_SECTS

    @property
    def setup_size(self) -> int:
        """Bytes of the real-mode part: the boot sector plus `setup_sects` sectors."""
        return (self.setup_sects + 1) * SECTOR

    @property
    def syssize(self) -> int:
        """Size of the protected-mode code in 16-byte paragraphs (boot.rst "syssize")."""
        return int(self.header.syssize)

    @property
    def loadflags(self) -> int:
        return int(self.header.loadflags)

    @property
    def xloadflags(self) -> int:
        return int(self.header.xloadflags)

    @property
    def kernel_alignment(self) -> int:
        return int(self.header.kernel_alignment)

    @property
    def relocatable(self) -> bool:
        return bool(self.header.relocatable_kernel)

    @property
    def init_size(self) -> int:
        """Linear memory the kernel needs from its (possibly relocated) start to boot."""
        return int(self.header.init_size)

    @property
    def pref_address(self) -> int:
        return int(self.header.pref_address)

    @property
    def cmdline_size(self) -> int:
        """Longest command line, without the terminating NUL (boot.rst "cmdline_size")."""
        return int(self.header.cmdline_size)

    @property
    def initrd_addr_max(self) -> int:
        """Highest address the initrd's last byte may occupy (boot.rst "initrd_addr_max")."""
        return int(self.header.initrd_addr_max)

    @property
    def payload_offset(self) -> int:
        """Offset of the compressed vmlinux from the start of the protected-mode code."""
        return int(self.header.payload_offset)

    @property
    def payload_length(self) -> int:
        return int(self.header.payload_length)

    @property
    def kernel(self) -> bytes:
        """The protected-mode part, what is loaded at the load address."""
        return self.data[self.setup_size :]

    @property
    def payload(self) -> bytes:
        start = self.setup_size + self.payload_offset
        return self.data[start : start + self.payload_length]

    def setup_header_bytes(self) -> bytes:
        """The file's setup header, 0x1F1 .. header_end, for the zero page (boot.rst
        "64-bit Boot Protocol": load the setup header from the image into boot_params)."""
        return self.data[SETUP_HEADER_OFFSET : self.header_end]

    def footprint(self, load_addr: int = layout.KERNEL_LOAD_ADDR) -> tuple[int, int]:
        """[start, end) of the memory the kernel uses while booting when loaded at
        `load_addr`: the image itself, and the `init_size` buffer the decompressor works in.

        arch/x86/boot/compressed/head_64.S (startup_64): a relocatable kernel decompresses at
        its load address rounded up to `kernel_alignment`, but never below LOAD_PHYSICAL_ADDR
        (which the header carries as `pref_address`, protocol 2.10+); a fixed one at
        LOAD_PHYSICAL_ADDR. Either way it uses `init_size` bytes from there.
        """
        base = self.pref_address
        if self.relocatable and self.kernel_alignment:
            align = self.kernel_alignment
            base = max(base, (load_addr + align - 1) // align * align)
        end = max(load_addr + len(self.kernel), base + self.init_size)
        return load_addr, end


def parse_bzimage(data: bytes) -> BzImage:
    """Check a bzImage's header and return it; `BootError` with one line if it is not a
    64-bit-bootable bzImage."""
    if len(data) < HEADER_MAGIC_OFFSET + 4:
        raise BootError(f"not a Linux kernel: file too small ({len(data)} bytes)")
    boot_flag = int.from_bytes(data[BOOT_FLAG_OFFSET : BOOT_FLAG_OFFSET + 2], "little")
    if boot_flag != BOOT_FLAG:
        raise BootError("not a Linux kernel: no boot sector signature 0xAA55 at 0x1FE")
    if data[HEADER_MAGIC_OFFSET : HEADER_MAGIC_OFFSET + 4] != HEADER_MAGIC:
        raise BootError("not a bzImage: no 'HdrS' setup header at 0x202 (boot protocol < 2.00)")
    # The header ends at 0x202 + the byte at 0x201 (the jump's displacement; boot.rst
    # "64-bit Boot Protocol"). Pad the copy to the full structure; fields past header_end
    # belong to newer protocol versions and are only read when the version has them.
    header_end = HEADER_MAGIC_OFFSET + data[0x201]
    raw = data[SETUP_HEADER_OFFSET : SETUP_HEADER_OFFSET + _HEADER_SIZE]
    hdr = setup_header.from_buffer_copy(raw.ljust(_HEADER_SIZE, b"\0"))
    version = int(hdr.version)
    if version < MIN_PROTOCOL:
        raise BootError(
            f"unsupported boot protocol version {protocol_str(version)} "
            f"(kvmkit needs 2.12 or later for the 64-bit entry; Linux 3.8+)"
        )
    if header_end < _INIT_SIZE_END:
        raise BootError(
            f"corrupt kernel: setup header ends at {header_end:#x}, before the fields "
            f"protocol {protocol_str(version)} defines"
        )
    image = BzImage(data, hdr, header_end)
    if image.setup_size < header_end:
        raise BootError(
            f"corrupt kernel: setup_sects {image.setup_sects} is smaller than the setup header"
        )
    if not image.loadflags & LOADED_HIGH:
        raise BootError("unsupported kernel: a zImage (loaded low); kvmkit needs a bzImage")
    if not image.xloadflags & XLF_KERNEL_64:
        raise BootError(
            "unsupported kernel: no 64-bit entry point (XLF_KERNEL_64 unset; a 32-bit kernel?)"
        )
    if image.setup_size >= len(data):
        raise BootError(
            f"truncated kernel: {len(data)} bytes, but the real-mode setup alone is "
            f"{image.setup_size} bytes"
        )
    kernel_size = len(data) - image.setup_size
    if image.syssize * 16 > kernel_size:
        raise BootError(
            f"truncated kernel: the header says {image.syssize * 16} bytes of protected-mode "
            f"code, the file has {kernel_size}"
        )
    if image.payload_length and image.payload_offset + image.payload_length > kernel_size:
        raise BootError(
            f"corrupt kernel: payload {image.payload_offset:#x}+{image.payload_length:#x} "
            f"lies outside the {kernel_size:#x}-byte protected-mode code"
        )
    if image.relocatable and image.kernel_alignment & (image.kernel_alignment - 1):
        raise BootError(
            f"corrupt kernel: kernel_alignment {image.kernel_alignment:#x} is not a power of two"
        )
    return image


def load_bzimage(
    mem: GuestMemory, image: BzImage, ram_end: int, load_addr: int = layout.KERNEL_LOAD_ADDR
) -> tuple[int, int]:
    """Copy the protected-mode kernel to `load_addr` (boot.rst: a bzImage's protected-mode
    code goes at 0x100000) after checking that it and its `init_size` decompression buffer fit
    in low RAM ending at `ram_end`. Returns the footprint [start, end)."""
    start, end = image.footprint(load_addr)
    if end > ram_end:
        need = (end + (1 << 20) - 1) >> 20
        raise BootError(
            f"kernel needs {need} MiB of low memory to boot (init_size {image.init_size >> 20} "
            f"MiB at {max(start, end - image.init_size):#x}), the VM has {ram_end >> 20} MiB"
        )
    mem.write(load_addr, image.kernel)
    return start, end
