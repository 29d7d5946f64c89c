"""The migration stream: addresses, the preamble, checksummed frames, page batches.

Everything read here comes from the other end of a socket and is checked before use: every
length against a cap for its frame type before anything is allocated, every frame's CRC32,
every page address against the destination's guest memory. docs/migration.md has the wire
format; in short:

    preamble   8 bytes magic b"KVMKMIGR", u32 protocol version, 8 bytes architecture tag
               (each side sends one; the destination answers the source's)
    frame      u16 type, u16 flags (0), u32 payload length, u32 CRC32 of the first 8 bytes
               of the header and the payload (zlib.crc32, IEEE 802.3), then the payload

All integers little-endian.
"""

from __future__ import annotations

import array
import enum
import fcntl
import json
import os
import socket
import struct
import sys
import time
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kvmkit.errors import UserError
from kvmkit.memory import PAGE_SIZE, GuestMemory, GuestMemoryError, MemoryRegion
from kvmkit.snapshot.format import ARCH_X86_64, HEADER, MAX_PAYLOAD, TRAILER
from kvmkit.unixsock import remove_stale_socket

MAGIC = b"KVMKMIGR"
PROTOCOL_VERSION = 1
PREAMBLE = struct.Struct("<8sI8s")
FRAME = struct.Struct("<HHII")
_CRC_SPAN = 8  # the header's bytes before its CRC field
# Pages per PAGES frame: 1 MiB of page data at most, so a frame is quick to check and the
# sender's rate limiter works in small steps.
MAX_BATCH = 256
ZERO_FLAG = 1  # low bit of a page address: the page is all zeros, no data follows
_ADDR_FLAGS = PAGE_SIZE - 1
ZERO_PAGE = bytes(PAGE_SIZE)
_COUNT = struct.Struct("<I")
JSON_CAP = 1 << 20
SOCKET_BUFFER = 4 << 20


class Kind(enum.IntEnum):
    """Frame types (docs/migration.md, "Frames")."""

    SETUP = 1  # source -> destination, JSON: what to build, memory layout
    READY = 2  # destination -> source, JSON: memory allocated, send pages
    PAGES = 3  # source -> destination: a batch of pages
    ROUND = 4  # source -> destination, JSON: a pre-copy round ended (progress only)
    STATE = 5  # source -> destination: the state, in the snapshot state-file format
    PREPARED = 6  # destination -> source, JSON: state checked, release the host devices
    HANDOVER = 7  # source -> destination, JSON: host devices released, take them
    ACK = 8  # destination -> source, JSON: the guest is the destination's now
    ERROR = 9  # either way, UTF-8 text: the reason the stream ends


# The largest payload each frame type may have; anything larger ends the stream before a
# byte of it is read.
MAX_LENGTH = {
    Kind.SETUP: JSON_CAP,
    Kind.READY: JSON_CAP,
    Kind.PAGES: _COUNT.size + MAX_BATCH * (8 + PAGE_SIZE),
    Kind.ROUND: JSON_CAP,
    Kind.STATE: HEADER.size + MAX_PAYLOAD + TRAILER.size,
    Kind.PREPARED: JSON_CAP,
    Kind.HANDOVER: JSON_CAP,
    Kind.ACK: JSON_CAP,
    Kind.ERROR: 4096,
}


class MigrationError(UserError):
    """A migration failed: the connection, the other side's refusal (`remote`), or a
    malformed stream. On the source the guest runs on; on the destination nothing ran."""

    def __init__(self, message: str, *, remote: bool = False) -> None:
        super().__init__(message)
        self.remote = remote


# -- addresses


