"""Whole-VM snapshots: capture a paused VM into a state file and a memory file, and load
them into a new VM (in this process or another).

The state file (format.py) holds, as plain data:
    setup     how the VM was built (irqchip, PIT and its flags, TSS/identity-map addresses,
              the KVM_CAP_X2APIC_API flags: they decide the LAPIC state's ID format; whether
              the vCPUs carry nested state; the Hyper-V vCPU capabilities and the synthetic
              MSRs saved beyond KVM's list)
    vm        PIT, clock, PIC master/slave, IOAPIC (vm_state.py)
    vcpus     one entry per vCPU (vcpu_state.py)
    memory    the memory file's layout (memory.py)
    devices   each device's save() data, restored by the VMM that owns the device
    meta      free-form plain data of the VMM (machine configuration, console nonce, ...)

The KVM part (setup, vm, vcpus) is a `KvmState`, captured apart from guest memory
(`capture_kvm_state`) and rebuilt onto memory from any source (`build_vm`): snapshot files
and migration streams are two transports of it. `read` validates the whole state and `load`
the memory file's size before anything is created, so a bad snapshot raises
`SnapshotError` with nothing restored; then it builds the VM in the order KVM needs: VM,
KVM_CAP_X2APIC_API, TSS, irqchip and PIT, memory, vCPUs (each restored, vcpu_state.py), then
the VM state (PIT -> clock -> irqchip). The caller runs the vCPUs after `resume()`, which issues
KVM_KVMCLOCK_CTRL on each.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kvmkit.abi.constants import Cap
from kvmkit.arch.x86_64.hyperv import HV_MSR_RANGE
from kvmkit.arch.x86_64.topology import MAX_VCPUS
from kvmkit.kvm import Kvm, Vcpu, Vm
from kvmkit.memory import GuestMemory
from kvmkit.snapshot.format import Fields, SnapshotError, read_state, write_state
from kvmkit.snapshot.memory import MemoryState, restore_memory, write_memory
from kvmkit.snapshot.vcpu_state import (
    VCPU_CAPS,
    VcpuState,
    check_nested_host,
    restore_vcpu,
    resume_vcpu,
    save_vcpu,
    saveable_msrs,
)
from kvmkit.snapshot.vm_state import VmState, restore_vm, save_vm

KIND = "kvmkit-vm"
DEFAULT_TSS_ADDR = 0xFFFB_D000


@dataclass
class VmSetup:
    irqchip: bool = True
    pit: bool = False
    pit_flags: int = 0
    tss_addr: int = DEFAULT_TSS_ADDR
    identity_map_addr: int | None = None
    # KVM_CAP_X2APIC_API flags enabled before the vCPUs were created (0: not enabled)
    x2apic_api: int = 0
    # The guest sees VMX/SVM: every vCPU's nested state is saved (docs/nested.md)
    nested: bool = False
    # KVM_ENABLE_CAP on every vCPU before its state (Hyper-V: vcpu_state.VCPU_CAPS) and the
    # synthetic MSRs saved beyond KVM_GET_MSR_INDEX_LIST (docs/hyperv.md)
    vcpu_caps: tuple[int, ...] = ()
    extra_msrs: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"irqchip": self.irqchip, "pit": self.pit, "pit_flags": self.pit_flags,
                "tss_addr": self.tss_addr, "identity_map_addr": self.identity_map_addr,
                "x2apic_api": self.x2apic_api, "nested": self.nested,
                "vcpu_caps": list(self.vcpu_caps),
                "extra_msrs": list(self.extra_msrs)}  # fmt: skip

    @classmethod
    def from_dict(cls, obj: Any) -> VmSetup:
        f = Fields(obj, "setup")
        ident = None if f.obj.get("identity_map_addr") is None else f.get_int(
            "identity_map_addr", 0, 2**32 - 1)  # fmt: skip
        return cls(
            irqchip=f.get_bool("irqchip"),
            pit=f.get_bool("pit"),
            pit_flags=f.get_int("pit_flags", 0, 2**32 - 1),
            tss_addr=f.get_int("tss_addr", 0, 2**32 - 1),
            identity_map_addr=ident,
            # absent in snapshots from before topologies: not enabled
            x2apic_api=f.get_int("x2apic_api", 0, 3) if f.has("x2apic_api") else 0,
            # absent in snapshots from before nested and Hyper-V support: neither
            nested=f.get_bool("nested") if f.has("nested") else False,
            vcpu_caps=_vcpu_caps(f) if f.has("vcpu_caps") else (),
            extra_msrs=_extra_msrs(f) if f.has("extra_msrs") else (),
        )


def _vcpu_caps(f: Fields) -> tuple[int, ...]:
    caps = tuple(f.get_ints("vcpu_caps", len(VCPU_CAPS), width=32))
    if not set(caps) <= set(VCPU_CAPS) or len(set(caps)) != len(caps):
        raise SnapshotError(f"snapshot state: {f.path}.vcpu_caps: only "
                            f"{', '.join(map(str, VCPU_CAPS))}, each once")  # fmt: skip
    return caps


def _extra_msrs(f: Fields) -> tuple[int, ...]:
    msrs = tuple(f.get_ints("extra_msrs", 64, width=32))
    if not all(m in HV_MSR_RANGE for m in msrs):
        raise SnapshotError(f"snapshot state: {f.path}.extra_msrs: only Hyper-V synthetic MSRs "
                            f"({HV_MSR_RANGE.start:#x}-{HV_MSR_RANGE.stop - 1:#x})")  # fmt: skip
    return msrs


@dataclass
class KvmState:
    """What KVM holds of a VM, apart from its memory: how the VM was built, its VM-wide state
    and every vCPU. One part of every state transfer (snapshot files, `kvmkit.vmm.persist`)."""

    setup: VmSetup
    vm: VmState
    vcpus: list[VcpuState]

    def to_dict(self) -> dict[str, Any]:
        return {
            "setup": self.setup.to_dict(),
            "vm": self.vm.to_dict(),
            "vcpus": [v.to_dict() for v in self.vcpus],
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> KvmState:
        """Check the `setup`, `vm` and `vcpus` keys of a payload (SnapshotError)."""
        f = Fields(state, "state")
        raw_vcpus = f.get_list("vcpus", MAX_VCPUS)
        if not raw_vcpus:
            raise SnapshotError("snapshot state: no vCPUs")
        vcpus = [VcpuState.from_dict(v, f"vcpus[{i}]") for i, v in enumerate(raw_vcpus)]
        if len({v.id for v in vcpus}) != len(vcpus):
            raise SnapshotError("snapshot state: duplicate vCPU ids")
        setup = VmSetup.from_dict(f.obj.get("setup"))
        vm = VmState.from_dict(f.obj.get("vm"))
        if (vm.irqchips is None) == setup.irqchip or (vm.pit2 is not None) != setup.pit:
            raise SnapshotError("snapshot state: VM state does not match its setup")
        if setup.irqchip and any(v.lapic is None for v in vcpus):
            raise SnapshotError("snapshot state: vCPU without LAPIC state in an irqchip VM")
        if any((v.nested is not None) != setup.nested for v in vcpus):
            raise SnapshotError("snapshot state: nested state must be on every vCPU of a "
                                "nested VM and on no other")  # fmt: skip
        return cls(setup, vm, vcpus)


def capture_kvm_state(kvm: Kvm, vm: Vm, vcpus: list[Vcpu], setup: VmSetup) -> KvmState:
    """The KVM state of a VM whose vCPUs are all held outside KVM_RUN (paused)."""
    msrs = saveable_msrs(kvm, vcpus[0], setup.extra_msrs)
    vcpu_states = [save_vcpu(v, msrs, irqchip=setup.irqchip, nested=setup.nested)
                   for v in vcpus]  # fmt: skip
    return KvmState(setup, save_vm(vm, irqchip=setup.irqchip, pit=setup.pit), vcpu_states)


@dataclass
class Snapshot:
    """A snapshot file's payload: the KVM state, the memory file's layout, and the VMM's
    own plain data (devices, meta)."""

    setup: VmSetup
    vm: VmState
    vcpus: list[VcpuState]
    memory: MemoryState
    devices: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def kvm(self) -> KvmState:
        return KvmState(self.setup, self.vm, self.vcpus)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": KIND,
            **self.kvm.to_dict(),
            "memory": self.memory.to_dict(),
            "devices": self.devices,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> Snapshot:
        f = Fields(state, "state")
        if f.get_str("kind", 64) != KIND:
            raise SnapshotError(f"snapshot state: not a {KIND} snapshot")
        kvm = KvmState.from_dict(state)
        memory = MemoryState.from_dict(f.obj.get("memory"))
        devices = f.get_obj("devices").obj
        meta = f.get_obj("meta").obj
        return cls(kvm.setup, kvm.vm, kvm.vcpus, memory, devices, meta)


def capture(
    kvm: Kvm, vm: Vm, vcpus: list[Vcpu], mem: GuestMemory, mem_path: str | os.PathLike[str],
    setup: VmSetup, *, diff: bool = False, devices: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
) -> Snapshot:  # fmt: skip
    """Snapshot a VM whose vCPUs are all paused (outside KVM_RUN): writes the memory file and
    returns the state (write it with `save`)."""
    state = capture_kvm_state(kvm, vm, vcpus, setup)
    memory = write_memory(mem, mem_path, vm=vm, diff=diff)
    return Snapshot(state.setup, state.vm, state.vcpus, memory, dict(devices or {}),
                    dict(meta or {}))  # fmt: skip


def save(state_path: str | os.PathLike[str], snapshot: Snapshot) -> None:
    write_state(state_path, snapshot.to_dict())


def read(state_path: str | os.PathLike[str]) -> Snapshot:
    """Read and validate a state file completely; only SnapshotError escapes."""
    return Snapshot.from_dict(read_state(state_path))


@dataclass
class Restored:
    vm: Vm
    mem: GuestMemory
    vcpus: list[Vcpu]
    state: KvmState

    def resume(self) -> None:
        """KVM_KVMCLOCK_CTRL on every vCPU: call right before running them."""
        for vcpu in self.vcpus:
            resume_vcpu(vcpu)

    def close(self) -> None:
        self.vm.close()
        self.mem.close()


def build_vm(kvm: Kvm, state: KvmState, mem: GuestMemory) -> Restored:
    """A new VM from a checked KVM state and guest memory from any source (a snapshot's
    memory file, pages received over a migration stream), in the order KVM needs: VM,
    KVM_CAP_X2APIC_API, TSS and identity map, irqchip and PIT, memory slots, vCPUs (each
    restored, vcpu_state.py), then the VM state (PIT -> clock -> irqchip). `mem` stays the
    caller's on failure."""
    setup = state.setup
    check_nested_host(kvm, state.vcpus)
    vm = kvm.create_vm()
    try:
        if setup.x2apic_api:
            # Before any vCPU: the saved LAPIC pages hold IDs in the format it selects.
            vm.enable_cap(Cap.X2APIC_API, setup.x2apic_api)
        vm.set_tss_addr(setup.tss_addr)
        if setup.identity_map_addr is not None:
            vm.set_identity_map_addr(setup.identity_map_addr)
        if setup.irqchip:
            vm.create_irqchip()
        if setup.pit:
            vm.create_pit2(setup.pit_flags)
        mem.register(vm)
        if vm.check_extension(Cap.MAX_VCPU_ID) and any(
            v.id >= max(vm.check_extension(Cap.MAX_VCPU_ID), 1) for v in state.vcpus
        ):
            raise SnapshotError("snapshot state: vCPU id beyond this host's KVM_CAP_MAX_VCPU_ID")
        vcpus = []
        for vcpu_state in state.vcpus:
            vcpu = vm.create_vcpu(vcpu_state.id)
            restore_vcpu(vcpu, vcpu_state, setup.vcpu_caps)
            vcpus.append(vcpu)
        restore_vm(vm, state.vm)
    except BaseException:
        vm.close()
        raise
    return Restored(vm, mem, vcpus, state)


def load(
    kvm: Kvm, snapshot: Snapshot, mem_path: str | os.PathLike[str], *,
    base_mem: str | os.PathLike[str] | None = None, huge_page_size: int = 0,
    prepare_memory: Callable[[GuestMemory], None] | None = None,
) -> Restored:  # fmt: skip
    """Build a new VM from a validated snapshot and its memory file (see `build_vm`);
    `huge_page_size` and `prepare_memory`: see `restore_memory`."""
    memory = snapshot.memory
    memory.check_file(base_mem if memory.diff and base_mem is not None else mem_path)
    if memory.diff and base_mem is None:
        raise SnapshotError("a diff snapshot restores on top of its base memory file")
    mem = restore_memory(memory, mem_path, base=base_mem, huge_page_size=huge_page_size,
                         prepare=prepare_memory)  # fmt: skip
    try:
        return build_vm(kvm, snapshot.kvm, mem)
    except BaseException:
        mem.close()
        raise
