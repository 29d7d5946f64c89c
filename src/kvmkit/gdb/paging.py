"""Guest-virtual to guest-physical translation, walking the guest's page tables from CR3.

Intel SDM vol. 3A chapter 4 (AMD APM vol. 2 chapter 5): which walk applies follows CR0.PG,
CR4.PAE, EFER.LMA and CR4.LA57:

- paging off (real mode, protected mode without paging): linear = physical;
- 32-bit paging (4.3): 2 levels, 4 KiB pages, 4 MiB pages with CR4.PSE (PSE-36 high bits);
- PAE paging (4.4): a 4-entry PDPT at CR3[31:5], then 2 levels, 2 MiB or 4 KiB pages;
- 4-level (4.5): PML4, PDPT (1 GiB pages), PD (2 MiB pages), PT; 48-bit canonical addresses;
- 5-level (CR4.LA57): a PML5 on top; 57-bit canonical addresses.

Every table read goes through `GuestMemory` (bounds-checked). A non-present entry, a table
outside guest memory or a non-canonical address raises `TranslationError`. Segmentation is
not applied: addresses are linear, as in other gdb stubs (QEMU's).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmkit.arch.x86_64.regs import CR0_PG, CR4_LA57, CR4_PAE, CR4_PSE, EFER_LMA
from kvmkit.memory.guest import GuestMemory
from kvmkit.memory.region import GuestMemoryError

PAGE_SIZE = 4096
_PRESENT = 1
_PS = 1 << 7
_ADDR_52 = ((1 << 52) - 1) & ~0xFFF  # bits 51:12 of a 64-bit entry


class TranslationError(Exception):
    """The address has no mapping (or the tables are outside guest memory)."""


@dataclass(frozen=True)
class PagingState:
    cr0: int
    cr3: int
    cr4: int
    efer: int

    @property
    def mode(self) -> str:
        if not self.cr0 & CR0_PG:
            return "none"
        if not self.cr4 & CR4_PAE:
            return "32bit"
        if not self.efer & EFER_LMA:
            return "pae"
        return "5level" if self.cr4 & CR4_LA57 else "4level"


@dataclass(frozen=True)
class Translation:
    phys: int
    page_size: int  # the size of the page holding the address (4 KiB .. 1 GiB)

    @property
    def bytes_left_in_page(self) -> int:
        return self.page_size - (self.phys % self.page_size)


def _entry(mem: GuestMemory, addr: int, what: str, va: int, *, wide: bool = True) -> int:
    """A present page-table entry (64-bit, or 32-bit for non-PAE paging), else an error."""
    try:
        entry = mem.read_u64(addr) if wide else mem.read_u32(addr)
    except GuestMemoryError:
        raise TranslationError(
            f"{what} at {addr:#x} (for {va:#x}) is outside guest memory"
        ) from None
    if not entry & _PRESENT:
        raise TranslationError(f"{va:#x} is not mapped ({what} not present)")
    return entry


def translate(mem: GuestMemory, state: PagingState, va: int) -> Translation:
    """The guest-physical address of linear address `va` under `state`."""
    if not 0 <= va < 1 << 64:
        raise TranslationError(f"address {va:#x} is not a 64-bit value")
    mode = state.mode
    if mode == "none":
        if va >= 1 << 32 and not state.efer & EFER_LMA:
            raise TranslationError(f"{va:#x} is beyond 4 GiB without paging")
        return Translation(va, PAGE_SIZE)
    if mode == "32bit":
        if va >= 1 << 32:
            raise TranslationError(f"{va:#x} is beyond 4 GiB in 32-bit paging")
        pde = _entry(
            mem, (state.cr3 & 0xFFFFF000) + ((va >> 22) & 0x3FF) * 4, "PDE", va, wide=False
        )
        if pde & _PS and state.cr4 & CR4_PSE:
            base = (pde & 0xFFC00000) | (((pde >> 13) & 0xFF) << 32)  # PSE-36/40 bits
            return Translation(base | (va & 0x3FFFFF), 4 << 20)
        pte = _entry(mem, (pde & 0xFFFFF000) + ((va >> 12) & 0x3FF) * 4, "PTE", va, wide=False)
        return Translation((pte & 0xFFFFF000) | (va & 0xFFF), PAGE_SIZE)
    if mode == "pae":
        if va >= 1 << 32:
            raise TranslationError(f"{va:#x} is beyond 4 GiB in PAE paging")
        pdpte = _entry(mem, (state.cr3 & 0xFFFFFFE0) + ((va >> 30) & 3) * 8, "PDPTE", va)
        table = pdpte & _ADDR_52
        levels = [(21, "PDE"), (12, "PTE")]
    else:
        bits = 57 if mode == "5level" else 48
        top = va >> (bits - 1)
        if top not in (0, (1 << (65 - bits)) - 1):
            raise TranslationError(f"{va:#x} is not canonical ({bits}-bit addresses)")
        table = state.cr3 & _ADDR_52
        levels = [(39, "PML4E"), (30, "PDPTE"), (21, "PDE"), (12, "PTE")]
        if mode == "5level":
            levels.insert(0, (48, "PML5E"))
    for shift, what in levels:
        entry = _entry(mem, table + ((va >> shift) & 0x1FF) * 8, what, va)
        if shift in (30, 21) and entry & _PS:
            size = 1 << shift
            base = entry & _ADDR_52 & ~(size - 1)
            return Translation(base | (va & (size - 1)), size)
        table = entry & _ADDR_52
    return Translation(table | (va & 0xFFF), PAGE_SIZE)


def read_virtual(mem: GuestMemory, state: PagingState, va: int, length: int) -> bytes:
    """Read `length` bytes at `va`, page by page. Stops early (returns fewer bytes) at the
    first unmapped page after the first byte; raises TranslationError if the first byte is
    unmapped."""
    if length < 0:
        raise ValueError("negative length")
    out = bytearray()
    while len(out) < length:
        addr = (va + len(out)) & ((1 << 64) - 1)
        try:
            tr = translate(mem, state, addr)
            chunk = min(length - len(out), PAGE_SIZE - (addr % PAGE_SIZE))
            out += mem.read(tr.phys, chunk)
        except (TranslationError, GuestMemoryError) as err:
            if not out:
                raise TranslationError(str(err)) from None
            break
    return bytes(out)


def write_virtual(mem: GuestMemory, state: PagingState, va: int, data: bytes) -> None:
    """Write all of `data` at `va` or nothing: every page is translated first."""
    pieces: list[tuple[int, int, int]] = []
    done = 0
    while done < len(data):
        addr = (va + done) & ((1 << 64) - 1)
        tr = translate(mem, state, addr)
        chunk = min(len(data) - done, PAGE_SIZE - (addr % PAGE_SIZE))
        if not mem.is_valid(tr.phys, chunk):
            raise TranslationError(f"{addr:#x} -> {tr.phys:#x} is outside guest memory")
        pieces.append((tr.phys, done, chunk))
        done += chunk
    for phys, off, chunk in pieces:
        mem.write(phys, data[off : off + chunk])
