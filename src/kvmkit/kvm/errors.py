"""The error types of the ioctl wrappers: `KvmError` for KVM file descriptors, `VfioError`
for VFIO ones; both are an `IoctlError` (an OSError carrying the operation's name)."""

from __future__ import annotations

import errno as _errno
import os


class IoctlError(OSError):
    """An ioctl failed: carries the operation name and errno."""

    def __init__(self, op: str, err: int, detail: str = "") -> None:
        msg = f"{op} failed: {os.strerror(err)} ({_errno.errorcode.get(err, err)})"
        if detail:
            msg += f": {detail}"
        super().__init__(err, msg)
        self.op = op

    def __str__(self) -> str:
        return str(self.args[1])


class KvmError(IoctlError):
    """An ioctl on a KVM file descriptor failed."""


class VfioError(IoctlError):
    """An ioctl (or read, write, mmap) on a VFIO container, group or device failed."""
