"""virtio-net (virtio 1.2 §5.1) against a real tap in a network namespace this test creates,
driven by a mock guest driver over virtio-mmio and served by the real worker thread. The
host side of the tap is an AF_PACKET socket in that namespace: frames the guest sends must
arrive there byte for byte, and frames sent there must land in the guest's rx buffers.
Needs root (`ip netns add`, /dev/net/tun): skipped otherwise."""

from __future__ import annotations

import copy
import ctypes
import fcntl
import json
import os
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from virtio_mock import MEM_SIZE, MmioGuest, restore_as_new_process, wait_for

from kvmkit.devices.virtio import mmio as r
from kvmkit.devices.virtio import net as n
from kvmkit.devices.virtio.device import (
    STATUS_DRIVER_OK,
    STATUS_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
    VirtioState,
)
from kvmkit.devices.virtio.worker import VirtioWorkers
from kvmkit.snapshot.format import SnapshotError
from kvmkit.testing.netns import in_netns, temp_netns

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"), reason="needs root and /dev/net/tun"
)

ETH_P_ALL = 0x0003
ETHERTYPE = 0x88B5  # IEEE "local experimental": nothing in the namespace answers it
RX_BUF = 1526 + 12  # Linux's small-buffer size (no GUEST_TSO), header included
RX_DATA = 0x20000
TAP = "kvmktap0"



@pytest.fixture
def netns() -> Iterator[str]:
    with temp_netns("kvmkit-t") as name:
        yield name


@pytest.fixture
def worker() -> Iterator[VirtioWorkers]:
    w = VirtioWorkers()
    w.start()
    yield w
    w.close()


class Guest(MmioGuest):
    """The guest's net driver: rx and tx queues over virtio-mmio."""

    rx_queue, rx_data, rx_buf = n.RX, RX_DATA, RX_BUF

    def __init__(self, dev: n.VirtioNet, size: int = 16) -> None:
        super().__init__(dev, 2, size, data_base=0x60000)
        self.dev: n.VirtioNet = dev

    def received(self) -> list[bytes]:
        return [
            self.mem.read(RX_DATA + slot * RX_BUF, length) for slot, length in self.q[n.RX].used()
        ]

    def transmit(self, packet: bytes) -> None:
        drv = self.q[n.TX]
        drv.add_chain([packet[:12], packet[12:]] if len(packet) > 12 else [packet], [])
        self.wr(r.QUEUE_NOTIFY, n.TX)
        wait_for(lambda: drv.used())


def frame(dst: bytes, src: bytes, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ETHERTYPE) + payload


@pytest.fixture
def setup(netns: str, worker: VirtioWorkers) -> Iterator[tuple[Guest, socket.socket]]:
    """The `kvmkit net setup` helper makes the tap (so it is tested too); the device
    attaches to it; an AF_PACKET socket is the host's side of the wire."""
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "kvmkit", "net", "setup", TAP,
         "--address", "10.0.99.1/24"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "ip addr add 10.0.99.2/24 dev eth0" in proc.stdout
    addr = subprocess.run(["ip", "-n", netns, "-br", "addr", "show", TAP], capture_output=True,
                          text=True, check=True).stdout  # fmt: skip
    assert "10.0.99.1/24" in addr

    def make() -> tuple[n.VirtioNet, socket.socket]:
        dev = n.VirtioNet(TAP, n.parse_mac("02:00:00:00:00:07"))
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind((TAP, 0))
        sock.settimeout(5)
        return dev, sock

    dev, sock = in_netns(netns, make)
    assert not dev.created_tap  # attached to the helper's tap
    worker.add(dev)
    g = Guest(dev)
    yield g, sock
    sock.close()
    dev.close()


def recv_ours(sock: socket.socket) -> bytes:
    """The next frame on the wire with our ethertype (the kernel sends its own: IPv6 DAD)."""
    while True:
        data = sock.recv(70000)
        if data[12:14] == struct.pack("!H", ETHERTYPE):
            return data


