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

from kvmkit.abi.constants import KVM_STATE_NESTED_GUEST_MODE, Cap, ClockFlag
from kvmkit.arch.x86_64.hyperv import HV_MSR_RANGE
from kvmkit.arch.x86_64.topology import MAX_VCPUS
from kvmkit.kvm import IntrExit, Kvm, KvmError, Vcpu, Vm
from kvmkit.memory import GuestMemory
from kvmkit.snapshot.format import Fields, SnapshotError, read_state, write_state
from kvmkit.snapshot.memory import MemoryState, restore_memory, write_memory
from kvmkit.snapshot.vcpu_state import (
    VCPU_CAPS,
    VcpuState,
    check_nested_host,
    interrupts_unchanged,
    nested_flags,
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


# Rounds of "deliver pending timers, read, check nothing came since" before the state is
# taken as it is (only a timer firing every few microseconds could keep it changing).
SETTLE_ROUNDS = 4
OnVcpu = Callable[[Vcpu, Callable[[], Any]], Any]


def _here(vcpu: Vcpu, fn: Callable[[], Any]) -> Any:
    return fn()


def deliver_pending_timers(vcpu: Vcpu, on_vcpu: OnVcpu = _here) -> None:
    """Move LAPIC timer interrupts KVM holds as pending into the vCPU's IRR, where
    KVM_GET_LAPIC sees them (`Vcpu.inject_pending_timers`), on the vCPU's thread."""
    exit_ = on_vcpu(vcpu, vcpu.inject_pending_timers)
    if not isinstance(exit_, IntrExit):
        raise SnapshotError(
            f"vcpu{vcpu.id}: KVM reported {exit_.describe()} for the paused vCPU; "
            "its state was not taken"
        )


def runs_nested_guest(vcpu: Vcpu) -> bool:
    """The vCPU was running its own guest when it was paused (KVM's nested state in guest
    mode, KVM_STATE_NESTED_GUEST_MODE)."""
    return bool(nested_flags(vcpu.get_nested_state()) & KVM_STATE_NESTED_GUEST_MODE)


def capture_kvm_state(
    kvm: Kvm, vm: Vm, vcpus: list[Vcpu], setup: VmSetup, *, on_vcpu: OnVcpu = _here,
    msr_indices: list[int] | None = None,
) -> KvmState:  # fmt: skip
    """The KVM state of a VM whose vCPUs are all held outside KVM_RUN (paused).

    A LAPIC timer that expired while its vCPU was paused is only a count inside KVM
    (`Vcpu.inject_pending_timers`): KVM_GET_LAPIC does not show it and a restore would lose
    the interrupt. So each vCPU first lets KVM deliver such timers into its IRR; after the
    state is read, once more, and a vCPU that got an interrupt in between (a timer that
    expired during the read) is read again. `on_vcpu(vcpu, fn)` runs `fn` on the vCPU's own
    thread (a VcpuControl's `call_held`); the default runs it here, which works but makes KVM
    switch the vCPU's task (a synchronize_rcu) twice. `msr_indices`: `saveable_msrs` found
    before (it does not change for a VM; finding it costs an ioctl per refused MSR).

    Not for a vCPU of a nested machine that is running its own guest (`runs_nested_guest`,
    read once: only a KVM_RUN moves a vCPU in or out of guest mode, and those vCPUs get
    none): the delivery KVM_RUN puts the timer interrupt in IRR, and the next KVM_RUN (the
    second delivery) injects it, which the guest hypervisor intercepts, so KVM leaves the
    nested guest (a synthesized #VMEXIT) and the snapshot would never hold a running nested
    guest (seen in the lane: 0 of 20 pauses). What that costs depends on the LVT timer's
    mode (docs/snapshot.md): in TSC-deadline mode nothing, the expired deadline is saved in
    IA32_TSC_DEADLINE (KVM zeroes it only when it delivers) and fires at restore."""
    msrs = saveable_msrs(kvm, vcpus[0], setup.extra_msrs) if msr_indices is None else msr_indices
    deliver = [False] * len(vcpus)
    if setup.irqchip:
        deliver = [not (setup.nested and runs_nested_guest(v)) for v in vcpus]
        for v, due in zip(vcpus, deliver, strict=True):
            if due:
                deliver_pending_timers(v, on_vcpu)
    vcpu_states = [save_vcpu(v, msrs, irqchip=setup.irqchip, nested=setup.nested)
                   for v in vcpus]  # fmt: skip
    for _ in range(SETTLE_ROUNDS if setup.irqchip else 0):
        changed = []
        for i, v in enumerate(vcpus):
            if deliver[i]:
                deliver_pending_timers(v, on_vcpu)
            if not interrupts_unchanged(v, vcpu_states[i]):
                changed.append(i)
        if not changed:
            break
        for i in changed:
            vcpu_states[i] = save_vcpu(vcpus[i], msrs, irqchip=setup.irqchip,
                                       nested=setup.nested)  # fmt: skip
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
    meta: dict[str, Any] | None = None, on_vcpu: OnVcpu = _here,
) -> Snapshot:  # fmt: skip
    """Snapshot a VM whose vCPUs are all paused (outside KVM_RUN): writes the memory file and
    returns the state (write it with `save`). `on_vcpu`: see `capture_kvm_state`."""
    state = capture_kvm_state(kvm, vm, vcpus, setup, on_vcpu=on_vcpu)
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


