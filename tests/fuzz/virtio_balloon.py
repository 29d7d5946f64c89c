"""Fuzz target: virtio-balloon's inflate and deflate queues (kvmkit.devices.virtio.balloon,
virtio 1.2 §5.5) over a queue and guest memory the input lays out (common.setup_device),
and its statistics parser on the same bytes. A bad guest puts the device in NEEDS_RESET
(a PFN outside guest RAM frees nothing); nothing may escape `serve_queue`, and the parsers
raise only BalloonError."""

from __future__ import annotations

from common import serve_all, setup_device

from kvmkit.devices.virtio.balloon import BalloonError, VirtioBalloon, parse_stats

_DEV = VirtioBalloon(amount_mib=1)


def TestOneInput(data: bytes) -> None:
    setup_device(_DEV, data)
    serve_all(_DEV)
    try:
        parse_stats(data[-64:])
    except BalloonError:
        pass
