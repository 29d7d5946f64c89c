"""Per-VM state as plain data: PIT, KVM clock, PIC master/slave, IOAPIC.

Restore order PIT -> clock -> irqchip (Firecracker's): the clock is set before any vCPU runs
(vCPUs started before KVM_SET_CLOCK have hung guests for minutes elsewhere), and the
interrupt controllers last so no interrupt is delivered into a half-restored machine.

A snapshot restores the clock without KVM_CLOCK_REALTIME: the guest's kvmclock continues
from the value it had when paused (it does not jump by the time the VM spent on disk), like a
VM that was paused and resumed. A migration (`advance=True`) makes it advance by the time
that passed since the capture, as the KVM API doc (4.133, KVM_VCPU_TSC_CTRL) describes for
live migration: the source records the host's CLOCK_REALTIME with the clock (KVM gives it
with KVM_CLOCK_REALTIME when the host has a stable master clock; otherwise kvmkit reads it
next to KVM_GET_CLOCK), and the destination either hands both to KVM_SET_CLOCK with
KVM_CLOCK_REALTIME (KVM adds `now - realtime` if positive) or adds the same difference
itself. The clock never goes back: a negative difference (the destination's wall clock
behind the source's) adds nothing. This assumes the two hosts' wall clocks agree (NTP).
"""

from __future__ import annotations

import ctypes
import time
from dataclasses import dataclass
from typing import Any

from kvmkit.abi import structs
from kvmkit.abi.constants import Cap, ClockFlag, IrqchipId
from kvmkit.kvm import KvmError, Vm
from kvmkit.snapshot.format import Fields, SnapshotError, b64

PIT_SIZE = ctypes.sizeof(structs.kvm_pit_state2)
IRQCHIP_SIZE = ctypes.sizeof(structs.kvm_irqchip)
CHIPS = (IrqchipId.PIC_MASTER, IrqchipId.PIC_SLAVE, IrqchipId.IOAPIC)


@dataclass
class VmState:
    clock: int
    pit2: bytes | None  # None when the VM has no in-kernel PIT
    irqchips: list[bytes] | None  # PIC master, PIC slave, IOAPIC; None without an irqchip
    # Taken with the clock (optional: states from before them restore as before):
    # KVM_GET_CLOCK's flags, the host's CLOCK_REALTIME in ns (KVM's when the flags have
    # KVM_CLOCK_REALTIME, else read beside the ioctl) and the host TSC (KVM_CLOCK_HOST_TSC).
    clock_flags: int = 0
    realtime: int | None = None
    host_tsc: int | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "clock": self.clock,
            "pit2": None if self.pit2 is None else b64(self.pit2),
            "irqchips": None if self.irqchips is None else [b64(c) for c in self.irqchips],
        }
        if self.realtime is not None:
            out.update(clock_flags=self.clock_flags, realtime=self.realtime)
        if self.host_tsc is not None:
            out["host_tsc"] = self.host_tsc
        return out

    @classmethod
    def from_dict(cls, obj: Any, path: str = "vm") -> VmState:
        f = Fields(obj, path)
        pit2 = None if f.obj.get("pit2") is None else f.get_blob("pit2", PIT_SIZE)
        chips: list[bytes] | None = None
        if f.obj.get("irqchips") is not None:
            raw = f.get_list("irqchips", len(CHIPS))
            if len(raw) != len(CHIPS):
                raise SnapshotError(f"snapshot state: {path}.irqchips must have 3 entries")
            chips = [Fields({"c": c}, f"{path}.irqchips").get_blob("c", IRQCHIP_SIZE) for c in raw]
            for want, data in zip(CHIPS, chips, strict=True):
                if int.from_bytes(data[:4], "little") != want:
                    raise SnapshotError(f"snapshot state: {path}.irqchips out of order")
        realtime = f.get_int("realtime") if f.has("realtime") else None
        return cls(
            clock=f.get_int("clock"), pit2=pit2, irqchips=chips,
            clock_flags=f.get_int("clock_flags", 0, 2**32 - 1) if f.has("clock_flags") else 0,
            realtime=realtime, host_tsc=f.get_int("host_tsc") if f.has("host_tsc") else None,
        )  # fmt: skip


def save_vm(vm: Vm, *, irqchip: bool = True, pit: bool = True) -> VmState:
    pit2 = None
    if pit:
        try:
            pit2 = bytes(vm.get_pit2())
        except KvmError:
            pit2 = None  # no in-kernel PIT in this VM
    chips = [bytes(vm.get_irqchip(c)) for c in CHIPS] if irqchip else None
    clock = vm.get_clock()
    wall = time.time_ns()
    flags = int(clock.flags)
    return VmState(
        clock=int(clock.clock), pit2=pit2, irqchips=chips, clock_flags=flags,
        realtime=int(clock.realtime) if flags & ClockFlag.REALTIME else wall,
        host_tsc=int(clock.host_tsc) if flags & ClockFlag.HOST_TSC else None,
    )  # fmt: skip


def restore_vm(vm: Vm, state: VmState, *, advance: bool = False) -> None:
    """PIT -> clock -> irqchip, into a VM that has its irqchip/PIT created as when saved.
    `advance`: the clock moves on by the time since the state was taken (module docstring)."""
    if state.pit2 is not None:
        vm.set_pit2(structs.kvm_pit_state2.from_bytes(state.pit2))
    vm.set_clock(_clock_data(vm, state, advance))
    if state.irqchips is not None:
        for data in state.irqchips:
            vm.set_irqchip(structs.kvm_irqchip.from_bytes(data))


def _clock_data(vm: Vm, state: VmState, advance: bool) -> structs.kvm_clock_data:
    clock = structs.kvm_clock_data()
    clock.clock, clock.flags = state.clock, 0
    if not advance or state.realtime is None:
        return clock
    kvm_adds = (state.clock_flags & ClockFlag.REALTIME
                and vm.check_extension(Cap.ADJUST_CLOCK) & ClockFlag.REALTIME)  # fmt: skip
    if kvm_adds:
        clock.realtime, clock.flags = state.realtime, ClockFlag.REALTIME
    else:
        clock.clock = state.clock + max(0, time.time_ns() - state.realtime)
    return clock
