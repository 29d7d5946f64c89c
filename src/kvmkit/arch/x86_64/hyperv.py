"""Hyper-V enlightenments: the feature names `--hyperv` takes, the CPUID leaves a guest sees,
the MSRs that carry their state. Pure data and functions (no KVM calls): kvmkit.vmm.hyperv
asks the host, kvmkit.arch.x86_64.cpuid places the leaves.

Sources: Microsoft's Hypervisor Top Level Functional Specification (TLFS) 6.0, section 2.4
"Feature and Interface Discovery" (the leaves 0x40000000-0x40000005 and their bits) and the
synthetic MSR chapters; Linux's names for them (include/asm-generic/hyperv-tlfs.h,
arch/x86/include/asm/hyperv-tlfs.h); KVM's implementation (KVM API doc,
KVM_GET_SUPPORTED_HV_CPUID; arch/x86/kvm/hyperv.c). Feature names and their dependencies
are QEMU's `hv-*` flags (docs/system/i386/hyperv.rst), so a QEMU user finds the same words.

A guest takes the Hyper-V path only when leaf 0x40000000 says "Microsoft Hv": Linux's
hypervisor detection (arch/x86/kernel/cpu/hypervisor.c) ranks each candidate by what its
detect() returns, Hyper-V's is 0x40000005 (HYPERV_CPUID_MIN) and KVM's is the base of its own
leaves, so KVM's leaves at 0x40000100 beside Hyper-V's still win. kvmkit therefore leaves
KVM's out unless asked to keep them (then they move to 0x40000100: Windows, which looks only
at 0x40000000, sees Hyper-V; Linux sees KVM).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from kvmkit.kvm.cpuid import CpuidEntry

# TLFS 2.4: the leaves kvmkit offers
HV_CPUID_VENDOR = 0x40000000  # EAX highest leaf, EBX:ECX:EDX vendor ID
HV_CPUID_INTERFACE = 0x40000001  # EAX "Hv#1"
HV_CPUID_VERSION = 0x40000002
HV_CPUID_FEATURES = 0x40000003  # EAX partition privileges (low), EBX (high), EDX features
HV_CPUID_ENLIGHTENMENT_INFO = 0x40000004  # EAX recommendations, EBX spinlock retries
HV_CPUID_IMPLEMENT_LIMITS = 0x40000005  # EAX max virtual processors
HV_LEAVES = range(HV_CPUID_VENDOR, HV_CPUID_IMPLEMENT_LIMITS + 1)
# Linux needs the highest leaf in [HYPERV_CPUID_MIN, HYPERV_CPUID_MAX] (mshyperv.c)
HYPERV_CPUID_MIN = 0x40000005
VENDOR = b"Microsoft Hv"  # what Windows and Linux compare (KVM reports "Linux KVM Hv")
# Where KVM's own leaves go when they are kept beside Hyper-V's (QEMU does the same)
KVM_LEAVES_MOVED = 0x40000100

# Leaf 0x40000003 EAX: partition privileges (TLFS 2.4.4; HV_MSR_*_AVAILABLE in Linux)
HV_MSR_VP_RUNTIME_AVAILABLE = 1 << 0
HV_MSR_TIME_REF_COUNT_AVAILABLE = 1 << 1
HV_MSR_SYNIC_AVAILABLE = 1 << 2
HV_MSR_SYNTIMER_AVAILABLE = 1 << 3
HV_MSR_APIC_ACCESS_AVAILABLE = 1 << 4  # APIC MSRs and the VP assist page
HV_MSR_HYPERCALL_AVAILABLE = 1 << 5
HV_MSR_VP_INDEX_AVAILABLE = 1 << 6
HV_MSR_REFERENCE_TSC_AVAILABLE = 1 << 9
HV_ACCESS_FREQUENCY_MSRS = 1 << 11
# Leaf 0x40000003 EBX
HV_POST_MESSAGES = 1 << 4
HV_SIGNAL_EVENTS = 1 << 5
# Leaf 0x40000003 EDX
HV_FEATURE_FREQUENCY_MSRS_AVAILABLE = 1 << 8
HV_STIMER_DIRECT_MODE_AVAILABLE = 1 << 19
# Leaf 0x40000004 EAX: recommendations (TLFS 2.4.5)
HV_X64_REMOTE_TLB_FLUSH_RECOMMENDED = 1 << 2
HV_X64_APIC_ACCESS_RECOMMENDED = 1 << 3
HV_X64_RELAXED_TIMING_RECOMMENDED = 1 << 5
HV_DEPRECATING_AEOI_RECOMMENDED = 1 << 9
HV_X64_CLUSTER_IPI_RECOMMENDED = 1 << 10
HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED = 1 << 11
HV_X64_NO_NONARCH_CORESHARING = 1 << 18

# Synthetic MSRs (TLFS chapters 3, 7, 11, 12; hyperv-tlfs.h)
HV_X64_MSR_GUEST_OS_ID = 0x40000000
HV_X64_MSR_HYPERCALL = 0x40000001
HV_X64_MSR_VP_INDEX = 0x40000002
HV_X64_MSR_REFERENCE_TSC = 0x40000021
HV_X64_MSR_VP_ASSIST_PAGE = 0x40000073
HV_X64_MSR_SCONTROL = 0x40000080
HV_X64_MSR_SIEFP = 0x40000082
HV_X64_MSR_SIMP = 0x40000083
HV_X64_MSR_SINT0 = 0x40000090  # SINT0..SINT15
HV_X64_MSR_STIMER0_CONFIG = 0x400000B0  # then COUNT, and STIMER1..3 CONFIG/COUNT pairs
HV_MSR_RANGE = range(0x40000000, 0x40000200)

# The SynIC and synthetic-timer MSRs KVM_GET_MSR_INDEX_LIST leaves out (it lists SCONTROL and
# STIMER0_CONFIG only, arch/x86/kvm/x86.c emulated_msrs_all) but KVM_GET/SET_MSRS take from
# the VMM (QEMU saves the same set): the event-flags and message pages, the 16 interrupt
# sources, and every timer's configuration and count. Without them a restored guest loses
# its SynIC pages and the expiry of its synthetic timers. Left out on purpose: SVERSION
# (read-only, constant) and EOM (a write-only signal, reads as 0).
SYNIC_MSRS = (
    HV_X64_MSR_SCONTROL, HV_X64_MSR_SIEFP, HV_X64_MSR_SIMP,
    *range(HV_X64_MSR_SINT0, HV_X64_MSR_SINT0 + 16),
)  # fmt: skip
STIMER_MSRS = tuple(range(HV_X64_MSR_STIMER0_CONFIG, HV_X64_MSR_STIMER0_CONFIG + 8))

_REGS = ("eax", "ebx", "ecx", "edx")


@dataclass(frozen=True)
class HvFeature:
    """One `--hyperv` feature: the CPUID bits it sets (leaf, register, mask), the features it
    needs (QEMU's rules), the KVM capability the host must have (its `Cap` name, or "")."""

    name: str
    bits: tuple[tuple[int, str, int], ...]
    requires: tuple[str, ...] = ()
    cap: str = ""
    what: str = ""


FEATURES: dict[str, HvFeature] = {f.name: f for f in (
    HvFeature("relaxed", ((HV_CPUID_ENLIGHTENMENT_INFO, "eax",
                           HV_X64_RELAXED_TIMING_RECOMMENDED),),
              what="relaxed timing: no watchdog timeouts from a descheduled vCPU"),
    HvFeature("vapic", ((HV_CPUID_FEATURES, "eax", HV_MSR_APIC_ACCESS_AVAILABLE),
                        (HV_CPUID_ENLIGHTENMENT_INFO, "eax", HV_X64_APIC_ACCESS_RECOMMENDED)),
              what="APIC access MSRs and the VP assist page (lazy EOI)"),
    HvFeature("time", ((HV_CPUID_FEATURES, "eax",
                        HV_MSR_TIME_REF_COUNT_AVAILABLE | HV_MSR_REFERENCE_TSC_AVAILABLE),),
              cap="HYPERV_TIME",
              what="partition reference counter and the reference TSC page (a clocksource)"),
    HvFeature("vpindex", ((HV_CPUID_FEATURES, "eax", HV_MSR_VP_INDEX_AVAILABLE),),
              cap="HYPERV_VP_INDEX", what="virtual processor index MSR (= the vCPU index)"),
    HvFeature("runtime", ((HV_CPUID_FEATURES, "eax", HV_MSR_VP_RUNTIME_AVAILABLE),),
              what="virtual processor run time MSR"),
    HvFeature("synic", ((HV_CPUID_FEATURES, "eax", HV_MSR_SYNIC_AVAILABLE),
                        (HV_CPUID_FEATURES, "ebx", HV_POST_MESSAGES | HV_SIGNAL_EVENTS),
                        (HV_CPUID_ENLIGHTENMENT_INFO, "eax", HV_DEPRECATING_AEOI_RECOMMENDED)),
              requires=("vpindex",), cap="HYPERV_SYNIC2",
              what="synthetic interrupt controller"),
    HvFeature("stimer", ((HV_CPUID_FEATURES, "eax", HV_MSR_SYNTIMER_AVAILABLE),),
              requires=("synic", "time"), what="synthetic timers"),
    HvFeature("stimer-direct", ((HV_CPUID_FEATURES, "edx", HV_STIMER_DIRECT_MODE_AVAILABLE),),
              requires=("stimer",),
              what="synthetic timers that interrupt directly (Linux's hyperv_clockevent)"),
    HvFeature("frequencies", ((HV_CPUID_FEATURES, "eax", HV_ACCESS_FREQUENCY_MSRS),
                              (HV_CPUID_FEATURES, "edx", HV_FEATURE_FREQUENCY_MSRS_AVAILABLE)),
              what="TSC and APIC frequency MSRs (no calibration at boot)"),
    HvFeature("tlbflush", ((HV_CPUID_ENLIGHTENMENT_INFO, "eax",
                            HV_X64_REMOTE_TLB_FLUSH_RECOMMENDED
                            | HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED),),
              requires=("vpindex",), cap="HYPERV_TLBFLUSH",
              what="paravirtual remote TLB flush hypercalls"),
    HvFeature("ipi", ((HV_CPUID_ENLIGHTENMENT_INFO, "eax",
                       HV_X64_CLUSTER_IPI_RECOMMENDED | HV_X64_EX_PROCESSOR_MASKS_RECOMMENDED),),
              requires=("vpindex",), cap="HYPERV_SEND_IPI",
              what="paravirtual IPI hypercalls"),
)}  # fmt: skip
ALL = "all"

# Bits every Hyper-V guest gets: the hypercall page (TLFS 3.13: without it no hypercall, so
# none of the paravirtual paths) and the hint that no vCPU shares a core with another VM's
# (KVM sets it only when that holds on the host).
_BASE_BITS = (
    (HV_CPUID_FEATURES, "eax", HV_MSR_HYPERCALL_AVAILABLE),
    (HV_CPUID_ENLIGHTENMENT_INFO, "eax", HV_X64_NO_NONARCH_CORESHARING),
)


def parse_features(spec: str) -> frozenset[str] | None:
    """`--hyperv` / `--hyperv=FEATURE,...`: None for "all" (what the host offers), else the
    named features. ValueError (one line) for an empty or unknown name."""
    names = [n.strip() for n in spec.split(",")]
    if any(not n for n in names):
        raise ValueError(f"--hyperv={spec}: empty feature name")
    if ALL in names:
        if len(names) > 1:
            raise ValueError(f"--hyperv={spec}: 'all' does not combine with other names")
        return None
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise ValueError(
            f"--hyperv: unknown Hyper-V feature {unknown[0]!r} (known: "
            f"{', '.join(FEATURES)}, or all)"
        )
    return frozenset(names)


def check_requirements(features: Iterable[str]) -> None:
    """ValueError naming the first feature whose requirement is not selected."""
    chosen = set(features)
    for name in FEATURES:  # table order: stable messages
        if name not in chosen:
            continue
        for need in FEATURES[name].requires:
            if need not in chosen:
                raise ValueError(f"--hyperv: {name} needs {need} (add it to the list)")


def offered_features(supported: list[CpuidEntry], caps: dict[str, int]) -> list[str]:
    """The features the host can give a guest, in table order: every CPUID bit of the feature
    is in KVM_GET_SUPPORTED_HV_CPUID, its capability is present, and so are its
    requirements'."""
    have: dict[tuple[int, str], int] = {}
    for e in supported:
        for reg in _REGS:
            have[(e.function, reg)] = have.get((e.function, reg), 0) | getattr(e, reg)
    offered: list[str] = []
    for f in FEATURES.values():
        if f.cap and not caps.get(f.cap, 0):
            continue
        if any(have.get((leaf, reg), 0) & mask != mask for leaf, reg, mask in f.bits):
            continue
        if all(need in offered for need in f.requires):
            offered.append(f.name)
    return offered


def leaves(supported: list[CpuidEntry], features: Iterable[str]) -> list[CpuidEntry]:
    """The Hyper-V leaves 0x40000000-0x40000005 for a guest with `features`, from KVM's
    KVM_GET_SUPPORTED_HV_CPUID: the vendor is "Microsoft Hv" and the highest leaf 0x40000005;
    in 0x40000003 and 0x40000004 only the bits of the chosen features (and the base bits)
    that KVM supports are set, so with KVM_CAP_HYPERV_ENFORCE_CPUID the guest can use
    nothing else. The version and limits leaves are KVM's as they are; 0x40000004 EBX (the
    spinlock retry count) too."""
    wanted: dict[tuple[int, str], int] = {}
    for leaf, reg, mask in [*_BASE_BITS, *(b for n in features for b in FEATURES[n].bits)]:
        wanted[(leaf, reg)] = wanted.get((leaf, reg), 0) | mask
    by_leaf = {e.function: e for e in supported if e.function in HV_LEAVES}
    out: list[CpuidEntry] = []
    for leaf in HV_LEAVES:
        e = by_leaf.get(leaf, CpuidEntry(leaf))
        if leaf == HV_CPUID_VENDOR:
            ebx, ecx, edx = (int.from_bytes(VENDOR[i : i + 4], "little") for i in (0, 4, 8))
            e = CpuidEntry(leaf, 0, 0, HV_CPUID_IMPLEMENT_LIMITS, ebx, ecx, edx)
        elif leaf in (HV_CPUID_FEATURES, HV_CPUID_ENLIGHTENMENT_INFO):
            regs = {r: getattr(e, r) & wanted.get((leaf, r), 0) for r in _REGS}
            if leaf == HV_CPUID_ENLIGHTENMENT_INFO:
                regs["ebx"] = e.ebx  # spinlock retries: a count, not feature bits
            e = CpuidEntry(leaf, 0, 0, regs["eax"], regs["ebx"], regs["ecx"], regs["edx"])
        else:
            e = CpuidEntry(leaf, 0, 0, e.eax, e.ebx, e.ecx, e.edx)
        out.append(e)
    return out


def extra_msrs(features: Iterable[str]) -> tuple[int, ...]:
    """The synthetic MSRs to save beyond KVM_GET_MSR_INDEX_LIST for these features."""
    chosen = set(features)
    extra: tuple[int, ...] = ()
    if "synic" in chosen:
        extra += SYNIC_MSRS
    if "stimer" in chosen:
        extra += STIMER_MSRS
    return extra


@dataclass(frozen=True)
class HvCpuid:
    """What the CPUID pass needs to give a vCPU Hyper-V leaves: KVM's supported leaves, the
    features chosen, and whether KVM's own leaves stay (moved to 0x40000100)."""

    supported: tuple[CpuidEntry, ...]
    features: frozenset[str]
    kvm_leaves: bool = False
