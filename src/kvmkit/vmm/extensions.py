"""The virtualization extensions a machine gives its guest beyond the CPU itself: nested
virtualization (docs/nested.md) and Hyper-V enlightenments (docs/hyperv.md), resolved against
what this host's KVM offers. `resolve` refuses (UserError, one line) a configuration the host
cannot serve; `kvmkit run` calls it before anything is built, `Machine.build` to build."""

from __future__ import annotations

from dataclasses import dataclass

from kvmkit.arch.x86_64 import hyperv as hv
from kvmkit.errors import UserError
from kvmkit.kvm import Kvm
from kvmkit.kvm.cpuid import CpuidEntry
from kvmkit.vmm.config import MachineConfig
from kvmkit.vmm.hyperv import choose, host_hyperv, vcpu_caps
from kvmkit.vmm.nested import nesting_problem


@dataclass(frozen=True)
class GuestExtensions:
    nested: bool = False
    hyperv: hv.HvCpuid | None = None  # the CPUID pass's input
    vcpu_caps: tuple[int, ...] = ()  # KVM_ENABLE_CAP on every vCPU (kvmkit.vmm.hyperv)
    extra_msrs: tuple[int, ...] = ()  # saved beyond KVM_GET_MSR_INDEX_LIST

    @property
    def hyperv_features(self) -> frozenset[str]:
        return self.hyperv.features if self.hyperv is not None else frozenset()


def resolve(
    config: MachineConfig, kvm: Kvm, supported: list[CpuidEntry] | None = None
) -> GuestExtensions:
    if config.nested:
        problem = nesting_problem(kvm, supported)
        if problem is not None:
            raise UserError(f"--nested: this host cannot give guests nested virtualization: "
                            f"{problem}")  # fmt: skip
    if config.hyperv is False:
        return GuestExtensions(nested=config.nested)
    host = host_hyperv(kvm)
    features = choose(host, config.hyperv_wanted)
    if not features:
        raise UserError("--hyperv: this host's KVM offers none of kvmkit's Hyper-V features")
    return GuestExtensions(
        nested=config.nested,
        hyperv=hv.HvCpuid(host.supported, features, config.hyperv_kvm_leaves),
        vcpu_caps=vcpu_caps(host, features),
        extra_msrs=hv.extra_msrs(features),
    )
