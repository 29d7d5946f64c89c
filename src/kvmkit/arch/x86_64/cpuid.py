"""The CPUID a vCPU shows its guest, made from `KVM_GET_SUPPORTED_CPUID`.

KVM reports what it *can* virtualize; a VMM must still fill in what depends on the machine it
builds: the APIC ID of each vCPU, the topology (here: one package, one thread per core, one
core per vCPU), the hypervisor bit and signature, and it must drop features it does not
emulate. The choices follow Firecracker's "CPUID normalization" and Cloud Hypervisor's
`arch::x86_64::configure_vcpu`:

- leaf 0x1 (SDM vol. 2A "CPUID", table 3-8 and 3-10/3-11): EBX[31:24] initial APIC ID =
  vcpu_id, EBX[23:16] addressable logical processor IDs in the package, EDX[28] HTT when there
  is more than one, ECX[31] "hypervisor present" (reserved for this use by the SDM, used by
  every hypervisor), ECX[3] MONITOR/MWAIT cleared (KVM does not let guests use MWAIT by default,
  so Linux must not pick mwait idle), ECX[24] TSC-deadline kept when KVM reports it;
- leaf 0x4 (SDM "Deterministic Cache Parameters", Intel): EAX[31:26] addressable core IDs - 1,
  EAX[25:14] logical processors sharing the cache - 1 (L1/L2 per core, L3 per package);
- leaf 0x6: EAX[1] Turbo Boost and ECX[3] energy-performance bias cleared (no such MSRs);
- leaves 0xB and 0x1F (SDM "Extended Topology Enumeration", vol. 3A 10.12 x2APIC ID):
  level 0 SMT with 1 logical processor, level 1 Core with nvcpus, then the invalid level;
  EDX of every subleaf = x2APIC ID = vcpu_id;
- AMD (APM vol. 3 appendix E.4): 0x80000001 ECX[1] CmpLegacy when nvcpus > 1,
  0x80000008 ECX[7:0] NC = nvcpus - 1 and ECX[15:12] ApicIdSize, 0x8000001D EAX[25:14]
  NumSharingCache - 1, 0x8000001E extended APIC ID / core ID / node ID;
- 0x40000000 (Linux Documentation/virt/kvm/x86/cpuid.rst): EAX = highest hypervisor leaf,
  EBX/ECX/EDX = "KVMKVMKVM\\0\\0\\0"; 0x40000001 (KVM paravirtual features such as kvmclock)
  as KVM supports them.
"""

from __future__ import annotations

from kvmkit.kvm.cpuid import CpuidEntry

KVM_CPUID_FLAG_SIGNIFICANT_INDEX = 1 << 0

# Leaf 0x1 (SDM vol. 2A, CPUID, tables 3-10 and 3-11)
LEAF1_ECX_MONITOR = 1 << 3
LEAF1_ECX_TSC_DEADLINE = 1 << 24
LEAF1_ECX_HYPERVISOR = 1 << 31
LEAF1_EDX_HTT = 1 << 28
# Leaf 0x6 (SDM vol. 2A, Thermal and Power Management leaf)
LEAF6_EAX_TURBO = 1 << 1
LEAF6_ECX_EPB = 1 << 3
# Leaf 0x80000001 ECX (APM vol. 3, E.4.2)
EXT1_ECX_CMP_LEGACY = 1 << 1
EXT1_ECX_TOPOEXT = 1 << 22

# Extended topology level types (SDM vol. 2A, CPUID leaf 0BH, ECX[15:8])
LEVEL_INVALID = 0
LEVEL_SMT = 1
LEVEL_CORE = 2

KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001

VENDOR_INTEL = b"GenuineIntel"
VENDOR_AMD = b"AuthenticAMD"
VENDOR_HYGON = b"HygonGenuine"

MAX_VCPUS = 254  # 8-bit APIC IDs, 255 is broadcast; the IOAPIC takes id nvcpus (MP table)


def _u32(data: bytes, i: int) -> int:
    return int.from_bytes(data[4 * i : 4 * i + 4], "little")


def vendor(entries: list[CpuidEntry]) -> bytes:
    """The 12-byte vendor string of leaf 0 (EBX, EDX, ECX order), b"" when absent."""
    for e in entries:
        if e.function == 0:
            return b"".join(r.to_bytes(4, "little") for r in (e.ebx, e.edx, e.ecx))
    return b""


def _bits_for(count: int) -> int:
    """Number of bits needed to give `count` distinct IDs (ceil(log2(count)))."""
    return max(count - 1, 0).bit_length()


def _topology_subleaves(function: int, vcpu_id: int, nvcpus: int) -> list[CpuidEntry]:
    """Subleaves 0 (SMT), 1 (Core) and 2 (invalid) of leaf 0xB or 0x1F (SDM vol. 2A, leaf
    0BH: EAX[4:0] shift to the next level's ID, EBX[15:0] logical processors at this level,
    ECX[7:0] level number, ECX[15:8] level type, EDX x2APIC ID)."""
    flags = KVM_CPUID_FLAG_SIGNIFICANT_INDEX
    core_shift = _bits_for(nvcpus)
    return [
        CpuidEntry(function, 0, flags, 0, 1, (LEVEL_SMT << 8) | 0, vcpu_id),
        CpuidEntry(function, 1, flags, core_shift, nvcpus, (LEVEL_CORE << 8) | 1, vcpu_id),
        CpuidEntry(function, 2, flags, 0, 0, (LEVEL_INVALID << 8) | 2, vcpu_id),
    ]


