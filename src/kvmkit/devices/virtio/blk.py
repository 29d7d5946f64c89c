"""virtio-blk over a raw image file (virtio 1.2 §5.2).

A request (§5.2.6) is a chain: a 16-byte device-readable header {type u32, reserved u32,
sector u64}, data buffers (device-readable for OUT, device-writable for IN and GET_ID), and a
last device-writable status byte. Data moves between the file and guest memory with
os.preadv/os.pwritev on guest-memory views: no copy in between.

Read-only drives offer VIRTIO_BLK_F_RO and also fail any write with VIRTIO_BLK_S_IOERR.
VIRTIO_BLK_F_FLUSH is offered and a FLUSH request is fdatasync(2): what the guest flushed
survives a VMM crash.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmkit.devices.virtio import iov
from kvmkit.devices.virtio.device import Budget, VirtioDevice
from kvmkit.devices.virtio.queue import Buffer, DescriptorChain, QueueError
from kvmkit.guestlog import GuestLog
from kvmkit.snapshot.format import Fields, SnapshotError

log = logging.getLogger(__name__)

VIRTIO_ID_BLOCK = 2
QUEUE_SIZE = 256
SECTOR_SIZE = 512
SEG_MAX = 128  # data segments per request we announce (VIRTIO_BLK_F_SEG_MAX)
SIZE_MAX = 1 << 20  # bytes per segment we announce (VIRTIO_BLK_F_SIZE_MAX)
ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES

# §5.2.3 feature bits
VIRTIO_BLK_F_SIZE_MAX = 1 << 1
VIRTIO_BLK_F_SEG_MAX = 1 << 2
VIRTIO_BLK_F_RO = 1 << 5
VIRTIO_BLK_F_BLK_SIZE = 1 << 6
VIRTIO_BLK_F_FLUSH = 1 << 9
VIRTIO_BLK_F_DISCARD = 1 << 13

# §5.2.6 request types and status
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

_HEADER = struct.Struct("<IIQ")
_DISCARD_SEG = struct.Struct("<QII")  # struct virtio_blk_discard_write_zeroes
MAX_DISCARD_SEG = 16
MAX_DISCARD_SECTORS = 1 << 22  # 2 GiB per segment
_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2


@dataclass
class DriveConfig:
    """One `--drive PATH[,ro][,serial=ID]`."""

    path: Path
    read_only: bool = False
    serial: str = ""

    @classmethod
    def parse(cls, spec: str) -> DriveConfig:
        path, *opts = spec.split(",")
        drive = cls(Path(path))
        for opt in opts:
            if opt in ("ro", "readonly"):
                drive.read_only = True
            elif opt.startswith("serial="):
                drive.serial = opt.removeprefix("serial=")
            else:
                raise ValueError(f"--drive {spec}: unknown option {opt!r} (ro, serial=ID)")
        return drive


class VirtioBlk(VirtioDevice):
    DEVICE_ID = VIRTIO_ID_BLOCK

    def __init__(self, path: str | Path, *, read_only: bool = False, serial: str = "",
                 name: str = "blk") -> None:  # fmt: skip
        self.path = Path(path)
        self.read_only = read_only
        self.fd = os.open(self.path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        size = os.fstat(self.fd).st_size
        self.capacity = size // SECTOR_SIZE  # in 512-byte sectors (§5.2.4)
        self.serial = (serial or self.path.name).encode()[:ID_BYTES]
        features = VIRTIO_BLK_F_SIZE_MAX | VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_BLK_SIZE
        features |= VIRTIO_BLK_F_FLUSH
        if read_only:
            features |= VIRTIO_BLK_F_RO
        else:
            features |= VIRTIO_BLK_F_DISCARD
        super().__init__(name, [QUEUE_SIZE], features)
        self.glog = GuestLog(log)  # this module's logger, rate-limited
        # Firecracker's block metrics (read by kvmkit.api.metrics): bytes and requests that
        # completed with VIRTIO_BLK_S_OK, flushes served.
        self.read_bytes = 0
        self.write_bytes = 0
        self.read_count = 0
        self.write_count = 0
        self.flush_count = 0

    def config_bytes(self) -> bytes:
        # struct virtio_blk_config (§5.2.4): capacity, size_max, seg_max, geometry,
        # blk_size, topology, writeback, unused0, num_queues, then the discard limits
        # (max_discard_sectors, max_discard_seg, discard_sector_alignment).
        return struct.pack(
            "<QIIHBBI8sBBHIII", self.capacity, SIZE_MAX, SEG_MAX, 0, 0, 0, SECTOR_SIZE,
            b"", 0, 0, 1, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1,
        )  # fmt: skip

    def describe_device(self) -> str:
        return (f"{self.path}: {self.read_count} reads, {self.write_count} writes, "
                f"{self.flush_count} flushes")

    # -- snapshots: the image is not in the snapshot; its identity is (docs/snapshot.md)
    def quiesce(self) -> None:
        # What the guest wrote reaches the disk before the snapshot exists: a restore in
        # another process (or after a host crash) sees the image the guest saw.
        if not self.read_only and self.fd >= 0:
            os.fdatasync(self.fd)

    def save_device(self) -> dict[str, Any]:
        return {
            "path": str(self.path.absolute()), "size": os.fstat(self.fd).st_size,
            "read_only": self.read_only, "serial": self.serial.decode("latin-1"),
        }  # fmt: skip

    @classmethod
    def check_device_state(cls, state: dict[str, Any], path: str) -> None:
        f = Fields(state, path)
        f.get_str("path", 4096)
        f.get_int("size", 0, 2**63 - 1)
        f.get_bool("read_only")
        f.get_str("serial", ID_BYTES)

    def restore_device(self, state: dict[str, Any], path: str) -> None:
        """The rebuilt drive must be the saved one: same image path and size, same options.
        The guest's page cache and file systems describe that image; another one would be
        corrupted by the restored guest."""
        f = Fields(state, path)
        saved_path = f.get_str("path", 4096)
        size = f.get_int("size", 0, 2**63 - 1)
        if saved_path != str(self.path.absolute()):
            raise SnapshotError(
                f"snapshot state: {path}: drive {saved_path} was restored as {self.path}"
            )
        now = os.fstat(self.fd).st_size
        if now != size:
            raise SnapshotError(
                f"drive {saved_path}: the image is {now} bytes, it was {size} when the "
                "snapshot was taken (another image?)"
            )
        if f.get_bool("read_only") != self.read_only:
            raise SnapshotError(f"snapshot state: {path}: drive read-only option differs")
        if f.get_str("serial", ID_BYTES).encode("latin-1", "replace") != self.serial:
            raise SnapshotError(f"snapshot state: {path}: drive serial differs")

    def close(self) -> None:
        super().close()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def process_queue(self, index: int, budget: Budget) -> None:
        assert self.mem is not None
        queue = self.queues[index]
        done = False
        while budget.take() and (chain := queue.pop(self.mem)) is not None:
            written = self.handle(chain)
            self.complete(index, chain.head, written)
            done = True
        if done:
            self.signal_used(index)

    def handle(self, chain: DescriptorChain) -> int:
        """Serve one request; return the bytes written into its device-writable part."""
        assert self.mem is not None
        # §5.2.6.1: the header is the first 16 device-readable bytes; the status byte is
        # the last device-writable byte. A chain without them is malformed.
        header = self._gather(chain.readable, _HEADER.size)
        if len(header) < _HEADER.size or not chain.writable or chain.writable[-1].length < 1:
            raise QueueError("virtio-blk request without header or status byte")
        rtype, _, sector = _HEADER.unpack(header)
        status_buf = chain.writable[-1]
        status_addr = status_buf.addr + status_buf.length - 1
        data_out = iov.skip(chain.readable, _HEADER.size)
        data_in = [*chain.writable[:-1]]
        if status_buf.length > 1:
            data_in.append(Buffer(status_buf.addr, status_buf.length - 1, True))
        written = 0
        try:
            if rtype == VIRTIO_BLK_T_IN:
                status, written = self._read(sector, data_in)
                if status == VIRTIO_BLK_S_OK:
                    self.read_count += 1
                    self.read_bytes += written
            elif rtype == VIRTIO_BLK_T_OUT:
                status = self._write(sector, data_out)
                if status == VIRTIO_BLK_S_OK:
                    self.write_count += 1
                    self.write_bytes += sum(b.length for b in data_out)
            elif rtype == VIRTIO_BLK_T_FLUSH:
                status = VIRTIO_BLK_S_OK
                if not self.read_only:
                    os.fdatasync(self.fd)
                self.flush_count += 1
            elif rtype == VIRTIO_BLK_T_DISCARD and not self.read_only:
                status = self._discard(data_out)
            elif rtype == VIRTIO_BLK_T_GET_ID:
                status, written = self._get_id(data_in)
            else:
                status = VIRTIO_BLK_S_UNSUPP
        except OSError as err:
            self.glog.warning("virtio %s: %s: I/O error: %s", self.name, self.path, err)
            status = VIRTIO_BLK_S_IOERR
        self.mem.write_u8(status_addr, status)
        return written + 1

    def _in_range(self, sector: int, length: int) -> bool:
        # §5.2.6.2: requests are whole sectors, inside the disk.
        return length % SECTOR_SIZE == 0 and sector + length // SECTOR_SIZE <= self.capacity

    def _read(self, sector: int, bufs: list[Buffer]) -> tuple[int, int]:
        assert self.mem is not None
        total = sum(b.length for b in bufs)
        if not self._in_range(sector, total):
            return VIRTIO_BLK_S_IOERR, 0
        views = [self.mem.view(b.addr, b.length, write=True) for b in bufs if b.length]
        offset, done = sector * SECTOR_SIZE, 0
        while done < total:
            n = os.preadv(self.fd, _tail(views, done), offset + done)
            if n <= 0:
                return VIRTIO_BLK_S_IOERR, done
            done += n
        return VIRTIO_BLK_S_OK, total

    def _write(self, sector: int, bufs: list[Buffer]) -> int:
        assert self.mem is not None
        if self.read_only:
            return VIRTIO_BLK_S_IOERR
        total = sum(b.length for b in bufs)
        if not self._in_range(sector, total):
            return VIRTIO_BLK_S_IOERR
        views = [self.mem.view(b.addr, b.length) for b in bufs if b.length]
        offset, done = sector * SECTOR_SIZE, 0
        while done < total:
            n = os.pwritev(self.fd, _tail(views, done), offset + done)
            if n <= 0:
                return VIRTIO_BLK_S_IOERR
            done += n
        return VIRTIO_BLK_S_OK

    def _discard(self, bufs: list[Buffer]) -> int:
        """§5.2.6: an array of {sector, num_sectors, flags}; the range is deallocated in the
        image (a hole) where the host file system can, which reads back as zeros."""
        total = sum(b.length for b in bufs)
        if total == 0 or total % _DISCARD_SEG.size or total // _DISCARD_SEG.size > MAX_DISCARD_SEG:
            return VIRTIO_BLK_S_IOERR
        raw = self._gather(bufs, total)
        segments = [_DISCARD_SEG.unpack_from(raw, i) for i in range(0, total, _DISCARD_SEG.size)]
        for sector, count, flags in segments:
            # §5.2.6.2: unknown flags make the command unsupported; ranges must be inside
            # the disk and within max_discard_sectors.
            if flags & ~1:
                return VIRTIO_BLK_S_UNSUPP
            if count > MAX_DISCARD_SECTORS or not self._in_range(sector, count * SECTOR_SIZE):
                return VIRTIO_BLK_S_IOERR
        for sector, count, _ in segments:
            err = _punch_hole(self.fd, sector * SECTOR_SIZE, count * SECTOR_SIZE)
            if err:
                self.glog.debug("virtio %s: discard: fallocate: %s", self.name, os.strerror(err))
        return VIRTIO_BLK_S_OK

    def _get_id(self, bufs: list[Buffer]) -> tuple[int, int]:
        assert self.mem is not None
        # §5.2.6: the ID is up to 20 bytes, NUL-padded when shorter.
        data = self.serial.ljust(ID_BYTES, b"\0")
        written = 0
        for b in bufs:
            chunk = data[written : written + b.length]
            if not chunk:
                break
            self.mem.write(b.addr, chunk)
            written += len(chunk)
        return VIRTIO_BLK_S_OK, written

    def _gather(self, bufs: list[Buffer], length: int) -> bytes:
        assert self.mem is not None
        out = b""
        for b in bufs:
            if len(out) >= length:
                break
            out += self.mem.read(b.addr, min(b.length, length - len(out)))
        return out


def _punch_hole(fd: int, offset: int, length: int) -> int:
    """fallocate(PUNCH_HOLE | KEEP_SIZE); a file system without holes keeps the data (a
    discard is a hint, §5.2.6.2). Returns the errno, 0 on success."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    mode = _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE
    if libc.fallocate(fd, mode, ctypes.c_int64(offset), ctypes.c_int64(length)) != 0:
        return ctypes.get_errno()
    return 0



def _tail(views: list[memoryview], skip: int) -> list[memoryview]:
    out = []
    for v in views:
        if skip >= len(v):
            skip -= len(v)
            continue
        out.append(v[skip:])
        skip = 0
    return out
