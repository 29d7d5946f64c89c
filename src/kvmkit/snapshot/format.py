"""The snapshot state file: a fixed header, a JSON payload, a CRC32.

    offset  size  field
    0       8     magic  b"KVMKSNAP"
    8       4     format version (little-endian u32), currently 1
    12      8     architecture tag, NUL-padded ASCII (b"x86_64\\0\\0")
    20      8     payload length in bytes (little-endian u64), at most MAX_PAYLOAD
    28      n     payload: UTF-8 JSON of plain data (dicts, lists, ints, strings, bools);
                  binary blobs (kernel structures, the XSAVE area) as base64 strings
    28+n    4     CRC32 (zlib.crc32, IEEE 802.3 polynomial) of bytes 0 .. 28+n

Snapshot files are hostile input: every length is checked against a cap and the file size
before anything is allocated, the checksum covers header and payload, and nothing is ever
unpickled. Any problem raises `SnapshotError` (a `UserError`: one line, exit status 2) before
a VM is touched, because `read_state` is the first step of every restore.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import struct
import zlib
from typing import Any

from kvmkit.errors import UserError

MAGIC = b"KVMKSNAP"
FORMAT_VERSION = 1
ARCH_X86_64 = b"x86_64"
HEADER = struct.Struct("<8sI8sQ")
TRAILER = struct.Struct("<I")
# A state file describes registers and device state, not memory: 64 MiB is far more than
# any real one needs (a 1-vCPU VM is ~30 KiB) and bounds what a hostile file can make us read.
MAX_PAYLOAD = 64 << 20
# JSON nesting deeper than this is not something kvmkit writes.
MAX_DEPTH = 32


class SnapshotError(UserError):
    """A snapshot file is unusable (truncated, corrupted, other version or architecture,
    oversized, malformed); nothing has been restored."""


def encode(state: dict[str, Any], *, arch: bytes = ARCH_X86_64,
           version: int = FORMAT_VERSION) -> bytes:  # fmt: skip
    """The complete state file for `state` (plain data only; bytes become base64 via b64())."""
    payload = json.dumps(state, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    if len(payload) > MAX_PAYLOAD:
        raise SnapshotError(f"snapshot state of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    header = HEADER.pack(MAGIC, version, arch.ljust(8, b"\0"), len(payload))
    body = header + payload
    return body + TRAILER.pack(zlib.crc32(body))


def decode(
    data: bytes, *, arch: bytes = ARCH_X86_64, what: str = "snapshot state"
) -> dict[str, Any]:
    """Check and parse a state file; only `SnapshotError` escapes for any input."""
    if len(data) < HEADER.size + TRAILER.size:
        raise SnapshotError(f"{what}: truncated ({len(data)} bytes, not even a header)")
    magic, version, file_arch, length = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise SnapshotError(f"{what}: not a kvmkit snapshot (bad magic {magic!r})")
    if version != FORMAT_VERSION:
        raise SnapshotError(
            f"{what}: format version {version}, this kvmkit reads version {FORMAT_VERSION}"
        )
    if file_arch.rstrip(b"\0") != arch:
        shown = file_arch.rstrip(b"\0").decode("ascii", "replace")
        raise SnapshotError(
            f"{what}: made for architecture {shown!r}, this host is {arch.decode()}"
        )
    if length > MAX_PAYLOAD:
        raise SnapshotError(f"{what}: payload of {length} bytes exceeds the {MAX_PAYLOAD} cap")
    end = HEADER.size + length
    if len(data) < end + TRAILER.size:
        raise SnapshotError(
            f"{what}: truncated ({len(data)} bytes, header says {end + TRAILER.size})"
        )
    if len(data) > end + TRAILER.size:
        raise SnapshotError(f"{what}: {len(data) - end - TRAILER.size} bytes after the checksum")
    (crc,) = TRAILER.unpack_from(data, end)
    if zlib.crc32(data[:end]) != crc:
        raise SnapshotError(f"{what}: checksum mismatch (the file is corrupted)")
    try:
        state = json.loads(data[HEADER.size : end].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise SnapshotError(f"{what}: malformed payload ({err})") from None
    if not isinstance(state, dict):
        raise SnapshotError(f"{what}: payload is not an object")
    _check_depth(state, what)
    return state


def _check_depth(value: Any, what: str) -> None:
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise SnapshotError(f"{what}: payload nested deeper than {MAX_DEPTH}")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def write_state(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Write atomically (temporary file, fsync, rename): a crash never leaves half a file."""
    data = encode(state)
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        # ENOSPC, EIO, a signal: the temporary file goes, nothing is under `path`
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            limit = HEADER.size + MAX_PAYLOAD + TRAILER.size
            if size > limit:
                raise SnapshotError(f"{os.fspath(path)}: {size} bytes, larger than any state file")
            data = f.read(limit + 1)
    except OSError as err:
        raise SnapshotError(f"cannot read {os.fspath(path)}: {err.strerror}") from None
    return decode(data, what=os.fspath(path))


# -- typed access to the decoded payload (every reader checks type and range)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class Fields:
    """Checked accessors on one JSON object of the payload; errors name the path."""

    def __init__(self, obj: Any, path: str) -> None:
        if not isinstance(obj, dict):
            raise SnapshotError(f"snapshot state: {path} must be an object")
        self.obj: dict[str, Any] = obj
        self.path = path

    def _get(self, key: str) -> Any:
        if key not in self.obj:
            raise SnapshotError(f"snapshot state: {self.path}.{key} is missing")
        return self.obj[key]

    def has(self, key: str) -> bool:
        return key in self.obj

    def get_int(self, key: str, lo: int = 0, hi: int = 2**64 - 1) -> int:
        v = self._get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise SnapshotError(f"snapshot state: {self.path}.{key} must be an integer in "
                                f"[{lo}, {hi}]")  # fmt: skip
        return v

    def get_bool(self, key: str) -> bool:
        v = self._get(key)
        if not isinstance(v, bool):
            raise SnapshotError(f"snapshot state: {self.path}.{key} must be true or false")
        return v

    def get_str(self, key: str, max_len: int = 4096) -> str:
        v = self._get(key)
        if not isinstance(v, str) or len(v) > max_len:
            raise SnapshotError(f"snapshot state: {self.path}.{key} must be a string")
        return v

    def get_blob(self, key: str, size: int | None = None, max_size: int = 1 << 20) -> bytes:
        v = self._get(key)
        if not isinstance(v, str) or len(v) > (max_size + 2) // 3 * 4:
            raise SnapshotError(f"snapshot state: {self.path}.{key} must be base64 data")
        try:
            data = base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise SnapshotError(f"snapshot state: {self.path}.{key} is not valid base64") from None
        if size is not None and len(data) != size:
            raise SnapshotError(
                f"snapshot state: {self.path}.{key} has {len(data)} bytes, expected {size}"
            )
        return data

    def get_list(self, key: str, max_len: int = 65536) -> list[Any]:
        v = self._get(key)
        if not isinstance(v, list) or len(v) > max_len:
            raise SnapshotError(f"snapshot state: {self.path}.{key} must be a list "
                                f"of at most {max_len} items")  # fmt: skip
        return v

    def get_obj(self, key: str) -> Fields:
        return Fields(self._get(key), f"{self.path}.{key}")

    def get_ints(self, key: str, max_len: int = 65536, width: int = 64) -> list[int]:
        items = self.get_list(key, max_len)
        hi = 2**width - 1
        for v in items:
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= hi:
                raise SnapshotError(f"snapshot state: {self.path}.{key} must hold integers")
        return items
