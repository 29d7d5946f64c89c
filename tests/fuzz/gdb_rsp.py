"""Fuzz target: the GDB remote serial protocol decoder (kvmkit.gdb.rsp): the byte stream
from a GDB client framed into packets (checksums, escapes, run-length encoding, size
limits, resynchronisation), then the payload helpers the session applies to packet
arguments (hex numbers, hex data, binary unescaping). The reader never raises; the helpers
reject bad arguments with RspError only."""

from __future__ import annotations

from kvmkit.gdb import rsp


def _arguments(payload: bytes) -> None:
    """What the session does with a packet's fields (`m addr,len`, `M addr,len:hex`,
    `X addr,len:binary`, `Z type,addr,kind`, `p n`, `P n=hex`...)."""
    body = payload[1:]
    head, _, data = body.partition(b":")
    for field in head.replace(b"=", b",").replace(b";", b",").split(b",")[:4]:
        try:
            rsp.parse_hex_int(field)
        except rsp.RspError:
            pass
    for decode in (rsp.hex_decode, rsp.unescape):
        try:
            decode(data)
        except rsp.RspError:
            pass


def TestOneInput(data: bytes) -> None:
    reader = rsp.PacketReader(rsp.DEFAULT_MAX_PAYLOAD)
    # Fed in two pieces: a packet split across reads must decode the same.
    cut = data[0] % (len(data) + 1) if data else 0
    for piece in (data[:cut], data[cut:]):
        for event in reader.feed(piece):
            if isinstance(event, rsp.Packet):
                assert len(event.payload) <= 2 * rsp.DEFAULT_MAX_PAYLOAD
                _arguments(event.payload)
