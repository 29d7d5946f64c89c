"""The one path by which kvmkit issues ioctls.

libc's `ioctl` is called through ctypes (which releases the GIL for the duration of the call,
so `KVM_RUN` on one thread does not stop the others). Unlike `fcntl.ioctl`, it accepts pointer
arguments of any size and integer arguments beyond a C `int` (e.g. `KVM_SET_TSS_ADDR`
0xfffbd000, see ENVIRONMENT.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Any

from kvmkit.kvm.errors import IoctlError, KvmError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_ioctl = _libc.ioctl
_ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_ioctl.restype = ctypes.c_int


def ioctl_int(
    fd: int, op: str, request: int, arg: int = 0, *, error: type[IoctlError] = KvmError
) -> int:
    """Issue an ioctl whose argument is an integer; return its non-negative result. A failure
    raises `error` (KvmError unless the fd is not KVM's)."""
    ret = _ioctl(fd, request, arg)
    if ret < 0:
        raise error(op, ctypes.get_errno())
    return int(ret)


def ioctl_ptr(
    fd: int, op: str, request: int, obj: Any, *, error: type[IoctlError] = KvmError
) -> int:
    """Issue an ioctl whose argument points at `obj` (a ctypes object or a writable buffer)."""
    if isinstance(obj, ctypes._SimpleCData | ctypes.Structure | ctypes.Union | ctypes.Array):
        addr = ctypes.addressof(obj)
    else:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(obj))
    ret = _ioctl(fd, request, addr)
    if ret < 0:
        raise error(op, ctypes.get_errno())
    return int(ret)


def close_fd(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
