"""Fuzz target: virtio-vsock's packet handling (kvmkit.devices.virtio.vsock, virtio 1.2
§5.10.6): the header of each tx packet and its ops (REQUEST, RESPONSE, RW, SHUTDOWN,
CREDIT_*, RST), credit accounting, and the rx and event queues. Host port 1234 has a Unix
listener (Firecracker's `<uds_path>_<port>`), so a guest REQUEST to it connects for real and
its RW data reaches the host socket. Nothing may escape `serve_queue`."""

from __future__ import annotations

import socket

from common import scratch_dir, serve_all, setup_device

from kvmkit.devices.virtio import vsock

_UDS = scratch_dir() / "v.sock"
_DEV = vsock.VirtioVsock(3, _UDS)
_LISTENER = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
_LISTENER.bind(f"{_UDS}_1234")
_LISTENER.listen(64)
_LISTENER.setblocking(False)


def _drop_accepted() -> None:
    while True:
        try:
            conn, _ = _LISTENER.accept()
        except BlockingIOError:
            return
        conn.close()


def TestOneInput(data: bytes) -> None:
    setup_device(_DEV, data)  # (its reset closes the connections of the last input)
    serve_all(_DEV, [vsock.TX, vsock.RX, vsock.EVENT, vsock.TX])
    _drop_accepted()
