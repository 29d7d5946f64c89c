"""A writer for "newc" cpio archives (the format the Linux kernel unpacks as an initramfs).

Pure Python, no external tool: kvmkit builds the lane's initramfs with it, and guest images
can use it later.  Archives are reproducible: timestamps default to 0, inode numbers count
up from 1 in the order entries are added, and owners default to root.

The kernel accepts several archives concatenated back to back (each with its own trailer),
which lets a cached base archive be combined with a small per-run one without rewriting it.
"""

from __future__ import annotations

import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member. `mode` includes the file type bits (stat.S_IFREG etc.)."""

    name: str
    mode: int
    data: bytes = b""
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    rdevmajor: int = 0
    rdevminor: int = 0
    nlink: int = 1


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _normalise(name: str) -> str:
    # The kernel and GNU cpio both expect relative names ("bin/sh", not "/bin/sh").
    name = name.strip("/")
    if not name or any(part in ("", "..") for part in name.split("/")):
        raise ValueError(f"bad cpio member name: {name!r}")
    return name


def _header(entry: Entry, name: str, ino: int) -> bytes:
    encoded = name.encode() + b"\0"
    fields = (
        ino,
        entry.mode,
        entry.uid,
        entry.gid,
        entry.nlink,
        entry.mtime,
        len(entry.data),
        0,  # devmajor: the device holding the file; meaningless in an archive
        0,  # devminor
        entry.rdevmajor,
        entry.rdevminor,
        len(encoded),
        0,  # check: only used by the "crc" variant (070702)
    )
    for value in fields:
        if not 0 <= value <= 0xFFFFFFFF:
            raise ValueError(f"cpio header field out of range in {name!r}: {value}")
    head = MAGIC + b"".join(b"%08X" % value for value in fields) + encoded
    return head + _pad4(len(head))


class CpioWriter:
    """Streams newc entries into a binary file; call `close()` (or use `with`) for the trailer."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 0
        self._names: set[str] = set()
        self._closed = False

    def __enter__(self) -> CpioWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._closed:
            self.close()

    def add(self, entry: Entry) -> None:
        if self._closed:
            raise ValueError("cpio archive already closed")
        name = _normalise(entry.name)
        if name in self._names:
            raise ValueError(f"duplicate cpio member: {name!r}")
        self._names.add(name)
        self._ino += 1
        self._out.write(_header(entry, name, self._ino))
        self._out.write(entry.data)
        self._out.write(_pad4(len(entry.data)))

    def dir(self, name: str, mode: int = 0o755) -> None:
        self.add(Entry(name, stat.S_IFDIR | mode, nlink=2))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.add(Entry(name, stat.S_IFREG | mode, data))

    def symlink(self, name: str, target: str) -> None:
        self.add(Entry(name, stat.S_IFLNK | 0o777, target.encode()))

    def chardev(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self.add(Entry(name, stat.S_IFCHR | mode, rdevmajor=major, rdevminor=minor))

    def dirs_for(self, name: str) -> None:
        """Add the parent directories of `name` that are not in the archive yet."""
        parts = _normalise(name).split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/".join(parts[:i])
            if parent not in self._names:
                self.dir(parent)

    def host_file(self, name: str, path: Path, mode: int | None = None) -> None:
        """Add a file read from the host, keeping its permission bits unless `mode` is given."""
        data = path.read_bytes()
        if mode is None:
            mode = stat.S_IMODE(path.stat().st_mode)
        self.file(name, data, mode)

    def close(self) -> None:
        if self._closed:
            return
        self._out.write(_header(Entry(TRAILER, 0), TRAILER, 0))
        self._closed = True


def write_archive(out: BinaryIO, entries: Iterable[Entry]) -> None:
    """Write `entries` and a trailer to `out`."""
    with CpioWriter(out) as writer:
        for entry in entries:
            writer.add(entry)
