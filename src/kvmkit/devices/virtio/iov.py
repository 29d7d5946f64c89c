"""Scatter-gather helpers over a chain's guest buffers: the devices move data with
readv/writev/sendmsg/recvmsg_into on `GuestMemory` views, so these build the view lists."""

from __future__ import annotations

from kvmkit.devices.virtio.queue import Buffer
from kvmkit.memory import GuestMemory


def skip(bufs: list[Buffer], length: int) -> list[Buffer]:
    """`bufs` without their first `length` bytes."""
    out = []
    for b in bufs:
        if length >= b.length:
            length -= b.length
            continue
        out.append(Buffer(b.addr + length, b.length - length, b.writable))
        length = 0
    return out


def limit(bufs: list[Buffer], length: int) -> list[Buffer]:
    """The first `length` bytes of `bufs`."""
    out = []
    for b in bufs:
        if length <= 0:
            break
        n = min(b.length, length)
        out.append(Buffer(b.addr, n, b.writable))
        length -= n
    return out


def views(mem: GuestMemory, bufs: list[Buffer], *, write: bool = False) -> list[memoryview]:
    return [mem.view(b.addr, b.length, write=write) for b in bufs if b.length]


def gather(mem: GuestMemory, bufs: list[Buffer], length: int) -> bytes:
    """Up to `length` bytes from the start of `bufs` (a header that may span buffers)."""
    out = bytearray()
    for b in bufs:
        if len(out) >= length:
            break
        out += mem.read(b.addr, min(b.length, length - len(out)))
    return bytes(out)


def scatter(mem: GuestMemory, bufs: list[Buffer], data: bytes) -> int:
    """Write `data` at the start of `bufs`; returns the bytes written (less if they are
    shorter)."""
    done = 0
    for b in bufs:
        if done >= len(data):
            break
        n = min(b.length, len(data) - done)
        mem.write(b.addr, data[done : done + n])
        done += n
    return done
