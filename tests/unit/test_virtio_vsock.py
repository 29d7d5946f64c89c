"""virtio-vsock (virtio 1.2 §5.10) driven by a mock guest driver over virtio-mmio, served by
the real worker thread, with real Unix sockets on the host side (Firecracker's protocol)."""

from __future__ import annotations

import copy
import json
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from virtio_mock import MEM_SIZE, MmioGuest, restore_as_new_process, wait_for

from kvmkit.devices.virtio import mmio as r
from kvmkit.devices.virtio import vsock as v
from kvmkit.devices.virtio.device import (
    STATUS_NEEDS_RESET,
    VirtioState,
)
from kvmkit.devices.virtio.queue import VIRTQ_DESC_F_WRITE
from kvmkit.devices.virtio.worker import VirtioWorkers
from kvmkit.snapshot.format import SnapshotError

CID = 42
RX_BUF = v.HDR_SIZE + 4096  # what Linux 6.1 gives: header + 4 KiB
RX_DATA = 0x20000  # rx buffers: one per descriptor slot
TX_DATA, TX_END = 0x40000, 0xF0000
EVENT_DATA = 0xF8000  # event buffers (struct virtio_vsock_event, 4 bytes): one per slot

Packet = tuple[int, int, int, int, int, int, int, int, int, int, bytes]



class Guest(MmioGuest):
    """The guest's vsock driver: rx/tx/event queues over virtio-mmio, packets as tuples."""

    rx_queue, rx_data, rx_buf = v.RX, RX_DATA, RX_BUF

    def __init__(self, dev: v.VirtioVsock, size: int = 16) -> None:
        super().__init__(dev, 3, size, data_base=TX_DATA, data_end=TX_END)
        self.dev: v.VirtioVsock = dev
        self.received: list[Packet] = []

    def give_events(self, count: int) -> None:
        """Event buffers, as Linux posts them at probe and after handling each event."""
        drv = self.q[v.EVENT]
        for _ in range(count):
            slot = drv.avail_idx % self.size
            drv.write_desc(drv.desc_base, slot, EVENT_DATA + 4 * slot, 4, VIRTQ_DESC_F_WRITE, 0)
            drv.publish(slot)
        self.wr(r.QUEUE_NOTIFY, v.EVENT)

    def events(self) -> list[tuple[int, int]]:
        """(used length, event id) of the event buffers the device returned."""
        return [(length, int(struct.unpack("<I", self.mem.read(EVENT_DATA + 4 * slot, 4))[0]))
                for slot, length in self.q[v.EVENT].used()]  # fmt: skip

    def poll(self) -> list[Packet]:
        for slot, length in self.q[v.RX].used():
            raw = self.mem.read(RX_DATA + slot * RX_BUF, length)
            hdr = v.HEADER.unpack(raw[: v.HDR_SIZE])
            assert hdr[4] == length - v.HDR_SIZE  # the header's len is what was written
            self.received.append((*hdr, raw[v.HDR_SIZE :]))
        return self.received

    def expect(self, op: int, timeout: float = 5.0, skip: tuple[int, ...] = ()) -> Packet:
        """The next received packet, which must have operation `op` (after any of `skip`)."""
        while True:
            wait_for(lambda: self.poll(), timeout)
            pkt = self.received.pop(0)
            if pkt[6] not in skip:
                break
        assert pkt[6] == op, f"expected op {op}, got {pkt}"
        return pkt

    def send(self, op: int, src_port: int, dst_port: int, payload: bytes = b"", *,
             buf_alloc: int = 1 << 20, fwd_cnt: int = 0, flags: int = 0, src_cid: int = CID,
             dst_cid: int = v.HOST_CID, ptype: int = 1, length: int | None = None,
             raw: bytes | None = None, wait: bool = True) -> None:  # fmt: skip
        hdr = v.HEADER.pack(src_cid, dst_cid, src_port, dst_port,
                            len(payload) if length is None else length, ptype, op, flags,
                            buf_alloc, fwd_cnt)  # fmt: skip
        drv = self.q[v.TX]
        drv.add_chain([raw if raw is not None else hdr + payload], [])
        self.wr(r.QUEUE_NOTIFY, v.TX)
        if wait:
            wait_for(lambda: drv.used())


