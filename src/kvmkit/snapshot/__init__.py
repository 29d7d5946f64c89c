"""Snapshot and restore: the state-file format, per-vCPU and per-VM state, guest memory
files, pausing vCPU loops (see docs/snapshot.md)."""

from kvmkit.snapshot.format import SnapshotError

__all__ = ["SnapshotError"]
