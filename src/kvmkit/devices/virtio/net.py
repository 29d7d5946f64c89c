"""virtio-net over a host tap device (virtio 1.2 §5.1).

One receive and one transmit queue (§5.1.2). Every frame either way is preceded by the
12-byte `virtio_net_hdr` (§5.1.6, the VERSION_1 layout with num_buffers), which is also
what the tap speaks with IFF_VNET_HDR and TUNSETVNETHDRSZ 12: headers pass through as they
are and the tap does the checksum/segmentation work the header asks for.

- TX: a chain's device-readable buffers (header + frame) go to the tap in one writev(2).
- RX: the tap fd is watched by the worker; a frame is read whole into a frame buffer, then
  copied into the guest's rx buffers: one buffer (chain), or with VIRTIO_NET_F_MRG_RXBUF as
  many as it takes, `num_buffers` saying how many (§5.1.6.4). Linux then posts small
  single-descriptor buffers instead of 64 KiB ones of 19 descriptors, which costs kvmkit far
  less per frame. When the guest has no rx buffer left the frame read stays in kvmkit (one
  frame at most) and the tap is not watched until the guest adds buffers: further frames
  wait in the tap's own queue (which drops when full).

Offloads are offered only as the tap accepts them (TUNSETOFFLOAD): GUEST_CSUM/GUEST_TSO4/6
(the tap hands us partial-checksum and GSO frames) and CSUM/HOST_TSO4/6 (we hand them to it).

With an `mtu` (Firecracker's NetworkInterface.mtu) the device offers VIRTIO_NET_F_MTU and
the value in its configuration space (§5.1.4): the driver uses it as the interface's MTU.

On an interface that serves the MMDS (`mmds`, kvmkit.mmds.stack) the frames the guest sends
to the MMDS address (ARP requests for it, IPv4 to it) go to the MMDS endpoint instead of the
tap (on the tx worker), and whenever a frame can go to the guest the endpoint's frames come
first (on the rx worker, woken by the tx worker through the rx queue's eventfd; as in
Firecracker's device model, docs/mmds/mmds-design.md); they pass the same rx rate limiter.

Optional rate limiters (Firecracker's `rx_rate_limiter`/`tx_rate_limiter`, `ratelimit.py`)
take one op and the frame's bytes per frame: a tx frame that must wait stays taken and held,
an rx frame stays read and pending (the tap unwatched meanwhile); the limiter's timer brings
the device back.
"""

from __future__ import annotations

import fcntl
import logging
import os
import selectors
import socket
import struct
from dataclasses import dataclass
from typing import Any

from kvmkit.abi import tun
from kvmkit.devices.virtio import iov
from kvmkit.devices.virtio.device import Budget, VirtioDevice
from kvmkit.devices.virtio.queue import DescriptorChain, QueueError
from kvmkit.devices.virtio.ratelimit import DeviceLimiter, RateLimiterConfig
from kvmkit.guestlog import GuestLog
from kvmkit.mmds.stack import MmdsStack
from kvmkit.mmds.store import Mmds
from kvmkit.snapshot.format import Fields, SnapshotError

log = logging.getLogger(__name__)

VIRTIO_ID_NET = 1
QUEUE_SIZE = 256
RX, TX = 0, 1

# §5.1.3 feature bits
VIRTIO_NET_F_CSUM = 1 << 0
VIRTIO_NET_F_GUEST_CSUM = 1 << 1
VIRTIO_NET_F_MTU = 1 << 3
VIRTIO_NET_F_MAC = 1 << 5
VIRTIO_NET_F_GUEST_TSO4 = 1 << 7
VIRTIO_NET_F_GUEST_TSO6 = 1 << 8
VIRTIO_NET_F_HOST_TSO4 = 1 << 11
VIRTIO_NET_F_HOST_TSO6 = 1 << 12
VIRTIO_NET_F_MRG_RXBUF = 1 << 15
VIRTIO_NET_F_STATUS = 1 << 16
VIRTIO_NET_S_LINK_UP = 1

