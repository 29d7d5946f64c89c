"""A one-file FUSE file system for tests of disk-backed devices: a real file whose reads,
writes and syncs the test can hold, delay or fail, so that a virtio-blk image can be a slow
or failing disk without a device-mapper target (which the build hosts lack).

    with FuseFile(tmp_path / "mnt", size=1 << 20) as f:
        blk = VirtioBlk(f.path)          # /…/mnt/disk.img, served by this process
        f.hold()                         # data requests wait until f.release()
        f.fail(errno.EIO)                # or fail with an errno (ENOSPC, EIO ...)

Speaks the kernel's FUSE protocol on /dev/fuse directly (linux/fuse.h, protocol 7.31; the
kernel's Documentation/filesystems/fuse.rst), no libfuse: the root directory holds `disk.img`
(contents in memory), opened with FOPEN_DIRECT_IO so every read and write reaches this server
instead of the page cache. Each data request (READ, WRITE, FSYNC) is answered on a thread of
its own, so a held request does not stop the others. Needs root (mount(2)) and /dev/fuse.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import threading
import time
from pathlib import Path
from types import TracebackType

# linux/fuse.h opcodes
FUSE_LOOKUP, FUSE_FORGET, FUSE_GETATTR, FUSE_SETATTR = 1, 2, 3, 4
FUSE_OPEN, FUSE_READ, FUSE_WRITE, FUSE_STATFS, FUSE_RELEASE = 14, 15, 16, 17, 18
FUSE_FSYNC, FUSE_FLUSH, FUSE_INIT, FUSE_OPENDIR, FUSE_READDIR = 20, 25, 26, 27, 28
FUSE_RELEASEDIR, FUSE_ACCESS, FUSE_INTERRUPT, FUSE_DESTROY = 29, 34, 36, 38
FUSE_BATCH_FORGET, FUSE_FALLOCATE = 42, 43
FOPEN_DIRECT_IO = 1 << 0
FUSE_BIG_WRITES = 1 << 5
FUSE_MAX_PAGES = 1 << 22
ROOT_ID, FILE_ID = 1, 2
NAME = "disk.img"
MAX_WRITE = 1 << 20

_IN_HEADER = struct.Struct("<IIQQIIIHH")  # fuse_in_header (40 bytes)
_OUT_HEADER = struct.Struct("<IiQ")  # fuse_out_header
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # fuse_attr (88 bytes)
_INIT_IN = struct.Struct("<IIII")  # major, minor, max_readahead, flags
_INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # fuse_init_out (64 bytes)
_RW_IN = struct.Struct("<QQII")  # fuse_read_in / fuse_write_in: fh, offset, size, flags
_SETATTR_IN = struct.Struct("<IIQQ")  # valid, padding, fh, size
FATTR_SIZE = 1 << 3
MS_NOSUID, MS_NODEV, MNT_DETACH = 2, 4, 2


class FuseFile:
    """A mounted FUSE file system with one file, `path`, of `size` bytes (zeros)."""

    def __init__(self, mountpoint: Path, size: int) -> None:
        self.mountpoint = mountpoint
        self.path = mountpoint / NAME
        self.data = bytearray(size)
        self._lock = threading.Lock()
        self._gate = threading.Event()
        self._gate.set()
        self._errno = 0
        self.delay = 0.0  # seconds each data request takes
        self.waiting = 0  # data requests held at the gate now
        self.requests = 0  # data requests seen
        self._fd = -1
        self._thread: threading.Thread | None = None

    # -- what a test controls
    def hold(self) -> None:
        """Data requests arriving from now on wait until `release()`."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def fail(self, err: int) -> None:
        """Answer data requests with this errno from now on (0: succeed again)."""
        self._errno = err

    def wait_waiting(self, count: int = 1, timeout: float = 10.0) -> bool:
        """Wait until `count` data requests are held at the gate."""
        deadline = time.monotonic() + timeout
        while self.waiting < count:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.005)
        return True

    # -- mounting
    def __enter__(self) -> FuseFile:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self._fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        libc = ctypes.CDLL(None, use_errno=True)
        opts = f"fd={self._fd},rootmode=40000,user_id=0,group_id=0,allow_other".encode()
        if libc.mount(b"kvmkit-fuse", os.fsencode(self.mountpoint), b"fuse",
                      MS_NOSUID | MS_NODEV, opts) != 0:  # fmt: skip
            err = ctypes.get_errno()
            os.close(self._fd)
            raise OSError(err, f"mount fuse on {self.mountpoint}: {os.strerror(err)}")
        self._thread = threading.Thread(target=self._serve, name="fusefile", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:  # fmt: skip
        self.close()

    def close(self) -> None:
        self.release()
        if self._fd < 0:
            return
        libc = ctypes.CDLL(None, use_errno=True)
        libc.umount2(os.fsencode(self.mountpoint), MNT_DETACH)
        if self._thread is not None:
            self._thread.join(5)
        os.close(self._fd)
        self._fd = -1

    # -- the protocol
    def _reply(self, unique: int, payload: bytes = b"", error: int = 0) -> None:
        try:
            os.write(self._fd, _OUT_HEADER.pack(_OUT_HEADER.size + len(payload), -error, unique)
                     + payload)  # fmt: skip
        except OSError:
            pass  # ENOENT: the request was interrupted; EBADF/ENODEV: unmounted

    def _attr(self, node: int) -> bytes:
        if node == ROOT_ID:
            mode, size, nlink = stat.S_IFDIR | 0o755, 0, 2
        else:
            mode, size, nlink = stat.S_IFREG | 0o644, len(self.data), 1
        return _ATTR.pack(node, size, (size + 511) // 512, 0, 0, 0, 0, 0, 0, mode, nlink,
                          0, 0, 0, 4096, 0)  # fmt: skip

    def _serve(self) -> None:
        while True:
            try:
                raw = os.read(self._fd, MAX_WRITE + 4096)
            except OSError as err:
                if err.errno in (errno.EINTR, errno.EAGAIN, errno.ENOENT):
                    continue
                return  # ENODEV: unmounted
            length, opcode, unique, node, *_ = _IN_HEADER.unpack_from(raw)
            body = raw[_IN_HEADER.size : length]
            if opcode in (FUSE_READ, FUSE_WRITE, FUSE_FSYNC):
                threading.Thread(target=self._data, args=(opcode, unique, body),
                                 daemon=True).start()  # fmt: skip
            elif opcode == FUSE_DESTROY:
                self._reply(unique)
                return
            else:
                self._meta(opcode, unique, node, body)

    def _meta(self, opcode: int, unique: int, node: int, body: bytes) -> None:
        if opcode == FUSE_INIT:
            _, _, readahead, _ = _INIT_IN.unpack_from(body)
            self._reply(unique, _INIT_OUT.pack(7, 31, readahead, FUSE_BIG_WRITES | FUSE_MAX_PAGES,
                                               16, 12, MAX_WRITE, 1, MAX_WRITE // 4096, 0, 0))
        elif opcode == FUSE_LOOKUP:
            if node == ROOT_ID and body.rstrip(b"\0") == NAME.encode():
                self._reply(unique, struct.pack("<QQQQII", FILE_ID, 0, 1, 1, 0, 0)
                            + self._attr(FILE_ID))  # fmt: skip
            else:
                self._reply(unique, error=errno.ENOENT)
        elif opcode == FUSE_GETATTR:
            self._reply(unique, struct.pack("<QII", 1, 0, 0) + self._attr(node))
        elif opcode == FUSE_SETATTR:
            valid, _, _, size = _SETATTR_IN.unpack_from(body)
            if valid & FATTR_SIZE and node == FILE_ID:
                with self._lock:
                    del self.data[size:]
                    self.data.extend(bytes(size - len(self.data)))
            self._reply(unique, struct.pack("<QII", 1, 0, 0) + self._attr(node))
        elif opcode in (FUSE_OPEN, FUSE_OPENDIR):
            self._reply(unique, struct.pack("<QII", 1, FOPEN_DIRECT_IO if opcode == FUSE_OPEN
                                            else 0, 0))  # fmt: skip
        elif opcode in (FUSE_RELEASE, FUSE_RELEASEDIR, FUSE_FLUSH, FUSE_ACCESS):
            self._reply(unique)
        elif opcode == FUSE_READDIR:
            self._reply(unique)  # an empty listing: tests open the file by name
        elif opcode == FUSE_STATFS:
            self._reply(unique, struct.pack("<QQQQQIII28x", 1 << 20, 1 << 19, 1 << 19, 16, 15,
                                            4096, 255, 4096))  # fmt: skip
        elif opcode in (FUSE_FORGET, FUSE_BATCH_FORGET, FUSE_INTERRUPT):
            pass  # no reply (linux/fuse.h)
        else:
            self._reply(unique, error=errno.ENOSYS)

    def _data(self, opcode: int, unique: int, body: bytes) -> None:
        self.requests += 1
        if not self._gate.is_set():
            with self._lock:
                self.waiting += 1
            self._gate.wait()
            with self._lock:
                self.waiting -= 1
        if self.delay:
            time.sleep(self.delay)
        if self._errno:
            self._reply(unique, error=self._errno)
            return
        if opcode == FUSE_FSYNC:
            self._reply(unique)
            return
        _, offset, size, _ = _RW_IN.unpack_from(body)
        with self._lock:
            if opcode == FUSE_READ:
                out = bytes(self.data[offset : offset + size])
            else:
                data = body[40 : 40 + size]  # after fuse_write_in (40 bytes)
                end = min(offset + len(data), len(self.data))  # the file does not grow
                self.data[offset:end] = data[: max(0, end - offset)]
                out = struct.pack("<II", max(0, end - offset), 0)
        self._reply(unique, out)
