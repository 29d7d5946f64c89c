"""Disk images for tests of root devices: an ext4 file system filled from a directory with
`mkfs.ext4 -d` (e2fsprogs; no mount, no root needed), alone or as the first partition of a
disk with an MBR or a GPT partition table that Linux reads (`root=PARTUUID=...`)."""

from __future__ import annotations

import struct
import subprocess
import uuid
import zlib
from pathlib import Path

SECTOR = 512
PART_START = 2048  # the first partition at 1 MiB, as partitioning tools put it
LINUX_FS = uuid.UUID("0fc63daf-8483-4772-8e79-3d69d8e47de4")  # GPT type "Linux filesystem"
GPT_ENTRIES = 128
GPT_ENTRY_SIZE = 128


def ext4(path: Path, source: Path, size_mib: int, *, offset: int = 0) -> None:
    """An ext4 file system of `size_mib` MiB holding `source`'s tree, `offset` bytes into
    `path` (which grows as needed)."""
    with open(path, "ab") as fh:
        fh.truncate(max(path.stat().st_size, offset + (size_mib << 20)))
    argv = ["mkfs.ext4", "-q", "-F", "-d", str(source)]
    if offset:
        argv += ["-E", f"offset={offset}"]
    subprocess.run([*argv, str(path), f"{size_mib}M"], check=True, capture_output=True)


def mbr_disk(path: Path, source: Path, size_mib: int, signature: int) -> str:
    """A disk whose only partition (type 0x83) holds an ext4 of `source`; returns its
    PARTUUID ("%08x-01" of the disk signature, as Linux's msdos.c makes it)."""
    ext4(path, source, size_mib, offset=PART_START * SECTOR)
    sectors = (size_mib << 20) // SECTOR
    mbr = bytearray(SECTOR)
    struct.pack_into("<I", mbr, 440, signature)
    # One entry at 446: status, CHS start (unused: LBA), type, CHS end, LBA start, sectors.
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\xfe\xff\xff", 0x83, b"\xfe\xff\xff",
                               PART_START, sectors)  # fmt: skip
    mbr[510:512] = b"\x55\xaa"
    with open(path, "r+b") as fh:
        fh.write(mbr)
    return f"{signature:08x}-01"


def gpt_disk(path: Path, source: Path, size_mib: int, part_uuid: uuid.UUID) -> str:
    """A disk with a GPT (protective MBR, primary and backup headers and entry arrays with
    their CRC32s, UEFI 2.x chapter 5) whose first partition holds an ext4 of `source`;
    returns its PARTUUID (the partition's unique GUID)."""
    ext4(path, source, size_mib, offset=PART_START * SECTOR)
    part_sectors = (size_mib << 20) // SECTOR
    entries_sectors = GPT_ENTRIES * GPT_ENTRY_SIZE // SECTOR
    total = PART_START + part_sectors + entries_sectors + 1
    with open(path, "r+b") as fh:
        fh.truncate(total * SECTOR)
    entries = bytearray(GPT_ENTRIES * GPT_ENTRY_SIZE)
    entries[:GPT_ENTRY_SIZE] = struct.pack(
        "<16s16sQQQ72s", LINUX_FS.bytes_le, part_uuid.bytes_le, PART_START,
        PART_START + part_sectors - 1, 0, "root".encode("utf-16-le"),
    )  # fmt: skip
    entries_crc = zlib.crc32(entries)
    disk_guid = uuid.uuid4()
    last = total - 1

    def header(current: int, backup: int, entries_lba: int) -> bytes:
        fields = [b"EFI PART", 0x00010000, 92, 0, 0, current, backup, 34,
                  last - entries_sectors - 1, disk_guid.bytes_le, entries_lba, GPT_ENTRIES,
                  GPT_ENTRY_SIZE, entries_crc]  # fmt: skip
        raw = struct.pack("<8sIIIIQQQQ16sQIII", *fields)
        fields[3] = zlib.crc32(raw)  # the header's CRC32 with its own field 0
        return struct.pack("<8sIIIIQQQQ16sQIII", *fields).ljust(SECTOR, b"\0")

    mbr = bytearray(SECTOR)
    mbr[446:462] = struct.pack("<B3sB3sII", 0, b"\x00\x02\x00", 0xEE, b"\xff\xff\xff", 1,
                               min(last, 0xFFFFFFFF))  # fmt: skip
    mbr[510:512] = b"\x55\xaa"
    with open(path, "r+b") as fh:
        fh.write(mbr + header(1, last, 2) + entries)
        fh.seek((last - entries_sectors) * SECTOR)
        fh.write(entries + header(last, 1, last - entries_sectors))
    return str(part_uuid)


def busybox_tree(root: Path, init_script: str) -> Path:
    """A minimal root file system tree at `root`: the static busybox with a symlink for each
    of its applets, the usual directories, and `init_script` as /sbin/init (a shell script
    run by the rootfs's own busybox sh)."""
    from kvmkit.image.busybox import applet_paths
    from kvmkit.lane.assets import ensure_busybox

    busybox = ensure_busybox()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "proc", "sys", "dev", "tmp", "root",
              "run", "mnt"):  # fmt: skip
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "bin" / "busybox").write_bytes(busybox.read_bytes())
    (root / "bin" / "busybox").chmod(0o755)
    for applet in applet_paths(busybox):
        target = root / applet
        if applet in ("bin/busybox", "sbin/init") or target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to("/bin/busybox")
    init = root / "sbin" / "init"
    init.write_text(init_script)
    init.chmod(0o755)
    (root / "etc" / "hostname").write_text("rootfs\n")
    return root
