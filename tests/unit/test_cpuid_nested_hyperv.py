"""The nested-virtualization and Hyper-V CPUID passes, from synthetic KVM output: the values
are what the lane's KVM (kvm_amd, Linux 6.1, nested=1) returned for KVM_GET_SUPPORTED_CPUID
and KVM_GET_SUPPORTED_HV_CPUID."""

from __future__ import annotations

import pytest

from kvmkit.arch.x86_64 import hyperv as hv
from kvmkit.arch.x86_64.cpuid import EXT1_ECX_SVM, LEAF1_ECX_VMX, guest_cpuid
from kvmkit.arch.x86_64.topology import Topology
from kvmkit.kvm.cpuid import CpuidEntry, find

AMD = (0x68747541, 0x444D4163, 0x69746E65)  # "AuthenticAMD" in EBX, ECX, EDX


def lane_supported() -> list[CpuidEntry]:
    b, c, d = AMD
    return [
        CpuidEntry(0, 0, 0, 0x10, b, c, d),
        CpuidEntry(1, 0, 0, 0x800F12, 0x800, 0x76F83203, 0x78BFBFD),
        CpuidEntry(0x40000000, 0, 0, 0x40000001, 0x4B4D564B, 0x564B4D56, 0x4D),
        CpuidEntry(0x40000001, 0, 0, 0x1007EFB, 0, 0, 0),
        CpuidEntry(0x80000000, 0, 0, 0x8000000A, 0, 0, 0),
        CpuidEntry(0x80000001, 0, 0, 0x800F12, 0, 0x75, 0x2DD3FBFD),
        CpuidEntry(0x8000000A, 0, 0, 0x1, 0x8, 0, 0x10000021),
    ]


def lane_hv() -> list[CpuidEntry]:
    sig = (0x756E694C, 0x564B2078, 0x7648204D)  # "Linux KVM Hv"
    return [
        CpuidEntry(0x40000000, 0, 0, 0x40000082, *sig),
        CpuidEntry(0x40000001, 0, 0, 0x31237648),
        CpuidEntry(0x40000002, 0, 0, 0x3839, 0xA0000),
        CpuidEntry(0x40000003, 0, 0, 0x2AFF, 0x830, 0, 0x80D12),
        CpuidEntry(0x40000004, 0, 0, 0x40E2C, 0xFFF),
        CpuidEntry(0x40000005, 0, 0, 0x400, 0x40),
        CpuidEntry(0x40000080, 0, 0, 0, *sig),
        CpuidEntry(0x4000000A, 0, 0, 0x80000, 1),
    ]


CAPS = {"HYPERV_TIME": 1, "HYPERV_VP_INDEX": 1, "HYPERV_SYNIC2": 1, "HYPERV_TLBFLUSH": 1,
        "HYPERV_SEND_IPI": 1}  # fmt: skip


def reg(entries: list[CpuidEntry], leaf: int, name: str) -> int:
    e = find(entries, leaf)
    assert e is not None, hex(leaf)
    return int(getattr(e, name))


def text(entries: list[CpuidEntry], leaf: int) -> bytes:
    e = find(entries, leaf)
    assert e is not None
    return b"".join(r.to_bytes(4, "little") for r in (e.ebx, e.ecx, e.edx))


def test_svm_is_hidden_unless_nested() -> None:
    supported = lane_supported()
    plain = guest_cpuid(supported, Topology.flat(1), 0)
    assert not reg(plain, 0x80000001, "ecx") & EXT1_ECX_SVM  # it leaked through before
    assert reg(plain, 0x80000001, "ecx") == 0x75 & ~EXT1_ECX_SVM  # nothing else touched
    svm = find(plain, 0x8000000A)
    assert svm is not None and (svm.eax, svm.ebx, svm.ecx, svm.edx) == (0, 0, 0, 0)
    nested = guest_cpuid(supported, Topology.flat(1), 0, nested=True)
    assert reg(nested, 0x80000001, "ecx") & EXT1_ECX_SVM
    assert reg(nested, 0x8000000A, "edx") == 0x10000021  # nested paging etc. as KVM says


def test_vmx_is_hidden_unless_nested() -> None:
    intel = [CpuidEntry(0, 0, 0, 0xD, 0x756E6547, 0x6C65746E, 0x49656E69),
             CpuidEntry(1, 0, 0, 0x906EA, 0x800, 0x7FFA320B | LEAF1_ECX_VMX, 0)]  # fmt: skip
    assert not reg(guest_cpuid(intel, Topology.flat(1), 0), 1, "ecx") & LEAF1_ECX_VMX
    assert reg(guest_cpuid(intel, Topology.flat(1), 0, nested=True), 1, "ecx") & LEAF1_ECX_VMX


