"""Per-VM state as plain data: PIT, KVM clock, PIC master/slave, IOAPIC.

Restore order PIT -> clock -> irqchip (Firecracker's): the clock is set before any vCPU runs
(vCPUs started before KVM_SET_CLOCK have hung guests for minutes elsewhere), and the
interrupt controllers last so no interrupt is delivered into a half-restored machine.

The clock is restored without KVM_CLOCK_REALTIME: the guest's kvmclock continues from the
value it had when paused (it does not jump by the time the VM spent on disk), like a VM that
was paused and resumed. KVM_CLOCK_TSC_STABLE and HOST_TSC are information from GET only.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

from kvmkit.abi import structs
from kvmkit.abi.constants import IrqchipId
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

    def to_dict(self) -> dict[str, Any]:
        return {
            "clock": self.clock,
            "pit2": None if self.pit2 is None else b64(self.pit2),
            "irqchips": None if self.irqchips is None else [b64(c) for c in self.irqchips],
        }

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
        return cls(clock=f.get_int("clock"), pit2=pit2, irqchips=chips)


def save_vm(vm: Vm, *, irqchip: bool = True, pit: bool = True) -> VmState:
    pit2 = None
    if pit:
        try:
            pit2 = bytes(vm.get_pit2())
        except KvmError:
            pit2 = None  # no in-kernel PIT in this VM
    chips = [bytes(vm.get_irqchip(c)) for c in CHIPS] if irqchip else None
    return VmState(clock=int(vm.get_clock().clock), pit2=pit2, irqchips=chips)


def restore_vm(vm: Vm, state: VmState) -> None:
    """PIT -> clock -> irqchip, into a VM that has its irqchip/PIT created as when saved."""
    if state.pit2 is not None:
        vm.set_pit2(structs.kvm_pit_state2.from_bytes(state.pit2))
    clock = structs.kvm_clock_data()
    clock.clock = state.clock
    clock.flags = 0
    vm.set_clock(clock)
    if state.irqchips is not None:
        for data in state.irqchips:
            vm.set_irqchip(structs.kvm_irqchip.from_bytes(data))