def _cache_sharing(eax: int, level_threads: int, package_ids: int) -> int:
    """Set EAX[25:14] (logical processors sharing this cache - 1) of leaf 4 / 0x8000001D from
    the cache level in EAX[7:5]: L1 and L2 belong to one core (one thread), L3 to the package."""
    level = (eax >> 5) & 0x7
    sharing = level_threads if level <= 2 else package_ids
    return (eax & ~(0xFFF << 14)) | (((sharing - 1) & 0xFFF) << 14)


def guest_cpuid(
    supported: list[CpuidEntry],
    vcpu_id: int,
    nvcpus: int,
    *,
    tsc_deadline: bool | None = None,
) -> list[CpuidEntry]:
    """The CPUID entries to give vCPU `vcpu_id` of a VM with `nvcpus` vCPUs (one package, one
    thread per core), for `KVM_SET_CPUID2`.

    `tsc_deadline`: None keeps leaf 1 ECX[24] as `supported` says; True/False force it (a VMM
    that checked KVM_CAP_TSC_DEADLINE_TIMER may set it: older kernels do not report it).
    """
    if not 1 <= nvcpus <= MAX_VCPUS:
        raise ValueError(f"nvcpus must be 1..{MAX_VCPUS}, not {nvcpus}")
    if not 0 <= vcpu_id < nvcpus:
        raise ValueError(f"vcpu_id {vcpu_id} out of range for {nvcpus} vCPUs")

    vend = vendor(supported)
    intel = vend == VENDOR_INTEL
    amd = vend in (VENDOR_AMD, VENDOR_HYGON)
    id_bits = _bits_for(nvcpus)
    package_ids = 1 << id_bits  # addressable APIC IDs in the package (a power of two)

    out: list[CpuidEntry] = []
    topology_done: set[int] = set()
    have_signature = False
    max_hv_leaf = KVM_CPUID_SIGNATURE

    for e in supported:
        fn = e.function
        if fn == 0x1:
            # SDM table 3-8: EBX[31:24] initial APIC ID, EBX[23:16] max addressable IDs for
            # logical processors in this package (valid when HTT), EBX[15:8] CLFLUSH size.
            ebx = (e.ebx & 0xFFFF) | (min(package_ids, 255) << 16) | ((vcpu_id & 0xFF) << 24)
            ecx = (e.ecx | LEAF1_ECX_HYPERVISOR) & ~LEAF1_ECX_MONITOR
            if tsc_deadline is True:
                ecx |= LEAF1_ECX_TSC_DEADLINE
            elif tsc_deadline is False:
                ecx &= ~LEAF1_ECX_TSC_DEADLINE
            edx = e.edx | LEAF1_EDX_HTT if nvcpus > 1 else e.edx & ~LEAF1_EDX_HTT
            out.append(e.with_regs(ebx=ebx, ecx=ecx, edx=edx))
        elif fn == 0x4:
            if intel and e.eax & 0x1F:  # EAX[4:0] cache type, 0 = no more caches
                eax = _cache_sharing(e.eax, 1, package_ids)
                # EAX[31:26]: maximum number of addressable IDs for processor cores - 1.
                eax = (eax & 0x03FF_FFFF) | (((min(package_ids, 64) - 1) & 0x3F) << 26)
                out.append(e.with_regs(eax=eax))
            else:
                out.append(e)
        elif fn == 0x6:
            out.append(e.with_regs(eax=e.eax & ~LEAF6_EAX_TURBO, ecx=e.ecx & ~LEAF6_ECX_EPB))
        elif fn in (0xB, 0x1F):
            if fn not in topology_done:
                topology_done.add(fn)
                out.extend(_topology_subleaves(fn, vcpu_id, nvcpus))
        elif fn == 0x80000001 and amd:
            ecx = e.ecx | EXT1_ECX_CMP_LEGACY if nvcpus > 1 else e.ecx & ~EXT1_ECX_CMP_LEGACY
            out.append(e.with_regs(ecx=ecx))
        elif fn == 0x80000008 and amd:
            # APM E.4.7: ECX[15:12] ApicIdSize (bits of the APIC ID that name the core),
            # ECX[7:0] NC = number of physical cores - 1.
            ecx = (e.ecx & ~0xF0FF) | ((id_bits & 0xF) << 12) | ((nvcpus - 1) & 0xFF)
            out.append(e.with_regs(ecx=ecx))
        elif fn == 0x8000001D and amd:
            if e.eax & 0x1F:
                out.append(e.with_regs(eax=_cache_sharing(e.eax, 1, package_ids)))
            else:
                out.append(e)
        elif fn == 0x8000001E and amd:
            # APM E.4.16: EAX extended APIC ID; EBX[15:8] threads per compute unit - 1,
            # EBX[7:0] compute unit (core) ID; ECX[10:8] nodes per processor - 1, ECX[7:0]
            # node ID.
            out.append(e.with_regs(eax=vcpu_id, ebx=vcpu_id & 0xFF, ecx=0, edx=0))
        elif fn == KVM_CPUID_SIGNATURE:
            have_signature = True
            max_hv_leaf = max(e.eax, KVM_CPUID_SIGNATURE)
            out.append(
                e.with_regs(
                    eax=max_hv_leaf,
                    ebx=_u32(KVM_SIGNATURE, 0),
                    ecx=_u32(KVM_SIGNATURE, 1),
                    edx=_u32(KVM_SIGNATURE, 2),
                )
            )
        else:
            out.append(e)

    if not have_signature:
        out.append(
            CpuidEntry(
                KVM_CPUID_SIGNATURE,
                0,
                0,
                KVM_CPUID_FEATURES
                if any(x.function == KVM_CPUID_FEATURES for x in out)
                else KVM_CPUID_SIGNATURE,
                _u32(KVM_SIGNATURE, 0),
                _u32(KVM_SIGNATURE, 1),
                _u32(KVM_SIGNATURE, 2),
            )
        )
    return out