# §5.1.6 struct virtio_net_hdr: flags, gso_type, hdr_len, gso_size, csum_start,
# csum_offset, num_buffers
NET_HDR = struct.Struct("<BBHHHHH")
NET_HDR_SIZE = NET_HDR.size  # 12
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80
# The largest frame: a 64 KiB GSO packet plus an Ethernet and a VLAN header (Linux's
# virtio_net and Firecracker use the same bound: 65550 + the 12-byte header).
MAX_FRAME = 65550
MIN_FRAME = 14  # an Ethernet header
# Bytes of a tx frame looked at to tell whether it is for the MMDS (Ethernet header and the
# ARP target or IPv4 destination address: MmdsStack.wants).
MMDS_PEEK = 42
# Frames the worker takes from the tap per wake-up before it serves other devices (the tap
# stays watched, so it comes back), and per used-buffer interrupt while it does.
RX_BATCH = 64
# rx chains taken from the ring at once (a frame of 64 KiB in 4 KiB mergeable buffers needs
# 17; a small one needs 1, and the rest wait, held, for the next frames), and tx chains
# taken and returned at once.
RX_TAKE = 8
TX_BATCH = 32


MIN_MTU, MAX_MTU = 68, 65535  # §5.1.4.1: the device MUST NOT set mtu below 68

@dataclass
class NetConfig:
    """`--net tap=NAME[,mac=XX:XX:XX:XX:XX:XX][,mtu=N]`, or one of the API's network
    interfaces (with its rate limiters)."""

    tap: str
    mac: str | None = None
    mtu: int | None = None
    rx_rate_limiter: RateLimiterConfig | None = None
    tx_rate_limiter: RateLimiterConfig | None = None
    # The MMDS this interface serves (the API's /mmds/config names it), or None.
    mmds: Mmds | None = None
    # The API's iface_id (kept in snapshots: a snapshot load's network_overrides name it).
    iface_id: str | None = None

    @classmethod
    def parse(cls, spec: str) -> NetConfig:
        tap: str | None = None
        mac: str | None = None
        mtu: int | None = None
        for opt in spec.split(","):
            key, sep, value = opt.partition("=")
            if key == "tap" and sep and value:
                tap = value
            elif key == "mac" and sep:
                mac = value
            elif key == "mtu" and sep and value.isdigit():
                mtu = int(value)
            else:
                raise ValueError(
                    f"--net {spec}: unknown option {opt!r} (tap=NAME, mac=MAC, mtu=N)"
                )
        if tap is None:
            raise ValueError(f"--net {spec}: needs tap=NAME")
        config = cls(tap, mac, mtu)
        try:
            config.check()
        except ValueError as err:
            raise ValueError(f"--net {spec}: {err}") from None
        return config

    def check(self) -> None:
        """What `MachineConfig.validate` checks; raises ValueError."""
        name = self.tap.encode()
        # IFNAMSIZ includes the NUL; '/' and whitespace are not valid in interface names.
        if not 0 < len(name) < tun.IFNAMSIZ or any(c in self.tap for c in "/ \t\n:"):
            raise ValueError(f"tap name {self.tap!r} is not a valid interface name")
        if self.mac is not None:
            parse_mac(self.mac)
        if self.mtu is not None and not MIN_MTU <= self.mtu <= MAX_MTU:
            raise ValueError(f"mtu {self.mtu}: must be between {MIN_MTU} and {MAX_MTU}")


def parse_mac(text: str) -> bytes:
    parts = text.split(":")
    try:
        raw = bytes(int(p, 16) for p in parts if len(p) == 2)
    except ValueError:
        raw = b""
    if len(parts) != 6 or len(raw) != 6:
        raise ValueError(f"mac {text!r} is not six hex bytes XX:XX:XX:XX:XX:XX")
    if raw[0] & 1:
        raise ValueError(f"mac {text}: a multicast address cannot be a NIC's")
    return raw


def random_mac() -> bytes:
    """A unicast, locally administered address (bit 0 of the first byte clear, bit 1 set)."""
    raw = bytearray(os.urandom(6))
    raw[0] = (raw[0] & 0xFC) | 0x02
    return bytes(raw)


def format_mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