def test_config_features_tx_and_rx(setup: tuple[Guest, socket.socket]) -> None:
    g, sock = setup
    offered = g.offered()
    assert g.rd(r.DEVICE_ID) == 1
    assert g.dev.read_config(0, 8) == bytes.fromhex("020000000007") + struct.pack("<H", 1)
    # The tap takes checksum and TSO offloads: all of them are offered, with MAC/STATUS.
    for bit in (n.VIRTIO_NET_F_MAC, n.VIRTIO_NET_F_STATUS, n.VIRTIO_NET_F_CSUM,
                n.VIRTIO_NET_F_GUEST_CSUM, n.VIRTIO_NET_F_HOST_TSO4, n.VIRTIO_NET_F_GUEST_TSO4,
                n.VIRTIO_NET_F_HOST_TSO6, n.VIRTIO_NET_F_GUEST_TSO6):  # fmt: skip
        assert offered & bit, hex(bit)
    g.init(VIRTIO_F_VERSION_1 | n.VIRTIO_NET_F_MAC | n.VIRTIO_NET_F_STATUS)
    assert g.rd(r.STATUS) & STATUS_DRIVER_OK

    # TX: header + frame (in two buffers) reaches the wire unchanged.
    out = frame(b"\xff" * 6, g.dev.mac, b"guest to host " * 50)
    g.transmit(bytes(12) + out)
    assert recv_ours(sock) == out
    assert g.dev.tx_frames == 1

    # RX: a frame on the wire lands in an rx buffer behind a 12-byte header, num_buffers 1.
    g.give_rx(4)
    inbound = frame(g.dev.mac, b"\x02\x00\x00\x00\x00\x01", b"host to guest " * 60)
    sock.send(inbound)
    got: list[bytes] = []
    wait_for(lambda: got.extend(g.received()) or any(p[24:26] == inbound[12:14] for p in got))
    pkt = next(p for p in got if p[24:26] == inbound[12:14])
    flags, gso, *_, num_buffers = n.NET_HDR.unpack(pkt[:12])
    assert (flags, gso, num_buffers) == (0, 0, 1)
    assert pkt[12:] == inbound


def test_rx_waits_for_buffers_without_spinning(setup: tuple[Guest, socket.socket]) -> None:
    g, sock = setup
    g.init(VIRTIO_F_VERSION_1 | n.VIRTIO_NET_F_MAC)
    frames = [frame(g.dev.mac, b"\x02\x00\x00\x00\x00\x01", bytes([i]) * 100) for i in range(3)]
    g.give_rx(1)
    # Use up the one buffer (the kernel may have sent its own frame already).
    sock.send(frames[0])
    first: list[bytes] = []
    wait_for(lambda: first.extend(g.received()) or first)
    for f in frames:
        sock.send(f)
    # No rx buffer: frames wait in the tap; the worker does not poll it meanwhile.
    cpu = time.process_time()
    time.sleep(0.5)
    assert time.process_time() - cpu < 0.2
    assert g.received() == []
    g.give_rx(8)
    got = list(first)
    wait_for(lambda: got.extend(g.received()) or sum(p[12:] in frames for p in got) >= 3)
    ours = [p[12:] for p in got if p[12:] in frames]
    assert ours[-3:] == frames  # in order, none lost


