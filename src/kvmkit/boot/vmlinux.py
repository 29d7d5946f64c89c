"""Extract the ELF `vmlinux` from a bzImage's compressed payload.

The payload (boot.rst "payload_offset"/"payload_length", protocol 2.08+) is the vmlinux ELF
compressed with the kernel's CONFIG_KERNEL_* method, followed by its uncompressed size as a
32-bit little-endian number (scripts/Makefile.lib `size_append`). gzip, xz, lzma and bzip2 are
decompressed with the standard library; zstd (not in Python 3.11's stdlib) through the `zstd`
or `unzstd` command when one is installed; lz4 and lzo are not supported.

With the vmlinux, the same kernel can be booted through PVH (kvmkit.boot.pvh).
"""

from __future__ import annotations

import bz2
import lzma
import shutil
import subprocess
import zlib
from typing import Protocol

from kvmkit.boot.bootparams import BootError
from kvmkit.boot.bzimage import BzImage, parse_bzimage

# Refuse to inflate beyond this (a decompression bomb, or a corrupt size trailer).
MAX_VMLINUX_SIZE = 1 << 30

_MAGICS: list[tuple[bytes, str]] = [
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"BZh", "bzip2"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"\x02\x21\x4c\x18", "lz4"),
    (b"\x89LZO", "lzo"),
    (b"\x5d\x00\x00", "lzma"),  # lzma "alone" header: properties 0x5D, dictionary size...
]


class _Decompressor(Protocol):
    def decompress(self, data: bytes, max_length: int = -1) -> bytes: ...


def compression_of(payload: bytes) -> str:
    """The compression method of a bzImage payload, from its magic bytes ("unknown" if none
    matches)."""
    for magic, name in _MAGICS:
        if payload.startswith(magic):
            return name
    return "unknown"


def _stdlib_decompress(name: str, data: bytes, limit: int) -> bytes:
    d: _Decompressor
    if name == "gzip":
        d = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
    elif name == "xz":
        d = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    elif name == "lzma":
        d = lzma.LZMADecompressor(format=lzma.FORMAT_ALONE)
    else:
        d = bz2.BZ2Decompressor()
    try:
        # One step with a cap: anything beyond the announced size is an error below.
        return d.decompress(data, limit + 1)
    except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError) as err:
        raise BootError(f"corrupt kernel: the {name} payload does not decompress ({err})") from err


def _zstd_cli(data: bytes) -> bytes:
    for tool in ("zstd", "unzstd"):
        path = shutil.which(tool)
        if path is None:
            continue
        argv = [path, "-d", "-c", "-q"] if tool == "zstd" else [path, "-c", "-q"]
        proc = subprocess.run(argv, input=data, capture_output=True)
        if proc.returncode != 0:
            msg = proc.stderr.decode(errors="replace").strip().splitlines()
            raise BootError(
                f"corrupt kernel: {tool} could not decompress the payload "
                f"({msg[-1] if msg else f'exit status {proc.returncode}'})"
            )
        return proc.stdout
    raise BootError(
        "the kernel is zstd-compressed: Python's standard library has no zstd, and neither "
        "`zstd` nor `unzstd` is installed (apt-get install zstd), or boot the bzImage instead"
    )


def extract_vmlinux(image: BzImage | bytes) -> bytes:
    """The uncompressed ELF vmlinux inside a bzImage (its bytes, or a parsed `BzImage`)."""
    if not isinstance(image, BzImage):
        image = parse_bzimage(image)
    if image.version < 0x0208 or image.payload_length == 0:
        raise BootError(f"kernel (protocol {image.protocol}) does not describe its payload")
    payload = image.payload
    if len(payload) < 8:
        raise BootError(f"corrupt kernel: payload of only {len(payload)} bytes")
    name = compression_of(payload)
    # scripts/Makefile.lib size_append: the uncompressed size follows the compressed data.
    expected = int.from_bytes(payload[-4:], "little")
    if not 0 < expected <= MAX_VMLINUX_SIZE:
        raise BootError(f"corrupt kernel: implausible uncompressed size {expected} in payload")
    if name in ("gzip", "xz", "lzma", "bzip2"):
        elf = _stdlib_decompress(name, payload, expected)
    elif name == "zstd":
        elf = _zstd_cli(payload[:-4])
    else:
        raise BootError(
            f"unsupported kernel compression {name} (kvmkit extracts gzip, xz, lzma, bzip2 and "
            "zstd); boot the bzImage instead"
        )
    if len(elf) != expected:
        raise BootError(
            f"corrupt kernel: {name} payload gave {len(elf)} bytes, its trailer says {expected}"
        )
    if elf[:4] != b"\x7fELF":
        raise BootError(f"corrupt kernel: the {name} payload is not an ELF vmlinux")
    return elf