@dataclass(frozen=True)
class Address:
    """`unix:PATH` or `tcp:HOST:PORT` (an IPv6 host in brackets: `tcp:[::1]:4444`)."""

    scheme: str
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def parse_address(text: str) -> Address:
    """UserError for anything but `unix:PATH` (PATH non-empty) or `tcp:HOST:PORT`."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path or "\0" in path or len(os.fsencode(path)) > 107:  # sun_path is 108 bytes
            raise UserError(f"{text!r}: a unix: address needs a socket path (at most 107 bytes)")
        return Address("unix", path=path)
    if text.startswith("tcp:"):
        rest = text[4:]
        host, sep, port_text = rest.rpartition(":")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        # ASCII digits, few enough for int(): str.isdigit() also takes "²", and int()
        # refuses more than 4300 digits (both raised ValueError from here).
        digits = port_text.lstrip("0") or "0"
        port_ok = port_text.isascii() and port_text.isdigit() and len(digits) <= 5
        if not sep or not host or not port_ok or not 0 <= int(digits) <= 65535:
            raise UserError(f"{text!r}: expected tcp:HOST:PORT (PORT 0-65535)")
        return Address("tcp", host=host, port=int(digits))
    raise UserError(f"{text!r}: a migration address is unix:PATH or tcp:HOST:PORT")


def connect(address: Address, timeout: float) -> socket.socket:
    try:
        if address.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(address.path)
        else:
            sock = socket.create_connection((address.host, address.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as err:
        raise MigrationError(f"cannot connect to {address}: {err.strerror or err}") from None
    return sock


def listen(address: Address) -> socket.socket:
    """A listening socket; a stale Unix socket file is replaced, a served one refused."""
    try:
        if address.scheme == "unix":
            remove_stale_socket(address.path)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(address.path)
        else:
            infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
            family, _, _, _, sockaddr = infos[0]
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
        sock.listen(1)
    except OSError as err:
        raise MigrationError(f"cannot listen on {address}: {err.strerror or err}") from None
    return sock


def bound_address(sock: socket.socket, address: Address) -> Address:
    """The address a listener got (tcp: port 0 becomes the port the kernel chose)."""
    if address.scheme == "tcp":
        return Address("tcp", host=address.host, port=sock.getsockname()[1])
    return address


# -- frames


class Channel:
    """Frames over a connected socket. Receiving checks the type, the length cap and the
    CRC before the payload is used; every failure is a MigrationError."""

    def __init__(self, sock: socket.socket, peer: str, timeout: float = 60.0) -> None:
        self.sock = sock
        self.peer = peer
        self.sock.settimeout(timeout)
        self.bytes_sent = 0
        # Room for a few PAGES frames in flight: with the default buffers (a few hundred
        # KiB) sender and receiver take turns instead of working at the same time. The
        # kernel caps the request (net.core.wmem_max/rmem_max); that is fine too.
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)
            except OSError:
                pass

    def settimeout(self, timeout: float) -> None:
        self.sock.settimeout(timeout)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    # -- raw I/O
    def _send_parts(self, parts: Sequence[bytes | memoryview]) -> None:
        total = sum(len(p) for p in parts)
        try:
            pending = [memoryview(p) for p in parts]
            sent = 0
            while sent < total:
                n = self.sock.sendmsg(pending)
                sent += n
                while n and pending:
                    if n >= len(pending[0]):
                        n -= len(pending[0])
                        pending.pop(0)
                    else:
                        pending[0] = pending[0][n:]
                        n = 0
        except TimeoutError:
            raise MigrationError(f"{self.peer} stopped reading (timed out)") from None
        except OSError as err:
            raise MigrationError(f"connection to {self.peer} lost: {err.strerror or err}") from None
        self.bytes_sent += total

    def _recv_exact(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        try:
            while got < n:
                k = self.sock.recv_into(view[got:])
                if k == 0:
                    raise MigrationError(
                        f"{self.peer} closed the connection"
                        + (f" in the middle of a frame ({got} of {n} bytes)" if got else "")
                    )
                got += k
        except TimeoutError:
            raise MigrationError(f"{self.peer} sent nothing for too long (timed out)") from None
        except OSError as err:
            raise MigrationError(f"connection to {self.peer} lost: {err.strerror or err}") from None
        return buf

    # -- preamble
    def send_preamble(self) -> None:
        self._send_parts([PREAMBLE.pack(MAGIC, PROTOCOL_VERSION, ARCH_X86_64.ljust(8, b"\0"))])

    def read_preamble(self) -> int:
        """The peer's protocol version, after checking magic and architecture."""
        magic, version, arch = PREAMBLE.unpack(self._recv_exact(PREAMBLE.size))
        if magic != MAGIC:
            raise MigrationError(f"{self.peer} does not speak kvmkit's migration protocol")
        if arch.rstrip(b"\0") != ARCH_X86_64:
            shown = arch.rstrip(b"\0").decode("ascii", "replace")
            raise MigrationError(f"{self.peer} migrates {shown!r} guests; this is x86_64")
        return int(version)

    # -- frames
    def send(self, kind: Kind, *parts: bytes | memoryview) -> None:
        length = sum(len(p) for p in parts)
        if length > MAX_LENGTH[kind]:
            raise MigrationError(f"{kind.name} frame of {length} bytes exceeds its cap")
        head = struct.pack("<HHI", int(kind), 0, length)
        crc = zlib.crc32(head)
        for p in parts:
            crc = zlib.crc32(p, crc)
        self._send_parts([head + struct.pack("<I", crc), *parts])

    def send_json(self, kind: Kind, value: Any) -> None:
        self.send(kind, json.dumps(value, separators=(",", ":"), allow_nan=False).encode())

    def send_error(self, reason: str) -> None:
        """Best effort: the peer may be gone already."""
        try:
            self.send(Kind.ERROR, reason.encode("utf-8", "replace")[: MAX_LENGTH[Kind.ERROR]])
        except MigrationError:
            pass

    def recv(self, expect: Iterable[Kind]) -> tuple[Kind, bytearray]:
        """The next frame, which must be one of `expect` (or ERROR: raised as the peer's
        refusal)."""
        wanted = set(expect)
        head = self._recv_exact(FRAME.size)
        raw_kind, flags, length, crc = FRAME.unpack(head)
        try:
            kind = Kind(raw_kind)
        except ValueError:
            raise MigrationError(f"{self.peer} sent a frame of unknown type {raw_kind}") from None
        if kind is not Kind.ERROR and kind not in wanted:
            names = "/".join(sorted(k.name for k in wanted))
            raise MigrationError(f"{self.peer} sent {kind.name} where {names} was due")
        if flags:
            raise MigrationError(f"{self.peer} sent a {kind.name} frame with flags {flags:#x}")
        if length > MAX_LENGTH[kind]:
            raise MigrationError(
                f"{self.peer} sent a {kind.name} frame of {length} bytes, over its "
                f"{MAX_LENGTH[kind]}-byte cap"
            )
        payload = self._recv_exact(length)
        if zlib.crc32(payload, zlib.crc32(head[:_CRC_SPAN])) != crc:
            raise MigrationError(f"{self.peer}: {kind.name} frame checksum mismatch (corrupted)")
        if kind is Kind.ERROR:
            text = payload.decode("utf-8", "replace").strip() or "no reason given"
            raise MigrationError(f"{self.peer} refused: {text}", remote=True)
        return kind, payload

    def recv_json(self, expect: Kind) -> dict[str, Any]:
        _, payload = self.recv([expect])
        return parse_json(payload, f"{self.peer}: {expect.name}")

    def peek_error(self, wait: float = 1.0) -> str | None:
        """After a failed send: the ERROR frame the peer sent before it closed, if any."""
        try:
            self.sock.settimeout(wait)
            self.recv([])
        except MigrationError as err:
            return str(err) if err.remote else None
        except OSError:
            return None
        return None


