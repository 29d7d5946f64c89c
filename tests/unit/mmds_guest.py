"""The guest side of MMDS tests: crafts the Ethernet/ARP/IPv4/TCP frames a guest sends
and parses (checking their checksums) the frames the MMDS endpoint sends back."""

from __future__ import annotations

import struct
from dataclasses import dataclass

from kvmkit.mmds.stack import ACK, FIN, PSH, RST, SYN, checksum

GUEST_MAC = bytes.fromhex("aafc00000001")
GUEST_IP = bytes([172, 16, 0, 2])
MMDS_IP = bytes([169, 254, 169, 254])
BROADCAST = b"\xff" * 6

__all__ = ["ACK", "FIN", "PSH", "RST", "SYN", "Guest", "Segment"]


def arp_request(target: bytes = MMDS_IP, op: int = 1) -> bytes:
    return (
        BROADCAST
        + GUEST_MAC
        + b"\x08\x06"
        + struct.pack("!HHBBH", 1, 0x0800, 6, 4, op)
        + GUEST_MAC
        + GUEST_IP
        + bytes(6)
        + target
    )


def ipv4(
    payload: bytes,
    *,
    dst: bytes = MMDS_IP,
    proto: int = 6,
    frag: int = 0x4000,
    ihl: int = 5,
    total: int | None = None,
) -> bytes:
    length = 20 + len(payload) if total is None else total
    hdr = bytearray(
        struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, length, 1, frag, 64, proto, 0, GUEST_IP, dst)
    )
    struct.pack_into("!H", hdr, 10, checksum(bytes(hdr)))
    return b"\x06\x01\x23\x45\x67\x01" + GUEST_MAC + b"\x08\x00" + bytes(hdr) + payload


def tcp(
    sport: int,
    dport: int,
    seq: int,
    ack: int,
    flags: int,
    window: int = 65535,
    payload: bytes = b"",
    options: bytes = b"",
    dst: bytes = MMDS_IP,
) -> bytes:
    hdr = bytearray(
        struct.pack(
            "!HHIIHHHH",
            sport,
            dport,
            seq & 0xFFFFFFFF,
            ack & 0xFFFFFFFF,
            ((20 + len(options)) // 4) << 12 | flags,
            window,
            0,
            0,
        )
    )
    seg = bytes(hdr) + options + payload
    pseudo = GUEST_IP + dst + struct.pack("!BBH", 0, 6, len(seg))
    seg = seg[:16] + struct.pack("!H", checksum(pseudo + seg)) + seg[18:]
    return ipv4(seg, dst=dst)


@dataclass
class Segment:
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int
    window: int
    options: bytes
    payload: bytes


def parse(frame: bytes) -> Segment:
    """A frame the MMDS sent: Ethernet to the guest from the MMDS MAC, IPv4 from the MMDS
    address, TCP; both checksums must be right."""
    assert frame[:6] == GUEST_MAC and frame[6:12] == bytes.fromhex("060123456701")
    assert frame[12:14] == b"\x08\x00"
    ip = frame[14:]
    assert ip[0] == 0x45 and checksum(ip[:20]) == 0
    total = struct.unpack_from("!H", ip, 2)[0]
    assert total == len(ip)
    assert ip[12:16] == MMDS_IP and ip[16:20] == GUEST_IP and ip[9] == 6
    seg = ip[20:total]
    pseudo = MMDS_IP + GUEST_IP + struct.pack("!BBH", 0, 6, len(seg))
    assert checksum(pseudo + seg) == 0, "bad TCP checksum"
    sport, dport, seq, ack, off_flags, window = struct.unpack_from("!HHIIHH", seg)
    doff = (off_flags >> 12) * 4
    return Segment(sport, dport, seq, ack, off_flags & 0x3F, window, seg[20:doff], seg[doff:])


class Guest:
    """A guest TCP client of the MMDS endpoint, one connection from `port`."""

    def __init__(self, stack: object, port: int = 40000, isn: int = 1000) -> None:
        self.stack = stack
        self.port = port
        self.seq = isn
        self.ack = 0

    def send(
        self,
        flags: int,
        payload: bytes = b"",
        *,
        seq: int | None = None,
        window: int = 65535,
        options: bytes = b"",
    ) -> bool:
        frame = tcp(
            self.port,
            80,
            self.seq if seq is None else seq,
            self.ack,
            flags,
            window,
            payload,
            options,
        )
        taken: bool = self.stack.intercept(frame)  # type: ignore[attr-defined]
        if seq is None:
            self.seq += len(payload) + (1 if flags & (SYN | FIN) else 0)
        return taken

    def frames(self) -> list[Segment]:
        out = []
        while (frame := self.stack.next_frame()) is not None:  # type: ignore[attr-defined]
            out.append(parse(frame))
        return out

    def connect(self, window: int = 65535, mss: int = 1460) -> Segment:
        self.send(SYN, window=window, options=struct.pack("!BBH", 2, 4, mss))
        (synack,) = self.frames()
        assert synack.flags == SYN | ACK and synack.ack == self.seq
        self.ack = synack.seq + 1
        self.send(ACK, window=window)
        return synack

    def request(self, text: str, window: int = 65535) -> bytes:
        """Send a request on a new connection and read the whole answer (ACKing it)."""
        self.connect(window)
        self.send(ACK | PSH, text.encode(), window=window)
        data = b""
        for _ in range(1000):
            segs = self.frames()
            if not segs:
                break
            for s in segs:
                if s.payload and s.seq == self.ack:
                    data += s.payload
                    self.ack += len(s.payload)
                if s.flags & FIN and s.seq + len(s.payload) == self.ack:
                    self.ack += 1
                    self.send(ACK | FIN, window=window)
                    (last,) = self.frames()  # the ACK of our FIN
                    assert last.flags == ACK and last.ack == self.seq
                    return data
            self.send(ACK, window=window)
        raise AssertionError(f"no FIN after {data!r}")
