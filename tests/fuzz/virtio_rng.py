"""Fuzz target: virtio-rng's request handling (kvmkit.devices.virtio.rng, virtio 1.2 §5.4)
over a queue and guest memory the input lays out (common.setup_device). A bad guest puts
the device in NEEDS_RESET; nothing may escape `serve_queue`."""

from __future__ import annotations

from common import serve_all, setup_device

from kvmkit.devices.virtio.rng import VirtioRng

_DEV = VirtioRng()


def TestOneInput(data: bytes) -> None:
    setup_device(_DEV, data)
    serve_all(_DEV)
