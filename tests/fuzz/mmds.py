"""Fuzz target: the MMDS endpoint a guest reaches through virtio-net (kvmkit.mmds.stack and
kvmkit.mmds.http): its bounded ARP/IPv4/TCP handling and the HTTP requests on it (request
line, headers, Content-Length, V2 session tokens, the store's paths).

Input: a mode byte, a segment size byte, then data.
  mode bit 2 set: the data is raw guest frames, each a u16 length and the frame;
  clear: the data is what the guest writes on one TCP connection to port 80, which the
  harness opens (SYN, then the SYN-ACK's number), sends in segments of the given size and
  closes (FIN). `@TOKEN@` in it becomes a valid V2 session token (the fuzzer cannot make
  one), so token-guarded GETs are reachable.
  mode bit 0: MMDS V2 (else V1); bit 1: imds_compat.
The endpoint refuses nothing by raising: a bad frame is dropped or answered (RST, 4xx);
any exception is a crash."""

from __future__ import annotations

import struct

from kvmkit.mmds.stack import MmdsStack
from kvmkit.mmds.store import Mmds, MmdsConfig

MMDS_IP = bytes([169, 254, 169, 254])
GUEST_IP = bytes([10, 0, 0, 2])
GUEST_MAC = bytes.fromhex("06000a000002")
SYN, ACK, PSH, FIN = 0x02, 0x10, 0x08, 0x01
_FRAME_LEN = struct.Struct("<H")
_DATA = {"latest": {"meta-data": {"instance-id": "i-fuzz", "ami-id": "ami-1", "tags": [1, 2]},
                    "user-data": "#!/bin/sh\n"}}  # fmt: skip


def _frame(seq: int, ack: int, flags: int, payload: bytes = b"", opts: bytes = b"") -> bytes:
    doff = (20 + len(opts)) // 4
    tcp = struct.pack("!HHIIHHHH", 40000, 80, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                      doff << 12 | flags, 65535, 0, 0) + opts + payload  # fmt: skip
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, 6, 0, GUEST_IP, MMDS_IP)
    return b"\xff" * 6 + GUEST_MAC + b"\x08\x00" + ip + tcp


def _drain(stack: MmdsStack) -> list[bytes]:
    out = []
    while (frame := stack.next_frame()) is not None:
        out.append(frame)
    return out


def TestOneInput(data: bytes) -> None:
    mode = data[0] if data else 0
    chunk = max(1, data[1]) if len(data) > 1 else 64
    body = data[2:]
    mmds = Mmds()
    mmds.put(_DATA)
    mmds.config = MmdsConfig(["eth0"], "V2" if mode & 1 else "V1", imds_compat=bool(mode & 2))
    stack = MmdsStack(mmds, "169.254.169.254")
    if mode & 4:
        at = 0
        while at + _FRAME_LEN.size <= len(body):
            (n,) = _FRAME_LEN.unpack_from(body, at)
            at += _FRAME_LEN.size
            stack.intercept(body[at : at + n])
            at += n
            _drain(stack)
        return
    body = body.replace(b"@TOKEN@", mmds.new_token(21600).encode())
    stack.intercept(_frame(1000, 0, SYN, opts=b"\x02\x04\x05\xb4"))  # MSS 1460
    frames = _drain(stack)
    assert len(frames) == 1, frames  # the SYN-ACK
    (iss,) = struct.unpack_from("!I", frames[0], 14 + 20 + 4)
    seq, ack = 1001, iss + 1
    for at in range(0, len(body), chunk):
        piece = body[at : at + chunk]
        stack.intercept(_frame(seq, ack, ACK | PSH, piece))
        seq += len(piece)
        _drain(stack)
    stack.intercept(_frame(seq, ack, ACK | FIN))
    _drain(stack)