def hyperv_cpuid(features: frozenset[str] | None = None, keep: bool = False) -> list[CpuidEntry]:
    chosen = frozenset(hv.offered_features(lane_hv(), CAPS)) if features is None else features
    cfg = hv.HvCpuid(tuple(lane_hv()), chosen, keep)
    return guest_cpuid(lane_supported(), Topology.flat(2), 1, hyperv=cfg)


def test_hyperv_leaves_replace_kvms() -> None:
    out = hyperv_cpuid()
    assert text(out, 0x40000000) == b"Microsoft Hv"
    assert reg(out, 0x40000000, "eax") == 0x40000005  # Linux: within [MIN, MAX]
    assert reg(out, 0x40000001, "eax") == 0x31237648  # "Hv#1"
    assert not [e for e in out if 0x40000100 <= e.function < 0x40000200]
    assert not [e for e in out if e.function in (0x40000080, 0x4000000A)]  # not offered
    # Every feature's bits, no others: partition privileges without RESET (bit 7) and
    # reenlightenment (bit 13), EBX without the debugging privilege, EDX only frequencies
    # and direct timers.
    assert reg(out, 0x40000003, "eax") == 0x2AFF & ~(1 << 7) & ~(1 << 13)
    assert reg(out, 0x40000003, "ebx") == 0x30
    assert reg(out, 0x40000003, "edx") == (1 << 8) | (1 << 19)
    assert reg(out, 0x40000004, "eax") == 0x40E2C
    assert reg(out, 0x40000004, "ebx") == 0xFFF
    assert len([e for e in out if e.function == 0x40000003]) == 1


def test_a_subset_sets_only_its_bits() -> None:
    out = hyperv_cpuid(frozenset({"time", "vpindex"}))
    assert reg(out, 0x40000003, "eax") == (
        hv.HV_MSR_HYPERCALL_AVAILABLE | hv.HV_MSR_TIME_REF_COUNT_AVAILABLE
        | hv.HV_MSR_REFERENCE_TSC_AVAILABLE | hv.HV_MSR_VP_INDEX_AVAILABLE
    )  # fmt: skip
    assert reg(out, 0x40000003, "edx") == 0
    assert reg(out, 0x40000004, "eax") == hv.HV_X64_NO_NONARCH_CORESHARING


def test_kvm_leaves_kept_move_to_0x40000100() -> None:
    out = hyperv_cpuid(keep=True)
    assert text(out, 0x40000000) == b"Microsoft Hv"
    assert text(out, 0x40000100) == b"KVMKVMKVM\0\0\0"
    assert reg(out, 0x40000100, "eax") == 0x40000101
    assert reg(out, 0x40000101, "eax") == 0x1007EFB


def test_feature_names() -> None:
    assert hv.parse_features("all") is None
    assert hv.parse_features("time,vpindex") == {"time", "vpindex"}
    with pytest.raises(ValueError, match="unknown Hyper-V feature 'bogus'"):
        hv.parse_features("time,bogus")
    with pytest.raises(ValueError, match="empty"):
        hv.parse_features("time,")
    with pytest.raises(ValueError, match="stimer needs synic"):
        hv.check_requirements({"stimer", "time"})
    hv.check_requirements({"stimer", "synic", "vpindex", "time"})


def test_offered_follows_bits_and_capabilities() -> None:
    assert hv.offered_features(lane_hv(), CAPS) == list(hv.FEATURES)
    no_ipi = {**CAPS, "HYPERV_SEND_IPI": 0}
    assert "ipi" not in hv.offered_features(lane_hv(), no_ipi)
    # No SynIC capability: no synic, and so no timers either.
    got = hv.offered_features(lane_hv(), {**CAPS, "HYPERV_SYNIC2": 0})
    assert not {"synic", "stimer", "stimer-direct"} & set(got)
    assert hv.offered_features([], CAPS) == []


def test_extra_msrs_for_synic_and_timers() -> None:
    assert hv.extra_msrs({"time"}) == ()
    extra = hv.extra_msrs({"synic", "stimer"})
    assert 0x40000083 in extra and 0x4000009F in extra and 0x400000B7 in extra
    assert 0x40000084 not in extra  # EOM: write-only
