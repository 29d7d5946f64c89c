"""Guest CPUID from a synthetic KVM_GET_SUPPORTED_CPUID, and the boot MSR list."""

from __future__ import annotations

import pytest

from kvmkit.arch.x86_64 import msr
from kvmkit.arch.x86_64.cpuid import (
    KVM_SIGNATURE,
    LEAF1_ECX_HYPERVISOR,
    LEAF1_ECX_MONITOR,
    LEAF1_ECX_TSC_DEADLINE,
    LEAF1_EDX_HTT,
    guest_cpuid,
)
from kvmkit.arch.x86_64.msrs import boot_msrs
from kvmkit.arch.x86_64.topology import Topology
from kvmkit.kvm.cpuid import CpuidEntry, find

SIG = 1  # KVM_CPUID_FLAG_SIGNIFCANT_INDEX
flat = Topology.flat


def _vendor_leaf(name: bytes, max_leaf: int = 0x1F) -> CpuidEntry:
    b, d, c = (int.from_bytes(name[i : i + 4], "little") for i in (0, 4, 8))
    return CpuidEntry(0, 0, 0, max_leaf, b, c, d)


def intel_supported() -> list[CpuidEntry]:
    return [
        _vendor_leaf(b"GenuineIntel"),
        CpuidEntry(1, 0, 0, 0x906EA, 0x0010_0800, 0x7FFA_320B | LEAF1_ECX_TSC_DEADLINE, 0x1789FBFF),
        # Leaf 4: L1d (type 1, level 1), L2 (type 3, level 2), L3 (level 3), end.
        CpuidEntry(4, 0, SIG, 0x1C00_4121, 0x01C0003F, 0x3F, 0),
        CpuidEntry(4, 1, SIG, 0x1C00_4143, 0x03C0003F, 0x3FF, 0),
        CpuidEntry(4, 2, SIG, 0x1C03_C163, 0x03C0003F, 0x2FFF, 6),
        CpuidEntry(4, 3, SIG, 0, 0, 0, 0),
        CpuidEntry(6, 0, 0, 0x4 | 0x2, 0, 0x8 | 0x1, 0),
        CpuidEntry(0xB, 0, SIG, 1, 2, 0x100, 7),
        CpuidEntry(0xB, 1, SIG, 4, 8, 0x201, 7),
        CpuidEntry(0x1F, 0, SIG, 1, 2, 0x100, 7),
        CpuidEntry(0x40000000, 0, 0, 0x40000001, 0, 0, 0),
        CpuidEntry(0x40000001, 0, 0, 0x01007AFB, 0, 0, 0),
        CpuidEntry(0x80000000, 0, 0, 0x80000008, 0, 0, 0),
    ]


def amd_supported() -> list[CpuidEntry]:
    return [
        _vendor_leaf(b"AuthenticAMD", 0x10),
        CpuidEntry(1, 0, 0, 0xA10F11, 0x0102_0800, 0x8120_2008, 0x078BFBFF),
        CpuidEntry(0xB, 0, SIG, 0, 0, 0, 1),
        CpuidEntry(0x80000001, 0, 0, 0xA10F11, 0, 0x0040_0393, 0x23D3FBFF),
        CpuidEntry(0x80000008, 0, 0, 0x3030, 0, 0x7001, 0),
        CpuidEntry(0x8000001D, 0, SIG, 0x121, 0x1C0003F, 0x3F, 0),
        CpuidEntry(0x8000001D, 3, SIG, 0x4163, 0x3C0003F, 0x7FFF, 1),
        CpuidEntry(0x8000001D, 4, SIG, 0, 0, 0, 0),
        CpuidEntry(0x8000001E, 0, 0, 0, 0x100, 0, 0),
    ]


def sub(entries: list[CpuidEntry], fn: int, index: int = 0) -> CpuidEntry:
    e = find(entries, fn, index)
    assert e is not None, f"leaf {fn:#x}.{index} missing"
    return e


@pytest.mark.parametrize(("vcpu_id", "nvcpus"), [(0, 1), (1, 2), (2, 3), (5, 8)])
def test_leaf1_apic_id_count_htt_hypervisor(vcpu_id: int, nvcpus: int) -> None:
    out = guest_cpuid(intel_supported(), flat(nvcpus), vcpu_id)
    leaf1 = sub(out, 1)
    assert leaf1.ebx >> 24 == vcpu_id
    assert (leaf1.ebx >> 16) & 0xFF == 1 << (nvcpus - 1).bit_length()
    assert leaf1.ebx & 0xFFFF == 0x0800  # CLFLUSH line size kept
    assert bool(leaf1.edx & LEAF1_EDX_HTT) == (nvcpus > 1)
    assert leaf1.ecx & LEAF1_ECX_HYPERVISOR
    assert not leaf1.ecx & LEAF1_ECX_MONITOR
    assert leaf1.ecx & LEAF1_ECX_TSC_DEADLINE  # kept: supported


def test_tsc_deadline_can_be_forced() -> None:
    sup = intel_supported()
    assert not sub(guest_cpuid(sup, flat(1), 0, tsc_deadline=False), 1).ecx & LEAF1_ECX_TSC_DEADLINE
    sup[1] = sup[1].with_regs(ecx=sup[1].ecx & ~LEAF1_ECX_TSC_DEADLINE)
    assert not sub(guest_cpuid(sup, flat(1), 0), 1).ecx & LEAF1_ECX_TSC_DEADLINE
    assert sub(guest_cpuid(sup, flat(1), 0, tsc_deadline=True), 1).ecx & LEAF1_ECX_TSC_DEADLINE


