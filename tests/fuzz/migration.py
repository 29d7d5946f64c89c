"""Fuzz target: the destination's migration stream reader (kvmkit.migration.receive
.receive_vm over kvmkit.migration.stream: preamble, frames, their caps and CRCs, SETUP's
configuration, PAGES batches into guest memory, ROUND, the STATE (a snapshot state file)
and HANDOVER), fed the bytes of a source over a real Unix socket.

The sink is the machine destination's (MachineSink) checks without its KVM: SETUP's kind
and configuration are parsed by the same functions, the guest memory is 64 KiB at 0 and
4 KiB at 0x20000 instead of the size SETUP names, and the state goes
through MachineState.from_dict; nothing is built. Input: a mode byte (bit 0 clear: every
frame's CRC is recomputed by the harness), then the stream. The only rejection is
MigrationError."""

from __future__ import annotations

import socket
from typing import Any

from common import HIGH_GPA, HIGH_SIZE, LOW_SIZE, fix_frame_crcs, scratch_dir

from kvmkit.arch.x86_64 import layout
from kvmkit.memory import GuestMemory
from kvmkit.migration.machine import KIND
from kvmkit.migration.receive import receive_vm
from kvmkit.migration.stream import MigrationError
from kvmkit.snapshot.core import VmSetup
from kvmkit.snapshot.format import SnapshotError
from kvmkit.vmm.persist import MachineState, config_from_dict

_PATH = str(scratch_dir() / "migration.sock")
_LISTENER = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
_LISTENER.bind(_PATH)
_LISTENER.listen(4)


class _Sink:
    def prepare(self, setup: dict[str, Any]) -> GuestMemory:
        if setup.get("kind") != KIND:
            raise SnapshotError(f"the source migrates {setup.get('kind')!r}")
        # MachineSink.prepare's checks, in its order, up to the memory it would allocate.
        config, _ = config_from_dict(setup.get("config"))
        want = [[start, size] for start, size in layout.ram_ranges(config.mem_mib << 20)]
        if setup.get("memory") != want:
            raise SnapshotError("SETUP.memory is not the memory map of the machine's size")
        VmSetup.from_dict(setup.get("vm_setup"))
        # A memory of its own: receive_vm closes it when the stream fails.
        mem = GuestMemory()
        mem.add_anonymous(0, LOW_SIZE)
        mem.add_anonymous(HIGH_GPA, HIGH_SIZE)
        return mem

    def check(self, payload: dict[str, Any]) -> MachineState:
        return MachineState.from_dict(payload)

    def build(self, checked: MachineState, memory: GuestMemory) -> None:
        memory.close()  # what a built machine would own

    def discard(self, built: None) -> None:
        pass

    def describe(self, built: None) -> str:
        return ""

    def abort(self) -> None:
        pass


def TestOneInput(data: bytes) -> None:
    stream = data[1:] if data[:1] and data[0] & 1 else fix_frame_crcs(data[1:])
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    try:
        client.connect(_PATH)
        client.sendall(stream)
        client.shutdown(socket.SHUT_WR)
        try:
            receive_vm(_LISTENER, _Sink(), accept_timeout=5, idle_timeout=5)  # type: ignore[arg-type]
        except MigrationError:
            pass
    finally:
        client.close()
