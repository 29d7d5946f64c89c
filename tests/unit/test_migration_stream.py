"""The migration stream as hostile input (no /dev/kvm): addresses, frames, page batches, and
a destination (`receive_vm` with the Machine sink) fed crafted streams over a real socket.

Every malformed, corrupted, truncated or out-of-range stream ends in one MigrationError
naming the problem, the source is told why (an ERROR frame), and nothing is written outside
the guest memory the destination built; random bytes are fuzzed with hypothesis.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import zlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmkit.errors import UserError
from kvmkit.memory import PAGE_SIZE, GuestMemory
from kvmkit.migration.machine import MachineSink
from kvmkit.migration.receive import receive_vm
from kvmkit.migration.stream import (
    FRAME,
    MAGIC,
    MAX_BATCH,
    MAX_LENGTH,
    PREAMBLE,
    ZERO_FLAG,
    Channel,
    Kind,
    MigrationError,
    PageBatch,
    PageSink,
    parse_address,
)
from kvmkit.snapshot.format import encode
from kvmkit.vmm.config import MachineConfig
from kvmkit.vmm.persist import config_to_dict

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
             "unix:" + "x" * 200],
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


# -- a destination fed crafted streams


def setup_payload(mem_mib: int = 4) -> dict[str, Any]:
    from kvmkit.arch.x86_64 import layout

    config = MachineConfig(mem_mib=mem_mib, command=["true"])
    return {"kind": "kvmkit-machine", "config": config_to_dict(config, ()),
            "memory": [[s, n] for s, n in layout.ram_ranges(mem_mib << 20)]}  # fmt: skip


def feed(script: Callable[[Channel], None]) -> tuple[str, str | None]:
    """Run `receive_vm` with a Machine sink against `script` (the source side); the error
    the destination raised, and the reason the source was sent (ERROR frame), if any."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0kvmkit-test-migration-" + str(threading.get_ident()))
    listener.listen(1)
    told: dict[str, str | None] = {"reason": None}

    def source() -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(listener.getsockname())
        ch = Channel(sock, "the destination", timeout=10)
        try:
            script(ch)
            ch.recv([Kind.ACK])
        except MigrationError as err:
            told["reason"] = str(err) if err.remote else None
        finally:
            ch.close()

    t = threading.Thread(target=source)
    t.start()
    try:
        receive_vm(listener, MachineSink(command_output=None, kvm_device="/nonexistent"),
                   accept_timeout=10)  # fmt: skip
    except MigrationError as err:
        error = str(err)
    else:
        error = ""
    finally:
        listener.close()
    t.join(10)
    return error, told["reason"]


def hello(ch: Channel, version: int = 1) -> None:
    ch.sock.sendall(PREAMBLE.pack(MAGIC, version, b"x86_64\0\0"))
    ch.read_preamble()
    if version != 1:
        ch.recv([])  # the destination's ERROR frame


def test_a_good_start_then_a_corrupted_page_frame() -> None:
    def script(ch: Channel) -> None:
        hello(ch)
        ch.send_json(Kind.SETUP, setup_payload())
        ch.recv_json(Kind.READY)
        good = bytes(b"".join(one_page_batch(0x1000).parts()))
        ch.sock.sendall(frame(Kind.PAGES, good))
        ch.sock.sendall(frame(Kind.PAGES, good, crc=zlib.crc32(good) ^ 1))

    error, told = feed(script)
    assert "PAGES frame checksum mismatch" in error
    assert told is not None and "checksum mismatch" in told


def one_page_batch(gpa: int) -> PageBatch:
    b = PageBatch()
    b.add(gpa, b"\x5a" * PAGE_SIZE)
    return b


@pytest.mark.parametrize(
    ("step", "message"),
    [("version", "speaks migration protocol 7"),
     ("magic", "does not speak kvmkit's migration protocol"),
     ("setup-kind", "not a kvmkit machine"),
     ("setup-layout", "not the memory map"),
     ("setup-drive", "missing"),
     ("page-outside", "outside this guest's memory"),
     ("truncated", "closed the connection in the middle of a frame"),
     ("state-corrupt", "migration state: checksum mismatch"),
     ("state-truncated", "migration state: truncated"),
     ("state-malformed", "state.vcpus must be a list"),
     ("pages-after-nothing", "closed the connection")],
)  # fmt: skip
def test_malformed_streams_are_refused(step: str, message: str, tmp_path: Any) -> None:
    def script(ch: Channel) -> None:
        if step == "version":
            hello(ch, version=7)
            return
        if step == "magic":
            ch.sock.sendall(PREAMBLE.pack(b"NOTKVMKT", 1, b"x86_64\0\0"))
            ch.read_preamble()
            return
        hello(ch)
        setup = setup_payload()
        if step == "setup-kind":
            setup["kind"] = "kvmkit-bare-vm"
        elif step == "setup-layout":
            setup["memory"] = [[0, 1 << 30]]
        elif step == "setup-drive":
            setup["config"]["drives"] = [{"path": str(tmp_path / "gone.img"), "size": 4096,
                                          "read_only": False, "serial": ""}]  # fmt: skip
        ch.send_json(Kind.SETUP, setup)
        ch.recv_json(Kind.READY)
        if step == "page-outside":
            ch.send(Kind.PAGES, *one_page_batch(64 << 20).parts())
        elif step == "truncated":
            whole = frame(Kind.PAGES, b"".join(one_page_batch(0x1000).parts()))
            ch.sock.sendall(whole[: len(whole) // 2])
            ch.sock.shutdown(socket.SHUT_WR)
        elif step.startswith("state"):
            state = encode({"kind": "kvmkit-vm", "vcpus": "nope"})
            if step == "state-corrupt":
                state = state[:40] + bytes([state[40] ^ 1]) + state[41:]
            elif step == "state-truncated":
                state = state[:20]
            ch.send(Kind.STATE, state)
        else:
            ch.sock.shutdown(socket.SHUT_WR)

    error, told = feed(script)
    assert message in error, error
    if step not in ("truncated", "pages-after-nothing", "magic"):
        assert told is not None and message.split(":")[-1].strip() in told, told


def test_json_payloads_are_capped() -> None:
    ch, other = pair()
    big = json.dumps({"x": "a" * (MAX_LENGTH[Kind.SETUP])}).encode()
    other.sendall(FRAME.pack(Kind.SETUP, 0, len(big), 0))
    with pytest.raises(MigrationError, match="over its"):
        ch.recv([Kind.SETUP])
