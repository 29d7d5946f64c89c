"""x86 tables: descriptors agree with the SDM encodings; page tables map what they claim."""

from __future__ import annotations

from kvmkit.arch.x86_64.paging import build_identity_map
from kvmkit.arch.x86_64.segments import CODE64, DATA, tss_descriptor
from kvmkit.memory import GuestMemory
from kvmkit.probe import detect_implementation


def test_flat_64bit_code_descriptor_encoding() -> None:
    # The well-known flat 64-bit kernel code segment used by Linux: 0x00af9b000000ffff.
    assert CODE64.encode() == 0x00AF9B000000FFFF
    assert DATA.encode() == 0x00CF93000000FFFF


def test_segment_matches_descriptor() -> None:
    seg = CODE64.segment(0x08)
    assert (seg.selector, seg.type, seg.l, seg.db, seg.g, seg.present) == (8, 0xB, 1, 0, 1, 1)
    assert seg.limit == 0xFFFFFFFF


def test_tss_descriptor_is_16_bytes_in_long_mode() -> None:
    low, high = tss_descriptor(0x1_2345_6000, 0x67).encode_system64()
    assert high == 0x1
    assert (low >> 40) & 0xF == 0xB and (low >> 16) & 0xFFFFFF == 0x456000
    assert (low >> 56) & 0xFF == 0x23


def test_identity_map_resolves_addresses() -> None:
    mem = GuestMemory()
    mem.add_anonymous(0, 1 << 20)
    try:
        end = build_identity_map(mem, 0x10000, 2 << 30)
        assert end == 0x10000 + 0x2000 + 2 * 0x1000

        def walk(va: int) -> int:
            pml4e = mem.read_u64(0x10000 + ((va >> 39) & 511) * 8)
            pdpte = mem.read_u64((pml4e & ~0xFFF) + ((va >> 30) & 511) * 8)
            pde = mem.read_u64((pdpte & ~0xFFF & (2**52 - 1)) + ((va >> 21) & 511) * 8)
            assert pde & 0x81 == 0x81  # present, 2 MiB page
            return (pde & ~0x1FFFFF & (2**52 - 1)) | (va & 0x1FFFFF)

        for va in (0, 0x123456, 0x7FFFFFFF, 0x4000_1234):
            assert walk(va) == va
    finally:
        mem.close()


def test_detect_implementation(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "kvm_amd").mkdir()
    assert detect_implementation(tmp_path, {"svm", "sse"})[0] == "hardware-svm"
    assert detect_implementation(tmp_path, {"sse"})[0] == "unknown"
    (tmp_path / "kvm_pvm").mkdir()
    assert detect_implementation(tmp_path, {"svm"})[0] == "pvm"
    (tmp_path / "kvm_pvm").rmdir()
    (tmp_path / "kvm_amd").rmdir()
    (tmp_path / "kvm_intel").mkdir()
    assert detect_implementation(tmp_path, {"vmx"})[0] == "hardware-vmx"
