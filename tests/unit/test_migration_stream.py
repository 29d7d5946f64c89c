"""The migration stream as hostile input (no /dev/kvm): addresses, frames and page batches
(a whole destination fed crafted streams: tests/kvm/test_migration_streams.py).

Every malformed, corrupted, truncated or out-of-range frame or batch ends in one
MigrationError naming the problem, and nothing is written outside the guest memory the
destination built; random bytes are fuzzed with hypothesis.
"""

from __future__ import annotations

import json
import socket
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmkit.errors import UserError
from kvmkit.memory import PAGE_SIZE, GuestMemory
from kvmkit.migration.stream import (
    FRAME,
    MAX_BATCH,
    MAX_LENGTH,
    ZERO_FLAG,
    Channel,
    Kind,
    MigrationError,
    PageBatch,
    PageSink,
    parse_address,
)

# -- addresses


@pytest.mark.parametrize(
    ("text", "want"),
    [("unix:/tmp/m.sock", "unix:/tmp/m.sock"), ("tcp:127.0.0.1:4444", "tcp:127.0.0.1:4444"),
     ("tcp:[::1]:80", "tcp:[::1]:80"), ("tcp:localhost:0", "tcp:localhost:0")],
)  # fmt: skip
def test_addresses(text: str, want: str) -> None:
    assert str(parse_address(text)) == want


@pytest.mark.parametrize(
    "text", ["", "unix:", "tcp:host", "tcp::80", "tcp:h:99999", "tcp:h:x", "http://h:1",
             "unix:" + "x" * 200,
             # digits str.isdigit() takes and int() refuses (ValueError, not UserError)
             "tcp:h:²", "tcp:h:" + "9" * 5000, "tcp:h:" + "0" * 5000 + "99999"],
)  # fmt: skip
def test_bad_addresses(text: str) -> None:
    with pytest.raises(UserError):
        parse_address(text)


# -- frames


def pair() -> tuple[Channel, socket.socket]:
    a, b = socket.socketpair()
    return Channel(a, "the peer", timeout=5), b


def frame(kind: int, payload: bytes, *, flags: int = 0, crc: int | None = None,
          length: int | None = None) -> bytes:  # fmt: skip
    head = struct.pack("<HHI", kind, flags, len(payload) if length is None else length)
    if crc is None:
        crc = zlib.crc32(payload, zlib.crc32(head))
    return head + struct.pack("<I", crc) + payload


def test_frames_round_trip() -> None:
    ch, other = pair()
    peer = Channel(other, "us", timeout=5)
    peer.send_json(Kind.SETUP, {"a": 1})
    peer.send(Kind.PAGES, b"x" * 100, b"y")
    assert ch.recv_json(Kind.SETUP) == {"a": 1}
    kind, payload = ch.recv([Kind.PAGES])
    assert kind is Kind.PAGES and payload == b"x" * 100 + b"y"


@pytest.mark.parametrize(
    ("data", "message"),
    [(frame(99, b""), "unknown type 99"),
     (frame(Kind.ACK, b"{}"), "sent ACK where SETUP was due"),
     (frame(Kind.SETUP, b"{}", flags=1), "with flags"),
     (frame(Kind.SETUP, b"", length=MAX_LENGTH[Kind.SETUP] + 1), "over its"),
     (frame(Kind.SETUP, b"{}", crc=1), "checksum mismatch"),
     (frame(Kind.SETUP, b"{}")[:-1], "in the middle of a frame"),
     (frame(Kind.SETUP, b"[1]"), "not a JSON object"),
     (frame(Kind.SETUP, b"{NaN}"), "malformed JSON"),
     (frame(Kind.ERROR, b"no room"), "the peer refused: no room")],
)  # fmt: skip
def test_bad_frames_are_refused(data: bytes, message: str) -> None:
    ch, other = pair()
    other.sendall(data)
    other.shutdown(socket.SHUT_WR)
    with pytest.raises(MigrationError, match=message):
        ch.recv_json(Kind.SETUP)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_only_ever_raise_migration_error(data: bytes) -> None:
    ch, other = pair()
    other.sendall(data)
    other.close()
    try:
        ch.recv([Kind.SETUP, Kind.PAGES, Kind.STATE])
    except MigrationError:
        pass
    finally:
        ch.close()


# -- page batches


def memory() -> GuestMemory:
    mem = GuestMemory()
    mem.add_anonymous(0, 16 * PAGE_SIZE)
    mem.add_anonymous(0x100000, 16 * PAGE_SIZE)
    return mem


def batch_payload(entries: list[tuple[int, bytes | None]]) -> bytearray:
    b = PageBatch()
    for gpa, data in entries:
        if data is None:
            b.add_zero(gpa)
        else:
            b.add(gpa, data)
    return bytearray(b"".join(b.parts()))


