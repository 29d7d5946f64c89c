"""Snapshot files of a `Machine`: one transport of its state (kvmkit.vmm.persist).

    machine.pause()                                  # every vCPU held outside KVM_RUN
    snapshot_machine(machine, "vm.state", "vm.mem")  # full; diff=True: pages dirtied since
    machine.resume()                                 # or close it, and later, in any process:
    m = restore_machine("vm.state", "vm.mem", command_output=sys.stdout.buffer.write)
    m.start(); m.wait()

The state file is the machine's `MachineState` payload plus `memory`, the layout of the
memory file written beside it (kvmkit.snapshot.memory: sparse, or only the dirtied pages of
a diff). A restore reads and checks the whole state file (`read_snapshot`) and the memory
file's size before any VM exists, maps the memory file MAP_PRIVATE, and hands both to
`Machine.from_state`, where the restore order is.

Virtio devices are quiesced by the pause: every queue worker thread parks between passes
(never inside a chain) and block devices fdatasync their images. A restore rebuilds them
from the saved configuration (same MMIO slots, IRQs, ioeventfds and irqfds), takes over
their queue state without a reset and kicks every ready queue once, so a request the guest
queued just before the pause is served. virtio-net reopens its tap by name; virtio-vsock binds a new
Unix socket (a stale one left by a killed process is removed) and, having no connection,
sends the guest a transport reset.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kvmkit.errors import UserError
from kvmkit.kvm import KvmError
from kvmkit.memory import HugePagesError
from kvmkit.mmds.store import Mmds
from kvmkit.snapshot.format import SnapshotError, read_state, write_state
from kvmkit.snapshot.memory import MemoryState, enable_dirty_log, restore_memory, write_memory
from kvmkit.vmm.machine import Machine
from kvmkit.vmm.persist import MachineState
from kvmkit.vmm.placement import bind_numa_nodes


def snapshot_machine(
    machine: Machine, state_path: str | os.PathLike[str], mem_path: str | os.PathLike[str],
    *, diff: bool = False, cancel: Callable[[], bool] | None = None,
) -> None:  # fmt: skip
    """Write a snapshot of a paused machine. After a full snapshot KVM dirty logging is on, so
    the next one can be a diff.

    Each file is written under a temporary name and renamed when complete (memory first,
    then state), so a failure or a kill half-way never leaves a partial file under either
    name. `cancel` (polled while memory is written) gives the snapshot up: SnapshotCancelled,
    nothing written under the final names."""
    state = machine.capture_state()  # refuses a machine that is not paused
    assert machine.vm is not None
    if diff and not all(r.log_dirty for r in machine.mem.regions):
        raise UserError("a diff snapshot needs a full snapshot of this machine first")
    memory = write_memory(machine.mem, mem_path, vm=machine.vm, diff=diff, cancel=cancel)
    write_state(state_path, {**state.to_dict(), "memory": memory.to_dict()})
    if not diff:
        enable_dirty_log(machine.mem, machine.vm)


@dataclass(frozen=True)
class Overrides:
    """Host resources a snapshot load gives anew, so that several clones of one snapshot
    run side by side (Firecracker's `network_overrides` and `vsock_override`,
    snapshot-support.md and network-for-clones.md): the tap of a network interface by its
    iface id, and the vsock device's Unix socket."""

    taps: dict[str, str] = field(default_factory=dict)
    vsock_uds: str | None = None

    def apply(self, payload: dict[str, Any]) -> None:
        """Put the new names into a state payload before it is checked (so the snapshot's
        own socket directory need not exist here). SnapshotError in Firecracker's words for
        an iface id or a vsock the snapshot does not have. A payload of another shape is
        left as it is for `MachineState.from_dict` to refuse."""
        meta = payload.get("meta")
        cfg = meta.get("config") if isinstance(meta, dict) else None
        if not isinstance(cfg, dict):
            return
        raw = cfg.get("nets")
        nets: list[Any] = raw if isinstance(raw, list) else []
        by_id = {n["iface_id"]: n for n in nets
                 if isinstance(n, dict) and isinstance(n.get("iface_id"), str)}  # fmt: skip
        renamed: dict[str, str] = {}
        for iface_id, tap in self.taps.items():
            if iface_id not in by_id:
                known = ", ".join(repr(i) for i in by_id) or "none"
                raise SnapshotError(f"Unknown Network Device: the snapshot has no network "
                                    f"interface {iface_id!r} (its iface ids: {known})")  # fmt: skip
            renamed[str(by_id[iface_id].get("tap"))] = tap
            by_id[iface_id]["tap"] = tap
        # The virtio-net device's own state names its tap too (checked at restore).
        devices = payload.get("devices")
        virtio = devices.get("virtio") if isinstance(devices, dict) else None
        for dev in virtio if isinstance(virtio, list) else []:
            part = dev.get("device") if isinstance(dev, dict) else None
            part = part.get("device") if isinstance(part, dict) else None
            if isinstance(part, dict) and part.get("tap") in renamed:
                part["tap"] = renamed[part["tap"]]
        if self.vsock_uds is not None:
            if not isinstance(cfg.get("vsock"), dict):
                raise SnapshotError("Unknown Vsock Device: the snapshot has no vsock device")
            cfg["vsock"]["uds_path"] = self.vsock_uds


