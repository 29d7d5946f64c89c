"""The bzImage header parser: Debian's real kernel, crafted headers, malformed files, fuzzing."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.arch.x86_64 import layout
from kvmkit.boot.bootparams import (
    LOADED_HIGH,
    XLF_CAN_BE_LOADED_ABOVE_4G,
    XLF_KERNEL_64,
    BootError,
    setup_header,
)
from kvmkit.boot.bzimage import BzImage, load_bzimage, parse_bzimage
from kvmkit.boot.vmlinux import compression_of
from kvmkit.lane.assets import LaneKernel, ensure_kernel
from kvmkit.memory.guest import GuestMemory


@pytest.fixture(scope="module")
def debian_kernel() -> LaneKernel:
    """Debian's generic kernel, unpacked by the lane's asset code (fetched if missing)."""
    return ensure_kernel()


def make_bzimage(
    *,
    version: int = 0x020F,
    setup_sects: int = 1,
    loadflags: int = LOADED_HIGH,
    xloadflags: int = XLF_KERNEL_64,
    kernel: bytes = b"\x90" * 0x400,
    payload: bytes = b"",
    init_size: int = 0x200000,
    cmdline_size: int = 2047,
    initrd_addr_max: int = 0x7FFFFFFF,
    relocatable: int = 1,
    kernel_alignment: int = 0x200000,
    pref_address: int = 0x1000000,
) -> bytes:
    """A minimal bzImage: boot sector + setup sectors holding the header, then `kernel`
    (`payload` appended to it and described by payload_offset/length)."""
    setup = bytearray((setup_sects or 4) * 512 + 512)
    body = kernel + payload
    hdr = setup_header(
        setup_sects=setup_sects, boot_flag=0xAA55, header=int.from_bytes(b"HdrS", "little"),
        version=version, loadflags=loadflags, xloadflags=xloadflags, init_size=init_size,
        cmdline_size=cmdline_size, initrd_addr_max=initrd_addr_max,
        relocatable_kernel=relocatable, kernel_alignment=kernel_alignment,
        pref_address=pref_address, syssize=(len(body) + 15) // 16,
        payload_offset=len(kernel) if payload else 0, payload_length=len(payload),
        # A short jump over the header: the header ends at 0x202 + 0x6A = 0x26C.
        jump=0x6AEB,
    )  # fmt: skip
    setup[0x1F1 : 0x1F1 + len(bytes(hdr))] = bytes(hdr)
    return bytes(setup) + body + bytes(-len(body) % 16)


def test_parses_debians_kernel(debian_kernel: LaneKernel) -> None:
    data = debian_kernel.vmlinuz.read_bytes()
    image = parse_bzimage(data)
    assert image.version >= 0x020C
    assert re.fullmatch(r"2\.\d\d", image.protocol)
    assert 1 <= image.setup_sects <= 64
    assert image.setup_size + image.syssize * 16 <= len(data)
    assert image.xloadflags & XLF_KERNEL_64 and image.xloadflags & XLF_CAN_BE_LOADED_ABOVE_4G
    assert image.loadflags & LOADED_HIGH
    assert image.relocatable
    assert image.kernel_alignment and not image.kernel_alignment & (image.kernel_alignment - 1)
    assert image.cmdline_size >= 255
    assert image.initrd_addr_max >= 0x37FFFFFF  # boot.rst: the 2.03+ default or more
    assert image.init_size > len(image.kernel)
    assert (
        0 < image.payload_offset < image.payload_offset + image.payload_length <= len(image.kernel)
    )
    assert image.header_end == 0x26C or image.header_end >= 0x264
    # The payload's compression is the one the kernel's config chose.
    config = (debian_kernel.root / "boot" / f"config-{debian_kernel.kver}").read_text()
    chosen = re.search(r"^CONFIG_KERNEL_(\w+)=y$", config, re.M)
    assert chosen is not None
    assert compression_of(image.payload) == chosen.group(1).lower()
    # The kernel's trailer: uncompressed size, plausible for a vmlinux.
    assert 10 << 20 < int.from_bytes(image.payload[-4:], "little") < 1 << 30


def test_crafted_header_fields() -> None:
    image = parse_bzimage(make_bzimage(setup_sects=3, init_size=0x300000, cmdline_size=4095))
    assert (image.setup_sects, image.setup_size) == (3, 2048)
    assert (image.init_size, image.cmdline_size, image.protocol) == (0x300000, 4095, "2.15")
    assert image.kernel.startswith(b"\x90" * 0x400)


def test_setup_sects_zero_means_four() -> None:
    image = parse_bzimage(make_bzimage(setup_sects=0))
    assert (image.setup_sects, image.setup_size) == (4, 5 * 512)


@pytest.mark.parametrize(("version", "shown"), [(0x020B, "2.11"), (0x0204, "2.04"),
                                                (0x0100, "1.00")])  # fmt: skip
def test_old_protocol_version_is_named(version: int, shown: str) -> None:
    with pytest.raises(BootError, match=rf"unsupported boot protocol version {shown}\b"):
        parse_bzimage(make_bzimage(version=version))


def test_minimum_protocol_2_12_is_accepted() -> None:
    assert parse_bzimage(make_bzimage(version=0x020C)).protocol == "2.12"


def test_no_64bit_entry() -> None:
    with pytest.raises(BootError, match="no 64-bit entry point"):
        parse_bzimage(make_bzimage(xloadflags=0))


def test_zimage_is_refused() -> None:
    with pytest.raises(BootError, match="zImage"):
        parse_bzimage(make_bzimage(loadflags=0))


def test_not_a_kernel() -> None:
    with pytest.raises(BootError, match="not a Linux kernel"):
        parse_bzimage(b"#!/bin/sh\necho hello\n" * 100)
    with pytest.raises(BootError, match="too small"):
        parse_bzimage(b"hello")
    data = bytearray(make_bzimage())
    data[0x202:0x206] = b"NoHd"
    with pytest.raises(BootError, match="not a bzImage"):
        parse_bzimage(bytes(data))


def test_truncated_files(debian_kernel: LaneKernel) -> None:
    data = debian_kernel.vmlinuz.read_bytes()
    with pytest.raises(BootError, match="truncated kernel"):
        parse_bzimage(data[: len(data) // 2])
    with pytest.raises(BootError, match="truncated kernel"):
        parse_bzimage(data[:0x400])  # inside the real-mode setup
    crafted = make_bzimage()
    with pytest.raises(BootError, match="truncated kernel"):
        parse_bzimage(crafted[:-16])


def test_payload_outside_the_kernel() -> None:
    data = bytearray(make_bzimage(payload=b"\x1f\x8b" + bytes(30)))
    data[0x24C:0x250] = (0x10000).to_bytes(4, "little")  # payload_length
    with pytest.raises(BootError, match="payload"):
        parse_bzimage(bytes(data))


def test_footprint_of_a_relocatable_kernel_starts_at_pref_address() -> None:
    image = parse_bzimage(make_bzimage(init_size=0x800000))
    # head_64.S: decompression at max(align_up(load, kernel_alignment), LOAD_PHYSICAL_ADDR).
    assert image.footprint(0x100000) == (0x100000, 0x1000000 + 0x800000)
    assert image.footprint(0x2000000) == (0x2000000, 0x2000000 + 0x800000)
    fixed = parse_bzimage(make_bzimage(relocatable=0, init_size=0x800000))
    assert fixed.footprint(0x100000) == (0x100000, 0x1800000)


def test_load_checks_ram_including_init_size() -> None:
    image = parse_bzimage(make_bzimage(init_size=0x800000))
    mem = GuestMemory()
    mem.add_anonymous(0, 32 << 20)
    try:
        with pytest.raises(BootError, match="needs 24 MiB of low memory"):
            load_bzimage(mem, image, ram_end=20 << 20)
        assert load_bzimage(mem, image, ram_end=32 << 20) == (0x100000, 0x1800000)
        assert mem.read(layout.KERNEL_LOAD_ADDR, 0x400) == b"\x90" * 0x400
    finally:
        mem.close()


def _parse_or_booterror(data: bytes) -> BzImage | None:
    try:
        return parse_bzimage(data)
    except BootError:
        return None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=2048))
def test_fuzz_random_bytes(data: bytes) -> None:
    _parse_or_booterror(data)


_VALID = make_bzimage(payload=b"\xfd7zXZ\x00" + bytes(58))


@settings(max_examples=600, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0x1F1, 0x26B), st.integers(0, 255)), min_size=1, max_size=12),
    st.integers(0, len(_VALID)),
)
def test_fuzz_mutated_header(edits: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(_VALID)
    for offset, value in edits:
        data[offset] = value
    image = _parse_or_booterror(bytes(data[:cut]))
    if image is not None:
        # Whatever parses can be used without tripping over its own numbers.
        image.footprint()
        assert len(image.payload) == image.payload_length
        assert image.setup_header_bytes()
