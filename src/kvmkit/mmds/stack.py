"""A minimal ARP + IPv4 + TCP endpoint for the MMDS address (Firecracker's "Dumbo",
docs/mmds/mmds-design.md), driven by a virtio-net device:

- `intercept(frame)` takes each Ethernet frame the guest sends on an interface that serves
  the MMDS; True means the frame was for the MMDS (an ARP request for its address, an IPv4
  packet to it) and must not reach the tap.
- `next_frame()` gives the next frame to put in the guest's receive queue, or None. Frames
  are made when the device asks for them (as Dumbo does), so nothing waits in kvmkit but
  the few ARP replies and resets in `MAX_PENDING`.

The guest is hostile: every length and offset is checked before it is used, malformed
frames for the MMDS address are dropped, and memory is bounded: at most MAX_CONNECTIONS
connections (a new one evicts the one idle longest, with a reset), each holding at most
`http.MAX_REQUEST` bytes of request and one answer (at most the store's size limit plus its
header).

What the link allows to leave out (a point-to-point virtio link neither loses nor reorders
frames: the device writes them only into buffers the guest posted): no congestion control,
no retransmission timer (a segment the guest did lose is sent again when it repeats an ACK
three times, RFC 5681 §3.2's fast retransmit), out-of-order segments dropped and answered
with an ACK of what came in order (RFC 9293 §3.10.7.4), no IP fragments, no 802.1Q tags,
no TCP options but MSS (RFC 9293 §3.7.1; without window scaling, SACK or timestamps in our
SYN-ACK the guest uses none of them: RFC 7323 §2.2, §3.2 and RFC 2018 §2). Received
checksums are not checked (the guest's own frames over shared memory; with checksum offload
they are partial anyway); the ones we send are complete. Anything else we do not expect
gets a reset (RFC 9293 §3.10.7.1).
"""

from __future__ import annotations

import os
import struct
import threading
from collections import deque
from enum import Enum

from kvmkit.mmds import http
from kvmkit.mmds.store import Mmds

MMDS_MAC = bytes.fromhex("060123456701")  # the MMDS's MAC in Firecracker (mmds-design.md)
ETH_HDR = 14
ETHERTYPE_IPV4, ETHERTYPE_ARP = 0x0800, 0x0806
ARP_LEN = 28  # RFC 826 for Ethernet/IPv4: 8 bytes of types and lengths, 2x (6 + 4)
MIN_ETH_FRAME = 60  # an Ethernet frame without its FCS is at least 60 bytes (802.3)
IP_HDR = 20
TCP_HDR = 20
IPPROTO_TCP = 6
HTTP_PORT = 80
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
DEFAULT_MSS = 536  # RFC 9293 §3.7.1: the MSS to assume without the option
OUR_MSS = 1460  # 1500-byte MTU less the IPv4 and TCP headers
RCV_WINDOW = http.MAX_REQUEST  # the request buffer: what we advertise
MAX_CONNECTIONS = 16
MAX_PENDING = 32  # ARP replies and resets waiting for a receive buffer (then dropped)
DUP_ACKS = 3  # RFC 5681 §3.2
SEQ_MASK = 0xFFFFFFFF