def test_bad_tx_packets_are_dropped_and_the_device_lives_on(
    setup: tuple[Guest, socket.socket],
) -> None:
    g, sock = setup
    g.init(VIRTIO_F_VERSION_1 | n.VIRTIO_NET_F_MAC)  # no CSUM, no HOST_TSO*
    g.transmit(b"\x00" * 8)  # shorter than the header
    g.transmit(bytes(12) + b"\x01" * 10)  # shorter than an Ethernet header
    g.transmit(bytes(12) + bytes(n.MAX_FRAME + 1))  # larger than any frame
    needs_csum = struct.pack("<BBHHHHH", 1, 0, 0, 0, 14, 16, 0)  # CSUM was not negotiated
    g.transmit(needs_csum + frame(b"\xff" * 6, g.dev.mac, b"x" * 64))
    gso = struct.pack("<BBHHHHH", 0, n.VIRTIO_NET_HDR_GSO_TCPV4, 54, 1448, 0, 0, 0)
    g.transmit(gso + frame(b"\xff" * 6, g.dev.mac, b"y" * 64))
    assert g.dev.tx_dropped == 5 and g.dev.tx_frames == 0
    assert not g.dev.status & STATUS_NEEDS_RESET
    ok = frame(b"\xff" * 6, g.dev.mac, b"still works")
    g.transmit(bytes(12) + ok)
    assert recv_ours(sock) == ok


def test_rx_buffer_shorter_than_the_header_needs_reset(setup: tuple[Guest, socket.socket]) -> None:
    g, sock = setup
    g.init(VIRTIO_F_VERSION_1)
    g.give_rx(1, length=8)
    sock.send(frame(g.dev.mac, b"\x02\x00\x00\x00\x00\x01", b"z" * 60))
    wait_for(lambda: g.dev.status & STATUS_NEEDS_RESET)
    # After the driver's reset the device serves again.
    g.rx_slot = 0
    g.init(VIRTIO_F_VERSION_1)
    assert not g.dev.status & STATUS_NEEDS_RESET
    ok = frame(b"\xff" * 6, g.dev.mac, b"after reset")
    g.transmit(bytes(12) + ok)
    assert recv_ours(sock) == ok


def quiet_tap(g: Guest, sock: socket.socket, netns: str) -> None:
    """Turn the namespace's IPv6 chatter (DAD, MLD) off on the tap and take in whatever the
    kernel queued before, up to a marker frame, so that the rx buffers a test posts next
    are all for its own frames."""
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw",
                    f"net.ipv6.conf.{TAP}.disable_ipv6=1"], check=True, timeout=30)  # fmt: skip
    marker = frame(g.dev.mac, b"\x02\x00\x00\x00\x00\x01", b"marker")
    sock.send(marker)
    got: list[bytes] = []
    while not got or got[-1][12:] != marker:  # one buffer at a time: none left over
        g.give_rx(1)
        count = len(got)
        wait_for(lambda count=count: got.extend(g.received()) or len(got) > count)  # type: ignore[misc]


def test_mergeable_rx_buffers_carry_a_frame_larger_than_one(
    setup: tuple[Guest, socket.socket], netns: str,
) -> None:  # fmt: skip
    """§5.1.6.4 with VIRTIO_NET_F_MRG_RXBUF: a frame larger than one rx buffer fills as many
    as it takes, consecutive in the used ring, the first header's num_buffers counting them;
    a frame that finds too few buffers waits for more (none lost, order kept)."""
    g, sock = setup
    assert g.offered() & n.VIRTIO_NET_F_MRG_RXBUF
    g.init(VIRTIO_F_VERSION_1 | n.VIRTIO_NET_F_MAC | n.VIRTIO_NET_F_MRG_RXBUF)
    quiet_tap(g, sock, netns)
    src = b"\x02\x00\x00\x00\x00\x01"
    big = frame(g.dev.mac, src, bytes(range(256)) * 5)  # 1294 bytes: 3 buffers of 512
    g.give_rx(2, length=512)  # too few: the frame waits for a third
    sock.send(big)
    wait_for(lambda: g.dev.held_chains() == {n.RX: 2})
    assert g.q[n.RX].used() == []
    small = frame(g.dev.mac, src, b"after the big one")
    sock.send(small)
    g.give_rx(2, length=512)
    entries: list[tuple[int, int]] = []
    wait_for(lambda: entries.extend(g.q[n.RX].used()) or len(entries) >= 4)
    datas = [g.mem.read(RX_DATA + slot * RX_BUF, length) for slot, length in entries]
    assert [length for _, length in entries] == [512, 512, 12 + len(big) - 1024, 12 + len(small)]
    first = n.NET_HDR.unpack(datas[0][:12])
    assert first[-1] == 3  # num_buffers
    assert b"".join(datas[:3])[12:] == big
    assert n.NET_HDR.unpack(datas[3][:12])[-1] == 1 and datas[3][12:] == small
    assert g.dev.held_chains() == {} and g.dev.rx_frames >= 2


