"""Fuzz target: the snapshot reader (kvmkit.vmm.snapshot.read_snapshot's checks: the state
file's header, size caps and checksum, then every part of the machine state and the memory
file's layout), all of which run before any VM exists.

Input: a mode byte, then a state file. Mode bit 0 clear: the file without its CRC32
trailer, whose payload length the harness recomputes and whose CRC32 it appends, so that
mutations reach the checks behind them; set: the whole file, read as it is. The only
rejection is SnapshotError (one line, exit status 2)."""

from __future__ import annotations

from common import fix_snapshot_crc

from kvmkit.snapshot.format import SnapshotError, decode
from kvmkit.snapshot.memory import MemoryState
from kvmkit.vmm.persist import MachineState


def TestOneInput(data: bytes) -> None:
    raw = data[1:] if data[:1] and data[0] & 1 else fix_snapshot_crc(data[1:])
    try:
        payload = decode(raw)
        MachineState.from_dict(payload)
        MemoryState.from_dict(payload.get("memory"))
    except SnapshotError:
        pass
