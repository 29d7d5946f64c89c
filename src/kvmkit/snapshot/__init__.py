"""Snapshot and restore: the state-file format, per-vCPU and per-VM state (the KVM part of
every state transfer), guest memory files (see docs/snapshot.md). A Machine's own state is
kvmkit.vmm.persist; pausing is kvmkit.vmm.runstate."""

from kvmkit.snapshot.format import SnapshotError

__all__ = ["SnapshotError"]
