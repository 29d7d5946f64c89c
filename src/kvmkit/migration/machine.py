"""Live migration of a `Machine`: the second transport of its state (the first is the
snapshot file pair, kvmkit.vmm.snapshot). Same capture (`Machine.capture_state`), same
rebuild (`Machine.from_state`); memory travels as pages while the guest runs.

    # destination (kvmkit restore --incoming unix:/tmp/mig.sock)
    machine = receive_migration("unix:/tmp/mig.sock", command_output=sys.stdout.buffer.write)
    machine.start(); machine.wait()
    # source (kvmkit migrate, PUT /migration)
    result = machine.migrate("unix:/tmp/mig.sock", max_downtime_ms=300)
    print(result.summary())

SETUP carries the machine's configuration (`meta.config` of the state: vCPUs, memory size,
drives with their image paths and sizes, nets, vsock): the destination checks it as a
restore does (a drive image missing or of another size is refused before any page moves)
and builds guest RAM the way the machine's own `build()` does (`add_guest_ram`). At the end
the state is checked completely (`MachineState.from_dict`), the source releases its taps
and vsock socket (`Machine.release_host_devices`), and the destination rebuilds the machine
with `Machine.from_state(..., advance_clock=True)`: drives reopened by path, taps by name,
vsock connections reset, kvmclock and TSC moved on by the downtime.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

from kvmkit.arch.x86_64 import layout
from kvmkit.errors import UserError
from kvmkit.kvm import Kvm, Vm
from kvmkit.memory import GuestMemory
from kvmkit.migration.bare import memory_layout
from kvmkit.migration.receive import receive_vm
from kvmkit.migration.send import MigrationProgress, MigrationResult, send_vm
from kvmkit.migration.stream import (
    Address,
    MigrationError,
    bound_address,
    listen,
    parse_address,
)
from kvmkit.snapshot.core import VmSetup, prepare_vm
from kvmkit.snapshot.format import SnapshotError
from kvmkit.vmm.machine import VFIO_NO_SNAPSHOT, Machine
from kvmkit.vmm.persist import MachineState, config_from_dict, config_to_dict
from kvmkit.vmm.placement import add_guest_ram
from kvmkit.vmm.runstate import RunState

KIND = "kvmkit-machine"


class MachineSource:
    """A running Machine as the sender's `Source`."""

    def __init__(self, machine: Machine) -> None:
        # First, before anything reaches the destination: a passthrough device's state is in
        # the hardware, which the destination cannot rebuild (docs/vfio.md).
        if machine.config.vfio:
            raise UserError(VFIO_NO_SNAPSHOT)
        if machine.vm is None or not machine.threads:
            raise UserError("the machine is not running: nothing to migrate")
        if machine.paused:
            raise UserError("the machine is paused: resume it before migrating")
        if any(t.control.state is RunState.FINISHED for t in machine.threads):
            raise UserError("the machine has ended: nothing to migrate")
        self.machine = machine
        self.mem: GuestMemory = machine.mem
        self.vm: Vm = machine.vm

    def setup(self) -> dict[str, Any]:
        try:
            config, sizes = self.machine.state_config()
        except OSError as err:  # a drive image gone from under the running guest
            raise UserError(f"cannot migrate: {err.filename}: {err.strerror}") from None
        # Taps and vsock sockets are opened by name at the destination: the source lets go
        # of them first (PREPARED/HANDOVER). Without them the destination builds at once.
        handover = bool(config.nets) or config.vsock is not None
        return {"kind": KIND, "config": config_to_dict(config, sizes),
                "memory": memory_layout(self.mem), "handover": handover,
                "vm_setup": self.machine.vm_setup().to_dict()}  # fmt: skip

    def pause(self) -> None:
        self.machine.pause()

    def resume(self) -> None:
        self.machine.resume()

    def capture(self) -> dict[str, Any]:
        return self.machine.capture_state().to_dict()

    def release(self) -> None:
        self.machine.release_host_devices()

    def reacquire(self) -> None:
        self.machine.reacquire_host_devices()

    def committed(self, detail: str) -> None:
        self.machine.finish_migrated(detail)


def migrate_machine(
    machine: Machine, destination: str, *, max_downtime_ms: float = 300,
    bandwidth_mib_s: float | None = None,
    progress: Callable[[MigrationProgress], None] | None = None,
) -> MigrationResult:  # fmt: skip
    """`Machine.migrate`: see kvmkit.migration.send for the algorithm."""
    address = parse_address(destination)
    return send_vm(MachineSource(machine), address, max_downtime_ms=max_downtime_ms,
                   bandwidth_mib_s=bandwidth_mib_s, progress=progress)  # fmt: skip