def test_page_batches_write_pages_and_zero_markers() -> None:
    mem = memory()
    sink = PageSink(mem)
    page = bytes(range(256)) * 16
    sink.apply(batch_payload([(0x1000, page), (0x100000, page), (0x2000, bytes(PAGE_SIZE))]),
               "src")  # fmt: skip
    assert mem.read(0x1000, PAGE_SIZE) == page and mem.read(0x100000, PAGE_SIZE) == page
    assert sink.pages == 2 and sink.zero_pages == 1  # the zero page went as a marker
    sink.apply(batch_payload([(0x1000, None)]), "src")  # written before: zeroed now
    assert mem.read(0x1000, PAGE_SIZE) == bytes(PAGE_SIZE)
    # A zero page is 8 bytes on the wire, not 4 KiB.
    assert len(batch_payload([(0x3000, bytes(PAGE_SIZE))])) == 4 + 8


@pytest.mark.parametrize(
    ("payload", "message"),
    [(batch_payload([(0x10000, b"\1" * PAGE_SIZE)]), "outside this guest's memory"),
     (batch_payload([(0x110000 - PAGE_SIZE, None)])[:-1] , "shorter than its address table"),
     (struct.pack("<IQ", 1, 0x1000 | 4) + b"\0" * PAGE_SIZE, "unknown flags"),
     (struct.pack("<I", 0), "with 0 pages"),
     (struct.pack("<I", MAX_BATCH + 1), "pages"),
     (struct.pack("<IQ", 1, 0x1000) + b"\0" * 100, "bytes for 1 pages"),
     (b"\1", "too short")],
)  # fmt: skip
def test_bad_page_batches_are_refused(payload: bytes, message: str) -> None:
    mem = memory()
    with pytest.raises(MigrationError, match=message):
        PageSink(mem).apply(bytearray(payload), "src")
    assert all(r.mapping[:] == bytes(r.size) for r in mem.regions)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.integers(0, 2**64 - 1) | st.sampled_from([0, 0x1001, 0x10F000, 0x110000]),
                min_size=1, max_size=8))
def test_random_page_addresses_never_reach_outside_guest_memory(addrs: list[int]) -> None:
    mem = memory()
    data = b"".join(b"\xaa" * PAGE_SIZE for a in addrs if not a & ZERO_FLAG)
    payload = bytearray(struct.pack(f"<I{len(addrs)}Q", len(addrs), *addrs) + data)
    flags_ok = all(not a & (PAGE_SIZE - 1) & ~ZERO_FLAG for a in addrs)
    inside = flags_ok and all(mem.is_valid(a & ~(PAGE_SIZE - 1), PAGE_SIZE) for a in addrs)
    if inside:
        PageSink(mem).apply(payload, "src")
    else:
        with pytest.raises(MigrationError):
            PageSink(mem).apply(payload, "src")


def test_json_payloads_are_capped() -> None:
    ch, other = pair()
    big = json.dumps({"x": "a" * (MAX_LENGTH[Kind.SETUP])}).encode()
    other.sendall(FRAME.pack(Kind.SETUP, 0, len(big), 0))
    with pytest.raises(MigrationError, match="over its"):
        ch.recv([Kind.SETUP])


def test_runs_of_pages_go_into_memfd_memory_whole() -> None:
    # Consecutive pages are written with one pwritev on the region's memfd; a zero marker
    # for a page written before ends the run and zeroes it; a page in another region, or
    # not next to the last one, starts a new run.
    mem = GuestMemory()
    mem.add_memfd(0, 16 * PAGE_SIZE)
    mem.add_memfd(0x100000, 16 * PAGE_SIZE)
    sink = PageSink(mem)
    gpas = [0x1000, 0x2000, 0x3000, 0x5000, 0x100000, 0x101000]
    pages = {gpa: bytes([i + 1]) * PAGE_SIZE for i, gpa in enumerate(gpas)}
    sink.apply(batch_payload(list(pages.items())), "src")
    for gpa, data in pages.items():
        assert mem.read(gpa, PAGE_SIZE) == data
    sink.apply(batch_payload([(0x1000, b"\x77" * PAGE_SIZE), (0x2000, None),
                              (0x3000, b"\x88" * PAGE_SIZE)]), "src")  # fmt: skip
    assert mem.read(0x1000, PAGE_SIZE) == b"\x77" * PAGE_SIZE
    assert mem.read(0x2000, PAGE_SIZE) == bytes(PAGE_SIZE)
    assert mem.read(0x3000, PAGE_SIZE) == b"\x88" * PAGE_SIZE
    assert mem.read(0x4000, PAGE_SIZE) == bytes(PAGE_SIZE)  # untouched between the runs
