"""GDT descriptors and the matching `kvm_segment` values (SDM vol. 3A 3.4.5, 7.2.3).

The VMM loads segment registers through KVM_SET_SREGS, but the guest reloads them from the
GDT (on IRET, interrupts and far jumps), so both must agree: build each descriptor once and
derive both from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmkit.abi import structs

# Descriptor types (S=1 code/data; S=0 system)
TYPE_DATA_RW = 0x3  # read/write, accessed
TYPE_CODE_XR = 0xB  # execute/read, accessed
TYPE_TSS_BUSY = 0xB  # 32/64-bit TSS (busy)
TYPE_LDT = 0x2


@dataclass(frozen=True)
class Descriptor:
    base: int = 0
    limit: int = 0xFFFFF
    type: int = TYPE_DATA_RW
    s: int = 1  # 1 code/data, 0 system
    dpl: int = 0
    present: int = 1
    avl: int = 0
    l: int = 0  # noqa: E741 - the SDM's name for the 64-bit code flag
    db: int = 1
    g: int = 1

    def encode(self) -> int:
        """The 8-byte descriptor (system descriptors in long mode add a second quadword)."""
        return (
            (self.limit & 0xFFFF)
            | ((self.base & 0xFFFFFF) << 16)
            | ((self.type & 0xF) << 40)
            | ((self.s & 1) << 44)
            | ((self.dpl & 3) << 45)
            | ((self.present & 1) << 47)
            | (((self.limit >> 16) & 0xF) << 48)
            | ((self.avl & 1) << 52)
            | ((self.l & 1) << 53)
            | ((self.db & 1) << 54)
            | ((self.g & 1) << 55)
            | (((self.base >> 24) & 0xFF) << 56)
        )

    def encode_system64(self) -> tuple[int, int]:
        """A 16-byte long-mode system descriptor (TSS/LDT): low and high quadwords."""
        return self.encode(), (self.base >> 32) & 0xFFFFFFFF

    def segment(self, selector: int) -> structs.kvm_segment:
        seg = structs.kvm_segment()
        seg.base = self.base
        # kvm_segment.limit is the byte-granular limit.
        seg.limit = ((self.limit << 12) | 0xFFF) if self.g else self.limit
        seg.selector = selector
        seg.type, seg.s, seg.dpl, seg.present = self.type, self.s, self.dpl, self.present
        seg.avl, seg.l, seg.db, seg.g = self.avl, self.l, self.db, self.g
        seg.unusable = 0
        return seg


def real_mode_segment(selector: int, code: bool = False) -> structs.kvm_segment:
    seg = structs.kvm_segment()
    seg.base = selector << 4
    seg.limit = 0xFFFF
    seg.selector = selector
    seg.type = TYPE_CODE_XR if code else TYPE_DATA_RW
    seg.s, seg.present = 1, 1
    return seg


CODE64 = Descriptor(type=TYPE_CODE_XR, l=1, db=0)
CODE32 = Descriptor(type=TYPE_CODE_XR)
DATA = Descriptor(type=TYPE_DATA_RW)
USER_CODE64 = Descriptor(type=TYPE_CODE_XR, l=1, db=0, dpl=3)
USER_CODE32 = Descriptor(type=TYPE_CODE_XR, dpl=3)
USER_DATA = Descriptor(type=TYPE_DATA_RW, dpl=3)


def tss_descriptor(base: int, limit: int) -> Descriptor:
    return Descriptor(base=base, limit=limit, type=TYPE_TSS_BUSY, s=0, db=0, g=0)
