"""GDB remote-protocol framing: checksums, escaping, run-length decoding, the stream reader."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmkit.gdb import rsp, target
from kvmkit.gdb.rsp import BadPacket, Interrupt, Nak, Packet, PacketReader


def events(data: bytes, max_payload: int = 64) -> list[rsp.Event]:
    return list(PacketReader(max_payload).feed(data))


def test_known_packets() -> None:
    assert rsp.encode_packet(b"OK") == b"$OK#9a"
    assert rsp.encode_packet(b"qSupported") == b"$qSupported#37"
    assert events(b"+$g#67-\x03") == [rsp.Ack(), Packet(b"g"), Nak(), Interrupt()]


def test_bad_checksum_then_resync() -> None:
    assert events(b"$g#00$g#67") == [BadPacket("checksum"), Packet(b"g")]
    # A '$' inside a packet restarts it (the first one lost its end).
    assert events(b"$m10$g#67") == [Packet(b"g")]
    assert events(b"$g#6z") == [BadPacket("malformed")]
    assert events(b"noise$g#67") == [Packet(b"g")]


def test_oversized_packet_is_dropped_once_it_ends() -> None:
    big = rsp.encode_packet(b"A" * 100)
    assert events(big + b"$g#67", max_payload=64) == [BadPacket("oversized"), Packet(b"g")]


def test_run_length_and_escapes() -> None:
    assert rsp.rle_decode(b"0* ") == b"0000"  # ' ' = 32: 3 more
    assert rsp.rle_decode(b"ab}*c") == b"ab}*c"  # an escaped '*' is not a run marker
    with pytest.raises(rsp.RspError):
        rsp.rle_decode(b"*a")
    with pytest.raises(rsp.RspError):
        rsp.rle_decode(b"a*~" * 100, limit=100)
    assert rsp.escape(b"#$}*a") == b"}\x03}\x04}]}\x0aa"
    with pytest.raises(rsp.RspError):
        rsp.unescape(b"ab}")


def test_hex_numbers_are_bounded() -> None:
    assert rsp.parse_hex_int(b"ffffffffffffffff") == 2**64 - 1
    for bad in (b"", b"1" * 17 + b"0" * 20, b"x1", b"-1", b"10000000000000000"):
        with pytest.raises(rsp.RspError):
            rsp.parse_hex_int(bad)
    with pytest.raises(rsp.RspError):
        rsp.hex_decode(b"abc")


@given(st.binary(max_size=200))
def test_escape_round_trip(data: bytes) -> None:
    escaped = rsp.escape(data)
    assert not set(escaped) & set(b"#$*")
    assert rsp.unescape(escaped) == data


@given(st.lists(st.binary(max_size=80), max_size=5), st.integers(1, 7))
def test_packets_survive_any_chunking(payloads: list[bytes], step: int) -> None:
    stream = b"".join(rsp.encode_packet(rsp.escape(p)) for p in payloads)
    reader = PacketReader(256)
    got: list[rsp.Event] = []
    for i in range(0, len(stream), step):
        got += reader.feed(stream[i : i + step])
    assert [rsp.unescape(e.payload) for e in got if isinstance(e, Packet)] == payloads
    assert all(isinstance(e, Packet) for e in got)


@given(st.binary(max_size=400))
def test_reader_never_raises_on_garbage(data: bytes) -> None:
    reader = PacketReader(32)
    for event in reader.feed(data):
        if isinstance(event, Packet):
            assert len(event.payload) <= 64  # bounded even after run-length expansion
    assert len(reader._buf) <= 32


def test_target_description_and_register_layout() -> None:
    xml = target.TARGET_XML.decode()
    for feature in ("org.gnu.gdb.i386.core", "org.gnu.gdb.i386.sse", "org.gnu.gdb.i386.linux",
                    "org.gnu.gdb.i386.segments", "org.kvmkit.x86.cr"):  # fmt: skip
        assert f'<feature name="{feature}">' in xml
    assert target.REGISTERS[target.RIP].name == "rip" and target.RIP == 16
    assert f'<reg name="cr3" bitsize="64" type="int" group="system" regnum="{target.CR3}"/>' in xml
    assert target.G_PACKET_BYTES == sum(r.bits for r in target.REGISTERS) // 8


def test_register_read_write_round_trip() -> None:
    from kvmkit.abi import structs

    state = target.RegisterState(structs.kvm_regs(), structs.kvm_sregs(), structs.kvm_fpu())
    for num, reg in enumerate(target.REGISTERS):
        value = bytes((num + i) & 0xFF for i in range(reg.bits // 8))
        target.write_register(state, num, value)
        # 32-bit x87 control words and segment selectors keep only 16 (or 11) bits.
        if reg.name != "orig_rax" and (reg.bits != 32 or reg.name in ("eflags", "mxcsr")):
            assert target.read_register(state, num) == value, reg.name
    raw = target.read_all(state)
    assert target.write_all(state, raw) == set()
    with pytest.raises(ValueError):
        target.write_register(state, target.RIP, b"\0" * 4)
    with pytest.raises(ValueError):
        target.read_register(state, target.NUM_REGISTERS)
    with pytest.raises(ValueError):
        target.write_all(state, raw + b"\0")