def _ifreq(name: str, flags: int) -> bytearray:
    req = bytearray(tun.IFREQ_SIZE)
    encoded = name.encode()
    req[: len(encoded)] = encoded
    struct.pack_into("<H", req, tun.IFNAMSIZ, flags)
    return req


def open_tap(name: str) -> tuple[int, bool]:
    """Open tap `name` with vnet headers (creating it if it does not exist; a tap kvmkit
    creates is brought up and goes away when kvmkit closes it). Returns (fd, created)."""
    existed = _exists(name)
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, tun.TUNSETIFF, _ifreq(name, tun.IFF_TAP | tun.IFF_NO_PI | tun.IFF_VNET_HDR))
        fcntl.ioctl(fd, tun.TUNSETVNETHDRSZ, struct.pack("<i", NET_HDR_SIZE))
        if not existed:
            _set_up(name)
    except OSError:
        os.close(fd)
        raise
    return fd, not existed


def _exists(name: str) -> bool:
    # Asked through a socket, i.e. in the calling thread's network namespace (a look at
    # /sys/class/net would see the namespace sysfs was mounted in).
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def _set_up(name: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = _ifreq(name, 0)
        fcntl.ioctl(s.fileno(), tun.SIOCGIFFLAGS, req)
        flags = struct.unpack_from("<H", req, tun.IFNAMSIZ)[0]
        struct.pack_into("<H", req, tun.IFNAMSIZ, flags | tun.IFF_UP)
        fcntl.ioctl(s.fileno(), tun.SIOCSIFFLAGS, req)


def _tap_offloads(fd: int) -> int:
    """The TUN_F_* set the tap accepts, probed with TUNSETOFFLOAD (then reset to none: the
    driver's choice sets them at activation)."""
    accepted = 0
    for flags in (tun.TUN_F_CSUM | tun.TUN_F_TSO4 | tun.TUN_F_TSO6, tun.TUN_F_CSUM):
        try:
            fcntl.ioctl(fd, tun.TUNSETOFFLOAD, flags)
        except OSError:
            continue
        accepted = flags
        break
    fcntl.ioctl(fd, tun.TUNSETOFFLOAD, 0)
    return accepted


class VirtioNet(VirtioDevice):
    DEVICE_ID = VIRTIO_ID_NET

    def __init__(
        self, tap: str, mac: bytes | None = None, name: str = "net", *, mtu: int | None = None,
        rx_rate_limiter: RateLimiterConfig | None = None,
        tx_rate_limiter: RateLimiterConfig | None = None, mmds: Mmds | None = None,
    ) -> None:  # fmt: skip
        if mtu is not None and not MIN_MTU <= mtu <= MAX_MTU:
            raise ValueError(f"mtu {mtu}: must be between {MIN_MTU} and {MAX_MTU}")
        self.tap_name = tap
        self.mac = mac if mac is not None else random_mac()
        self.mtu = mtu
        self.tap_fd, self.created_tap = open_tap(tap)
        offloads = _tap_offloads(self.tap_fd)
        features = VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS
        if offloads & tun.TUN_F_CSUM:
            features |= VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM
        if offloads & tun.TUN_F_TSO4:
            features |= VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_GUEST_TSO4
        if offloads & tun.TUN_F_TSO6:
            features |= VIRTIO_NET_F_HOST_TSO6 | VIRTIO_NET_F_GUEST_TSO6
        # MRG_RXBUF needs nothing from the tap: kvmkit spreads a frame over the buffers.
        features |= VIRTIO_NET_F_MRG_RXBUF
        if mtu is not None:
            features |= VIRTIO_NET_F_MTU
        super().__init__(name, [QUEUE_SIZE, QUEUE_SIZE], features)
        self.glog = GuestLog(log)  # this module's logger, rate-limited
        # Each limiter's timer is watched by its queue's worker (rx's also watches the tap).
        self.rx_limiter = DeviceLimiter(self, RX, rx_rate_limiter)
        self.tx_limiter = DeviceLimiter(self, TX, tx_rate_limiter)
        # A tx chain the limiter made wait (taken, sent first when the queue is served
        # again), and whether the pending rx frame already got its tokens.
        self._tx_throttled: DescriptorChain | None = None
        self._pending_paid = False
        # rx chains taken from the ring and not used yet, oldest first (a frame that needs
        # more mergeable buffers than the guest has posted so far).
        self._rx_held: list[DescriptorChain] = []
        # The frame read from the tap and not delivered yet (no rx buffers): its length in
        # `_frame`, 0 when there is none.
        self._frame = bytearray(NET_HDR_SIZE + MAX_FRAME)
        self._frame_view = memoryview(self._frame)
        self._pending = 0
        self._tap_watched = False
        self._tap_failed = False
        self._tx_gso_ok = frozenset({VIRTIO_NET_HDR_GSO_NONE})
        # Firecracker's net metrics, roughly: frames and bytes each way, frames dropped.
        self.rx_frames = self.rx_bytes = self.rx_dropped = 0
        self.tx_frames = self.tx_bytes = self.tx_dropped = 0
        self.tx_malformed = self.tap_write_fails = 0
        self.mmds: MmdsStack | None = None
        self._mmds_sent = False
        if mmds is not None and mmds.config is not None:
            self.mmds = MmdsStack(mmds, mmds.config.ipv4_address)

    def config_bytes(self) -> bytes:
        # struct virtio_net_config (§5.1.4): mac, status, max_virtqueue_pairs, and mtu
        # (which exists only with VIRTIO_NET_F_MTU).
        raw = self.mac + struct.pack("<HH", VIRTIO_NET_S_LINK_UP, 1)
        if self.mtu is not None:
            raw += struct.pack("<H", self.mtu)
        return raw

    def update_rate_limiters(self, rx: RateLimiterConfig | None,
                             tx: RateLimiterConfig | None) -> None:  # fmt: skip
        """PATCH /network-interfaces/{id}: replace the buckets each update names (full)."""
        if rx is not None:
            self.rx_limiter.reconfigure(rx)
        if tx is not None:
            self.tx_limiter.reconfigure(tx)

    def activate(self) -> None:
        # What the tap may hand us follows what the driver accepted (§5.1.6.4: the device
        # sends NEEDS_CSUM/GSO frames only with GUEST_CSUM/GUEST_TSO*).
        flags = 0
        if self.has_feature(VIRTIO_NET_F_GUEST_CSUM):
            flags |= tun.TUN_F_CSUM
            if self.has_feature(VIRTIO_NET_F_GUEST_TSO4):
                flags |= tun.TUN_F_TSO4
            if self.has_feature(VIRTIO_NET_F_GUEST_TSO6):
                flags |= tun.TUN_F_TSO6
        fcntl.ioctl(self.tap_fd, tun.TUNSETOFFLOAD, flags)
        gso_ok = {VIRTIO_NET_HDR_GSO_NONE}
        if self.has_feature(VIRTIO_NET_F_HOST_TSO4):
            gso_ok.add(VIRTIO_NET_HDR_GSO_TCPV4)
        if self.has_feature(VIRTIO_NET_F_HOST_TSO6):
            gso_ok.add(VIRTIO_NET_HDR_GSO_TCPV6)
        self._tx_gso_ok = frozenset(gso_ok)
        self._tap_failed = False
        self._watch_tap(True)

    def stop_host_io(self) -> None:
        self._watch_tap(False)
        self.rx_limiter.unwatch()
        self.tx_limiter.unwatch()

    # -- snapshots (docs/snapshot.md): the tap is reopened by name; the config space's MAC
    # must come back the same. `restored()` (activate) sets the tap's offloads again and
    # watches it: the rx buffers the guest posted are in the restored ring.
    def save_device(self) -> dict[str, Any]:
        return {"tap": self.tap_name, "mac": format_mac(self.mac)}

    @classmethod
    def check_device_state(cls, state: dict[str, Any], path: str) -> None:
        f = Fields(state, path)
        try:
            NetConfig(f.get_str("tap", 64), f.get_str("mac", 64)).check()
        except ValueError as err:
            raise SnapshotError(f"snapshot state: {path}: {err}") from None

    def restore_device(self, state: dict[str, Any], path: str) -> None:
        f = Fields(state, path)
        if f.get_str("tap", 64) != self.tap_name:
            raise SnapshotError(f"snapshot state: {path}: tap {f.obj['tap']!r} was restored "
                                f"as {self.tap_name!r}")  # fmt: skip
        if parse_mac(f.get_str("mac", 64)) != self.mac:
            raise SnapshotError(f"snapshot state: {path}: MAC {f.obj['mac']} was restored as "
                                f"{format_mac(self.mac)}")  # fmt: skip

    def describe_device(self) -> str:
        limits = [
            f"; {way} {text}" for way, text in (
                # rx holds a frame read from the tap and not paid for yet
                ("rx", self.rx_limiter.describe(bool(self._pending) and not self._pending_paid)),
                ("tx", self.tx_limiter.describe(self._tx_throttled is not None)),
            ) if text
        ]  # fmt: skip
        return (f"tap {self.tap_name}: {'watched' if self._tap_watched else 'not watched'}"
                f"{', failed' if self._tap_failed else ''}; frame waiting {self._pending} B; "
                f"rx held {len(self._rx_held)}; rx {self.rx_frames} frames "
                f"({self.rx_dropped} dropped), tx {self.tx_frames} ({self.tx_dropped} dropped)"
                f"{''.join(limits)}")  # fmt: skip

    def held_chains(self) -> dict[int, int]:
        # A frame read but not delivered is not saved: like a frame on the wire, it is lost
        # with this process (TCP sends it again). A tx chain held by the limiter is saved
        # as not taken: the restored device sends it.
        held = {RX: len(self._rx_held)} if self._rx_held else {}
        if self._tx_throttled is not None:
            held[TX] = 1
        return held

    def reset_device(self) -> None:
        self._watch_tap(False)
        self.rx_limiter.unwatch()
        self.tx_limiter.unwatch()
        self._rx_held = []
        self._pending = 0
        self._pending_paid = False
        self._tx_throttled = None
        if self.mmds is not None:
            self.mmds.reset()  # the guest's connections went with its driver

    def close(self) -> None:
        with self.lock:
            self.stop_host_io()
            if self.tap_fd >= 0:
                os.close(self.tap_fd)
                self.tap_fd = -1
            self.rx_limiter.close()
            self.tx_limiter.close()
        super().close()

    # -- live migration: a tap is attached to one process at a time
    def release_host(self) -> None:
        with self.lock:
            self.stop_host_io()
            if self.tap_fd >= 0:
                os.close(self.tap_fd)
                self.tap_fd = -1

    def reacquire_host(self) -> None:
        with self.lock:
            if self.tap_fd >= 0:
                return
            self.tap_fd, self.created_tap = open_tap(self.tap_name)
            if self.activated:
                self.restored()  # the offloads the driver accepted, and the watch

    def _watch_tap(self, on: bool) -> None:
        if self.watcher is None or on == self._tap_watched or self.tap_fd < 0:
            return
        if on:
            self.watcher.watch(self, self.tap_fd, selectors.EVENT_READ, self._tap_event)
        else:
            self.watcher.unwatch(self.tap_fd)
        self._tap_watched = on

    def process_queue(self, index: int, budget: Budget) -> None:
        if index == TX:
            self._process_tx(budget)
        else:
            self._fill_rx()  # new rx buffers: frames waiting in the tap can come in

    # -- TX (its own worker thread)
    def _process_tx(self, budget: Budget) -> None:
        assert self.mem is not None
        if self.tx_limiter.limits or self._tx_throttled is not None:
            self._process_tx_limited(budget)
            return
        done = False
        queue, mem = self.queues[TX], self.mem
        while (n := budget.grant(TX_BATCH)) and (chains := queue.pop_batch(mem, n)):
            for chain in chains:
                self._transmit(chain)
            # §5.1.6.2: transmit buffers are device-readable only; nothing is written.
            queue.push_batch(mem, [(chain.head, 0) for chain in chains])
            done = True
        if done:
            self.signal_used(TX)
        self._mmds_answer()

    def _process_tx_limited(self, budget: Budget) -> None:
        """One chain at a time, each paid for before it goes: one op and its frame bytes."""
        assert self.mem is not None
        queue, mem, limiter = self.queues[TX], self.mem, self.tx_limiter
        done = False
        while budget.take():
            chain, self._tx_throttled = self._tx_throttled, None
            if chain is None and (chain := queue.pop(mem)) is None:
                break
            if limiter.limits and not limiter.consume_request(
                max(0, chain.readable_length - NET_HDR_SIZE)
            ):
                self._tx_throttled = chain
                limiter.wait()
                break
            self._transmit(chain)
            queue.push(mem, chain.head, 0)
            done = True
        if done:
            self.signal_used(TX)
        self._mmds_answer()

    def _mmds_answer(self) -> None:
        """After frames went to the MMDS: have the rx worker put its answers into the rx
        queue (the endpoint's lock keeps the two threads apart)."""
        if self._mmds_sent:
            self._mmds_sent = False
            self.notify_queue(RX)

    def _transmit(self, chain: DescriptorChain) -> None:
        assert self.mem is not None
        total = chain.readable_length
        # §5.1.6.2: each packet is the header followed by the frame; a packet shorter than
        # header + Ethernet header or longer than the largest frame is dropped.
        if not NET_HDR_SIZE + MIN_FRAME <= total <= NET_HDR_SIZE + MAX_FRAME:
            self.glog.debug("virtio %s: tx packet of %d bytes dropped", self.name, total)
            self.tx_dropped += 1
            self.tx_malformed += 1
            return
        first = chain.readable[0]
        if first.length >= NET_HDR_SIZE:
            header = self.mem.read(first.addr, NET_HDR_SIZE)
        else:
            header = iov.gather(self.mem, chain.readable, NET_HDR_SIZE)
        flags, gso_type, *_ = NET_HDR.unpack(header)
        # §5.1.6.2.1: NEEDS_CSUM only with VIRTIO_NET_F_CSUM, GSO only with the matching
        # HOST_TSO feature; the tap would do the work anyway, but the guest broke the rule.
        if (flags & VIRTIO_NET_HDR_F_NEEDS_CSUM and not self.has_feature(VIRTIO_NET_F_CSUM)) or (
            gso_type & ~VIRTIO_NET_HDR_GSO_ECN not in self._tx_gso_ok
        ):
            self.glog.debug("virtio %s: tx header flags %#x gso %#x not negotiated", self.name,
                            flags, gso_type)  # fmt: skip
            self.tx_dropped += 1
            self.tx_malformed += 1
            return
        if self.mmds is not None and self._to_mmds(chain, total):
            return
        try:
            os.writev(self.tap_fd, iov.views(self.mem, chain.readable))
        except OSError as err:
            # EIO: the tap is down; EINVAL: a header the tap refuses; EAGAIN: its queue is
            # full. A NIC drops such frames too.
            self.glog.debug("virtio %s: tx: %s", self.name, err)
            self.tx_dropped += 1
            self.tap_write_fails += 1
            return
        self.tx_frames += 1
        self.tx_bytes += total - NET_HDR_SIZE

    def _to_mmds(self, chain: DescriptorChain, total: int) -> bool:
        """Hand a frame for the MMDS to its endpoint (True), never to the tap."""
        assert self.mem is not None and self.mmds is not None
        head = iov.gather(self.mem, chain.readable, min(total, NET_HDR_SIZE + MMDS_PEEK))
        if not self.mmds.wants(head[NET_HDR_SIZE:]):
            return False
        self.mmds.intercept(iov.gather(self.mem, chain.readable, total)[NET_HDR_SIZE:])
        self._mmds_sent = True
        return True

    # -- RX (its own worker thread, which also watches the tap: HOST_GROUP is RX's)
    def _tap_event(self, events: int) -> None:
        self._fill_rx()

    def _fill_rx(self) -> None:
        """Move frames from the tap into rx buffers until the tap is empty (then it stays
        watched), the guest has no buffer left (then it is not watched: the guest's next
        rx notification brings us back), or RX_BATCH frames went in (the tap stays watched
        and readable, so the worker returns after serving the others)."""
        assert self.mem is not None
        delivered = 0
        for _ in range(RX_BATCH):
            if not self._pending and self.mmds is not None:
                self._pending = self._mmds_frame()
                self._pending_paid = False
            if not self._pending:
                if self._tap_failed:
                    break
                try:
                    n = os.readv(self.tap_fd, [self._frame_view])
                except BlockingIOError:
                    break
                except OSError as err:
                    # Not a state a frame can cause (the frame buffer takes the largest):
                    # the tap is gone. Stop reading it rather than spin; tx goes on.
                    self.glog.warning("virtio %s: rx from tap %s: %s; rx stopped", self.name,
                                self.tap_name, err)  # fmt: skip
                    self._tap_failed = True
                    break
                if n < NET_HDR_SIZE + MIN_FRAME:
                    self.rx_dropped += 1
                    continue
                self._pending, self._pending_paid = n, False
            limiter = self.rx_limiter
            if not self._pending_paid and limiter.limits:
                if not limiter.consume_request(self._pending - NET_HDR_SIZE):
                    limiter.wait()  # the frame waits, read; the tap is not watched
                    break
                self._pending_paid = True
            if not self._deliver(self._pending):
                break
            self._pending, self._pending_paid = 0, False
            delivered += 1
        # Watch the tap while a frame read from it could go somewhere: not while one waits
        # for buffers (level-triggered, it would wake the worker in a loop).
        self._watch_tap(not self._pending and not self._tap_failed)
        if delivered:
            self.signal_used(RX)

    def _mmds_frame(self) -> int:
        """The MMDS endpoint's next frame into the frame buffer behind a zeroed header (no
        offload flags: its checksums are complete); its length, 0 if there is none."""
        assert self.mmds is not None
        frame = self.mmds.next_frame()
        if frame is None:
            return 0
        n = NET_HDR_SIZE + len(frame)
        self._frame[:NET_HDR_SIZE] = bytes(NET_HDR_SIZE)
        self._frame[NET_HDR_SIZE:n] = frame
        return n

    def _take_rx(self, index: int) -> DescriptorChain | None:
        """The `index`th rx chain of the held ones, taking more from the ring as needed."""
        assert self.mem is not None
        held = self._rx_held
        while index >= len(held):
            chains = self.queues[RX].pop_batch(self.mem, RX_TAKE)
            if not chains:
                return None  # pop_batch() asked the driver to notify when it adds one
            for chain in chains:
                # §5.1.6.3.1: every receive buffer must at least hold the header (Linux
                # makes them >= 1518 bytes mergeable, else >= 1526 or 65562); shorter ones
                # are a driver bug.
                if chain.writable_length < NET_HDR_SIZE:
                    raise QueueError(f"rx buffer of {chain.writable_length} bytes < header")
            held.extend(chains)
        return held[index]

    def _deliver(self, n: int) -> bool:
        """Put the pending frame of `n` bytes (header included) into rx buffers; False if the
        guest has not posted enough of them yet (the frame stays pending, the chains taken
        stay held)."""
        assert self.mem is not None
        mem, frame = self.mem, self._frame_view
        mergeable = self.has_feature(VIRTIO_NET_F_MRG_RXBUF)
        # §5.1.6.4: without MRG_RXBUF the frame goes into one chain; with it, into as many
        # as it takes, consecutive in the used ring, the first header's num_buffers saying
        # how many.
        count, room = 0, 0
        while True:
            chain = self._take_rx(count)
            if chain is None:
                return False
            count += 1
            room += chain.writable_length
            if room >= n:
                break
            if not mergeable:
                # It does not fit (a frame above the MTU the buffers were sized for): a
                # NIC drops it; the buffer waits for the next one.
                self.rx_dropped += 1
                return True
        struct.pack_into("<H", frame, 10, count)  # the tap leaves num_buffers alone
        done, used = 0, []
        for chain in self._rx_held[:count]:
            start = done
            for buf in chain.writable:
                if done >= n:
                    break
                k = min(buf.length, n - done)
                mem.write(buf.addr, frame[done : done + k])
                done += k
            used.append((chain.head, done - start))
        self.queues[RX].push_batch(mem, used)
        del self._rx_held[:count]
        self.rx_frames += 1
        self.rx_bytes += n - NET_HDR_SIZE
        return True
