"""What this host's KVM offers a `--hyperv` guest, and the choices a machine makes from it
(docs/hyperv.md; the feature table is kvmkit.arch.x86_64.hyperv).

`host_hyperv(kvm)` reads KVM_GET_SUPPORTED_HV_CPUID (on /dev/kvm where the kernel has
KVM_CAP_SYS_HYPERV_CPUID, Linux 5.11+; else on a vCPU of a scratch VM, KVM_CAP_HYPERV_CPUID,
Linux 5.4+) and the capabilities each feature needs. `choose(host, wanted)` turns the
configuration into the features the guest gets, refusing (UserError, one line) what the host
does not offer. Per vCPU, `vcpu_caps(host, features)` lists what KVM_ENABLE_CAP turns on before
the guest runs (KVM API doc, section 6 "Capabilities that can be enabled on vCPUs"):

    KVM_CAP_HYPERV_ENFORCE_CPUID   where the kernel has it (5.14+): the guest can use only the
                                   MSRs and hypercalls its Hyper-V CPUID bits announce
    KVM_CAP_HYPERV_SYNIC2          with `synic`: KVM emulates the SynIC (and so the synthetic
                                   timers); SYNIC2 rather than SYNIC so that KVM does not clear
                                   the guest's message and event pages when they are set
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvmkit.abi.constants import Cap
from kvmkit.arch.x86_64 import hyperv as hv
from kvmkit.errors import UserError
from kvmkit.kvm import Kvm, KvmError
from kvmkit.kvm.cpuid import CpuidEntry

# The capabilities `kvmkit probe` reports beside the features (hv.FEATURES names the rest)
_CAPS = ("HYPERV", "HYPERV_CPUID", "SYS_HYPERV_CPUID", "HYPERV_ENFORCE_CPUID")


@dataclass(frozen=True)
class HypervHost:
    supported: tuple[CpuidEntry, ...]  # KVM_GET_SUPPORTED_HV_CPUID
    caps: dict[str, int] = field(default_factory=dict)
    offered: tuple[str, ...] = ()
    problem: str = ""  # why there is no Hyper-V emulation at all ("" when there is)


def host_hyperv(kvm: Kvm) -> HypervHost:
    names = {*_CAPS, *(f.cap for f in hv.FEATURES.values() if f.cap)}
    caps = {name: kvm.check_extension(Cap[name]) for name in sorted(names)}
    if not caps["HYPERV"]:
        return HypervHost((), caps, problem="KVM_CAP_HYPERV is 0: no Hyper-V emulation")
    if not (caps["SYS_HYPERV_CPUID"] or caps["HYPERV_CPUID"]):
        return HypervHost((), caps, problem="no KVM_GET_SUPPORTED_HV_CPUID (Linux 5.4 or newer)")
    try:
        if caps["SYS_HYPERV_CPUID"]:
            supported = kvm.supported_hv_cpuid()
        else:
            vm = kvm.create_vm()
            try:
                supported = vm.create_vcpu(0).supported_hv_cpuid()
            finally:
                vm.close()
    except KvmError as err:
        return HypervHost((), caps, problem=f"KVM_GET_SUPPORTED_HV_CPUID failed: {err}")
    return HypervHost(tuple(supported), caps, tuple(hv.offered_features(supported, caps)))


def choose(host: HypervHost, wanted: frozenset[str] | None) -> frozenset[str]:
    """The features a `--hyperv` guest gets: every one the host offers (`wanted` None), or
    exactly `wanted`; UserError when the host has no Hyper-V emulation or lacks one."""
    if host.problem:
        raise UserError(f"--hyperv: this host's KVM cannot offer Hyper-V ({host.problem})")
    if wanted is None:
        return frozenset(host.offered)
    for name in hv.FEATURES:  # table order: the same message each time
        if name in wanted and name not in host.offered:
            cap = hv.FEATURES[name].cap
            why = f"KVM_CAP_{cap} is 0" if cap and not host.caps.get(cap) else (
                "KVM_GET_SUPPORTED_HV_CPUID lacks its CPUID bits")
            raise UserError(f"--hyperv={name}: this host's KVM does not offer it ({why})")
    return wanted


def vcpu_caps(host: HypervHost, features: frozenset[str]) -> tuple[int, ...]:
    """The vCPU capabilities to enable, in order (see the module docstring)."""
    caps: list[int] = []
    if host.caps.get("HYPERV_ENFORCE_CPUID"):
        caps.append(int(Cap.HYPERV_ENFORCE_CPUID))
    if "synic" in features:
        caps.append(int(Cap.HYPERV_SYNIC2))
    return tuple(caps)

