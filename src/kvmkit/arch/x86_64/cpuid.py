"""The CPUID a vCPU shows its guest, made from `KVM_GET_SUPPORTED_CPUID`.

KVM reports what it *can* virtualize; a VMM must still fill in what depends on the machine it
builds: each vCPU's APIC ID and the topology (sockets, dies, cores, threads; see
topology.py), the hypervisor bit and signature, and it must drop features it does not
emulate. The choices follow Firecracker's "CPUID normalization" and Cloud Hypervisor's
`arch::x86_64::configure_vcpu`.

`guest_cpuid` runs the supported entries through a list of passes, one per group of leaves;
each pass is a function `(entries, ctx) -> entries` and leaves the others' leaves alone, so a
new group (nested virtualization bits, Hyper-V leaves) is one more pass in `PASSES`:

- `features_pass`, leaves 0x1 ECX and 0x6 (SDM vol. 2A "CPUID", tables 3-10 and 3-11, and
  the Thermal and Power Management leaf): ECX[31] "hypervisor present" (reserved for this use
  by the SDM, used by every hypervisor), ECX[3] MONITOR/MWAIT cleared (KVM does not let guests
  use MWAIT by default, so Linux must not pick mwait idle), ECX[24] TSC-deadline kept when
  KVM reports it (or forced); 0x6 EAX[1] Turbo Boost and ECX[3] energy-performance bias
  cleared (no such MSRs);
- `topology_pass`, everything that names APIC IDs or counts processors:
  leaf 0x1 (SDM table 3-8): EBX[31:24] initial APIC ID (its low 8 bits: the SDM's "modulo"
  rule for IDs above 255), EBX[23:16] addressable IDs in the package, EDX[28] HTT when the
  package holds more than one logical processor;
  leaf 0x4 (Intel "Deterministic Cache Parameters"): EAX[31:26] addressable core IDs in the
  package - 1, EAX[25:14] addressable IDs sharing the cache - 1 (L1/L2 per core, L3 per die);
  leaves 0xB and 0x1F (SDM "Extended Topology Enumeration" / "V2 Extended Topology
  Enumeration", vol. 3A 10.12.8): one subleaf per level - SMT, Core, and on 0x1F Die when
  there is more than one die - with EAX[4:0] the shift to the next level's ID, EBX[15:0] the
  logical processors at this level, ECX[7:0] the subleaf, ECX[15:8] the level type (1 SMT,
  2 Core, 5 Die), then an invalid level; EDX of every subleaf is the x2APIC ID. 0x1F is
  added on Intel when there are dies and KVM did not list it (only it can describe dies);
  AMD (APM vol. 3 appendix E.4): 0x80000001 ECX[1] CmpLegacy when the package has more than
  one logical processor, ECX[22] TopologyExtensions set when the leaves it announces
  (0x8000001D, 0x8000001E) are there, as Firecracker does: without it Linux reads neither and
  sees no SMT siblings (a TCG-emulated EPYC, like the lane's, does not report it);
  0x80000008 ECX[15:12] ApicIdSize (low APIC ID bits that number the logical processors in a
  package) and ECX[7:0] NC (logical processors per package - 1);
  0x8000001D EAX[25:14] NumSharingCache - 1; 0x8000001E EAX extended APIC ID, EBX[15:8]
  threads per core - 1, EBX[7:0] core ID in the package, ECX[10:8] nodes (dies) per package
  - 1, ECX[7:0] node ID;
- `nested_pass`, the hardware virtualization extension (docs/nested.md): leaf 0x1 ECX[5] VMX
  (SDM vol. 2A table 3-10) and 0x80000001 ECX[2] SVM (APM vol. 3 E.4.2) stay as KVM reports
  them only with `nested` (KVM reports its vendor's bit only when its `nested` module
  parameter is on); otherwise both are cleared and the SVM feature leaf 0x8000000A (APM
  E.4.9, meaningful only with SVM) is zeroed, as QEMU does without `+svm`;
- `hypervisor_pass`, 0x40000000 (Linux Documentation/virt/kvm/x86/cpuid.rst): EAX = highest
  hypervisor leaf, EBX/ECX/EDX = "KVMKVMKVM\\0\\0\\0"; 0x40000001 (KVM paravirtual features
  such as kvmclock) as KVM supports them;
- `hyperv_pass`, with `--hyperv` (docs/hyperv.md, kvmkit.arch.x86_64.hyperv): Hyper-V's
  leaves 0x40000000-0x40000005 take the base; KVM's leaves are left out, or with
  `kvm_leaves` moved to 0x40000100-0x40000101 (its signature leaf's EAX moved with them).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from kvmkit.arch.x86_64 import hyperv as hv
from kvmkit.arch.x86_64.topology import CpuLocation, Topology
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
LEAF1_ECX_VMX = 1 << 5
# Leaf 0x80000001 ECX (APM vol. 3, E.4.2)
EXT1_ECX_CMP_LEGACY = 1 << 1
EXT1_ECX_SVM = 1 << 2
SVM_FEATURES_LEAF = 0x8000000A
EXT1_ECX_TOPOEXT = 1 << 22

# Extended topology level types (SDM vol. 2A, CPUID leaf 1FH, ECX[15:8])
LEVEL_INVALID = 0
LEVEL_SMT = 1
LEVEL_CORE = 2
LEVEL_DIE = 5

KVM_SIGNATURE = b"KVMKVMKVM\0\0\0"
KVM_CPUID_SIGNATURE = 0x40000000
KVM_CPUID_FEATURES = 0x40000001

VENDOR_INTEL = b"GenuineIntel"
VENDOR_AMD = b"AuthenticAMD"
VENDOR_HYGON = b"HygonGenuine"


def _u32(data: bytes, i: int) -> int:
    return int.from_bytes(data[4 * i : 4 * i + 4], "little")


def vendor(entries: list[CpuidEntry]) -> bytes:
    """The 12-byte vendor string of leaf 0 (EBX, EDX, ECX order), b"" when absent."""
    for e in entries:
        if e.function == 0:
            return b"".join(r.to_bytes(4, "little") for r in (e.ebx, e.edx, e.ecx))
    return b""


@dataclass(frozen=True)
class CpuidContext:
    """What a pass knows about the vCPU whose CPUID it builds."""

    topology: Topology
    cpu: CpuLocation
    vendor: bytes
    tsc_deadline: bool | None = None
    topology_leaves: bool = False  # AMD's 0x8000001D and 0x8000001E are both supported
    nested: bool = False  # expose VMX/SVM (docs/nested.md)
    hyperv: hv.HvCpuid | None = None  # Hyper-V leaves (docs/hyperv.md)

    @property
    def intel(self) -> bool:
        return self.vendor == VENDOR_INTEL

    @property
    def amd(self) -> bool:
        return self.vendor in (VENDOR_AMD, VENDOR_HYGON)


Pass = Callable[[list[CpuidEntry], CpuidContext], list[CpuidEntry]]
LeafFix = Callable[[CpuidEntry, CpuidContext], list[CpuidEntry]]


def _per_leaf(entries: list[CpuidEntry], ctx: CpuidContext,
              fixes: dict[int, LeafFix]) -> list[CpuidEntry]:  # fmt: skip
    """Replace each entry whose leaf has a fix by what the fix returns (none, one or more)."""
    out: list[CpuidEntry] = []
    for e in entries:
        fix = fixes.get(e.function)
        out.extend(fix(e, ctx) if fix is not None else [e])
    return out


# -- features
def _leaf1_features(e: CpuidEntry, ctx: CpuidContext) -> list[CpuidEntry]:
    ecx = (e.ecx | LEAF1_ECX_HYPERVISOR) & ~LEAF1_ECX_MONITOR
    if ctx.tsc_deadline is True:
        ecx |= LEAF1_ECX_TSC_DEADLINE
    elif ctx.tsc_deadline is False:
        ecx &= ~LEAF1_ECX_TSC_DEADLINE
    return [e.with_regs(ecx=ecx)]


def _leaf6(e: CpuidEntry, ctx: CpuidContext) -> list[CpuidEntry]:
    return [e.with_regs(eax=e.eax & ~LEAF6_EAX_TURBO, ecx=e.ecx & ~LEAF6_ECX_EPB)]


def features_pass(entries: list[CpuidEntry], ctx: CpuidContext) -> list[CpuidEntry]:
    return _per_leaf(entries, ctx, {0x1: _leaf1_features, 0x6: _leaf6})


# -- topology
def _cache_sharing(eax: int, topo: Topology) -> int:
    """Set EAX[25:14] (addressable IDs sharing this cache - 1) of leaf 4 / 0x8000001D from
    the cache level in EAX[7:5]: L1 and L2 belong to one core (its threads), L3 to a die."""
    level = (eax >> 5) & 0x7
    sharing = 1 << (topo.smt_bits if level <= 2 else topo.die_shift)
    return (eax & ~(0xFFF << 14)) | ((min(sharing, 0x1000) - 1) << 14)


def _leaf1_topology(e: CpuidEntry, ctx: CpuidContext) -> list[CpuidEntry]:
    # SDM table 3-8: EBX[31:24] initial APIC ID, EBX[23:16] max addressable IDs for logical
    # processors in this package (valid when HTT), EBX[15:8] CLFLUSH size.
    topo = ctx.topology
    package_ids = min(1 << topo.pkg_shift, 255)
    ebx = (e.ebx & 0xFFFF) | (package_ids << 16) | ((ctx.cpu.apic_id & 0xFF) << 24)
    edx = e.edx | LEAF1_EDX_HTT if topo.per_package > 1 else e.edx & ~LEAF1_EDX_HTT
    return [e.with_regs(ebx=ebx, edx=edx)]


def _leaf4(e: CpuidEntry, ctx: CpuidContext) -> list[CpuidEntry]:
    if not ctx.intel or not e.eax & 0x1F:  # EAX[4:0] cache type, 0 = no more caches
        return [e]
    topo = ctx.topology
    eax = _cache_sharing(e.eax, topo)
    # EAX[31:26]: maximum number of addressable IDs for processor cores in the package - 1.
    cores = min(1 << (topo.core_bits + topo.die_bits), 64)
    return [e.with_regs(eax=(eax & 0x03FF_FFFF) | ((cores - 1) << 26))]


def extended_topology(function: int, ctx: CpuidContext) -> list[CpuidEntry]:
    """Every subleaf of leaf 0xB or 0x1F for this vCPU (SDM vol. 2A, leaves 0BH and 1FH)."""
    topo = ctx.topology
    levels = [(LEVEL_SMT, topo.smt_bits, topo.threads)]
    if function == 0x1F and topo.dies > 1:
        levels.append((LEVEL_CORE, topo.die_shift, topo.threads * topo.cores))
        levels.append((LEVEL_DIE, topo.pkg_shift, topo.per_package))
    else:  # leaf 0xB has no die level: its last level's shift reaches the package ID
        levels.append((LEVEL_CORE, topo.pkg_shift, topo.per_package))
    flags = KVM_CPUID_FLAG_SIGNIFICANT_INDEX
    x2apic_id = ctx.cpu.apic_id
    out = [
        CpuidEntry(function, i, flags, shift, count & 0xFFFF, (kind << 8) | i, x2apic_id)
        for i, (kind, shift, count) in enumerate(levels)
    ]
    n = len(levels)
    out.append(CpuidEntry(function, n, flags, 0, 0, (LEVEL_INVALID << 8) | n, x2apic_id))
    return out


def _extended_topology_once() -> LeafFix:
    done: set[int] = set()

    def fix(e: CpuidEntry, ctx: CpuidContext) -> list[CpuidEntry]:
        if e.function in done:
            return []  # the first subleaf brought them all
        done.add(e.function)
        return extended_topology(e.function, ctx)

    return fix


def _ext1(e: CpuidEntry, ctx: CpuidContext) -> list[CpuidEntry]:
    if not ctx.amd:
        return [e]
    multi = ctx.topology.per_package > 1
    ecx = e.ecx | EXT1_ECX_CMP_LEGACY if multi else e.ecx & ~EXT1_ECX_CMP_LEGACY
    if ctx.topology_leaves:
        ecx |= EXT1_ECX_TOPOEXT
    return [e.with_regs(ecx=ecx)]


def _ext8(e: CpuidEntry, ctx: CpuidContext) -> list[CpuidEntry]:
    if not ctx.amd:
        return [e]
    # APM E.4.7: ECX[15:12] ApicIdSize, ECX[7:0] NC = logical processors per package - 1.
    topo = ctx.topology
    nc = min(topo.per_package, 256) - 1
    return [e.with_regs(ecx=(e.ecx & ~0xF0FF) | ((topo.pkg_shift & 0xF) << 12) | nc)]


def _ext1d(e: CpuidEntry, ctx: CpuidContext) -> list[CpuidEntry]:
    if not ctx.amd or not e.eax & 0x1F:
        return [e]
    return [e.with_regs(eax=_cache_sharing(e.eax, ctx.topology))]


def _ext1e(e: CpuidEntry, ctx: CpuidContext) -> list[CpuidEntry]:
    if not ctx.amd:
        return [e]
    # APM E.4.16 / PPR: EAX extended APIC ID; EBX[15:8] threads per core - 1, EBX[7:0] core
    # ID (unique in the package); ECX[10:8] nodes per processor - 1, ECX[7:0] node ID. kvmkit
    # calls each die a node, numbered across the machine.
    topo, cpu = ctx.topology, ctx.cpu
    core_id = (cpu.die * topo.cores + cpu.core) & 0xFF
    node_id = (cpu.socket * topo.dies + cpu.die) & 0xFF
    ebx = ((topo.threads - 1) & 0xFF) << 8 | core_id
    ecx = (min(topo.dies, 8) - 1) << 8 | node_id
    return [e.with_regs(eax=cpu.apic_id, ebx=ebx, ecx=ecx, edx=0)]


def topology_pass(entries: list[CpuidEntry], ctx: CpuidContext) -> list[CpuidEntry]:
    once = _extended_topology_once()
    out = _per_leaf(entries, ctx, {
        0x1: _leaf1_topology, 0x4: _leaf4, 0xB: once, 0x1F: once,
        0x80000001: _ext1, 0x80000008: _ext8, 0x8000001D: _ext1d, 0x8000001E: _ext1e,
    })  # fmt: skip
    if ctx.intel and ctx.topology.dies > 1 and not any(e.function == 0x1F for e in out):
        # Only leaf 0x1F can describe dies: add it and raise the highest basic leaf to it.
        out = [e.with_regs(eax=max(e.eax, 0x1F)) if e.function == 0 else e for e in out]
        out.extend(extended_topology(0x1F, ctx))
    return out


# -- nested virtualization
def _leaf1_nested(e: CpuidEntry, ctx: CpuidContext) -> list[CpuidEntry]:
    return [e if ctx.nested else e.with_regs(ecx=e.ecx & ~LEAF1_ECX_VMX)]


def _ext1_nested(e: CpuidEntry, ctx: CpuidContext) -> list[CpuidEntry]:
    return [e if ctx.nested else e.with_regs(ecx=e.ecx & ~EXT1_ECX_SVM)]


def _svm_features(e: CpuidEntry, ctx: CpuidContext) -> list[CpuidEntry]:
    return [e if ctx.nested else e.with_regs(eax=0, ebx=0, ecx=0, edx=0)]


def nested_pass(entries: list[CpuidEntry], ctx: CpuidContext) -> list[CpuidEntry]:
    return _per_leaf(entries, ctx, {
        0x1: _leaf1_nested, 0x80000001: _ext1_nested, SVM_FEATURES_LEAF: _svm_features,
    })  # fmt: skip


# -- hypervisor leaves
def hypervisor_pass(entries: list[CpuidEntry], ctx: CpuidContext) -> list[CpuidEntry]:
    out: list[CpuidEntry] = []
    have_signature = False
    for e in entries:
        if e.function == KVM_CPUID_SIGNATURE:
            have_signature = True
            max_leaf = max(e.eax, KVM_CPUID_SIGNATURE)
            e = e.with_regs(eax=max_leaf, ebx=_u32(KVM_SIGNATURE, 0),
                            ecx=_u32(KVM_SIGNATURE, 1), edx=_u32(KVM_SIGNATURE, 2))  # fmt: skip
        out.append(e)
    if not have_signature:
        features = any(x.function == KVM_CPUID_FEATURES for x in out)
        out.append(
            CpuidEntry(
                KVM_CPUID_SIGNATURE, 0, 0,
                KVM_CPUID_FEATURES if features else KVM_CPUID_SIGNATURE,
                _u32(KVM_SIGNATURE, 0), _u32(KVM_SIGNATURE, 1), _u32(KVM_SIGNATURE, 2),
            )
        )  # fmt: skip
    return out


def hyperv_pass(entries: list[CpuidEntry], ctx: CpuidContext) -> list[CpuidEntry]:
    if ctx.hyperv is None:
        return entries
    base = KVM_CPUID_SIGNATURE
    kvm = [e for e in entries if base <= e.function < base + 0x100]
    out = [e for e in entries if not base <= e.function < base + 0x100]
    out.extend(hv.leaves(list(ctx.hyperv.supported), ctx.hyperv.features))
    if ctx.hyperv.kvm_leaves:
        shift = hv.KVM_LEAVES_MOVED - base
        for e in kvm:
            moved = replace(e, function=e.function + shift)
            if e.function == base:
                moved = moved.with_regs(eax=e.eax + shift)  # the highest KVM leaf moves too
            out.append(moved)
    return out


PASSES: tuple[Pass, ...] = (
    features_pass, topology_pass, nested_pass, hypervisor_pass, hyperv_pass,
)  # fmt: skip


def guest_cpuid(
    supported: list[CpuidEntry],
    topology: Topology,
    index: int,
    *,
    tsc_deadline: bool | None = None,
    nested: bool = False,
    hyperv: hv.HvCpuid | None = None,
    passes: tuple[Pass, ...] = PASSES,
) -> list[CpuidEntry]:
    """The CPUID entries of vCPU `index` (0-based, Linux's CPU number) of a machine with
    `topology`, for `KVM_SET_CPUID2` on the vCPU whose id is its APIC ID.

    `tsc_deadline`: None keeps leaf 1 ECX[24] as `supported` says; True/False force it (a VMM
    that checked KVM_CAP_TSC_DEADLINE_TIMER may set it: older kernels do not report it).
    `nested`: keep VMX/SVM as KVM reports them (hidden otherwise). `hyperv`: Hyper-V leaves.
    """
    leaves = {e.function for e in supported}
    ctx = CpuidContext(
        topology, topology.location(index), vendor(supported), tsc_deadline,
        topology_leaves={0x8000001D, 0x8000001E} <= leaves, nested=nested, hyperv=hyperv,
    )  # fmt: skip
    entries = list(supported)
    for step in passes:
        entries = step(entries, ctx)
    return entries