def read_snapshot(
    state_path: str | os.PathLike[str], overrides: Overrides | None = None
) -> tuple[MachineState, MemoryState]:
    """Read and check a state file completely (format, checksum, every state and device),
    with `overrides` applied; only SnapshotError escapes, and nothing has been created."""
    payload = read_state(state_path)
    if overrides is not None:
        overrides.apply(payload)
    state = MachineState.from_dict(payload)
    return state, MemoryState.from_dict(payload.get("memory"))


def restore_machine(
    state_path: str | os.PathLike[str], mem_path: str | os.PathLike[str], *,
    base_mem: str | os.PathLike[str] | None = None,
    command_output: Callable[[bytes], None] | None = None, kvm_device: str = "/dev/kvm",
    overrides: Overrides | None = None, mmds: Mmds | None = None, track_dirty: bool = False,
    merged: bool = False,
) -> Machine:  # fmt: skip
    """A Machine built from a snapshot, ready to `start()` (it resumes where it was paused).
    A bad state or memory file raises SnapshotError before any VM exists.

    `overrides`: new taps and vsock socket (clones side by side). `mmds`: the store the
    snapshot's MMDS configuration is served from (it takes that configuration; its data is
    the caller's: Firecracker does not keep the data store in a snapshot). `track_dirty`:
    dirty-page tracking on from the load, so a diff snapshot taken later holds the pages
    written since the load and applies on top of `mem_path` (Firecracker's
    `track_dirty_pages` / `enable_diff_snapshots` of a snapshot load). `merged`: the
    state may be a diff's and `mem_path` is then its base with the diff folded in
    (`merge_diff`; Firecracker's rule: load the state file of the layer merged last)."""
    state, layout = read_snapshot(state_path, overrides)
    if layout.diff and base_mem is None:
        if not merged:
            raise SnapshotError("a diff snapshot restores on top of its base memory file")
        layout = MemoryState([replace(r, dirty=None) for r in layout.regions], diff=False)
    layout.check_file(mem_path)
    config = state.config
    config.validate_placement()  # the huge pages and host nodes it names (UserError)
    try:
        # Huge-page memory is filled from the file; NUMA nodes are bound before that.
        memory = restore_memory(
            layout, mem_path, base=base_mem, huge_page_size=config.huge_page_size,
            prepare=lambda mem: bind_numa_nodes(mem, config),
        )  # fmt: skip
    except HugePagesError as err:
        raise UserError(f"huge pages: {err}") from None
    if mmds is not None:
        for net in config.nets:
            if net.mmds is not None:
                mmds.config, net.mmds = net.mmds.config, mmds
    machine = Machine.from_state(state, memory, command_output=command_output,
                                 kvm_device=kvm_device)  # fmt: skip
    if track_dirty:
        assert machine.vm is not None
        try:
            enable_dirty_log(machine.mem, machine.vm)
        except BaseException:
            machine.close()
            raise
    return machine


def snapshot_after(
    machine: Machine, seconds: float, state_path: Path, mem_path: Path
) -> int | None:
    """`kvmkit run --snapshot-after`: wait, pause, snapshot, stop the VM. None if the VM
    ended first (the caller reports that as usual), else the exit status 0."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if machine.wait(min(0.2, max(deadline - time.monotonic(), 0))) is not None:
            return None
    t0 = time.monotonic()
    machine.pause()
    try:
        snapshot_machine(machine, state_path, mem_path)
    except KvmError as err:
        raise UserError(f"snapshot failed: {err}") from None
    took = time.monotonic() - t0
    machine.stop()
    print(f"kvmkit run: snapshot written to {state_path} and {mem_path} in {took:.2f} s; "
          "the VM was stopped", flush=True, file=sys.stderr)  # fmt: skip
    return 0