def test_snapshot_saves_held_rx_chains_as_not_taken(
    setup: tuple[Guest, socket.socket], netns: str, worker: VirtioWorkers,
) -> None:  # fmt: skip
    """Chains a mergeable frame took while waiting for more are saved as not taken: the
    restored device uses them for the next frames (the waiting frame itself is lost with
    the process, like a frame on the wire)."""
    g, sock = setup
    g.init(VIRTIO_F_VERSION_1 | n.VIRTIO_NET_F_MAC | n.VIRTIO_NET_F_MRG_RXBUF)
    quiet_tap(g, sock, netns)
    src = b"\x02\x00\x00\x00\x00\x01"
    g.give_rx(2, length=512)
    sock.send(frame(g.dev.mac, src, b"L" * 1400))  # needs 3 buffers
    wait_for(lambda: g.dev.held_chains() == {n.RX: 2})
    assert worker.pause()
    state = json.loads(json.dumps(g.dev.save().to_dict()))
    # Both held chains are saved as not taken.
    assert state["queues"][n.RX]["last_avail"] == g.dev.queues[n.RX].last_avail - 2
    transport_state = g.transport.save().to_dict()
    memory = g.mem.read(0, MEM_SIZE)
    g.dev.close()
    dev2 = in_netns(netns, lambda: n.VirtioNet(TAP, n.parse_mac("02:00:00:00:00:07")))
    worker2 = VirtioWorkers()
    try:
        restore_as_new_process(g, dev2, worker2, memory, state, transport_state)
        after = [frame(dev2.mac, src, b"after %d" % i) for i in range(2)]
        for f in after:
            sock.send(f)
        entries: list[tuple[int, int]] = []
        wait_for(lambda: entries.extend(g.q[n.RX].used()) or len(entries) >= 2)
        got = [g.mem.read(RX_DATA + slot * RX_BUF, length)[12:] for slot, length in entries]
        assert got == after
        assert dev2.errors == []
    finally:
        worker2.close()
        dev2.close()
        worker.resume()


SIOCETHTOOL = 0x8946  # <linux/sockios.h>
ETHTOOL_GTXCSUM, ETHTOOL_GTSO = 0x16, 0x1E  # <linux/ethtool.h>


def ethtool_get(ifname: str, cmd: int) -> int:
    """An ETHTOOL_G* value of `ifname` (struct ethtool_value {cmd, data}) in this thread's
    namespace: how the tap's offloads stand (TUNSETOFFLOAD sets them)."""
    value = ctypes.create_string_buffer(struct.pack("<II", cmd, 0), 8)
    ifr = bytearray(40)  # struct ifreq: name[16], then ifr_data
    ifr[: len(ifname)] = ifname.encode()
    struct.pack_into("<Q", ifr, 16, ctypes.addressof(value))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifr)
    return int(struct.unpack("<II", value.raw)[1])


def tap_offloads(netns: str) -> tuple[int, int]:
    """(tx checksumming, TSO) of the tap: on when the driver took GUEST_CSUM/GUEST_TSO4."""
    return in_netns(netns, lambda: (ethtool_get(TAP, ETHTOOL_GTXCSUM),
                                    ethtool_get(TAP, ETHTOOL_GTSO)))  # fmt: skip