@pytest.fixture
def worker() -> Iterator[VirtioWorkers]:
    w = VirtioWorkers()
    w.start()
    yield w
    w.close()


@pytest.fixture
def guest(tmp_path: Path, worker: VirtioWorkers) -> Iterator[Guest]:
    dev = v.VirtioVsock(CID, tmp_path / "v.sock")
    worker.add(dev)
    g = Guest(dev)
    g.init()
    yield g
    dev.close()
    assert not (tmp_path / "v.sock").exists()


def host_connect(g: Guest, port: int) -> tuple[socket.socket, Packet]:
    """A host client's CONNECT; returns it and the REQUEST the guest got."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(str(g.dev.uds_path))
    client.sendall(f"CONNECT {port}\n".encode())
    req = g.expect(v.OP_REQUEST)
    assert req[:4] == (v.HOST_CID, CID, req[2], port) and req[2] >= v.FIRST_HOST_PORT
    return client, req


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"EOF after {len(out)} of {n} bytes"
        out += chunk
    return out


def test_config_space_is_the_guest_cid(guest: Guest) -> None:
    assert guest.dev.read_config(0, 8) == struct.pack("<Q", CID)
    assert guest.rd(r.DEVICE_ID) == 19


def test_host_initiated_connection_credit_and_close(guest: Guest) -> None:
    guest.give_rx(8)
    client, req = host_connect(guest, 5000)
    host_port = req[2]
    # The guest accepts with a small receive buffer: 4096 bytes of credit.
    guest.send(v.OP_RESPONSE, 5000, host_port, buf_alloc=4096)
    assert client.recv(64) == f"OK {host_port}\n".encode()

    data = bytes(range(256)) * 40  # 10240 bytes: more than the guest's credit
    client.sendall(data)
    got = b""
    # Only 4096 bytes arrive until the guest frees buffer space; then the device asks
    # for credit (CREDIT_REQUEST) rather than send more.
    while len(got) < 4096:
        pkt = guest.expect(v.OP_RW)
        assert pkt[2:4] == (host_port, 5000) and pkt[8] == v.CONN_BUF_ALLOC
        got += pkt[10]
    assert got == data[:4096]
    guest.expect(v.OP_CREDIT_REQUEST)
    time.sleep(0.1)
    assert guest.poll() == []  # nothing beyond the credit
    # The guest consumed it: a credit update lets the rest come.
    guest.send(v.OP_CREDIT_UPDATE, 5000, host_port, buf_alloc=4096, fwd_cnt=4096)
    while len(got) < 8192:
        got += guest.expect(v.OP_RW)[10]
    guest.expect(v.OP_CREDIT_REQUEST)  # out of credit again
    guest.send(v.OP_CREDIT_UPDATE, 5000, host_port, buf_alloc=4096, fwd_cnt=8192)
    while len(got) < len(data):
        got += guest.expect(v.OP_RW)[10]
    assert got == data

    # Guest -> host, and the host's EOF reaches the guest as SHUTDOWN SEND (half-close).
    guest.send(v.OP_RW, 5000, host_port, b"hello from the guest", buf_alloc=4096, fwd_cnt=10240)
    assert recv_exactly(client, 20) == b"hello from the guest"
    client.shutdown(socket.SHUT_WR)
    pkt = guest.expect(v.OP_SHUTDOWN)
    assert pkt[7] == v.SHUTDOWN_SEND
    guest.send(v.OP_RW, 5000, host_port, b"after", buf_alloc=4096, fwd_cnt=10240)
    assert recv_exactly(client, 5) == b"after"
    # The guest closes: SHUTDOWN both ways; the device ends it with a RST, the client EOF.
    guest.send(v.OP_SHUTDOWN, 5000, host_port, flags=3, buf_alloc=4096, fwd_cnt=10240)
    guest.expect(v.OP_RST)
    assert client.recv(10) == b""
    assert guest.dev.conns == {}


def test_guest_initiated_connection_to_uds_port(guest: Guest) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{guest.dev.uds_path}_6000")
    listener.listen(1)
    listener.settimeout(5)
    guest.give_rx(8)
    guest.send(v.OP_REQUEST, 1234, 6000, buf_alloc=65536)
    resp = guest.expect(v.OP_RESPONSE)
    assert resp[:4] == (v.HOST_CID, CID, 6000, 1234)
    conn, _ = listener.accept()
    conn.settimeout(5)
    payload = bytes(i * 7 & 0xFF for i in range(60000))
    guest.send(v.OP_RW, 1234, 6000, payload, buf_alloc=65536)
    assert recv_exactly(conn, len(payload)) == payload
    conn.sendall(b"reply")
    assert guest.expect(v.OP_RW)[10] == b"reply"
    conn.close()
    assert guest.expect(v.OP_SHUTDOWN)[7] == v.SHUTDOWN_SEND
    guest.send(v.OP_SHUTDOWN, 1234, 6000, flags=3)
    guest.expect(v.OP_RST)
    listener.close()


def test_refusals_are_resets(guest: Guest) -> None:
    guest.give_rx(8)
    # Nothing listens on <uds>_7000: the guest's connect is reset.
    guest.send(v.OP_REQUEST, 1234, 7000)
    rst = guest.expect(v.OP_RST)
    assert rst[:4] == (v.HOST_CID, CID, 7000, 1234)
    # No guest listener: the guest answers the REQUEST with RST, the host client sees EOF.
    client, req = host_connect(guest, 5001)
    guest.send(v.OP_RST, 5001, req[2])
    assert client.recv(10) == b""
    # A malformed CONNECT line closes the client without bothering the guest.
    bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bad.settimeout(5)
    bad.connect(str(guest.dev.uds_path))
    bad.sendall(b"CONNECT x\n")
    assert bad.recv(10) == b""
    time.sleep(0.05)
    assert guest.poll() == []


def test_a_guest_beyond_its_credit_is_reset_not_buffered(guest: Guest) -> None:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{guest.dev.uds_path}_6001")
    listener.listen(1)
    guest.give_rx(8)
    guest.send(v.OP_REQUEST, 99, 6001)
    guest.expect(v.OP_RESPONSE)
    conn, _ = listener.accept()  # and never read: the socket fills, then kvmkit's buffer
    chunk = bytes(v.MAX_PKT)
    conn_state = guest.dev.conns[(6001, 99)]
    for _ in range(16):
        guest.send(v.OP_RW, 99, 6001, chunk)
        assert len(conn_state.pending) <= v.CONN_BUF_ALLOC
        if (6001, 99) not in guest.dev.conns:
            break
    assert (6001, 99) not in guest.dev.conns
    guest.expect(v.OP_RST, skip=(v.OP_CREDIT_UPDATE,))  # the guest ignored the updates
    assert not guest.dev.status & STATUS_NEEDS_RESET
    conn.close()
    listener.close()


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"src_cid": 7}, "wrong src_cid"),
        ({"dst_cid": 9}, "not for the host"),
        ({"ptype": 2}, "seqpacket is not offered"),
        ({"op": 99}, "unknown op"),
        ({"length": 100}, "len beyond the payload"),
        ({"length": v.MAX_PKT + 1, "payload": bytes(v.MAX_PKT + 1)}, "len over 64 KiB"),
    ],
)
def test_hostile_packets_get_a_reset(guest: Guest, kwargs: dict[str, object], why: str) -> None:
    guest.give_rx(4)
    op = int(kwargs.pop("op", v.OP_RW))  # type: ignore[call-overload]
    payload = kwargs.pop("payload", b"")
    guest.send(op, 1, 2, payload, **kwargs)  # type: ignore[arg-type]
    rst = guest.expect(v.OP_RST)
    assert rst[2:4] == (2, 1), why
    assert not guest.dev.status & STATUS_NEEDS_RESET
    # The device still works.
    guest.send(v.OP_REQUEST, 5, 7100)
    guest.expect(v.OP_RST)


def test_malformed_chains_need_reset_and_the_device_recovers(guest: Guest) -> None:
    guest.send(v.OP_RW, 1, 2, raw=b"short", wait=False)  # a tx packet without a header
    wait_for(lambda: guest.dev.status & STATUS_NEEDS_RESET)
    guest.init()  # the driver resets the device (§2.1.2) and it works again
    assert not guest.dev.status & STATUS_NEEDS_RESET
    guest.rx_slot = 0
    guest.give_rx(1, length=20)  # an rx buffer that cannot hold a header
    guest.send(v.OP_REQUEST, 5, 7100, wait=False)
    wait_for(lambda: guest.dev.status & STATUS_NEEDS_RESET)
    guest.init()
    guest.rx_slot = 0
    guest.give_rx(2)
    guest.send(v.OP_REQUEST, 5, 7100)
    guest.expect(v.OP_RST)


def test_answers_wait_for_rx_buffers_and_are_bounded(guest: Guest) -> None:
    # No rx buffers: a flood of refused REQUESTs queues RSTs up to a bound, no further.
    for port in range(v.MAX_CONTROL + 50):
        guest.send(v.OP_REQUEST, port, 7200)
    assert len(guest.dev._control) == v.MAX_CONTROL
    assert guest.dev.dropped_control == 50
    guest.give_rx(4)
    for port in range(4):
        assert guest.expect(v.OP_RST)[3] == port


def test_reset_closes_host_connections(guest: Guest) -> None:
    guest.give_rx(4)
    client, req = host_connect(guest, 5002)
    guest.send(v.OP_RESPONSE, 5002, req[2])
    assert client.recv(64).startswith(b"OK ")
    guest.wr(r.STATUS, 0)  # driver reset
    assert client.recv(10) == b""
    assert guest.dev.conns == {}


@pytest.mark.parametrize("posted", [4, 0], ids=["event-buffers-posted", "none-yet"])
def test_restore_resets_the_guest_then_new_connections_work(
    guest: Guest, worker: VirtioWorkers, posted: int
) -> None:
    """Firecracker's behaviour: connections do not survive a snapshot. The device restored
    (as in another process, over a copy of guest memory) has none; it sends the guest
    VIRTIO_VSOCK_EVENT_TRANSPORT_RESET in an event buffer (the first one the guest posts,
    if it had none) and holds every rx packet until the guest gave that buffer back, so a
    new connection never reaches the guest before the reset. Then connections work both
    ways, from the next host port."""
    g = guest
    uds = g.dev.uds_path
    g.give_rx(8)
    if posted:
        g.give_events(posted)
    client, req = host_connect(g, 5000)
    old_port = req[2]
    g.send(v.OP_RESPONSE, 5000, old_port)
    assert client.recv(64) == f"OK {old_port}\n".encode()
    client.sendall(b"before")
    assert g.expect(v.OP_RW)[10] == b"before"

    assert worker.pause()
    state = json.loads(json.dumps(g.dev.save().to_dict()))
    transport_state = g.transport.save().to_dict()
    assert state["device"] == {"cid": CID, "next_port": old_port + 1}
    memory = g.mem.read(0, MEM_SIZE)
    g.dev.close()  # the old process ends: its host connections and socket file with it
    assert client.recv(10) == b""
    assert not uds.exists()
    assert g.events() == []  # nothing was sent while running

    dev2 = v.VirtioVsock(CID, uds)
    worker2 = VirtioWorkers()
    try:
        restore_as_new_process(g, dev2, worker2, memory, state, transport_state)
        if not posted:
            time.sleep(0.1)
            assert g.events() == []  # sent as soon as the guest posts an event buffer
            g.give_events(1)
        events: list[tuple[int, int]] = []
        wait_for(lambda: events.extend(g.events()) or events)
        assert events == [(4, v.VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)]
        # With EVENT_IDX the guest's next event buffer notifies (its answer).
        assert g.q[v.EVENT].avail_event() == g.q[v.EVENT].avail_idx

        # A host connection before the guest has handled the reset: its REQUEST waits, and
        # so does the RST for a packet on the connection of before the snapshot.
        client2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client2.settimeout(5)
        client2.connect(str(uds))
        client2.sendall(b"CONNECT 5000\n")
        g.send(v.OP_RW, 5000, old_port, b"stale")
        time.sleep(0.2)
        assert g.poll() == []
        g.give_events(1)  # Linux reset its sockets and gives the buffer back
        # Both held packets come now, in the order the worker took their causes (the
        # client's CONNECT line and the guest's stale packet race each other on a loaded
        # machine): the RST for the stale connection and the new REQUEST.
        wait_for(lambda: len(g.poll()) >= 2)
        held = {pkt[6]: pkt for pkt in (g.received.pop(0), g.received.pop(0))}
        assert sorted(held) == sorted([v.OP_RST, v.OP_REQUEST]), held
        assert held[v.OP_RST][2:4] == (old_port, 5000)
        req2 = held[v.OP_REQUEST]
        assert req2[2:4] == (old_port + 1, 5000)  # host ports go on: no clash with before
        g.send(v.OP_RESPONSE, 5000, req2[2])
        assert client2.recv(64) == f"OK {old_port + 1}\n".encode()
        client2.sendall(b"after")
        assert g.expect(v.OP_RW)[10] == b"after"
        g.send(v.OP_RW, 5000, req2[2], b"back")
        assert recv_exactly(client2, 4) == b"back"

        # Guest -> host (<uds>_6000) as well.
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(f"{uds}_6000")
        listener.listen(1)
        listener.settimeout(5)
        g.send(v.OP_REQUEST, 1234, 6000)
        assert g.expect(v.OP_RESPONSE)[2:4] == (6000, 1234)
        conn, _ = listener.accept()
        g.send(v.OP_RW, 1234, 6000, b"guest after restore")
        assert recv_exactly(conn, 19) == b"guest after restore"
        conn.close()
        listener.close()
        client2.close()
        assert dev2.errors == []
    finally:
        worker2.close()
        dev2.close()
        worker.resume()
    assert not uds.exists()


def test_restore_refuses_another_cid_or_malformed_vsock_state(guest: Guest) -> None:
    guest.give_events(2)
    state = guest.dev.save()
    other = copy.deepcopy(state.to_dict())
    other["device"]["cid"] = CID + 1
    with pytest.raises(SnapshotError, match=f"guest CID {CID + 1} was restored as {CID}"):
        guest.dev.restore(VirtioState.from_dict(other, "d"))
    for key, value, message in (("cid", 2, "cid must be an integer in"),
                                ("next_port", 80, "next_port must be an integer in"),
                                ("next_port", "x", "next_port must be an integer in")):  # fmt: skip
        bad = copy.deepcopy(state.to_dict())
        bad["device"][key] = value
        with pytest.raises(SnapshotError, match=message):
            v.VirtioVsock.check_device_state(bad["device"], "d")
    assert guest.dev.save() == state


def test_a_failed_migration_hands_the_socket_back(guest: Guest, worker: VirtioWorkers) -> None:
    """A live migration's hand-over (kvmkit.migration): the paused source lets go of its
    socket (host programs see EOF, the path is free for the destination to bind). When the
    migration fails after that, the source binds the path again, tells the guest that its
    connections were reset (as after a restore) and host programs connect as before."""
    g = guest
    uds = g.dev.uds_path
    g.give_rx(8)
    g.give_events(1)
    client, req = host_connect(g, 5000)
    g.send(v.OP_RESPONSE, 5000, req[2])
    assert client.recv(64) == f"OK {req[2]}\n".encode()
    assert worker.pause()
    g.dev.release_host()
    assert client.recv(10) == b"" and g.dev.conns == {}
    assert not uds.exists()
    taker = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    taker.bind(str(uds))  # what the destination would do; then it fails and lets go
    taker.close()
    uds.unlink()
    g.dev.reacquire_host()
    worker.resume()
    assert uds.exists()
    events: list[tuple[int, int]] = []
    wait_for(lambda: events.extend(g.events()) or events)
    assert events == [(4, v.VIRTIO_VSOCK_EVENT_TRANSPORT_RESET)]
    g.give_events(1)  # the guest handled the reset
    client2, req2 = host_connect(g, 5001)
    g.send(v.OP_RESPONSE, 5001, req2[2])
    assert client2.recv(64) == f"OK {req2[2]}\n".encode()
    client2.sendall(b"still here")
    assert g.expect(v.OP_RW)[10] == b"still here"
    g.dev.reacquire_host()  # not released: nothing to do
    client.close()
    client2.close()
    assert g.dev.errors == []


def test_close_leaves_a_newer_socket_file_alone(tmp_path: Path) -> None:
    """The process that took a snapshot may close after a restoring one (which removed the
    stale file) bound its own socket at the path: that one stays."""
    dev = v.VirtioVsock(CID, tmp_path / "v.sock")
    (tmp_path / "v.sock").unlink()
    newer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    newer.bind(str(tmp_path / "v.sock"))
    dev.close()
    assert (tmp_path / "v.sock").exists()
    newer.close()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("cid=3", "needs cid=N and uds=PATH"),
        ("uds=/tmp/x", "needs cid=N and uds=PATH"),
        ("cid=abc,uds=/tmp/x", "is not a number"),
        ("cid=3,uds=/tmp/x,port=1", "unknown option"),
    ],
)
def test_vsock_spec_parsing(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        v.VsockConfig.parse(spec)
    assert v.VsockConfig.parse("cid=3,uds=/tmp/v.sock") == v.VsockConfig(3, Path("/tmp/v.sock"))


def test_vsock_config_checks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="between 3"):
        v.VsockConfig(2, tmp_path / "s").check()
    with pytest.raises(ValueError, match="no such directory"):
        v.VsockConfig(3, tmp_path / "nodir" / "s").check()
    (tmp_path / "exists").write_text("")
    with pytest.raises(ValueError, match="already exists"):
        v.VsockConfig(3, tmp_path / "exists").check()
    with pytest.raises(ValueError, match="too long"):
        v.VsockConfig(3, tmp_path / ("x" * 120)).check()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--net", "mac=02:00:00:00:00:01"], "--net mac=02:00:00:00:00:01: needs tap=NAME"),
        (["--net", "tap=t0,mac=nope"], "six hex bytes"),
        (["--net", "tap=t0", "--net", "tap=t0"], "the same tap twice"),
        (["--vsock", "cid=2,uds={tmp}/v.sock"], "must be between 3"),
        (["--vsock", "cid=3"], "needs cid=N and uds=PATH"),
        (["--vsock", "cid=3,uds={tmp}/missing/v.sock"], "no such directory"),
    ],
)
def test_run_cli_rejects_bad_net_and_vsock(tmp_path: Path, args: list[str], message: str) -> None:
    import subprocess
    import sys

    argv = [a.format(tmp=tmp_path) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "kvmkit", "run", *argv, "--", "true"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_credit_for_all_connections_together_is_bounded(guest: Guest) -> None:
    """§5.10.6.3: the buf_alloc kvmkit advertises on a connection is the most guest data it
    may have to hold for it (what the host socket has not taken). Advertised over all
    connections it is capped (32 MiB): 200 guest connections to a host program that never
    reads get 256 KiB each until the cap, the rest are refused with RST (the guest's
    connect() fails: ECONNRESET; a host program's CONNECT is closed), and a closed
    connection gives its credit back."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{guest.dev.uds_path}_6100")
    listener.listen(512)
    answers: list[Packet] = []

    def answer() -> Packet:
        guest.give_rx(1)
        wait_for(lambda: guest.poll())
        return guest.received.pop(0)

    for i in range(200):
        guest.send(v.OP_REQUEST, 10000 + i, 6100)
        answers.append(answer())
    accepted = [p for p in answers if p[6] == v.OP_RESPONSE]
    refused = [p for p in answers if p[6] == v.OP_RST]
    assert len(accepted) + len(refused) == 200
    credit = sum(p[8] for p in accepted)
    assert credit <= 32 << 20
    assert refused and all(p[8] == v.CONN_BUF_ALLOC for p in accepted)
    assert len(guest.dev.conns) == len(accepted)
    # A host program's CONNECT finds no credit either: its socket is closed at once.
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(5)
    client.connect(str(guest.dev.uds_path))
    client.sendall(b"CONNECT 5000\n")
    assert client.recv(10) == b""
    # A connection closed by the guest frees its credit for a new one.
    first = accepted[0]
    guest.send(v.OP_RST, first[3], 6100)
    guest.send(v.OP_REQUEST, 20000, 6100)
    again = answer()
    assert again[6] == v.OP_RESPONSE and again[8] == v.CONN_BUF_ALLOC
    listener.close()
