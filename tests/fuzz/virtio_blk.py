"""Fuzz target: virtio-blk's request parser (kvmkit.devices.virtio.blk, virtio 1.2 §5.2.6):
request headers, data and status buffers, discard segments, GET_ID, over a 64 KiB image
file. A bad guest gets an error status or puts the device in NEEDS_RESET; nothing may
escape `serve_queue`."""

from __future__ import annotations

from common import scratch_dir, serve_all, setup_device

from kvmkit.devices.virtio.blk import VirtioBlk

_IMAGE = scratch_dir() / "disk.img"
_IMAGE.write_bytes(bytes(64 * 1024))
_DEV = VirtioBlk(_IMAGE, serial="fuzz")


def TestOneInput(data: bytes) -> None:
    setup_device(_DEV, data)
    serve_all(_DEV)
