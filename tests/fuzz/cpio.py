"""Fuzz target: the cpio ("newc") writer's input (kvmkit.image.cpio): member names, modes,
ids, times, device numbers, symlink targets and data, as the image builders pass them. The
only rejection is ValueError (a bad name, a duplicate, a field out of range); an accepted
archive must read back as what was added."""

from __future__ import annotations

import io
import struct

from kvmkit.image import cpio

FIELDS = struct.Struct("<BIIIIIB")  # kind, mode bits, uid, gid, mtime, rdev, name length


def _read_back(raw: bytes) -> list[str]:
    """The member names of a newc archive (the layout the kernel unpacks)."""
    names, at = [], 0
    while True:
        assert raw[at : at + 6] == cpio.MAGIC
        size = int(raw[at + 54 : at + 62], 16)
        namesize = int(raw[at + 94 : at + 102], 16)
        name = raw[at + 110 : at + 110 + namesize - 1].decode()
        at = (at + 110 + namesize + 3) & ~3
        at = (at + size + 3) & ~3
        if name == cpio.TRAILER:
            return names
        names.append(name)


def TestOneInput(data: bytes) -> None:
    out = io.BytesIO()
    added: list[str] = []
    writer = cpio.CpioWriter(out)
    at = 0
    while at + FIELDS.size <= len(data) and len(added) < 32:
        kind, mode, uid, gid, mtime, rdev, name_len = FIELDS.unpack_from(data, at)
        at += FIELDS.size
        name = data[at : at + name_len].decode("utf-8", "replace")
        at += name_len
        payload = data[at : at + (kind >> 3)]
        at += kind >> 3
        try:
            match kind & 7:
                case 0:
                    writer.dir(name, mode & 0o7777)
                case 1:
                    writer.file(name, payload, mode & 0o7777)
                case 2:
                    writer.symlink(name, payload.decode("utf-8", "replace"))
                case 3:
                    writer.chardev(name, rdev >> 20, rdev & 0xFFFFF, mode & 0o7777)
                case 4:
                    writer.dirs_for(name)
                    continue
                case _:
                    writer.add(cpio.Entry(name, mode, payload, uid, gid, mtime, rdev >> 20,
                                          rdev & 0xFFFFF))  # fmt: skip
        except ValueError:
            continue
        added.append(name.strip("/"))
    writer.close()
    names = _read_back(out.getvalue())
    assert set(added) <= set(names), (added, names)
