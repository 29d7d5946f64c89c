"""GDB remote serial protocol framing (GDB manual, appendix E "Remote Protocol", "Overview").

A packet is `$payload#cc` where `cc` is the modulo-256 sum of the payload bytes as two hex
digits. The receiver answers `+` (good) or `-` (bad checksum, resend). Outside packets a 0x03
byte is an interrupt request (Ctrl-C). Inside a payload `}` escapes the next byte (XOR 0x20;
binary data of `X` packets and `qXfer` replies) and `X*n` repeats X (n - 29) more times
(run-length encoding; only replies use it in practice, but a decoder must accept it).

Everything here is pure code: `PacketReader` turns a byte stream from an untrusted peer into
events, never raising on garbage, never holding more than `max_payload` bytes of a packet.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

DEFAULT_MAX_PAYLOAD = 0x4000  # advertised as PacketSize in qSupported
INTERRUPT = 0x03
_ESCAPED = frozenset(b"#$}*")
_HEX = frozenset(b"0123456789abcdefABCDEF")


class RspError(ValueError):
    """A malformed payload (bad hex, bad escape, bad run length...)."""


def checksum(payload: bytes | bytearray | memoryview) -> int:
    return sum(payload) & 0xFF


def encode_packet(payload: bytes) -> bytes:
    """`$payload#cc`; the payload must already be escaped where needed."""
    return b"$" + payload + b"#" + b"%02x" % checksum(payload)


def escape(data: bytes | bytearray | memoryview) -> bytes:
    """Binary escaping: `#`, `$`, `}` and `*` become `}` followed by the byte XOR 0x20."""
    out = bytearray()
    for b in bytes(data):
        if b in _ESCAPED:
            out += bytes((0x7D, b ^ 0x20))
        else:
            out.append(b)
    return bytes(out)


def unescape(data: bytes | bytearray | memoryview) -> bytes:
    out = bytearray()
    it = iter(bytes(data))
    for b in it:
        if b == 0x7D:
            nxt = next(it, None)
            if nxt is None:
                raise RspError("escape character at the end of the data")
            out.append(nxt ^ 0x20)
        else:
            out.append(b)
    return bytes(out)


def rle_decode(data: bytes, limit: int = DEFAULT_MAX_PAYLOAD * 2) -> bytes:
    """Expand `X*n` runs (X repeated n - 29 more times, n printable: 29 + 3 .. 126).
    An escaped byte (`}x`) is kept as it is (escapes are undone after expansion).
    Raises RspError on a dangling `*` or when the result would exceed `limit` bytes."""
    if b"*" not in data:
        return data
    out = bytearray()
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b == 0x2A:  # '*'
            if not out or i + 1 >= n:
                raise RspError("run-length marker without a byte to repeat or a count")
            count = data[i + 1] - 29
            if count < 0 or data[i + 1] > 126:
                raise RspError(f"bad run length {data[i + 1]:#x}")
            out += bytes((out[-1],)) * count
            i += 2
        elif b == 0x7D and i + 1 < n:
            out += data[i : i + 2]
            i += 2
        else:
            out.append(b)
            i += 1
        if len(out) > limit:
            raise RspError("run-length expansion exceeds the packet size limit")
    return bytes(out)


def hex_decode(text: bytes | str) -> bytes:
    raw = text.encode("ascii", "replace") if isinstance(text, str) else bytes(text)
    if len(raw) % 2 or not _HEX.issuperset(raw):
        raise RspError("bad hex data")
    return bytes.fromhex(raw.decode("ascii"))


def hex_encode(data: bytes | bytearray | memoryview) -> bytes:
    return bytes(data).hex().encode("ascii")


def parse_hex_int(text: bytes, *, max_bits: int = 64) -> int:
    """A big-endian hex number as GDB writes addresses and lengths (no sign, no 0x)."""
    if not text or len(text) > (max_bits + 3) // 4 + 16 or not _HEX.issuperset(text):
        raise RspError(f"bad hex number {text[:32]!r}")
    value = int(text, 16)
    if value >> max_bits:
        raise RspError(f"number {text[:32]!r} wider than {max_bits} bits")
    return value


# -- events produced by the reader
@dataclass(frozen=True)
class Packet:
    payload: bytes  # run-length decoded, still escaped (X packets unescape their data)


@dataclass(frozen=True)
class Interrupt:
    pass


@dataclass(frozen=True)
class Ack:
    pass


@dataclass(frozen=True)
class Nak:
    pass


@dataclass(frozen=True)
class BadPacket:
    """A packet that arrived damaged: `reason` is "checksum", "oversized" or "malformed".
    With "checksum" the sender must be NAKed so it resends."""

    reason: str


Event = Packet | Interrupt | Ack | Nak | BadPacket

_IDLE, _DATA, _CSUM1, _CSUM2, _DISCARD, _DISCARD_CS1, _DISCARD_CS2 = range(7)


class PacketReader:
    """Incremental decoder of the byte stream from GDB.

    `feed(data)` yields events. Bytes outside packets other than `+`, `-` and 0x03 are
    ignored; a `$` inside a packet restarts it (resynchronisation after lost bytes). A packet
    whose payload grows past `max_payload` is dropped as "oversized" once its end arrives.
    """

    def __init__(self, max_payload: int = DEFAULT_MAX_PAYLOAD) -> None:
        if max_payload < 16:
            raise ValueError("max_payload too small")
        self.max_payload = max_payload
        self._state = _IDLE
        self._buf = bytearray()
        self._csum_hi = 0

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Event]:
        for b in bytes(data):
            yield from self._byte(b)

    def _byte(self, b: int) -> Iterator[Event]:
        st = self._state
        if st == _IDLE:
            if b == 0x24:  # '$'
                self._buf.clear()
                self._state = _DATA
            elif b == 0x2B:
                yield Ack()
            elif b == 0x2D:
                yield Nak()
            elif b == INTERRUPT:
                yield Interrupt()
            return  # anything else between packets is line noise
        if st == _DATA:
            if b == 0x23:  # '#'
                self._state = _CSUM1
            elif b == 0x24:
                self._buf.clear()  # a new packet started: the previous one was cut short
            elif len(self._buf) >= self.max_payload:
                self._buf.clear()
                self._state = _DISCARD
            else:
                self._buf.append(b)
            return
        if st in (_CSUM1, _DISCARD_CS1):
            digit = _hexval(b)
            if digit < 0:
                yield BadPacket("malformed" if st == _CSUM1 else "oversized")
                self._reset_after_bad(b)
                return
            self._csum_hi = digit
            self._state = _CSUM2 if st == _CSUM1 else _DISCARD_CS2
            return
        if st == _DISCARD:
            if b == 0x23:
                self._state = _DISCARD_CS1
            return
        if st == _DISCARD_CS2:
            self._state = _IDLE
            yield BadPacket("oversized")
            return
        # _CSUM2
        digit = _hexval(b)
        self._state = _IDLE
        if digit < 0:
            yield BadPacket("malformed")
            self._reset_after_bad(b)
            return
        payload = bytes(self._buf)
        self._buf.clear()
        if (self._csum_hi << 4 | digit) != checksum(payload):
            yield BadPacket("checksum")
            return
        try:
            yield Packet(rle_decode(payload, self.max_payload * 2))
        except RspError:
            yield BadPacket("malformed")

    def _reset_after_bad(self, b: int) -> None:
        self._buf.clear()
        self._state = _IDLE
        if b == 0x24:
            self._state = _DATA


def _hexval(b: int) -> int:
    if 0x30 <= b <= 0x39:
        return b - 0x30
    if 0x61 <= b <= 0x66:
        return b - 0x57
    if 0x41 <= b <= 0x46:
        return b - 0x37
    return -1
