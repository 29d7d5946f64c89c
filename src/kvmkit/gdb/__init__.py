"""A GDB remote-serial-protocol stub for kvmkit guests that knows the guest's CR3.

- `rsp`: packet framing, escaping, checksums, run-length decoding (pure code).
- `target`: the x86-64 target description and the register layout of `g`/`p` packets.
- `paging`: guest-virtual to guest-physical translation from CR3.
- `stub`: `GdbStub`, the server, usable with `kvmkit.testing.TinyGuest` and `kvmkit.vmm.Machine`.
"""

from kvmkit.gdb.stub import GdbStub, parse_address

__all__ = ["GdbStub", "parse_address"]
