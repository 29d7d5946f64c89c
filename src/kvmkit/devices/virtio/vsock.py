"""virtio-vsock (virtio 1.2 §5.10): the virtio side; the host side, Firecracker's Unix
sockets, is `vsock_uds.UdsHost`.

Queues (§5.10.2): 0 rx (device -> driver packets), 1 tx (driver -> device), 2 event. The
configuration space is the guest's CID (§5.10.4). Every packet starts with a 44-byte header
(§5.10.6); stream connections follow the REQUEST/RESPONSE/RW/SHUTDOWN/RST state machine with
credit-based flow control (§5.10.6.3).

The host side, as Firecracker's:
- a host process connects to the Unix socket at `uds_path`, writes `CONNECT <port>\\n`, and the
  device asks the guest (REQUEST) to accept a connection on `<port>` from a fresh host port;
  when the guest answers RESPONSE the client reads `OK <hostport>\\n` and the socket carries the
  stream; a guest RST (nobody listening) closes the client;
- a guest connecting to host CID 2 port P is connected to the Unix socket `<uds_path>_P`
  (RST when nothing listens there).

Snapshots (docs/snapshot.md), as Firecracker: host connections do not survive them. A
restored device has none; it sends VIRTIO_VSOCK_EVENT_TRANSPORT_RESET on the event queue
(§5.10.6.6) and holds every rx packet until the driver has handled it, so the guest resets
its connected sockets (its listeners stay) before anything of a new connection reaches it.

Bounded buffering: data the guest sends is written straight to the host socket; what the
socket does not take waits in a per-connection buffer that the credit we gave the guest on
that connection (its buf_alloc, §5.10.6.3) bounds: a guest that sends beyond it is reset.
The credit of all connections together is capped too (`CREDIT_TOTAL`, 32 MiB): a new
connection gets CONN_BUF_ALLOC (256 KiB) or what is left when that is less, and is refused
(RST) when less than MIN_CONN_CREDIT is left; a closed connection gives its credit back.
A connection's credit never shrinks (a sender computing its free space as buf_alloc minus
the bytes in flight in unsigned arithmetic, as Linux does, would wrap below zero). So guest
data held by kvmkit is at most CREDIT_TOTAL. Data from a host socket is read straight into
guest rx buffers, only as much as the guest's credit allows and only while the guest has rx
buffers available: otherwise the socket is not read.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import selectors
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmkit.devices.virtio import iov
from kvmkit.devices.virtio.device import Budget, VirtioDevice
from kvmkit.devices.virtio.queue import Buffer, DescriptorChain, QueueError
from kvmkit.devices.virtio.vsock_uds import UdsHost
from kvmkit.guestlog import GuestLog
from kvmkit.snapshot.format import Fields, SnapshotError

log = logging.getLogger(__name__)

VIRTIO_ID_VSOCK = 19
QUEUE_SIZE = 256
RX, TX, EVENT = 0, 1, 2

HOST_CID = 2  # §5.10.4: the host's well-known CID
MIN_GUEST_CID = 3  # 0, 1 and 2 are reserved (§5.10.4); 0xFFFFFFFF is VMADDR_CID_ANY
MAX_GUEST_CID = 0xFFFFFFFE

# §5.10.6 struct virtio_vsock_hdr
HEADER = struct.Struct("<QQIIIHHIII")  # src_cid dst_cid src_port dst_port len type op flags
HDR_SIZE = HEADER.size  # 44                                       buf_alloc fwd_cnt
VIRTIO_VSOCK_TYPE_STREAM = 1
OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
# §5.10.6.6 struct virtio_vsock_event: le32 id
EVENT_STRUCT = struct.Struct("<I")
VIRTIO_VSOCK_EVENT_TRANSPORT_RESET = 0

CONN_BUF_ALLOC = 256 * 1024  # the credit we give the guest per connection (§5.10.6.3)
CREDIT_TOTAL = 32 << 20  # the credit of all connections together: guest data kvmkit may hold
MIN_CONN_CREDIT = 16 * 1024  # a connection that would get less is refused
MAX_PKT = 64 * 1024  # payload per packet either way (Linux: VIRTIO_VSOCK_MAX_PKT_BUF_SIZE)
MAX_CONNS = 1024  # connections at once: a guest cannot open unbounded host sockets
MAX_CONTROL = 1024  # control packets waiting for rx buffers; beyond, new ones are dropped
FIRST_HOST_PORT = 1 << 30  # host ports handed to host-initiated connections (as Firecracker)


@dataclass
class VsockConfig:
    """`--vsock cid=N,uds=PATH`."""

    cid: int
    uds_path: Path

    @classmethod
    def parse(cls, spec: str) -> VsockConfig:
        cid: int | None = None
        uds: str | None = None
        for opt in spec.split(","):
            key, sep, value = opt.partition("=")
            if key == "cid" and sep:
                try:
                    cid = int(value, 0)
                except ValueError:
                    raise ValueError(f"--vsock {spec}: cid {value!r} is not a number") from None
            elif key == "uds" and sep and value:
                uds = value
            else:
                raise ValueError(f"--vsock {spec}: unknown option {opt!r} (cid=N, uds=PATH)")
        if cid is None or uds is None:
            raise ValueError(f"--vsock {spec}: needs cid=N and uds=PATH")
        return cls(cid, Path(uds))

    def check(self, *, exists_ok: bool = False) -> None:
        """What `MachineConfig.validate` checks; raises ValueError. `exists_ok`: a restore
        deals with a socket file left at the path itself (`remove_stale_socket`)."""
        if not MIN_GUEST_CID <= self.cid <= MAX_GUEST_CID:
            raise ValueError(f"vsock cid {self.cid}: must be between 3 and {MAX_GUEST_CID}")
        # sun_path is 108 bytes with the NUL; `<uds>_<port>` must fit too.
        if len(os.fsencode(self.uds_path)) + len("_4294967295") > 107:
            raise ValueError(f"vsock uds {self.uds_path}: path too long for a Unix socket")
        if not self.uds_path.parent.is_dir():
            raise ValueError(f"vsock uds {self.uds_path}: no such directory")
        if not exists_ok and (self.uds_path.exists() or self.uds_path.is_symlink()):
            raise ValueError(f"vsock uds {self.uds_path}: already exists")


# After a restore: the TRANSPORT_RESET event is to be sent, or the driver's answer awaited.
RESET_SEND = "send"
RESET_ACK = "ack"

# Connection states
CONNECTING = "connecting"  # host-initiated: REQUEST sent, waiting for the guest's RESPONSE
ESTABLISHED = "established"


@dataclass(eq=False)
class _Conn:
    local_port: int  # the host side's port
    peer_port: int  # the guest's port
    sock: socket.socket
    state: str
    buf_alloc: int  # the credit we give the guest on this connection (from the pool)
    # Our receive side (guest -> host): what we told the guest (§5.10.6.3).
    fwd_cnt: int = 0  # bytes the guest sent that reached the host socket (u32, wraps)
    last_fwd_cnt_sent: int = 0
    pending: bytearray = field(default_factory=bytearray)  # not yet taken by the host socket
    # The guest's receive side (host -> guest).
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0  # bytes we sent the guest (u32, wraps)
    credit_requested: bool = False
    readable: bool = False  # the host socket has data (or EOF) we have not read yet
    host_eof: bool = False  # we told the guest SHUTDOWN SEND
    guest_shutdown: int = 0  # SHUTDOWN flags the guest sent
    watched: int = -1  # selector events the socket is watched for (-1: not watched)
    early_data: bool = False  # a host client sent data before the guest accepted

    def peer_credit(self) -> int:
        """How many bytes the guest can still take (§5.10.6.3: buf_alloc - (tx_cnt -
        fwd_cnt)); 0 when the guest reports a fwd_cnt that makes no sense."""
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF
        return max(0, self.peer_buf_alloc - in_flight)


class VirtioVsock(VirtioDevice):
    DEVICE_ID = VIRTIO_ID_VSOCK

    def __init__(self, cid: int, uds_path: str | Path, name: str = "vsock") -> None:
        super().__init__(name, [QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE], 0)
        self.glog = GuestLog(log)  # this module's logger, rate-limited
        if not MIN_GUEST_CID <= cid <= MAX_GUEST_CID:
            raise ValueError(f"vsock cid {cid}: must be between 3 and {MAX_GUEST_CID}")
        self.cid = cid
        self.host = UdsHost(uds_path)
        self.uds_path = self.host.uds_path
        self.conns: dict[tuple[int, int], _Conn] = {}  # (local_port, peer_port)
        self.credit_free = CREDIT_TOTAL  # credit not given to any connection
        self._control: collections.deque[bytes] = collections.deque()  # headers to send
        self._ready: collections.deque[_Conn] = collections.deque()  # readable host sockets
        self._rx_held: DescriptorChain | None = None
        self._next_port = FIRST_HOST_PORT
        self._reset: str | None = None  # RESET_SEND, RESET_ACK after a restore
        self._reset_level = 0  # event buffers left when the reset went out
        self.dropped_control = 0
        self.resets_sent = 0

    # -- VirtioDevice hooks
    def config_bytes(self) -> bytes:
        return struct.pack("<Q", self.cid)  # struct virtio_vsock_config (§5.10.4)

    def activate(self) -> None:
        watcher = self.watcher
        if watcher is not None:
            self.host.start(functools.partial(watcher.watch, self), watcher.unwatch,
                            self._host_connect)  # fmt: skip

    def stop_host_io(self) -> None:
        self.host.stop()
        for conn in self.conns.values():
            self._unwatch(conn)

    def reset_device(self) -> None:
        # §5.10.6.? a device reset ends every connection: the host clients see EOF.
        self.stop_host_io()
        for conn in list(self.conns.values()):
            conn.sock.close()
        self.host.close_clients()
        self.conns.clear()
        self.credit_free = CREDIT_TOTAL
        self._control.clear()
        self._ready.clear()
        self._rx_held = None
        self._reset = None

    def close(self) -> None:
        with self.lock:
            self.reset_device()
            self.host.close()
        super().close()

    # -- live migration: the destination binds the socket path; connections are reset
    def release_host(self) -> None:
        with self.lock:
            self.reset_device()  # host clients see EOF, as when a snapshotted VM stops
            self.host.close()  # the listener, and the socket file if it is still ours

    def reacquire_host(self) -> None:
        with self.lock:
            if self.host.reopen() and self.activated:
                # The guest's connections were reset on the host side: tell it (as after a
                # restore), and watch the new listener. The worker sends the reset when it
                # serves a queue: kick them, as a restore does, or the guest would not hear
                # of it until it next notified one.
                self.restored()
                self.kick_ready_queues()

    # -- snapshots: the guest CID and the next host port; no connection is saved
    def save_device(self) -> dict[str, Any]:
        return {"cid": self.cid, "next_port": self._next_port}

    @classmethod
    def check_device_state(cls, state: dict[str, Any], path: str) -> None:
        f = Fields(state, path)
        f.get_int("cid", MIN_GUEST_CID, MAX_GUEST_CID)
        f.get_int("next_port", FIRST_HOST_PORT, 0xFFFFFFFF)

    def restore_device(self, state: dict[str, Any], path: str) -> None:
        f = Fields(state, path)
        if f.get_int("cid", MIN_GUEST_CID, MAX_GUEST_CID) != self.cid:
            raise SnapshotError(f"snapshot state: {path}: guest CID {f.obj['cid']} was "
                                f"restored as {self.cid}")  # fmt: skip
        # Host ports go on from where they were: a guest socket reset by the restore keeps
        # its address until its program closes it, and a new connection from the same host
        # port would be answered by that socket (with a RST).
        self._next_port = f.get_int("next_port", FIRST_HOST_PORT, 0xFFFFFFFF)

    def restored(self) -> None:
        super().restored()  # watch the listening socket (a new one, this process's)
        # The guest still holds the connections of the process that took the snapshot.
        if self.queues[EVENT].ready:
            self._reset = RESET_SEND

    def describe_device(self) -> str:
        pending = sum(len(c.pending) for c in self.conns.values())
        return (f"{len(self.conns)} connections, {pending} B of guest data held, credit free "
                f"{self.credit_free}; {len(self._control)} control packets waiting "
                f"({self.dropped_control} dropped); {len(self.host.clients)} host clients")

    def held_chains(self) -> dict[int, int]:
        return {RX: 1} if self._rx_held is not None else {}

    def worker_groups(self) -> list[list[int]]:
        # One worker for the three queues: they share the connections (a tx packet queues
        # an rx answer; a host socket's data goes out on rx).
        return [[RX, TX, EVENT]]

    def process_queue(self, index: int, budget: Budget) -> None:
        if index == TX:
            self._process_tx(budget)
        # An rx notification means new rx buffers: packets waiting for them can go now. An
        # event queue notification (new event buffers) may be the driver's answer to a
        # TRANSPORT_RESET, which _fill_rx waits for.
        self._fill_rx()

    def _reset_done(self) -> bool:
        """After a restore: send VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (§5.10.6.6) in the next
        event buffer, then wait for the driver to have handled it. Linux resets its
        connected sockets, then gives the buffer back and notifies; a packet of a new
        connection that reached it before would be reset with the old ones (Firecracker
        holds rx the same way). True once rx may go on."""
        assert self.mem is not None
        queue = self.queues[EVENT]
        if self._reset == RESET_SEND:
            chain = queue.pop(self.mem)
            if chain is None:
                return False  # the driver's next event buffer (its notification) resumes
            # §5.10.6.6: event buffers are device-writable struct virtio_vsock_event.
            if chain.writable_length < EVENT_STRUCT.size:
                raise QueueError(f"vsock event buffer of {chain.writable_length} bytes < 4")
            # Read before the driver can see the event: one buffer more is its answer.
            self._reset_level = queue.pending(self.mem)
            iov.scatter(self.mem, chain.writable,
                        EVENT_STRUCT.pack(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET))  # fmt: skip
            # Linux handles an event only if the used length is exactly the event's size.
            self.complete(EVENT, chain.head, EVENT_STRUCT.size)
            self._reset = RESET_ACK
            queue.notify_on_next(self.mem)  # with EVENT_IDX the answer must notify too
            self.signal_used(EVENT)
            self.glog.info("virtio %s: transport reset sent", self.name)
        if queue.pending(self.mem) <= self._reset_level:
            return False
        self._reset = None
        return True

    # -- guest -> host
    def _process_tx(self, budget: Budget) -> None:
        assert self.mem is not None
        done = False
        while budget.take() and (chain := self.queues[TX].pop(self.mem)) is not None:
            self._handle_tx(chain)
            self.complete(TX, chain.head, 0)
            done = True
        if done:
            self.signal_used(TX)

    def _handle_tx(self, chain: DescriptorChain) -> None:
        assert self.mem is not None
        # §5.10.6: every packet starts with the header; a chain without one is malformed.
        raw = iov.gather(self.mem, chain.readable, HDR_SIZE)
        if len(raw) < HDR_SIZE:
            raise QueueError(f"vsock tx packet of {len(raw)} bytes is shorter than its header")
        src_cid, dst_cid, src_port, dst_port, length, ptype, op, flags, buf_alloc, fwd_cnt = (
            HEADER.unpack(raw)
        )
        # §5.10.6.2: the packet's len must match the payload that follows the header, and a
        # packet larger than any buffer a receiver offers is an error; both get a RST.
        payload_len = chain.readable_length - HDR_SIZE
        bad = ""
        if src_cid != self.cid:
            bad = f"src_cid {src_cid} is not the guest's {self.cid}"
        elif dst_cid != HOST_CID:
            bad = f"dst_cid {dst_cid} is not the host ({HOST_CID})"
        elif ptype != VIRTIO_VSOCK_TYPE_STREAM:
            bad = f"socket type {ptype} (only stream is offered)"
        elif length > payload_len or length > MAX_PKT:
            bad = f"len {length} with {payload_len} payload bytes (max {MAX_PKT})"
        elif op not in (OP_REQUEST, OP_RESPONSE, OP_RST, OP_SHUTDOWN, OP_RW,
                        OP_CREDIT_UPDATE, OP_CREDIT_REQUEST):  # fmt: skip
            bad = f"unknown op {op}"
        if bad:
            self.glog.info("virtio %s: bad tx packet: %s", self.name, bad)
            if op != OP_RST:  # §5.10.6.4: never answer a RST with a RST
                self._send_rst_raw(dst_port, src_port, src_cid)
                conn = self.conns.get((dst_port, src_port))
                if conn is not None and src_cid == self.cid:
                    self._close(conn)
            return
        key = (dst_port, src_port)
        conn = self.conns.get(key)
        if op == OP_REQUEST:
            if conn is not None:
                self._close(conn, rst=True)  # a REQUEST on a live connection: reset it
                return
            self._guest_connect(dst_port, src_port, buf_alloc, fwd_cnt)
            return
        if conn is None:
            if op != OP_RST:
                self._send_rst_raw(dst_port, src_port, src_cid)
            return
        # §5.10.6.3: every packet carries the sender's buf_alloc and fwd_cnt.
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        if conn.peer_credit() > 0:
            conn.credit_requested = False
        if op == OP_RST:
            self._close(conn)
        elif op == OP_RESPONSE:
            self._guest_accepted(conn)
        elif conn.state != ESTABLISHED:
            self._close(conn, rst=True)  # anything but RESPONSE/RST before it is a protocol error
        elif op == OP_RW:
            payload = iov.limit(iov.skip(chain.readable, HDR_SIZE), length)
            self._guest_data(conn, payload, length)
        elif op == OP_SHUTDOWN:
            conn.guest_shutdown |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND)
            self._flush(conn)
        elif op == OP_CREDIT_REQUEST:
            self._queue_packet(conn, OP_CREDIT_UPDATE)
        # CREDIT_UPDATE: the credit fields were taken above.
        if conn.sock.fileno() >= 0:
            self._update_watch(conn)

    def _take_credit(self) -> int:
        """The credit for a new connection from the pool (module docstring); 0: refuse it."""
        if len(self.conns) >= MAX_CONNS:
            return 0
        credit = min(CONN_BUF_ALLOC, self.credit_free)
        if credit < MIN_CONN_CREDIT:
            return 0
        self.credit_free -= credit
        return credit

    def _guest_connect(self, local_port: int, peer_port: int, buf_alloc: int, fwd_cnt: int) -> None:
        """A guest REQUEST to host port `local_port`: connect to `<uds_path>_<port>`. Refused
        (RST: the guest's connect fails with ECONNRESET, as when nobody listens) when
        nothing listens there or the connection or credit limits are reached."""
        credit = self._take_credit()
        if not credit:
            self.glog.info("virtio %s: guest connection to port %d refused: %d connections, "
                           "%d bytes of credit left", self.name, local_port, len(self.conns),
                           self.credit_free)  # fmt: skip
            self._send_rst_raw(local_port, peer_port, self.cid)
            return
        try:
            sock = self.host.connect(local_port)
        except OSError as err:
            self.credit_free += credit
            self.glog.debug("virtio %s: connect %s_%d: %s", self.name, self.uds_path, local_port,
                            err)  # fmt: skip
            self._send_rst_raw(local_port, peer_port, self.cid)
            return
        conn = _Conn(local_port, peer_port, sock, ESTABLISHED, credit, peer_buf_alloc=buf_alloc,
                     peer_fwd_cnt=fwd_cnt)  # fmt: skip
        self.conns[(local_port, peer_port)] = conn
        self._queue_packet(conn, OP_RESPONSE)
        self._update_watch(conn)

    def _guest_accepted(self, conn: _Conn) -> None:
        """The guest's RESPONSE to our REQUEST: the host client learns its port."""
        if conn.state != CONNECTING:
            self._close(conn, rst=True)
            return
        conn.state = ESTABLISHED
        if conn.early_data:
            conn.readable = True
            self._ready.append(conn)
        if not self.host.send_ok(conn.sock, conn.local_port):
            self._close(conn, rst=True)  # the client went away

    def _guest_data(self, conn: _Conn, payload: list[Buffer], length: int) -> None:
        assert self.mem is not None
        if conn.guest_shutdown & SHUTDOWN_SEND:
            self._close(conn, rst=True)  # data after the guest said it would send none
            return
        # §5.10.6.3: the guest may send at most the credit we gave; what the host socket has
        # not taken yet must fit in it. More is a guest bug: reset the connection rather
        # than buffer without bound.
        if len(conn.pending) + length > conn.buf_alloc:
            self.glog.info("virtio %s: port %d: guest exceeded its credit", self.name,
                           conn.peer_port)  # fmt: skip
            self._close(conn, rst=True)
            return
        views = iov.views(self.mem, payload)
        sent = 0
        if not conn.pending:
            try:
                sent = conn.sock.sendmsg(views)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close(conn, rst=True)  # the host side went away (EPIPE)
                return
        conn.fwd_cnt = (conn.fwd_cnt + sent) & 0xFFFFFFFF
        if sent < length:
            rest = iov.skip(payload, sent)
            for v in iov.views(self.mem, rest):
                conn.pending += v
        self._credit_check(conn)

    def _flush(self, conn: _Conn) -> None:
        """Write buffered guest data to the host socket; then act on the guest's SHUTDOWN."""
        if conn.pending:
            try:
                sent = conn.sock.send(conn.pending)
            except BlockingIOError:
                sent = 0
            except OSError:
                self._close(conn, rst=True)
                return
            del conn.pending[:sent]
            conn.fwd_cnt = (conn.fwd_cnt + sent) & 0xFFFFFFFF
            self._credit_check(conn)
        if conn.pending:
            return
        if conn.guest_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND:
            # §5.10.6.5: the guest closed; the connection ends with our RST (Linux waits
            # for it before it frees the socket).
            self._close(conn, rst=True)
        elif conn.guest_shutdown & SHUTDOWN_SEND:
            try:
                conn.sock.shutdown(socket.SHUT_WR)  # the host client reads EOF
            except OSError:
                pass

    def _credit_check(self, conn: _Conn) -> None:
        """Tell the guest about freed buffer space when it matters (§5.10.6.3): once half of
        the credit was freed since the last report, so a sender never waits for long."""
        if (conn.fwd_cnt - conn.last_fwd_cnt_sent) & 0xFFFFFFFF >= conn.buf_alloc // 2:
            self._queue_packet(conn, OP_CREDIT_UPDATE)

    # -- host -> guest
    def _host_connect(self, sock: socket.socket, port: int) -> None:
        """A host program's `CONNECT <port>` (UdsHost): ask the guest (REQUEST), or close
        the socket at once when the connection or credit limits are reached."""
        credit = self._take_credit()
        if not credit:
            sock.close()
            return
        local = self._alloc_port(port)
        conn = _Conn(local, port, sock, CONNECTING, credit)
        self.conns[(local, port)] = conn
        self._queue_packet(conn, OP_REQUEST)
        self._update_watch(conn)
        self._fill_rx()

    def _alloc_port(self, peer_port: int) -> int:
        while (self._next_port, peer_port) in self.conns:
            self._next_port = max(FIRST_HOST_PORT, (self._next_port + 1) & 0xFFFFFFFF)
        port = self._next_port
        self._next_port = max(FIRST_HOST_PORT, (self._next_port + 1) & 0xFFFFFFFF)
        return port

    def _host_event(self, conn: _Conn, events: int) -> None:
        if self.conns.get((conn.local_port, conn.peer_port)) is not conn:
            return
        if events & selectors.EVENT_WRITE:
            self._flush(conn)
            if self.conns.get((conn.local_port, conn.peer_port)) is not conn:
                self._fill_rx()
                return
        if events & selectors.EVENT_READ and conn.state == ESTABLISHED and not conn.readable:
            conn.readable = True
            self._ready.append(conn)
        self._update_watch(conn)
        self._fill_rx()

    def _update_watch(self, conn: _Conn) -> None:
        """Watch the host socket for what we can act on now: reading only while we have
        not seen it readable (the data waits in the socket until the guest can take it),
        writing only while guest data waits."""
        want = 0
        if conn.state == ESTABLISHED and not conn.readable and not conn.host_eof:
            want |= selectors.EVENT_READ
        if conn.pending:
            want |= selectors.EVENT_WRITE
        if conn.state == CONNECTING:
            # Watch for a client that hangs up before the guest answers (until it sends data
            # early: that waits in the socket for the connection).
            want = 0 if conn.early_data else selectors.EVENT_READ
        if want == conn.watched or self.watcher is None:
            return
        if want:
            self.watcher.watch(self, conn.sock.fileno(), want,
                               functools.partial(self._host_event_any, conn))  # fmt: skip
        else:
            self.watcher.unwatch(conn.sock.fileno())
        conn.watched = want

    def _host_event_any(self, conn: _Conn, events: int) -> None:
        if conn.state == CONNECTING:
            try:
                hung_up = conn.sock.recv(1, socket.MSG_PEEK) == b""
            except BlockingIOError:
                return
            except OSError:
                hung_up = True
            if hung_up:  # the client gave up before the guest answered
                self._close(conn, rst=True)
                self._fill_rx()
            else:
                conn.early_data = True
                self._update_watch(conn)
            return
        self._host_event(conn, events)

    def _unwatch(self, conn: _Conn) -> None:
        if conn.watched > 0 and self.watcher is not None:
            self.watcher.unwatch(conn.sock.fileno())
        conn.watched = -1

    def _close(self, conn: _Conn, *, rst: bool = False) -> None:
        if self.conns.get((conn.local_port, conn.peer_port)) is conn:
            del self.conns[(conn.local_port, conn.peer_port)]
            self.credit_free += conn.buf_alloc
            conn.pending = bytearray()
        self._unwatch(conn)
        conn.sock.close()
        conn.readable = False
        if rst:
            self._send_rst_raw(conn.local_port, conn.peer_port, self.cid)

    # -- the rx queue
    def _header(self, conn: _Conn, op: int, length: int = 0, flags: int = 0) -> bytes:
        conn.last_fwd_cnt_sent = conn.fwd_cnt
        return HEADER.pack(HOST_CID, self.cid, conn.local_port, conn.peer_port, length,
                           VIRTIO_VSOCK_TYPE_STREAM, op, flags, conn.buf_alloc,
                           conn.fwd_cnt)  # fmt: skip

    def _queue_packet(self, conn: _Conn, op: int, flags: int = 0) -> None:
        self._queue_raw(self._header(conn, op, 0, flags))

    def _queue_raw(self, header: bytes) -> None:
        if len(self._control) >= MAX_CONTROL:
            # A guest that gives no rx buffers yet keeps provoking answers: drop, do not grow.
            self.dropped_control += 1
            return
        self._control.append(header)

    def _send_rst_raw(self, local_port: int, peer_port: int, peer_cid: int) -> None:
        self.resets_sent += 1
        self._queue_raw(HEADER.pack(HOST_CID, peer_cid, local_port, peer_port, 0,
                                    VIRTIO_VSOCK_TYPE_STREAM, OP_RST, 0, 0, 0))  # fmt: skip

    def _take_rx(self) -> DescriptorChain | None:
        assert self.mem is not None
        held = self._rx_held
        if held is not None:
            self._rx_held = None
            return held
        chain = self.queues[RX].pop(self.mem)
        # §5.10.6.1: rx buffers take a whole header; shorter ones are a driver bug.
        if chain is not None and chain.writable_length < HDR_SIZE:
            raise QueueError(f"vsock rx buffer of {chain.writable_length} bytes < header")
        return chain

    def _next_ready(self) -> _Conn | None:
        """A connection with data to read that the guest has credit for (round robin)."""
        for _ in range(len(self._ready)):
            conn = self._ready[0]
            if not conn.readable or conn.sock.fileno() < 0:
                self._ready.popleft()
                continue
            if conn.peer_credit() > 0:
                self._ready.rotate(-1)
                return conn
            self._ready.rotate(-1)
            if not conn.credit_requested:
                conn.credit_requested = True
                self._queue_packet(conn, OP_CREDIT_REQUEST)
        return None

    def _fill_rx(self) -> None:
        assert self.mem is not None
        if self._reset is not None and not self._reset_done():
            return
        used = False
        while True:
            conn = None if self._control else self._next_ready()
            if not self._control and conn is None:
                break
            chain = self._take_rx()
            if chain is None:
                break  # the rx notification resumes us
            if self._control:
                iov.scatter(self.mem, chain.writable, self._control.popleft())
                self.complete(RX, chain.head, HDR_SIZE)
                used = True
                continue
            assert conn is not None
            written = self._read_host(conn, chain)
            if written is None:
                self._rx_held = chain
                continue
            self.complete(RX, chain.head, written)
            used = True
        if used:
            self.signal_used(RX)

    def _read_host(self, conn: _Conn, chain: DescriptorChain) -> int | None:
        """Read from the host socket into `chain` after its header; None: nothing to read
        (the chain is kept for the next packet)."""
        assert self.mem is not None
        room = min(chain.writable_length - HDR_SIZE, conn.peer_credit(), MAX_PKT)
        payload = iov.limit(iov.skip(chain.writable, HDR_SIZE), room)
        try:
            n = conn.sock.recvmsg_into(iov.views(self.mem, payload, write=True))[0] if room else 0
        except BlockingIOError:
            conn.readable = False
            self._update_watch(conn)
            return None
        except OSError:
            n = -1
        if n < 0:
            # The host side broke the connection (ECONNRESET): the guest gets a RST.
            self._close(conn)
            header = HEADER.pack(HOST_CID, self.cid, conn.local_port, conn.peer_port, 0,
                                 VIRTIO_VSOCK_TYPE_STREAM, OP_RST, 0, 0, 0)  # fmt: skip
            self.resets_sent += 1
        elif n == 0 and room:
            # EOF: the host will send no more (SHUTDOWN SEND); the guest may still write
            # (half-close), and its own SHUTDOWN ends the connection.
            conn.readable = False
            conn.host_eof = True
            self._update_watch(conn)
            header = self._header(conn, OP_SHUTDOWN, 0, SHUTDOWN_SEND)
        else:
            conn.tx_cnt = (conn.tx_cnt + n) & 0xFFFFFFFF
            header = self._header(conn, OP_RW, n)
        iov.scatter(self.mem, chain.writable, header)
        return HDR_SIZE + max(n, 0)