def prepare_vm(kvm: Kvm, setup: VmSetup, mem: GuestMemory) -> Vm:
    """The first part of `build_vm`, which needs no state: the VM, KVM_CAP_X2APIC_API, TSS
    and identity map, irqchip and PIT, memory slots. A migration's destination does this
    while the pages arrive (registering guest RAM is the slowest step of a rebuild) and
    hands the VM to `build_vm(prepared=...)` once the state is in."""
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
    except BaseException:
        vm.close()
        raise
    return vm


def build_vm(kvm: Kvm, state: KvmState, mem: GuestMemory, *, advance_clock: bool = False,
             prepared: Vm | None = None) -> Restored:  # fmt: skip
    """A new VM from a checked KVM state and guest memory from any source (a snapshot's
    memory file, pages received over a migration stream), in the order KVM needs: VM,
    KVM_CAP_X2APIC_API, TSS and identity map, irqchip and PIT, memory slots (`prepare_vm`,
    or `prepared`: a VM
    `prepare_vm` made for this state's setup and `mem`), vCPUs (each restored,
    vcpu_state.py), then the VM state (PIT -> clock -> irqchip). `mem` stays the caller's
    on failure; the VM is closed.

    `advance_clock` (live migration): the guest's clocks move on by the time since the state
    was taken instead of continuing from it: kvmclock (vm_state.py), and the TSC of every
    vCPU where both hosts gave the host TSC with the clock (`advance_tsc`)."""
    try:
        check_nested_host(kvm, state.vcpus)  # before any vCPU: one line where KVM cannot
    except BaseException:
        if prepared is not None:
            prepared.close()
        raise
    vm = prepared if prepared is not None else prepare_vm(kvm, state.setup, mem)
    try:
        if vm.check_extension(Cap.MAX_VCPU_ID) and any(
            v.id >= max(vm.check_extension(Cap.MAX_VCPU_ID), 1) for v in state.vcpus
        ):
            raise SnapshotError("snapshot state: vCPU id beyond this host's KVM_CAP_MAX_VCPU_ID")
        vcpus = []
        for vcpu_state in state.vcpus:
            vcpu = vm.create_vcpu(vcpu_state.id)
            restore_vcpu(vcpu, vcpu_state, state.setup.vcpu_caps)
            vcpus.append(vcpu)
        restore_vm(vm, state.vm, advance=advance_clock)
        if advance_clock:
            advance_tsc(vm, vcpus, state)
    except BaseException:
        vm.close()
        raise
    return Restored(vm, mem, vcpus, state)


def advance_tsc(vm: Vm, vcpus: list[Vcpu], state: KvmState) -> bool:
    """Move each vCPU's TSC on by the time since the source took `state`, after the clock
    was set (KVM API doc 4.133, KVM_VCPU_TSC_CTRL, steps 4-7 of its migration recipe):

        offset_dest = offset_src + (clock_dest - clock_src) * tsc_khz / 1e6
                      + (host_tsc_src - host_tsc_dest)

    where clock_* are kvmclock nanoseconds and host_tsc_* the host TSC read with them
    (KVM_CLOCK_HOST_TSC). Needs the TSC-offset attribute on both hosts and a stable master
    clock on both (KVM gives HOST_TSC only then). Where any of that is missing the vCPUs
    keep the TSC restored through IA32_TSC: it continues from its value at the pause, as
    after a snapshot, while kvmclock (which Linux guests keep time with) still advances.
    Returns whether the TSCs were moved."""
    if state.vm.host_tsc is None:
        return False
    saved = list(zip(vcpus, state.vcpus, strict=True))
    if any(s.tsc_offset is None or not s.tsc_khz for _, s in saved):
        return False
    if not all(v.has_tsc_offset() for v in vcpus):
        return False
    now = vm.get_clock()
    if not now.flags & ClockFlag.HOST_TSC:
        return False
    elapsed_ns = max(0, int(now.clock) - state.vm.clock)
    for vcpu, s in saved:
        assert s.tsc_offset is not None and s.tsc_khz is not None
        ticks = elapsed_ns * s.tsc_khz // 1_000_000
        try:
            vcpu.set_tsc_offset(s.tsc_offset + ticks + state.vm.host_tsc - int(now.host_tsc))
        except KvmError:
            return False
    return True


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
