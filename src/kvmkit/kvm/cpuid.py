"""CPUID entries as plain data, converted to and from `struct kvm_cpuid2`."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, replace

from kvmkit.abi import structs
from kvmkit.abi.constants import KVM_CPUID_FLAG_SIGNIFCANT_INDEX


@dataclass(frozen=True)
class CpuidEntry:
    function: int
    index: int = 0
    flags: int = 0
    eax: int = 0
    ebx: int = 0
    ecx: int = 0
    edx: int = 0

    @property
    def significant_index(self) -> bool:
        return bool(self.flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX)

    def with_regs(self, **regs: int) -> CpuidEntry:
        return replace(self, **regs)


def to_kvm_cpuid2(entries: list[CpuidEntry]) -> ctypes.Structure:
    buf = structs.cpuid2_type(len(entries))()
    buf.nent = len(entries)
    for i, e in enumerate(entries):
        out = buf.entries[i]
        out.function, out.index, out.flags = e.function, e.index, e.flags
        out.eax, out.ebx, out.ecx, out.edx = e.eax, e.ebx, e.ecx, e.edx
    return buf


def from_kvm_cpuid2(buf: ctypes.Structure) -> list[CpuidEntry]:
    result = []
    for i in range(int(buf.nent)):
        e = buf.entries[i]
        regs = (int(e.eax), int(e.ebx), int(e.ecx), int(e.edx))
        result.append(CpuidEntry(int(e.function), int(e.index), int(e.flags), *regs))
    return result


def find(entries: list[CpuidEntry], function: int, index: int = 0) -> CpuidEntry | None:
    for e in entries:
        if e.function == function and (not e.significant_index or e.index == index):
            return e
    return None
