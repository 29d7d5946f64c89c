"""Creating a machine's vCPUs from its topology: the host's limits, x2APIC IDs, affinity.

KVM names a vCPU by its initial APIC ID (KVM_CREATE_VCPU's id becomes the in-kernel LAPIC's
ID, KVM API doc), so a topology with gaps in its APIC IDs has sparse vCPU ids, and the ids are
bounded by KVM_CAP_MAX_VCPU_ID while the count is bounded by KVM_CAP_MAX_VCPUS.

APIC IDs above 254 do not fit the 8-bit xAPIC ID: for them the VMM enables KVM_CAP_X2APIC_API
with KVM_X2APIC_API_USE_32BIT_IDS (the LAPIC state and MSI routes carry 32-bit destination
IDs; without it KVM_GET_LAPIC of an x2APIC-mode vCPU keeps `id << 24`, losing the high bits)
and KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK (destination 0xFF is then an ordinary x2APIC ID,
not a broadcast), as QEMU does. The capability is enabled on the VM before any vCPU exists.
Machines whose APIC IDs all fit 8 bits leave it off, so their LAPIC state keeps the classic
format (snapshots record which one: snapshot.core.VmSetup.x2apic_api).
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

from kvmkit.abi.constants import Cap
from kvmkit.arch.x86_64.topology import HostCpuLimits, Topology
from kvmkit.errors import UserError
from kvmkit.kvm import Kvm, KvmError, Vcpu, Vm

# include/uapi/linux/kvm.h
KVM_X2APIC_API_USE_32BIT_IDS = 1 << 0
KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK = 1 << 1
X2APIC_API_FLAGS = KVM_X2APIC_API_USE_32BIT_IDS | KVM_X2APIC_API_DISABLE_BROADCAST_QUIRK
_DEFAULT_MAX_VCPUS = 4  # KVM API doc, KVM_CAP_NR_VCPUS: "assume 4 if it is absent"


def host_limits(kvm: Kvm) -> HostCpuLimits:
    """KVM_CAP_MAX_VCPUS (or the recommended KVM_CAP_NR_VCPUS on kernels without it, or 4)
    and KVM_CAP_MAX_VCPU_ID (KVM API doc, KVM_CREATE_VCPU: where it is absent, assume the
    KVM_CAP_MAX_VCPUS value)."""
    max_vcpus = (
        kvm.check_extension(Cap.MAX_VCPUS)
        or kvm.check_extension(Cap.NR_VCPUS)
        or _DEFAULT_MAX_VCPUS
    )
    return HostCpuLimits(max_vcpus, kvm.check_extension(Cap.MAX_VCPU_ID) or max_vcpus)


def enable_x2apic_api(vm: Vm) -> None:
    """KVM_CAP_X2APIC_API with 32-bit IDs and no broadcast quirk; UserError where the host's
    KVM lacks it (APIC IDs above 254 cannot work there)."""
    offered = vm.check_extension(Cap.X2APIC_API)
    if offered & X2APIC_API_FLAGS != X2APIC_API_FLAGS:
        raise UserError(
            "this topology has APIC IDs above 254, which need KVM_CAP_X2APIC_API; this host's "
            f"KVM offers flags {offered:#x}"
        )
    vm.enable_cap(Cap.X2APIC_API, X2APIC_API_FLAGS)


def prepare_vm(vm: Vm, topology: Topology) -> int:
    """What the VM needs before its vCPUs are created; returns the KVM_CAP_X2APIC_API flags
    it enabled (0 unless some APIC ID is above 254)."""
    if topology.needs_x2apic:
        enable_x2apic_api(vm)
        return X2APIC_API_FLAGS
    return 0


def create_vcpu(vm: Vm, topology: Topology, index: int) -> Vcpu:
    """KVM_CREATE_VCPU for vCPU `index`, with its APIC ID as the id; a refusal becomes one
    line naming the id and the host's limits."""
    apic_id = topology.apic_id(index)
    try:
        return vm.create_vcpu(apic_id)
    except KvmError as err:
        limits = host_limits(vm.kvm)
        why = {
            errno.EINVAL: f"ids must be below {limits.max_vcpu_id} (KVM_CAP_MAX_VCPU_ID) and at "
            f"most {limits.max_vcpus} vCPUs per VM (KVM_CAP_MAX_VCPUS)",
            errno.EEXIST: "a vCPU with this id exists",
            errno.ENOMEM: "the host is out of memory (or a memory policy forbids the "
            "allocation)",
        }.get(err.errno or 0, str(err))
        raise UserError(f"cannot create vCPU {index} (APIC ID {apic_id}): {why}") from None


@contextlib.contextmanager
def affinity(cpus: frozenset[int] | None) -> Iterator[None]:
    """Run the body with this thread's CPU affinity set to `cpus` (no change for None): a
    thread started inside inherits it from its first instruction (sched_setaffinity(2))."""
    if cpus is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as err:
        raise UserError(f"--cpu-affinity {sorted(cpus)}: {err.strerror}") from None
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)
