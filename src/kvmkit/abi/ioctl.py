"""Linux ioctl request numbers, computed as `<asm-generic/ioctl.h>` does.

Layout (x86-64): bits 0-7 number, 8-15 type, 16-29 argument size, 30-31 direction.
"""

from __future__ import annotations

import ctypes

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

IOC_NONE = 0
IOC_WRITE = 1
IOC_READ = 2

ArgType = type[ctypes._SimpleCData] | type[ctypes.Structure] | type[ctypes.Union]  # type: ignore[type-arg]


def _ioc(direction: int, type_: int, nr: int, size: int) -> int:
    if not 0 <= size < (1 << _IOC_SIZEBITS):
        raise ValueError(f"ioctl argument size {size} does not fit in {_IOC_SIZEBITS} bits")
    return (
        (direction << _IOC_DIRSHIFT)
        | (type_ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def IO(type_: int, nr: int) -> int:
    return _ioc(IOC_NONE, type_, nr, 0)


def IOR(type_: int, nr: int, arg: ArgType) -> int:
    return _ioc(IOC_READ, type_, nr, ctypes.sizeof(arg))


def IOW(type_: int, nr: int, arg: ArgType) -> int:
    return _ioc(IOC_WRITE, type_, nr, ctypes.sizeof(arg))


def IOWR(type_: int, nr: int, arg: ArgType) -> int:
    return _ioc(IOC_READ | IOC_WRITE, type_, nr, ctypes.sizeof(arg))
