"""Fuzz target: virtio-net's transmit path (kvmkit.devices.virtio.net, virtio 1.2 §5.1.6):
the virtio_net_hdr of each tx packet, the frame limits, and the MMDS endpoint the frames
to 169.254.169.254 reach (ARP, IPv4, TCP, HTTP: kvmkit.mmds.stack); then the receive path
fills the guest's rx buffers with the MMDS answers and one frame from the host.

The tap is replaced by a datagram socket pair (the host's end is drained and fed here):
the fuzzed code is everything between the guest's rings and the tap's file descriptor.
Input: u16 length and the frame the host sends (up to 1600 bytes), then common.setup_device's
layout. Nothing may escape `serve_queue`."""

from __future__ import annotations

import contextlib
import socket
import struct
import types
from collections.abc import Iterator

from common import serve_all, setup_device

from kvmkit.abi import tun
from kvmkit.devices.virtio import net
from kvmkit.mmds.store import Mmds, MmdsConfig

_HOST, _TAP = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
_HOST.setblocking(False)
_TAP.setblocking(False)


@contextlib.contextmanager
def _socket_as_tap() -> Iterator[None]:
    """The tap's set-up calls (TUNSETIFF, TUNSETOFFLOAD) have no socket equivalent: while
    the device is built and activated, it gets the socket as its tap and every offload, so
    every header feature can be negotiated. Put back afterwards (the host suite imports
    this module beside the real virtio-net tests)."""
    saved = net.open_tap, net._tap_offloads, net.fcntl
    net.open_tap = lambda name: (_TAP.fileno(), False)
    net._tap_offloads = lambda fd: tun.TUN_F_CSUM | tun.TUN_F_TSO4 | tun.TUN_F_TSO6
    net.fcntl = types.SimpleNamespace(ioctl=lambda *args: 0)  # type: ignore[assignment]
    try:
        yield
    finally:
        net.open_tap, net._tap_offloads, net.fcntl = saved


_MMDS = Mmds()
_MMDS.put({"latest": {"meta-data": {"instance-id": "i-fuzz", "local-ipv4": "10.0.0.2"}}})
_MMDS.config = MmdsConfig(["eth0"], "V1")
with _socket_as_tap():
    _DEV = net.VirtioNet("fuzz0", bytes.fromhex("06000a000002"), mmds=_MMDS)
MAX_HOST_FRAME = 1600


def _drain(sock: socket.socket) -> None:
    while True:
        try:
            sock.recv(65536)
        except BlockingIOError:
            return


def TestOneInput(data: bytes) -> None:
    (n,) = struct.unpack_from("<H", data.ljust(2, b"\0"))
    n = min(n, MAX_HOST_FRAME)
    frame, rest = data[2 : 2 + n], data[2 + n :]
    _drain(_TAP)
    with _socket_as_tap():
        setup_device(_DEV, rest)
    if frame:
        _HOST.send(frame)
    serve_all(_DEV, [net.TX, net.RX])
    _drain(_HOST)