def test_leaf4_core_count_and_cache_sharing() -> None:
    out = guest_cpuid(intel_supported(), flat(4), 1)
    l1, l2, l3, end = (sub(out, 4, i) for i in range(4))
    for e in (l1, l2, l3):
        assert e.eax >> 26 == 3  # 4 addressable cores - 1
    assert (l1.eax >> 14) & 0xFFF == 0 and (l2.eax >> 14) & 0xFFF == 0
    assert (l3.eax >> 14) & 0xFFF == 3
    assert l1.eax & 0x3FFF == 0x0121 and l3.eax & 0x3FFF == 0x0163  # type/level kept
    assert end.eax == 0


def test_leaf6_turbo_and_epb_cleared() -> None:
    leaf6 = sub(guest_cpuid(intel_supported(), flat(1), 0), 6)
    assert leaf6.eax == 0x4 and leaf6.ecx == 0x1


@pytest.mark.parametrize("fn", [0xB, 0x1F])
def test_extended_topology_leaves(fn: int) -> None:
    out = guest_cpuid(intel_supported(), flat(3), 2)
    subs = [e for e in out if e.function == fn]
    assert [e.index for e in subs] == [0, 1, 2]
    smt, core, invalid = subs
    assert all(e.flags & SIG and e.edx == 2 for e in subs)
    assert (smt.eax & 0x1F, smt.ebx & 0xFFFF, (smt.ecx >> 8) & 0xFF, smt.ecx & 0xFF) == (0, 1, 1, 0)
    assert (core.eax & 0x1F, core.ebx & 0xFFFF, (core.ecx >> 8) & 0xFF, core.ecx & 0xFF) == (
        2, 3, 2, 1,
    )  # fmt: skip
    assert invalid.ebx == 0 and (invalid.ecx >> 8) & 0xFF == 0 and invalid.ecx & 0xFF == 2


def test_kvm_signature_leaf_kept_and_features_passed() -> None:
    out = guest_cpuid(intel_supported(), flat(1), 0)
    sig = sub(out, 0x40000000)
    raw = b"".join(r.to_bytes(4, "little") for r in (sig.ebx, sig.ecx, sig.edx))
    assert raw == KVM_SIGNATURE and sig.eax == 0x40000001
    assert sub(out, 0x40000001).eax == 0x01007AFB


def test_kvm_signature_leaf_added_when_missing() -> None:
    sup = [e for e in intel_supported() if e.function != 0x40000000]
    out = guest_cpuid(sup, flat(1), 0)
    sig = sub(out, 0x40000000)
    raw = b"".join(r.to_bytes(4, "little") for r in (sig.ebx, sig.ecx, sig.edx))
    assert raw == b"KVMKVMKVM\0\0\0" and sig.eax == 0x40000001


def test_amd_topology_leaves() -> None:
    out = guest_cpuid(amd_supported(), flat(4), 3)
    assert sub(out, 0x80000008).ecx == (2 << 12) | 3  # ApicIdSize 2, NC = 3
    assert sub(out, 0x80000008).eax == 0x3030
    assert sub(out, 0x80000001).ecx & 0x2  # CmpLegacy
    assert (sub(out, 0x8000001D, 0).eax >> 14) & 0xFFF == 0
    assert (sub(out, 0x8000001D, 3).eax >> 14) & 0xFFF == 3
    e1e = sub(out, 0x8000001E)
    assert (e1e.eax, e1e.ebx, e1e.ecx) == (3, 3, 0)
    single = guest_cpuid(amd_supported(), flat(1), 0)
    assert not sub(single, 0x80000001).ecx & 0x2
    assert sub(single, 0x80000008).ecx & 0xF0FF == 0


def test_other_leaves_unchanged_and_input_untouched() -> None:
    sup = intel_supported()
    before = list(sup)
    out = guest_cpuid(sup, flat(2), 1)
    assert sup == before
    assert sub(out, 0) == sup[0]
    assert sub(out, 0x80000000) == sup[-1]


@pytest.mark.parametrize(("vcpu_id", "nvcpus"), [(0, 0), (2, 2), (-1, 2), (0, 1025)])
def test_bad_topology_rejected(vcpu_id: int, nvcpus: int) -> None:
    with pytest.raises(ValueError):
        guest_cpuid(intel_supported(), flat(nvcpus), vcpu_id)


def test_boot_msrs_firecracker_list_in_order() -> None:
    entries = boot_msrs()
    assert entries == [
        (msr.IA32_SYSENTER_CS, 0),
        (msr.IA32_SYSENTER_ESP, 0),
        (msr.IA32_SYSENTER_EIP, 0),
        (msr.IA32_STAR, 0),
        (msr.IA32_CSTAR, 0),
        (msr.IA32_KERNEL_GS_BASE, 0),
        (msr.IA32_FMASK, 0),
        (msr.IA32_LSTAR, 0),
        (msr.IA32_TSC, 0),
        (msr.IA32_MISC_ENABLE, 1),
        (0x2FF, 0x806),
    ]
    assert msr.IA32_TSC not in dict(boot_msrs(tsc=False))
