"""Identity-mapped page tables built in guest memory (SDM vol. 3A 4.5, 4-level paging)."""

from __future__ import annotations

from kvmkit.arch.x86_64.regs import PTE_PRESENT, PTE_PS, PTE_USER, PTE_WRITE
from kvmkit.memory.guest import GuestMemory

GIB = 1 << 30
MIB2 = 2 << 20


def build_identity_map(
    mem: GuestMemory, pml4_addr: int, size: int, *, user: bool = False
) -> int:
    """Map virtual [0, size) to the same physical addresses with 2 MiB pages.

    Uses one PML4 page, one PDPT page and one PD page per GiB, placed consecutively from
    `pml4_addr`. Returns the address just past the tables. `user` sets U/S at every level so
    that CPL3 code can reach everything (tiny test guests).
    """
    if pml4_addr % 4096:
        raise ValueError("page tables must be 4 KiB aligned")
    gib = max(1, (size + GIB - 1) // GIB)
    if gib > 512:
        raise ValueError("identity map larger than 512 GiB needs more PDPT pages")
    flags = PTE_PRESENT | PTE_WRITE | (PTE_USER if user else 0)
    pdpt = pml4_addr + 0x1000
    first_pd = pml4_addr + 0x2000
    mem.fill(pml4_addr, 0x2000 + gib * 0x1000)
    mem.write_u64(pml4_addr, pdpt | flags)
    for g in range(gib):
        pd = first_pd + g * 0x1000
        mem.write_u64(pdpt + g * 8, pd | flags)
        table = bytearray(4096)
        for i in range(512):
            phys = g * GIB + i * MIB2
            table[i * 8 : i * 8 + 8] = (phys | flags | PTE_PS).to_bytes(8, "little")
        mem.write(pd, table)
    return first_pd + gib * 0x1000
