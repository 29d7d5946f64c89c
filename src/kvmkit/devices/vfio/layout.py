"""What a passthrough function looks like, read from its configuration space: BARs, the
capability list, and which pages of a BAR can be handed to the guest as memory.

Pure functions of bytes and numbers (no file descriptors), so the rules are unit-tested with
real configuration-space images.

- BARs (PCI Local Bus 3.0 §6.2.5.1): bit 0 set: an I/O BAR; else bits 2:1 the memory type
  (10b: 64-bit, taking the next register as its upper half), bit 3 prefetchable. The size is
  VFIO's region size for the BAR (the kernel sized it already).
- Capabilities (§6.7): a list from the pointer at 0x34, each entry ID, next pointer; walked
  with a step limit and bounds checks (a device's list is data like any other).
- mmap segments: the pages of a BAR VFIO lets us map (all of it, or the sparse areas it
  lists) minus the pages holding the MSI-X table or PBA, which kvmkit must see (§6.8.2).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvmkit.abi import vfio as abi
from kvmkit.devices.pci.config import BAR0, BAR_COUNT, CAPABILITIES_POINTER, CONFIG_SIZE, STATUS
from kvmkit.devices.pci.config import STATUS_CAP_LIST as _CAP_LIST

PAGE_SIZE = 4096
MEM32, MEM64, IO = "mem32", "mem64", "io"
_MAX_CAPS = 48  # 256 bytes hold at most 48 dword-aligned capabilities after the header


@dataclass(frozen=True)
class BarSpec:
    index: int  # the BAR register (0-5); a 64-bit BAR also owns index + 1
    kind: str  # MEM32, MEM64 or IO
    prefetchable: bool
    size: int

    @property
    def flags(self) -> int:
        """The read-only low bits of the BAR register (§6.2.5.1)."""
        if self.kind == IO:
            return abi.PCI_BASE_ADDRESS_SPACE_IO
        flags = abi.PCI_BASE_ADDRESS_MEM_TYPE_64 if self.kind == MEM64 else 0
        return flags | (abi.PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetchable else 0)

    @property
    def size_mask(self) -> int:
        """The writable address bits (64 of them for a 64-bit BAR): sizing reads them back."""
        width = 64 if self.kind == MEM64 else 32
        low = 0x3 if self.kind == IO else 0xF
        return ~(self.size - 1) & ~low & ((1 << width) - 1)


def decode_bars(config: bytes, sizes: list[int]) -> list[BarSpec]:
    """The implemented BARs of a type-0 function: `config` its first 64 bytes or more,
    `sizes[i]` VFIO's size of region BARi (0: not implemented)."""
    bars: list[BarSpec] = []
    i = 0
    while i < BAR_COUNT:
        reg = struct.unpack_from("<I", config, BAR0 + 4 * i)[0]
        size = sizes[i] if i < len(sizes) else 0
        if reg & abi.PCI_BASE_ADDRESS_SPACE_IO:
            if size:
                bars.append(BarSpec(i, IO, False, size))
            i += 1
            continue
        is64 = reg & abi.PCI_BASE_ADDRESS_MEM_TYPE_MASK == abi.PCI_BASE_ADDRESS_MEM_TYPE_64
        if is64 and i == BAR_COUNT - 1:
            is64 = False  # a 64-bit type in BAR5 has no upper half: treat it as 32-bit
        if size:
            prefetch = bool(reg & abi.PCI_BASE_ADDRESS_MEM_PREFETCH)
            bars.append(BarSpec(i, MEM64 if is64 else MEM32, prefetch, size))
        i += 2 if is64 else 1
    return bars


def find_capabilities(config: bytes) -> dict[int, int]:
    """{capability ID: offset of its first instance} from the list at 0x34."""
    found: dict[int, int] = {}
    if len(config) < CONFIG_SIZE:
        return found
    status = struct.unpack_from("<H", config, STATUS)[0]
    if not status & _CAP_LIST:
        return found
    offset = config[CAPABILITIES_POINTER] & 0xFC
    seen: set[int] = set()
    for _ in range(_MAX_CAPS):
        if offset < 0x40 or offset > CONFIG_SIZE - 2 or offset in seen:
            break
        seen.add(offset)
        found.setdefault(config[offset], offset)
        offset = config[offset + 1] & 0xFC
    return found


def _page_span(offset: int, size: int) -> tuple[int, int]:
    start = offset & ~(PAGE_SIZE - 1)
    end = (offset + size + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
    return start, end


def mmap_segments(
    areas: tuple[tuple[int, int], ...] | list[tuple[int, int]], holes: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """(offset, size) of the whole pages in `areas` that no hole (offset, size: the MSI-X
    table or PBA) touches, in order. Areas that are not page-aligned shrink to their whole
    pages."""
    spans = sorted(_page_span(off, size) for off, size in holes if size > 0)
    out: list[tuple[int, int]] = []
    for off, size in areas:
        start = (off + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1)
        end = (off + size) & ~(PAGE_SIZE - 1)
        for hole_start, hole_end in spans:
            if hole_end <= start or hole_start >= end:
                continue
            if hole_start > start:
                out.append((start, hole_start - start))
            start = max(start, hole_end)
        if end > start:
            out.append((start, end - start))
    return out
