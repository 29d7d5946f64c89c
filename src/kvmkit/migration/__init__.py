"""Live migration: move a running guest to another kvmkit process with pre-copy.

    # destination: kvmkit restore --incoming unix:/tmp/mig.sock, or
    machine = receive_migration("unix:/tmp/mig.sock"); machine.start()
    # source: kvmkit migrate --api-sock SOCK --to unix:/tmp/mig.sock, or
    result = machine.migrate("unix:/tmp/mig.sock")

Modules: `stream` (addresses, framing, page batches), `send` (the source's algorithm),
`receive` (the destination's checks), `machine` (a Machine's source and destination),
`bare` (a bare KVM VM: tiny guests). The protocol and the algorithm: docs/migration.md.
"""

from kvmkit.migration.machine import Incoming, receive_migration
from kvmkit.migration.send import MigrationProgress, MigrationResult
from kvmkit.migration.stream import MigrationError

__all__ = ["Incoming", "MigrationError", "MigrationProgress", "MigrationResult",
           "receive_migration"]  # fmt: skip