def _after(a: int, b: int) -> bool:
    """Sequence number a comes after b (RFC 9293 §3.4: comparisons modulo 2^32)."""
    return 0 < ((a - b) & SEQ_MASK) < 0x80000000


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071): one's complement of the one's complement sum of
    the 16-bit big-endian words, an odd last byte padded with zero."""
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


class State(Enum):
    SYN_RECEIVED = 1
    ESTABLISHED = 2


class Connection:
    """One guest connection to port 80: receives one request, sends one answer, closes."""

    def __init__(self, mac: bytes, ip: bytes, port: int, irs: int, mss: int) -> None:
        self.mac, self.ip, self.port = mac, ip, port
        self.state = State.SYN_RECEIVED
        self.irs = irs
        self.rcv_nxt = (irs + 1) & SEQ_MASK
        self.iss = int.from_bytes(os.urandom(4), "big")  # RFC 9293 §3.4.1: unpredictable
        self.snd_una = self.snd_nxt = self.snd_max = self.iss
        self.snd_wnd = 0
        self.mss = max(64, min(mss, OUR_MSS))
        self.rx = bytearray()
        self.tx: bytes | None = None  # the answer (and then our FIN), once the request came
        self.peer_fin = False
        self.need_synack = True
        self.need_ack = False
        self.dup_acks = 0
        self.last_active = 0

    @property
    def data_start(self) -> int:
        return (self.iss + 1) & SEQ_MASK

    def fin_acked(self) -> bool:
        return (
            self.tx is not None and self.snd_una == (self.data_start + len(self.tx) + 1) & SEQ_MASK
        )

    def done(self) -> bool:
        return self.peer_fin and self.fin_acked() and not self.need_ack


class MmdsStack:
    """The MMDS endpoint of one virtio-net interface."""

    def __init__(self, mmds: Mmds, ipv4: str) -> None:
        self.mmds = mmds
        self.ip = bytes(int(x) for x in ipv4.split("."))
        if len(self.ip) != 4:
            raise ValueError(f"MMDS address {ipv4!r} is not an IPv4 address")
        self.conns: dict[tuple[bytes, int], Connection] = {}
        self.pending: deque[bytes] = deque()
        self._tick = 0
        self._ident = 0
        # A virtio-net device calls intercept() on its tx worker thread and next_frame() on
        # its rx worker thread.
        self._lock = threading.Lock()
        # What the guest sent the MMDS and what we sent back (`metrics()`).
        self.rx_frames = self.dropped = self.unusual = 0
        self.tx_frames = self.tx_bytes = self.tx_errors = self.resets = 0
        self.created = 0  # connections; those not in `conns` any more were destroyed

    def metrics(self) -> dict[str, int]:
        """The counters under Firecracker's `mmds` metrics names (src/vmm/src/logger/
        metrics.rs MmdsMetrics; its dumbo counts the same events)."""
        with self._lock:
            return {
                "rx_accepted": self.rx_frames, "rx_accepted_err": self.dropped,
                "rx_accepted_unusual": self.unusual, "tx_frames": self.tx_frames,
                "tx_bytes": self.tx_bytes, "tx_errors": self.tx_errors,
                "connections_created": self.created,
                "connections_destroyed": self.created - len(self.conns),
            }  # fmt: skip

    def reset(self) -> None:
        """Forget every connection and queued frame (the guest's driver was reset)."""
        with self._lock:
            self.conns.clear()
            self.pending.clear()

    # -- from the guest
    def wants(self, head: bytes) -> bool:
        """Whether a frame beginning with `head` (at least its first 42 bytes, when it has
        them) may be for the MMDS: an ARP packet for its address or IPv4 to it."""
        if len(head) < ETH_HDR + 20:
            return False
        kind = head[12:14]
        if kind == b"\x08\x06":
            return head[ETH_HDR + 24 : ETH_HDR + 28] == self.ip
        return kind == b"\x08\x00" and head[ETH_HDR + 16 : ETH_HDR + 20] == self.ip

    def intercept(self, frame: bytes) -> bool:
        """Process a frame the guest sent; True if it was for the MMDS (consumed here)."""
        if not self.wants(frame[: ETH_HDR + 28]):
            return False
        with self._lock:
            self.rx_frames += 1
            if frame[12:14] == b"\x08\x06":
                self._arp(frame)
            else:
                self._ipv4(frame)
        return True

    def _arp(self, frame: bytes) -> None:
        # RFC 826: hardware type 1 (Ethernet), protocol IPv4, lengths 6 and 4, op 1 (request).
        if len(frame) < ETH_HDR + ARP_LEN:
            self.dropped += 1
            return
        htype, ptype, hlen, plen, op = struct.unpack_from("!HHBBH", frame, ETH_HDR)
        if (htype, ptype, hlen, plen, op) != (1, ETHERTYPE_IPV4, 6, 4, 1):
            self.dropped += 1
            return
        sha = frame[ETH_HDR + 8 : ETH_HDR + 14]
        spa = frame[ETH_HDR + 14 : ETH_HDR + 18]
        reply = (
            sha
            + MMDS_MAC
            + b"\x08\x06"
            + struct.pack("!HHBBH", 1, ETHERTYPE_IPV4, 6, 4, 2)
            + MMDS_MAC
            + self.ip
            + sha
            + spa
        )
        self._queue(reply.ljust(MIN_ETH_FRAME, b"\0"))

    def _ipv4(self, frame: bytes) -> None:
        # RFC 791 §3.1: version 4, IHL >= 5 words, total length covering the header and
        # within the frame; no fragments (MF set or an offset), TCP only.
        ver_ihl, _, total, _, frag, _, proto = struct.unpack_from("!BBHHHBB", frame, ETH_HDR)
        ihl = (ver_ihl & 0x0F) * 4
        if (
            ver_ihl >> 4 != 4
            or ihl < IP_HDR
            or not ihl <= total <= len(frame) - ETH_HDR
            or frag & 0x3FFF
        ):
            self.dropped += 1
            return
        if proto != IPPROTO_TCP:  # well formed, but not TCP: "unusual" in Firecracker
            self.unusual += 1
            return
        src_ip = frame[ETH_HDR + 12 : ETH_HDR + 16]
        self._tcp(frame[6:12], src_ip, frame[ETH_HDR + ihl : ETH_HDR + total])

    def _tcp(self, mac: bytes, ip: bytes, seg: bytes) -> None:
        # RFC 9293 §3.1: the data offset covers the header and lies within the segment.
        if len(seg) < TCP_HDR:
            self.dropped += 1
            return
        sport, dport, seq, ack, off_flags, window = struct.unpack_from("!HHIIHH", seg)
        doff = (off_flags >> 12) * 4
        flags = off_flags & 0x3F
        if doff < TCP_HDR or doff > len(seg):
            self.dropped += 1
            return
        payload = seg[doff:]
        key = (ip, sport)
        conn = self.conns.get(key)
        if dport != HTTP_PORT or conn is None:
            if dport == HTTP_PORT and flags & (SYN | ACK | RST) == SYN:
                self._open(key, mac, seq, _mss(seg[TCP_HDR:doff]))
            elif not flags & RST:
                self._reset_reply(mac, ip, sport, dport, seq, ack, flags, len(payload))
            return
        self._tick += 1
        conn.last_active = self._tick
        if flags & RST:
            # RFC 9293 §3.10.7.4 (RFC 5961 §3): a reset counts only at the expected number.
            if seq == conn.rcv_nxt:
                del self.conns[key]
            return
        if flags & SYN:
            if seq == conn.irs:  # the guest sent its SYN again: it lacks our SYN-ACK
                conn.need_synack = conn.state is State.SYN_RECEIVED
                conn.need_ack = not conn.need_synack
            else:  # the guest reuses the port for a new connection
                del self.conns[key]
                if not flags & ACK:
                    self._open(key, mac, seq, _mss(seg[TCP_HDR:doff]))
            return
        if not flags & ACK:
            return  # RFC 9293 §3.10.7.4: a segment without ACK is dropped
        self._segment(conn, key, seq, ack, flags, window, payload)

    def _segment(
        self,
        conn: Connection,
        key: tuple[bytes, int],
        seq: int,
        ack: int,
        flags: int,
        window: int,
        payload: bytes,
    ) -> None:
        if conn.state is State.SYN_RECEIVED:
            if ack != conn.data_start:  # RFC 9293 §3.10.7.4: an unacceptable ACK: reset
                del self.conns[key]
                self._reset_reply(
                    conn.mac, conn.ip, conn.port, HTTP_PORT, seq, ack, flags, len(payload)
                )
                return
            conn.state = State.ESTABLISHED
            conn.snd_una = conn.snd_nxt = conn.snd_max = ack
        if _after(ack, conn.snd_max):  # acknowledges what was never sent
            conn.need_ack = True
            return
        if _after(ack, conn.snd_una):
            conn.snd_una, conn.dup_acks = ack, 0
            if _after(ack, conn.snd_nxt):
                conn.snd_nxt = ack
        elif (
            ack == conn.snd_una
            and conn.snd_una != conn.snd_max
            and not payload
            and not flags & FIN
            and window == conn.snd_wnd
        ):
            conn.dup_acks += 1
            if conn.dup_acks >= DUP_ACKS:  # send again from what the guest has
                conn.snd_nxt, conn.dup_acks = conn.snd_una, 0
        conn.snd_wnd = window
        if payload or flags & FIN:
            self._receive(conn, key, seq, flags, payload)
        if conn.done():
            del self.conns[key]

    def _receive(
        self, conn: Connection, key: tuple[bytes, int], seq: int, flags: int, payload: bytes
    ) -> None:
        conn.need_ack = True
        if seq != conn.rcv_nxt:
            # A retransmission overlapping what we have: keep its new part; anything else
            # (out of order, all old) only gets the ACK of what came in order.
            old = (conn.rcv_nxt - seq) & SEQ_MASK
            if old >= 0x80000000 or old > len(payload):
                return
            payload = payload[old:]
        if conn.peer_fin:
            return
        room = RCV_WINDOW - len(conn.rx)
        taken = payload[:room]
        if conn.tx is None:
            conn.rx += taken
        conn.rcv_nxt = (conn.rcv_nxt + len(taken)) & SEQ_MASK
        if flags & FIN and len(taken) == len(payload):
            conn.peer_fin = True
            conn.rcv_nxt = (conn.rcv_nxt + 1) & SEQ_MASK
        if conn.tx is None:
            self._serve(conn, key)

    def _serve(self, conn: Connection, key: tuple[bytes, int]) -> None:
        """Answer the request once it is whole (the answer closes the connection)."""
        try:
            parsed = http.parse(conn.rx)
        except http.TooLarge:
            del self.conns[key]
            self._send_reset(conn)
            return
        except http.HttpError as err:
            conn.tx = http.Response(err.status, err.message.encode()).encode()
        else:
            if parsed is not None:
                request, _ = parsed
                conn.tx = http.respond(self.mmds, request).encode(request.version)
            elif conn.peer_fin:  # the guest closed before a whole request: close too
                conn.tx = b""
        if conn.tx is not None:
            conn.rx = bytearray()

    def _open(self, key: tuple[bytes, int], mac: bytes, seq: int, mss: int) -> None:
        if len(self.conns) >= MAX_CONNECTIONS:
            oldest = min(self.conns, key=lambda k: self.conns[k].last_active)
            self._send_reset(self.conns.pop(oldest))
        conn = Connection(mac, key[0], key[1], seq, mss)
        self.created += 1
        self._tick += 1
        conn.last_active = self._tick
        self.conns[key] = conn

    # -- to the guest
    def next_frame(self) -> bytes | None:
        """The next frame for the guest's receive queue, or None."""
        with self._lock:
            frame = self._next_frame()
            if frame is not None:
                self.tx_frames += 1
                self.tx_bytes += len(frame)
            return frame

    def _next_frame(self) -> bytes | None:
        if self.pending:
            return self.pending.popleft()
        for key in list(self.conns):
            conn = self.conns[key]
            frame = self._output(conn)
            if frame is None:
                continue
            # Round robin: the connection served goes to the end of the order.
            del self.conns[key]
            if not conn.done():
                self.conns[key] = conn
            return frame
        return None

    def _output(self, conn: Connection) -> bytes | None:
        if conn.state is State.SYN_RECEIVED:
            if not conn.need_synack:
                return None
            conn.need_synack = False
            # Our only option: MSS (kind 2, length 4; RFC 9293 §3.2).
            return self._segment_frame(
                conn, conn.iss, SYN | ACK, b"", struct.pack("!BBH", 2, 4, OUR_MSS)
            )
        tx = conn.tx if conn.tx is not None else b""
        sent = (conn.snd_nxt - conn.data_start) & SEQ_MASK
        if sent < len(tx):
            usable = (conn.snd_una + conn.snd_wnd - conn.snd_nxt) & SEQ_MASK
            if 0 < usable < 0x80000000:
                n = min(conn.mss, len(tx) - sent, usable)
                seq = conn.snd_nxt
                conn.snd_nxt = (seq + n) & SEQ_MASK
                self._sent(conn)
                flags = ACK | (PSH if sent + n == len(tx) else 0)
                return self._segment_frame(conn, seq, flags, tx[sent : sent + n])
        elif conn.tx is not None and sent == len(tx):
            seq = conn.snd_nxt
            conn.snd_nxt = (seq + 1) & SEQ_MASK
            self._sent(conn)
            return self._segment_frame(conn, seq, FIN | ACK, b"")
        if conn.need_ack:
            conn.need_ack = False
            return self._segment_frame(conn, conn.snd_nxt, ACK, b"")
        return None

    def _sent(self, conn: Connection) -> None:
        conn.need_ack = False  # every segment carries the ACK
        if _after(conn.snd_nxt, conn.snd_max):
            conn.snd_max = conn.snd_nxt

    def _segment_frame(
        self, conn: Connection, seq: int, flags: int, payload: bytes, options: bytes = b""
    ) -> bytes:
        window = RCV_WINDOW - len(conn.rx)
        return self._frame(conn.mac, conn.ip, conn.port, seq, conn.rcv_nxt, flags, window,
                           payload, options)  # fmt: skip

    def _send_reset(self, conn: Connection) -> None:
        self._queue_reset(conn.mac, conn.ip, conn.port, conn.snd_nxt, conn.rcv_nxt, RST | ACK)

    def _reset_reply(self, mac: bytes, ip: bytes, sport: int, dport: int, seq: int, ack: int,
                     flags: int, length: int) -> None:  # fmt: skip
        """RFC 9293 §3.10.7.1: the reset for a segment no connection takes (`dport` is the
        port it was sent to: the reset comes from there)."""
        if flags & ACK:
            self._queue_reset(mac, ip, sport, ack, 0, RST, src_port=dport)
        else:
            seg_len = length + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
            self._queue_reset(mac, ip, sport, 0, (seq + seg_len) & SEQ_MASK, RST | ACK,
                              src_port=dport)  # fmt: skip

    def _queue_reset(self, mac: bytes, ip: bytes, port: int, seq: int, ack: int, flags: int,
                     *, src_port: int = HTTP_PORT) -> None:  # fmt: skip
        """Queue a reset segment to the guest's `port` (a zero window, no data)."""
        self.resets += 1
        self._queue(self._frame(mac, ip, port, seq, ack, flags, 0, b"", src_port=src_port))

    def _queue(self, frame: bytes) -> None:
        if len(self.pending) >= MAX_PENDING:
            self.tx_errors += 1  # like a frame lost on the wire: the guest sends again
            return
        self.pending.append(frame)

    def _frame(self, mac: bytes, ip: bytes, dport: int, seq: int, ack: int, flags: int,
               window: int, payload: bytes, options: bytes = b"", *,
               src_port: int = HTTP_PORT) -> bytes:  # fmt: skip
        """An Ethernet frame from the MMDS (`src_port` on its address) to the guest's `mac`,
        `ip` and `dport`."""
        tcp_len = TCP_HDR + len(options) + len(payload)
        self._ident = (self._ident + 1) & 0xFFFF
        # RFC 791: version 4, IHL 5, DF, TTL 64, TCP; RFC 9293 §3.1 for the TCP header.
        iph = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, IP_HDR + tcp_len, self._ident,
                                    0x4000, 64, IPPROTO_TCP, 0, self.ip, ip))  # fmt: skip
        struct.pack_into("!H", iph, 10, checksum(bytes(iph)))
        offset_flags = ((TCP_HDR + len(options)) // 4) << 12 | flags
        tcp = bytearray(struct.pack("!HHIIHHHH", src_port, dport, seq, ack, offset_flags,
                                    min(window, 0xFFFF), 0, 0))  # fmt: skip
        tcp += options + payload
        pseudo = self.ip + ip + struct.pack("!BBH", 0, IPPROTO_TCP, tcp_len)
        struct.pack_into("!H", tcp, 16, checksum(pseudo + bytes(tcp)))
        return mac + MMDS_MAC + b"\x08\x00" + bytes(iph) + bytes(tcp)


def _mss(options: bytes) -> int:
    """The MSS option of a SYN (RFC 9293 §3.2), else the default; other options skipped,
    a malformed list ends the walk."""
    i = 0
    while i < len(options):
        kind = options[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= len(options) or options[i + 1] < 2 or i + options[i + 1] > len(options):
            break
        if kind == 2 and options[i + 1] == 4:
            return int.from_bytes(options[i + 2 : i + 4], "big") or DEFAULT_MSS
        i += options[i + 1]
    return DEFAULT_MSS