class MachineSink:
    """The destination's `Sink` for a Machine."""

    def __init__(self, *, command_output: Callable[[bytes], None] | None,
                 kvm_device: str) -> None:  # fmt: skip
        self.command_output = command_output
        self.kvm_device = kvm_device
        self.setup: dict[str, Any] = {}
        # The VM, made with the memory while the pages arrive (kvmkit.snapshot.core
        # .prepare_vm: registering guest RAM is the slowest part of a rebuild).
        self.prepared: tuple[Kvm, Vm] | None = None
        self.vm_setup = VmSetup()

    def prepare(self, setup: dict[str, Any]) -> GuestMemory:
        if setup.get("kind") != KIND:
            raise SnapshotError(f"the source migrates {setup.get('kind')!r}, not a kvmkit machine")
        config, _ = config_from_dict(setup.get("config"))
        want = [[start, size] for start, size in layout.ram_ranges(config.mem_mib << 20)]
        if setup.get("memory") != want:
            raise SnapshotError("SETUP.memory is not the memory map of the machine's size")
        if setup.get("handover") is not (bool(config.nets) or config.vsock is not None):
            raise SnapshotError("SETUP.handover must say whether taps or vsock change hands")
        self.vm_setup = VmSetup.from_dict(setup.get("vm_setup"))
        config.validate_placement()  # the huge pages and host nodes it names (UserError)
        mem = GuestMemory()
        try:
            add_guest_ram(mem, config)  # as the machine's own build(): huge pages, NUMA nodes
            try:
                kvm = Kvm(self.kvm_device)
            except OSError as err:
                raise UserError(f"{self.kvm_device}: {err.strerror or err}") from None
            try:
                self.prepared = (kvm, prepare_vm(kvm, self.vm_setup, mem))
            except BaseException:
                kvm.close()
                raise
        except BaseException:
            mem.close()
            raise
        self.setup = setup
        return mem

    def check(self, payload: dict[str, Any]) -> MachineState:
        state = MachineState.from_dict(payload)
        if state.kvm.setup != self.vm_setup:
            raise SnapshotError("migration state: the VM was set up another way than SETUP said")
        config = config_to_dict(state.config, state.drive_sizes)
        before = self.setup["config"]
        for now, then in zip(config["drives"], before.get("drives", []), strict=False):
            if now["path"] == then.get("path") and now["size"] != then.get("size"):
                raise SnapshotError(
                    f"drive {now['path']}: the image is {now['size']} bytes now, it was "
                    f"{then.get('size')} when the migration started"
                )
        if config != before:
            raise SnapshotError("migration state: the configuration differs from SETUP's")
        return state

    def build(self, checked: MachineState, memory: GuestMemory) -> Machine:
        prepared, self.prepared = self.prepared, None
        return Machine.from_state(checked, memory, command_output=self.command_output,
                                  kvm_device=self.kvm_device, advance_clock=True,
                                  prepared=prepared)  # fmt: skip

    def discard(self, built: Machine) -> None:
        built.close()

    def abort(self) -> None:
        if self.prepared is not None:
            kvm, vm = self.prepared
            self.prepared = None
            vm.close()
            kvm.close()

    def describe(self, built: Machine) -> str:
        return "".join(f", {k} {v:.0f} ms" for k, v in built.rebuild_ms.items())


class Incoming:
    """A listening destination (`kvmkit restore --incoming`): `address` is where it listens
    (a tcp port 0 replaced by the port it got)."""

    def __init__(self, destination: str) -> None:
        self.requested: Address = parse_address(destination)
        self.listener: socket.socket = listen(self.requested)
        self.address = bound_address(self.listener, self.requested)

    def close(self) -> None:
        self.listener.close()
        if self.requested.scheme == "unix":
            try:
                os.unlink(self.requested.path)
            except OSError:
                pass

    def __enter__(self) -> Incoming:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def receive(
        self, *, command_output: Callable[[bytes], None] | None = None,
        kvm_device: str = "/dev/kvm", accept_timeout: float | None = None,
        log: Callable[[str], None] | None = None,
    ) -> Machine:  # fmt: skip
        """One migration: the Machine it brought, built and acknowledged, to `start()`."""
        from kvmkit.kvm.kick import install_kick_handler

        install_kick_handler()  # vCPU kicks need it, and only the main thread can
        sink = MachineSink(command_output=command_output, kvm_device=kvm_device)
        machine = receive_vm(self.listener, sink, accept_timeout=accept_timeout, log=log)
        if not isinstance(machine, Machine):  # pragma: no cover - receive_vm returns build's
            raise MigrationError("internal: unexpected receive result")
        return machine


def receive_migration(
    destination: str, *, command_output: Callable[[bytes], None] | None = None,
    kvm_device: str = "/dev/kvm", accept_timeout: float | None = None,
) -> Machine:  # fmt: skip
    """Listen at `destination`, receive one migrated Machine and return it, built, with the
    source told it may end its guest: `start()` it at once."""
    with Incoming(destination) as incoming:
        return incoming.receive(command_output=command_output, kvm_device=kvm_device,
                                accept_timeout=accept_timeout)  # fmt: skip