def parse_json(payload: bytes | bytearray, what: str) -> dict[str, Any]:
    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        value = json.loads(bytes(payload).decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise MigrationError(f"{what}: malformed JSON ({err})") from None
    if not isinstance(value, dict):
        raise MigrationError(f"{what}: not a JSON object")
    return value


# -- page batches


class PageBatch:
    """Builds PAGES frames: addresses (with the zero flag) and the data of non-zero pages."""

    def __init__(self) -> None:
        self.addrs = array.array("Q")
        self.data: list[bytes] = []
        self.zero = 0

    def __len__(self) -> int:
        return len(self.addrs)

    def add(self, gpa: int, page: bytes) -> None:
        if page == ZERO_PAGE:
            self.addrs.append(gpa | ZERO_FLAG)
            self.zero += 1
        else:
            self.addrs.append(gpa)
            self.data.append(page)

    def add_zero(self, gpa: int) -> None:
        self.addrs.append(gpa | ZERO_FLAG)
        self.zero += 1

    def parts(self) -> list[bytes]:
        if sys.byteorder != "little":
            self.addrs.byteswap()
        return [_COUNT.pack(len(self.addrs)), self.addrs.tobytes(), *self.data]

    @property
    def wire_bytes(self) -> int:
        return FRAME.size + _COUNT.size + 8 * len(self.addrs) + PAGE_SIZE * len(self.data)


class PageSink:
    """The destination's side of PAGES frames: every address checked against the guest
    memory the destination built, then the page written (or zeroed) in place."""

    def __init__(self, mem: GuestMemory) -> None:
        self.mem = mem
        # Pages written so far: a zero marker for a page never written needs no work (the
        # destination's fresh memory reads zero), and skipping it keeps it unallocated.
        self.written = {id(r): bytearray((r.size // PAGE_SIZE + 7) // 8) for r in mem.regions}
        self.pages = 0
        self.zero_pages = 0
        # Regions whose memfd can be written directly: shared and on base pages (hugetlbfs
        # takes no write(2)); the others are written through their mapping.
        self.write_fd = {
            id(r): r.fd for r in mem.regions
            if r.fd >= 0 and not getattr(r, "huge_page_size", 0)
            and fcntl.fcntl(r.fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        }  # fmt: skip

    def apply(self, payload: bytearray, peer: str) -> None:
        if len(payload) < _COUNT.size:
            raise MigrationError(f"{peer}: PAGES frame too short")
        (count,) = _COUNT.unpack_from(payload)
        if not 1 <= count <= MAX_BATCH:
            raise MigrationError(f"{peer}: PAGES frame with {count} pages (1-{MAX_BATCH})")
        table_end = _COUNT.size + 8 * count
        if len(payload) < table_end:
            raise MigrationError(f"{peer}: PAGES frame shorter than its address table")
        addrs = array.array("Q", bytes(payload[_COUNT.size : table_end]))
        if sys.byteorder != "little":
            addrs.byteswap()
        data_pages = sum(1 for a in addrs if not a & ZERO_FLAG)
        if len(payload) != table_end + data_pages * PAGE_SIZE:
            raise MigrationError(
                f"{peer}: PAGES frame of {len(payload)} bytes for {count} pages, "
                f"{data_pages} with data"
            )
        view = memoryview(payload)
        at = table_end
        # Consecutive data pages of one region go into guest memory with one pwritev on
        # its memfd (no page fault per page on first touch), or through the mapping.
        run: list[memoryview] = []
        run_region: MemoryRegion | None = None
        run_start = run_end = 0
        for entry in addrs:
            flags, gpa = entry & _ADDR_FLAGS, entry & ~_ADDR_FLAGS
            if flags & ~ZERO_FLAG:
                raise MigrationError(f"{peer}: page {gpa:#x} with unknown flags {flags:#x}")
            try:
                region = self.mem.region_for(gpa, PAGE_SIZE)
            except GuestMemoryError:
                raise MigrationError(
                    f"{peer}: page {gpa:#x} is outside this guest's memory"
                ) from None
            off = gpa - region.guest_phys_addr
            page = off // PAGE_SIZE
            written = self.written[id(region)]
            if flags & ZERO_FLAG:
                self.zero_pages += 1
                if written[page >> 3] & (1 << (page & 7)):
                    self._flush(run_region, run_start, run)  # (the page may be in the run)
                    run, run_region = [], None
                    region.mapping[off : off + PAGE_SIZE] = ZERO_PAGE
                continue
            if run_region is not region or off != run_end:
                self._flush(run_region, run_start, run)
                run, run_region, run_start = [], region, off
            run.append(view[at : at + PAGE_SIZE])
            run_end = off + PAGE_SIZE
            written[page >> 3] |= 1 << (page & 7)
            at += PAGE_SIZE
            self.pages += 1
        self._flush(run_region, run_start, run)

    def _flush(self, region: MemoryRegion | None, offset: int, pages: list[memoryview]) -> None:
        if region is None or not pages:
            return
        fd = self.write_fd.get(id(region), -1)
        if fd >= 0:
            done, total = 0, PAGE_SIZE * len(pages)
            while done < total:
                first = done // PAGE_SIZE
                head = [pages[first][done % PAGE_SIZE :], *pages[first + 1 :]]
                done += os.pwritev(fd, head, offset + done)
            return
        for i, data in enumerate(pages):
            region.mapping[offset + i * PAGE_SIZE : offset + (i + 1) * PAGE_SIZE] = data


class Pacer:
    """Keeps the bytes sent under `rate` bytes/s (None: no limit) by sleeping."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.start = time.monotonic()
        self.sent = 0

    def spend(self, n: int) -> None:
        self.sent += n
        if self.rate:
            ahead = self.sent / self.rate - (time.monotonic() - self.start)
            if ahead > 0:
                time.sleep(ahead)