def test_snapshot_restore_reapplies_offloads_and_rx_resumes(
    setup: tuple[Guest, socket.socket], netns: str, worker: VirtioWorkers,
) -> None:  # fmt: skip
    """A device saved with the worker paused and restored, as in another process, over a
    copy of guest memory: the tap is reopened, gets the offloads the driver negotiated
    before (it will not negotiate again), and rx resumes into the buffers the guest posted
    before the snapshot, the one the device held unused included."""
    g, sock = setup
    # Every rx buffer must be ours to count: no IPv6 chatter (DAD, MLD) from the kernel.
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw",
                    f"net.ipv6.conf.{TAP}.disable_ipv6=1"], check=True, timeout=30)  # fmt: skip
    offloads = (n.VIRTIO_NET_F_GUEST_CSUM | n.VIRTIO_NET_F_GUEST_TSO4 | n.VIRTIO_NET_F_CSUM
                | n.VIRTIO_NET_F_HOST_TSO4)  # fmt: skip
    g.init(VIRTIO_F_VERSION_1 | n.VIRTIO_NET_F_MAC | offloads)
    assert tap_offloads(netns) == (1, 1)
    posted = 8
    g.give_rx(posted)
    src = b"\x02\x00\x00\x00\x00\x01"
    before = frame(g.dev.mac, src, b"before the snapshot")
    sock.send(before)
    got: list[bytes] = []
    wait_for(lambda: got.extend(g.received()) or any(p[12:] == before for p in got))
    left = posted - len(got)  # buffers posted before the snapshot and not used (kernel
    # frames queued before IPv6 went off may have come first)
    # Chains the device took in a batch and holds unused are saved as not taken.
    taken = g.dev.queues[n.RX].last_avail - g.dev.held_chains().get(n.RX, 0)

    assert worker.pause()
    state = json.loads(json.dumps(g.dev.save().to_dict()))
    transport_state = g.transport.save().to_dict()
    assert state["device"] == {"tap": TAP, "mac": "02:00:00:00:00:07"}
    assert state["queues"][n.RX]["last_avail"] == taken
    memory = g.mem.read(0, MEM_SIZE)
    g.dev.close()  # the old process ends; the tap (made by `kvmkit net setup`) stays

    dev2 = in_netns(netns, lambda: n.VirtioNet(TAP, n.parse_mac("02:00:00:00:00:07")))
    worker2 = VirtioWorkers()
    try:
        # The reopened tap starts without offloads (kvmkit probes them at open).
        assert tap_offloads(netns) == (0, 0)
        restore_as_new_process(g, dev2, worker2, memory, state, transport_state)
        assert g.rd(r.STATUS) & STATUS_DRIVER_OK
        assert tap_offloads(netns) == (1, 1)
        # rx resumes without a guest notification, into every buffer posted before the
        # snapshot and not used.
        after = [frame(dev2.mac, src, b"after the restore %d" % i) for i in range(left)]
        for f in after:
            sock.send(f)
        got = []
        wait_for(lambda: got.extend(g.received()) or len(got) >= left)
        assert [p[12:] for p in got] == after
        # tx too.
        out = frame(b"\xff" * 6, dev2.mac, b"guest after restore")
        g.transmit(bytes(12) + out)
        assert recv_ours(sock) == out
        assert dev2.errors == []
    finally:
        worker2.close()
        dev2.close()
        worker.resume()


def test_restore_refuses_another_mac_or_malformed_net_state(
    setup: tuple[Guest, socket.socket],
) -> None:
    g, _ = setup
    g.init(VIRTIO_F_VERSION_1 | n.VIRTIO_NET_F_MAC)
    state = g.dev.save()
    other = copy.deepcopy(state.to_dict())
    other["device"]["mac"] = "02:00:00:00:00:08"
    with pytest.raises(SnapshotError, match="MAC 02:00:00:00:00:08 was restored as"):
        g.dev.restore(VirtioState.from_dict(other, "d"))
    for key, value, message in (("mac", "01:00:00:00:00:07", "multicast"),
                                ("tap", "a b", "not a valid interface name"),
                                ("mac", 7, "must be a string")):  # fmt: skip
        bad = copy.deepcopy(state.to_dict())
        bad["device"][key] = value
        with pytest.raises(SnapshotError, match=message):
            n.VirtioNet.check_device_state(bad["device"], "d")
    assert g.dev.save() == state  # nothing changed


