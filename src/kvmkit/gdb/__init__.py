"""A GDB remote-serial-protocol stub for kvmkit guests that knows the guest's CR3.

- `rsp`: packet framing, escaping, checksums, run-length decoding (pure code).
- `target`: the x86-64 target description and the register layout of `g`/`p` packets.
- `paging`: guest-virtual to guest-physical translation from CR3.
- `breakpoints`: software breakpoints in guest memory, hardware ones in DR0-DR3/DR7.
- `stub`: `GdbStub`, the server: stops and resumes vCPUs through their run state
  (kvmkit.vmm.runstate), takes their debug exits; usable with `kvmkit.testing.TinyGuest` and
  `kvmkit.vmm.Machine`.
- `session`: one GDB connection, a handler per packet letter on `GdbStub`'s public API.
"""

from kvmkit.gdb.stub import GdbStub, parse_address

__all__ = ["GdbStub", "parse_address"]
