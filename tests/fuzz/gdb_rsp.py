"""Fuzz target: the GDB remote serial protocol (kvmkit.gdb): the byte stream from a GDB
client framed into packets by rsp.PacketReader (checksums, escapes, run-length encoding,
size limits, resynchronisation), then each packet handled by a real Session: its arguments
decoded (addresses, lengths, register numbers, hex and binary data, breakpoint kinds,
qXfer ranges, monitor commands) against a GdbStub of a tiny guest on /dev/kvm whose vCPU
never runs. Packets that would resume, detach or kill (c, C, s, S, vCont;..., vKill, D, k)
are left out: they end the session rather than parse anything more.

The reader never raises; Session.dispatch turns bad arguments into E replies (RspError,
ValueError, an unmapped address, a failed KVM call). Anything else escaping is a crash.
Without a usable /dev/kvm only the framing part runs."""

from __future__ import annotations

import socket
from typing import Any

from kvmkit.gdb import rsp

_session: Any = None
_peer: socket.socket | None = None


def _make_session() -> Any:
    """A Session over a socket pair, for a stub of a tiny guest (None without KVM)."""
    global _session, _peer
    if _session is None:
        try:
            from kvmkit.gdb.session import Session
            from kvmkit.gdb.stub import GdbStub
            from kvmkit.testing import TinyGuest

            guest = TinyGuest("long64")
        except OSError:
            _session = False
            return None
        conn, _peer = socket.socketpair()
        _peer.setblocking(False)
        _session = Session(GdbStub.for_tiny_guest(guest), conn)
        _session.guest = guest  # kept alive with the session
    return _session or None


def _handled(payload: bytes) -> bool:
    if payload[:1] in (b"c", b"C", b"s", b"S", b"D", b"k"):
        return False
    return not (payload.startswith(b"v") and payload not in (b"vCont?", b"vMustReplyEmpty"))


def TestOneInput(data: bytes) -> None:
    reader = rsp.PacketReader(rsp.DEFAULT_MAX_PAYLOAD)
    session = _make_session()
    # Fed in two pieces: a packet split across reads must decode the same.
    cut = data[0] % (len(data) + 1) if data else 0
    for piece in (data[:cut], data[cut:]):
        for event in reader.feed(piece):
            if isinstance(event, rsp.Packet):
                assert len(event.payload) <= 2 * rsp.DEFAULT_MAX_PAYLOAD
                if session is not None and _handled(event.payload):
                    session.on_event(event)
            elif session is not None:
                session.on_event(event)
    if session is not None:
        session.noack = False
        assert _peer is not None
        try:
            while _peer.recv(65536):
                pass
        except BlockingIOError:
            pass
