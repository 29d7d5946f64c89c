"""Guest page-table walks from CR3: 4- and 5-level, 1 GiB / 2 MiB / 4 KiB pages, PAE, 32-bit,
no paging; unmapped and out-of-memory tables are errors, never host accesses."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmkit.arch.x86_64.regs import CR0_PE, CR0_PG, CR4_LA57, CR4_PAE, CR4_PSE, EFER_LMA
from kvmkit.gdb.paging import (
    PagingState,
    TranslationError,
    read_virtual,
    translate,
    write_virtual,
)
from kvmkit.memory import GuestMemory

P, W, PS = 1, 2, 0x80


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    m = GuestMemory()
    m.add_anonymous(0, 4 << 20)
    yield m
    m.close()


def build_4level(mem: GuestMemory, *, la57: bool = False) -> PagingState:
    """VA 0xffff_8000_0000_0000 + ... kernel-style mappings of every page size."""
    root = 0x1000
    pml4 = 0x2000 if la57 else root
    if la57:
        mem.write_u64(root + 0x1FF * 8, pml4 | P | W)  # PML5[511] -> PML4
    pdpt, pd, pt = 0x3000, 0x4000, 0x5000
    mem.write_u64(pml4 + 0x100 * 8, pdpt | P | W)  # PML4[256]
    mem.write_u64(pdpt + 0 * 8, 0x4000_0000 | P | W | PS)  # 1 GiB page at 1 GiB
    mem.write_u64(pdpt + 1 * 8, pd | P | W)
    mem.write_u64(pd + 0 * 8, 0x20_0000 | P | W | PS)  # 2 MiB page at 2 MiB
    mem.write_u64(pd + 1 * 8, pt | P | W)
    mem.write_u64(pt + 5 * 8, 0x7000 | P | W | (1 << 63))  # NX bit ignored
    mem.write_u64(pt + 6 * 8, 0x8000)  # not present
    mem.write_u64(pd + 2 * 8, 0x7FF0_0000 | P)  # table outside guest memory
    cr4 = CR4_PAE | (CR4_LA57 if la57 else 0)
    return PagingState(CR0_PE | CR0_PG, root | 0x5, cr4, EFER_LMA | 0x100)  # PCID bits in CR3


@pytest.mark.parametrize("la57", [False, True])
def test_long_mode_page_sizes(mem: GuestMemory, la57: bool) -> None:
    state = build_4level(mem, la57=la57)
    # PML4[256] (and PML5[511]): the same sign-extended address in both modes.
    base = 0xFFFF_8000_0000_0000
    one_gib = translate(mem, state, base + 0x1234_5678)
    assert (one_gib.phys, one_gib.page_size) == (0x4000_0000 + 0x1234_5678, 1 << 30)
    two_mib = translate(mem, state, base + (1 << 30) + 0x1_2345)
    assert (two_mib.phys, two_mib.page_size) == (0x20_0000 + 0x1_2345, 2 << 20)
    four_k = translate(mem, state, base + (1 << 30) + (2 << 20) + 5 * 4096 + 0x123)
    assert (four_k.phys, four_k.page_size) == (0x7123, 4096)
    for va in (
        base + (1 << 30) + (2 << 20) + 6 * 4096,  # PTE not present
        base + (1 << 30) + (4 << 20),  # PD entry pointing outside memory
        base + (1 << 39),  # PML4E absent
        0x1000,  # PML4[0] (or PML5[0]) absent
    ):
        with pytest.raises(TranslationError):
            translate(mem, state, va)


def test_non_canonical_addresses_are_rejected(mem: GuestMemory) -> None:
    state = build_4level(mem)
    with pytest.raises(TranslationError, match="canonical"):
        translate(mem, state, 0x0000_8000_0000_0000)
    with pytest.raises(TranslationError):
        translate(mem, state, 1 << 64)


def test_pae_and_32bit_paging(mem: GuestMemory) -> None:
    # PAE: PDPT (4 entries) at CR3, PD with a 2 MiB page, and a PT.
    mem.write_u64(0x1000 + 3 * 8, 0x2000 | P)  # PDPTE[3] -> PD (VA 0xC0000000..)
    mem.write_u64(0x2000, 0x40_0000 | P | PS)
    mem.write_u64(0x2008, 0x3000 | P)
    mem.write_u64(0x3000 + 8, 0x9000 | P)
    pae = PagingState(CR0_PE | CR0_PG, 0x1000, CR4_PAE, 0)
    assert translate(mem, pae, 0xC001_2345).phys == 0x41_2345
    assert translate(mem, pae, 0xC020_1ABC).phys == 0x9ABC
    with pytest.raises(TranslationError):
        translate(mem, pae, 0x1000)  # PDPTE[0] not present
    # 32-bit paging: 4 MiB page (PSE) and a 4 KiB page.
    mem.write_u32(0x5000 + 0x300 * 4, 0x0040_0000 | P | PS)
    mem.write_u32(0x5000 + 0x301 * 4, 0x6000 | P)
    mem.write_u32(0x6000 + 2 * 4, 0xA000 | P)
    flat = PagingState(CR0_PE | CR0_PG, 0x5000, CR4_PSE, 0)
    assert translate(mem, flat, 0xC012_3456).phys == 0x52_3456
    assert translate(mem, flat, 0xC040_2010).phys == 0xA010
    with pytest.raises(TranslationError):
        translate(mem, flat, 0x1_0000_0000)


def test_no_paging_is_identity(mem: GuestMemory) -> None:
    real = PagingState(0, 0, 0, 0)
    assert translate(mem, real, 0xB8000).phys == 0xB8000
    mem.write(0x3FFFF0, b"0123456789abcdef")
    assert read_virtual(mem, real, 0x3FFFF0, 64) == b"0123456789abcdef"  # stops at the end
    with pytest.raises(TranslationError):
        read_virtual(mem, real, 0x400000, 4)
    with pytest.raises(TranslationError):
        write_virtual(mem, real, 0x3FFFFE, b"xyzw")  # would cross out of memory: nothing
    assert mem.read(0x3FFFFE, 2) == b"ef"


def test_reads_and_writes_cross_pages(mem: GuestMemory) -> None:
    state = build_4level(mem)
    base = 0xFFFF_8000_4000_0000  # the 2 MiB page at phys 2 MiB
    write_virtual(mem, state, base + 4090, b"ABCDEFGHIJ")
    assert mem.read(0x20_0000 + 4090, 10) == b"ABCDEFGHIJ"
    assert read_virtual(mem, state, base + 4090, 10) == b"ABCDEFGHIJ"


@given(st.integers(0, 2**64 - 1))
def test_any_address_translates_or_fails_cleanly(va: int) -> None:
    m = GuestMemory()
    m.add_anonymous(0, 1 << 20)
    try:
        state = build_4level(m)
        for s in (state, PagingState(state.cr0, state.cr3, state.cr4 | CR4_LA57, state.efer)):
            try:
                tr = translate(m, s, va)
            except TranslationError:
                continue
            assert 0 <= tr.phys < 1 << 52
    finally:
        m.close()