def test_kvmkit_creates_a_missing_tap(netns: str) -> None:
    dev = in_netns(netns, lambda: n.VirtioNet("kvmknew0"))
    try:
        assert dev.created_tap
        assert dev.mac[0] & 0x03 == 0x02  # unicast, locally administered
        link = subprocess.run(["ip", "-n", netns, "link", "show", "kvmknew0"],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
        assert "UP" in link
    finally:
        dev.close()
    # A tap kvmkit created goes away with it.
    gone = subprocess.run(["ip", "-n", netns, "link", "show", "kvmknew0"], capture_output=True)
    assert gone.returncode != 0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("mac=02:00:00:00:00:01", "needs tap=NAME"),
        ("tap=", "unknown option"),
        ("tap=a/b", "not a valid interface name"),
        ("tap=averyveryverylongname", "not a valid interface name"),
        ("tap=t0,mac=zz:00:00:00:00:01", "six hex bytes"),
        ("tap=t0,mac=01:00:00:00:00:01", "multicast"),
        ("tap=t0,vhost=on", "unknown option"),
    ],
)
def test_net_spec_parsing(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        n.NetConfig.parse(spec)


def test_net_spec_ok() -> None:
    assert n.NetConfig.parse("tap=t0,mac=02:AA:00:00:00:01") == n.NetConfig(
        "t0", "02:AA:00:00:00:01"
    )
    assert n.parse_mac("02:aa:00:00:00:01") == bytes.fromhex("02aa00000001")


def test_net_helper_refuses_bad_input(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kvmkit", "net", "setup", "t0", "--address", "10.0.0.1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "prefix length" in proc.stderr


def test_mtu_and_tx_rate_limit(netns: str, worker: VirtioWorkers) -> None:
    """Firecracker's `mtu` is offered as VIRTIO_NET_F_MTU with the value in the config space
    (§5.1.4); a tx limiter of one frame per 100 ms spaces the guest's frames on the wire."""
    from kvmkit.devices.virtio.ratelimit import BucketConfig, RateLimiterConfig

    def make() -> tuple[n.VirtioNet, socket.socket]:
        dev = n.VirtioNet(
            "kvmklim0", n.parse_mac("02:00:00:00:00:09"), mtu=1400,
            tx_rate_limiter=RateLimiterConfig(ops=BucketConfig(1, 100)),
        )  # fmt: skip
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind(("kvmklim0", 0))
        sock.settimeout(5)
        return dev, sock

    dev, sock = in_netns(netns, make)
    try:
        worker.add(dev)
        g = Guest(dev)
        assert g.offered() & n.VIRTIO_NET_F_MTU
        assert dev.read_config(10, 2) == struct.pack("<H", 1400)
        g.init(VIRTIO_F_VERSION_1 | n.VIRTIO_NET_F_MAC | n.VIRTIO_NET_F_MTU)
        t0 = time.monotonic()
        for i in range(4):
            g.transmit(bytes(12) + frame(b"\xff" * 6, dev.mac, b"%d" % i * 60))
        for i in range(4):
            assert recv_ours(sock)[14:16] == b"%d" % i * 2
        took = time.monotonic() - t0
        assert 0.25 <= took < 3.0, took
        assert dev.tx_limiter.throttled >= 2 and dev.tx_frames == 4
        with pytest.raises(ValueError, match="mtu"):
            n.NetConfig("tap0", mtu=67).check()
    finally:
        sock.close()
        dev.close()


def test_rx_rate_limit_set_after_activation_spaces_frames(
    setup: tuple[Guest, socket.socket],
) -> None:
    """An rx limiter added on a live device (what PATCH /network-interfaces does): frames
    wait, read, in the device until the limiter's timer lets them in, one per 100 ms; none
    is lost and the worker does not spin meanwhile."""
    from kvmkit.devices.virtio.ratelimit import BucketConfig, RateLimiterConfig

    g, sock = setup
    g.init(VIRTIO_F_VERSION_1 | n.VIRTIO_NET_F_MAC)
    g.dev.update_rate_limiters(RateLimiterConfig(ops=BucketConfig(1, 100)), None)
    g.give_rx(8)
    frames = [frame(g.dev.mac, b"\x02\x00\x00\x00\x00\x01", bytes([i]) * 100) for i in range(4)]
    cpu = time.process_time()
    t0 = time.monotonic()
    for f in frames:
        sock.send(f)
    got: list[bytes] = []
    wait_for(lambda: got.extend(g.received()) or sum(p[12:] in frames for p in got) >= 4)
    took = time.monotonic() - t0
    assert [p[12:] for p in got if p[12:] in frames] == frames
    assert took >= 0.25, took  # the first frame in at once, then one per 100 ms
    assert time.process_time() - cpu < took  # waiting on a timer, not polling
    assert g.dev.rx_limiter.throttled >= 2 and g.dev.rx_limiter.timer_events >= 2


def test_mmds_frames_answered_in_the_device_never_on_the_tap(
    netns: str, worker: VirtioWorkers
) -> None:
    """An interface that serves the MMDS: the guest's ARP request for the MMDS address and
    its TCP connection to it are answered in its rx queue and never reach the tap; a frame
    for another address still goes to the tap."""
    from mmds_guest import ACK, FIN, PSH, SYN, arp_request, parse, tcp

    from kvmkit.mmds.store import Mmds, MmdsConfig

    m = Mmds()
    m.config = MmdsConfig(["eth0"])
    m.put({"latest": {"meta-data": {"instance-id": "i-0123"}}})

    def make() -> tuple[n.VirtioNet, socket.socket]:
        dev = n.VirtioNet("kvmktap1", n.parse_mac("aa:fc:00:00:00:01"), mmds=m)
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind(("kvmktap1", 0))
        return dev, sock

    dev, sock = in_netns(netns, make)
    try:
        worker.add(dev)
        g = Guest(dev)
        g.init(VIRTIO_F_VERSION_1 | n.VIRTIO_NET_F_MAC)
        g.give_rx(16)
        got: list[bytes] = []

        def next_rx() -> bytes:
            """The next frame from the MMDS (the host kernel sends its own IPv6 frames on
            the tap too)."""
            while True:
                wait_for(lambda: got.extend(p[12:] for p in g.received()) or got)
                frame = got.pop(0)
                if frame[6:12] == bytes.fromhex("060123456701"):
                    return frame
                g.give_rx(1)

        g.transmit(bytes(12) + arp_request())
        reply = next_rx()
        assert reply[12:14] == b"\x08\x06" and reply[22:28] == bytes.fromhex("060123456701")
        g.transmit(bytes(12) + tcp(40000, 80, 100, 0, SYN))
        synack = parse(next_rx())
        assert synack.flags == SYN | ACK and synack.ack == 101
        ack = synack.seq + 1
        g.transmit(bytes(12) + tcp(40000, 80, 101, ack, ACK))
        request = b"GET /latest/meta-data/instance-id HTTP/1.1\r\n\r\n"
        g.transmit(bytes(12) + tcp(40000, 80, 101, ack, ACK | PSH, payload=request))
        answer = b""
        while True:
            seg = parse(next_rx())
            answer += seg.payload
            if seg.flags & FIN:
                break
            if len(got) < 2:
                g.give_rx(4)
        assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"\r\n\r\ni-0123")
        assert dev.tx_frames == 0 and dev.rx_frames >= 4  # nothing went through the tap

        # A frame for another address goes to the tap as always; the sniffer saw nothing
        # addressed to the MMDS.
        other = tcp(40001, 80, 1, 0, SYN, dst=bytes([10, 0, 99, 1]))
        g.transmit(bytes(12) + other)
        sock.settimeout(2)
        seen = []
        while True:
            data = sock.recv(70000)
            seen.append(data)
            if data == other:
                break
        mmds_ip = bytes([169, 254, 169, 254])
        assert not [f for f in seen if mmds_ip in f[14:60]]
        assert dev.tx_frames == 1
    finally:
        sock.close()
        dev.close()
def test_a_throttled_tx_queue_holds_up_neither_rx_nor_a_patch(
    setup: tuple[Guest, socket.socket],
) -> None:  # fmt: skip
    """A tx limiter of one frame per minute: the second frame is held on the tx queue's
    worker, while frames from the wire still reach the guest at once on the rx worker; a
    PATCH lifting the limit sends the held frame at once, not at the timer."""
    from kvmkit.devices.virtio.ratelimit import BucketConfig, RateLimiterConfig

    g, sock = setup
    sock.settimeout(20)
    g.init(VIRTIO_F_VERSION_1 | n.VIRTIO_NET_F_MAC)
    g.dev.update_rate_limiters(None, RateLimiterConfig(ops=BucketConfig(1, 60_000)))
    out = [frame(b"\xff" * 6, g.dev.mac, b"%d" % i * 60) for i in range(2)]
    g.transmit(bytes(12) + out[0])
    assert recv_ours(sock)[14:16] == b"00"
    g.q[n.TX].add_chain([bytes(12), out[1]], [])  # not waited for: it is held
    g.wr(r.QUEUE_NOTIFY, n.TX)
    # Bounds of 20 s, a third of the limiter's minute: a loaded host is slow, not that slow.
    wait_for(lambda: g.dev.tx_limiter.throttled >= 1, 20)
    assert g.dev.tx_frames == 1
    # Room for the host's own frames on the new tap too (IPv6 MLD and router solicitations
    # took two of four buffers in one failed run, leaving the third frame waiting).
    g.give_rx(16)
    inbound = [frame(g.dev.mac, b"\x02\x00\x00\x00\x00\x01", bytes([i]) * 80) for i in range(3)]
    t0 = time.monotonic()
    for f in inbound:
        sock.send(f)
    got: list[bytes] = []
    wait_for(lambda: got.extend(g.received()) or sum(p[12:] in inbound for p in got) >= 3, 20)
    assert time.monotonic() - t0 < 20
    assert g.dev.tx_frames == 1  # still held
    t0 = time.monotonic()
    g.dev.update_rate_limiters(None, RateLimiterConfig(ops=BucketConfig(0, 0)))
    assert recv_ours(sock)[14:16] == b"11"
    assert time.monotonic() - t0 < 20
    wait_for(lambda: g.dev.tx_frames == 2, 20)


def test_a_tap_gone_at_driver_ok_is_needs_reset_not_the_end_of_the_vm(
    setup: tuple[Guest, socket.socket], netns: str,
) -> None:  # fmt: skip
    """The tap is deleted before the guest's driver finishes initialising: TUNSETOFFLOAD at
    DRIVER_OK fails (EBADFD). That is a host error, not a reason to end the VM: the register
    write returns, the device is in NEEDS_RESET and the driver is told by a configuration
    change interrupt (§2.1.2); the other device state stays usable (a reset works)."""
    g, _ = setup
    subprocess.run(["ip", "-n", netns, "link", "del", TAP], check=True, timeout=30)
    g.init(VIRTIO_F_VERSION_1 | n.VIRTIO_NET_F_MAC | n.VIRTIO_NET_F_GUEST_CSUM)
    status = g.rd(r.STATUS)
    assert status & STATUS_NEEDS_RESET and status & STATUS_DRIVER_OK
    assert not g.dev.activated
    assert g.rd(r.INTERRUPT_STATUS) & 2  # INT_CONFIG
    assert "activation" in g.dev.errors[0]
    g.wr(r.STATUS, 0)
    assert g.rd(r.STATUS) == 0
