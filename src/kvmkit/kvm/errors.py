"""The single error type of the KVM wrappers."""

from __future__ import annotations

import errno as _errno
import os


class KvmError(OSError):
    """An ioctl on a KVM file descriptor failed: carries the operation name and errno."""

    def __init__(self, op: str, err: int, detail: str = "") -> None:
        msg = f"{op} failed: {os.strerror(err)} ({_errno.errorcode.get(err, err)})"
        if detail:
            msg += f": {detail}"
        super().__init__(err, msg)
        self.op = op

    def __str__(self) -> str:
        return str(self.args[1])
