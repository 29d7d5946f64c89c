"""Migration of a bare KVM VM (no `Machine`: a tiny guest, a VM scripted by hand): its
memory, the KVM state of its VM and vCPUs, nothing else.

    # source: the vCPUs run in VcpuRunners
    result = send_bare(BareVm(kvm, vm, mem, runners, VmSetup(irqchip=True)), "unix:/tmp/m")
    # destination
    restored = receive_bare(listener, kvm)       # a kvmkit.snapshot.core.Restored
    restored.resume(); VcpuRunner(restored.vcpus[0], on_exit).start()
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvmkit.kvm import Kvm, Vm
from kvmkit.memory import PAGE_SIZE, GuestMemory, memfd_region
from kvmkit.migration.receive import receive_vm
from kvmkit.migration.send import MigrationProgress, MigrationResult, send_vm
from kvmkit.migration.stream import MigrationError, parse_address
from kvmkit.snapshot.core import KvmState, Restored, VmSetup, build_vm, capture_kvm_state
from kvmkit.snapshot.format import Fields, SnapshotError
from kvmkit.snapshot.memory import MAX_MEMORY, MAX_REGIONS
from kvmkit.vmm.vcpu import VcpuRunner

KIND = "kvmkit-bare-vm"


def memory_layout(mem: GuestMemory) -> list[list[int]]:
    return [[r.guest_phys_addr, r.size] for r in mem.regions]


def memory_from_layout(raw: Any, path: str) -> GuestMemory:
    """Fresh memfd-backed guest memory for a layout read from the stream: at most
    MAX_REGIONS page-aligned, non-overlapping regions (SnapshotError otherwise)."""
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_REGIONS:
        raise SnapshotError(f"{path}: 1 to {MAX_REGIONS} memory regions expected")
    mem = GuestMemory()
    try:
        for i, entry in enumerate(raw):
            f = Fields({"gpa": entry[0], "size": entry[1]} if isinstance(entry, list)
                       and len(entry) == 2 else None, f"{path}[{i}]")  # fmt: skip
            gpa = f.get_int("gpa", 0, MAX_MEMORY)
            size = f.get_int("size", PAGE_SIZE, MAX_MEMORY)
            if gpa % PAGE_SIZE or size % PAGE_SIZE:
                raise SnapshotError(f"{path}[{i}]: not page-aligned")
            try:
                mem.add(memfd_region(gpa, size))
            except ValueError as err:  # GuestMemoryError: overlapping regions
                raise SnapshotError(f"{path}[{i}]: {err}") from None
    except BaseException:
        mem.close()
        raise
    return mem


@dataclass
class BareVm:
    """A VM whose vCPUs run in `runners` (one per vCPU, in vCPU order)."""

    kvm: Kvm
    vm: Vm
    mem: GuestMemory
    runners: list[VcpuRunner]
    vm_setup: VmSetup

    def setup(self) -> dict[str, Any]:
        return {"kind": KIND, "memory": memory_layout(self.mem)}

    def pause(self) -> None:
        for r in self.runners:
            r.pause()

    def resume(self) -> None:
        for r in self.runners:
            r.resume()

    def capture(self) -> dict[str, Any]:
        by_vcpu = {id(r.vcpu): r for r in self.runners}
        state = capture_kvm_state(
            self.kvm, self.vm, [r.vcpu for r in self.runners], self.vm_setup,
            on_vcpu=lambda v, fn: by_vcpu[id(v)].control.call_held(
                fn, thread_alive=by_vcpu[id(v)].thread.is_alive),
        )  # fmt: skip
        return {"kind": KIND, **state.to_dict(), "memory": memory_layout(self.mem)}

    def release(self) -> None:
        pass

    def reacquire(self) -> None:
        pass

    def committed(self, detail: str) -> None:
        for r in self.runners:
            r.stop()


def send_bare(
    vm: BareVm, destination: str, *, max_downtime_ms: float = 300,
    bandwidth_mib_s: float | None = None, max_rounds: int | None = None,
    progress: Callable[[MigrationProgress], None] | None = None,
    manual_dirty_log: bool | None = None,
) -> MigrationResult:  # fmt: skip
    kwargs: dict[str, Any] = {} if max_rounds is None else {"max_rounds": max_rounds}
    return send_vm(vm, parse_address(destination), max_downtime_ms=max_downtime_ms,
                   bandwidth_mib_s=bandwidth_mib_s, progress=progress,
                   manual_dirty_log=manual_dirty_log, **kwargs)  # fmt: skip


class BareSink:
    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.layout: list[list[int]] = []

    def prepare(self, setup: dict[str, Any]) -> GuestMemory:
        if setup.get("kind") != KIND:
            raise SnapshotError(f"the source migrates {setup.get('kind')!r}, not a bare VM")
        mem = memory_from_layout(setup.get("memory"), "SETUP.memory")
        self.layout = memory_layout(mem)
        return mem

    def check(self, payload: dict[str, Any]) -> KvmState:
        if payload.get("kind") != KIND:
            raise SnapshotError("migration state: not a bare VM's state")
        if payload.get("memory") != self.layout:
            raise SnapshotError("migration state: memory layout differs from SETUP's")
        return KvmState.from_dict(payload)

    def build(self, checked: KvmState, memory: GuestMemory) -> Restored:
        try:
            return build_vm(self.kvm, checked, memory, advance_clock=True)
        except BaseException:
            memory.close()
            raise

    def discard(self, built: Restored) -> None:
        built.close()

    def describe(self, built: Restored) -> str:
        return ""

    def abort(self) -> None:
        pass


def receive_bare(listener: socket.socket, kvm: Kvm, *,
                 accept_timeout: float | None = None) -> Restored:  # fmt: skip
    """Receive one bare VM; it is built (vCPUs restored, clock advanced), not running."""
    restored = receive_vm(listener, BareSink(kvm), accept_timeout=accept_timeout)
    if not isinstance(restored, Restored):  # pragma: no cover - receive_vm returns build's
        raise MigrationError("internal: unexpected receive result")
    return restored
