"""Helpers shared by the fuzz targets (docs/security.md, "Fuzzing").

Each target module exposes `TestOneInput(data: bytes) -> None` (atheris' entry point). It
turns the bytes into the input of one kvmkit parser, catches only the documented rejections
(kvmkit's own error types, carrying a message) and lets anything else escape: an escaping
exception is a crash. The targets need no atheris to import or run, so the corpus replay of
the host suite (test_fuzz_targets.py) runs them as plain functions.
"""

from __future__ import annotations

import struct
import tempfile
import zlib
from pathlib import Path

from kvmkit.devices.virtio.device import VirtioDevice
from kvmkit.devices.virtio.queue import QueueArea
from kvmkit.memory import GuestMemory

# The guest memory a device target's input fills: a 64 KiB region at 0 and a 4 KiB one at
# 0x20000, with a hole between them (buffers across the hole or past the end must be
# refused, never followed).
LOW_SIZE = 0x10000
HIGH_GPA, HIGH_SIZE = 0x20000, 0x1000

_MEM: GuestMemory | None = None
_SCRATCH: Path | None = None


def scratch_dir() -> Path:
    """A private directory for the targets' host files (a disk image, Unix sockets)."""
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = Path(tempfile.mkdtemp(prefix="kvmkit-fuzz-"))
    return _SCRATCH


def guest_memory(image: bytes) -> GuestMemory:
    """The targets' guest memory with `image` at GPA 0 (the rest zero). Built once per
    process and refilled per input: mapping it afresh each time would dominate the run."""
    global _MEM
    if _MEM is None:
        _MEM = GuestMemory()
        _MEM.add_anonymous(0, LOW_SIZE)
        _MEM.add_anonymous(HIGH_GPA, HIGH_SIZE)
    low = image[:LOW_SIZE]
    _MEM.write(0, low + bytes(LOW_SIZE - len(low)))
    _MEM.fill(HIGH_GPA, HIGH_SIZE)
    return _MEM


# -- driver-side set-up of a device, from the input's first bytes
#
#   u8  features: bit 0 VIRTIO_F_EVENT_IDX, bit 1 VIRTIO_F_INDIRECT_DESC
#   u8  queue size as log2 (masked to 0..7: 1..128 entries)
#   per queue: u16 desc_addr, u16 avail_addr, u16 used_addr, u16 last_avail, u16 next_used
# then the guest memory image.
DEVICE_HEADER = struct.Struct("<BB")
QUEUE_HEADER = struct.Struct("<HHHHH")


def setup_device(dev: VirtioDevice, data: bytes) -> bytes:
    """Put `dev` into DRIVER_OK with its queues laid out as `data` says (the way a driver
    would, through the device's own queue set-up calls) over `guest_memory`. Returns the
    memory image. A layout the device refuses leaves it in NEEDS_RESET, as for a guest."""
    from kvmkit.devices.virtio.device import (
        STATUS_ACKNOWLEDGE,
        STATUS_DRIVER,
        STATUS_DRIVER_OK,
        STATUS_FEATURES_OK,
        VIRTIO_F_EVENT_IDX,
        VIRTIO_F_INDIRECT_DESC,
        VIRTIO_F_VERSION_1,
    )

    need = DEVICE_HEADER.size + QUEUE_HEADER.size * len(dev.queues)
    head = data[:need].ljust(need, b"\0")
    flags, size_log2 = DEVICE_HEADER.unpack_from(head)
    image = data[need:]
    mem = guest_memory(image)
    dev.reset()
    dev.mem = mem
    features = VIRTIO_F_VERSION_1
    if flags & 1:
        features |= VIRTIO_F_EVENT_IDX
    if flags & 2:
        features |= VIRTIO_F_INDIRECT_DESC
    # Everything the device offers besides, as Linux accepts what it knows.
    features |= dev.device_features & ~(VIRTIO_F_EVENT_IDX | VIRTIO_F_INDIRECT_DESC)
    dev.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    dev.write_driver_features(0, features & 0xFFFFFFFF)
    dev.write_driver_features(1, features >> 32)
    dev.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    size = 1 << (size_log2 & 7)
    for i, q in enumerate(dev.queues):
        desc, avail, used, last_avail, next_used = QUEUE_HEADER.unpack_from(
            head, DEVICE_HEADER.size + QUEUE_HEADER.size * i
        )
        dev.queue_set_size(i, min(size, q.max_size))
        dev.queue_set_address(i, QueueArea.DESC, desc)
        dev.queue_set_address(i, QueueArea.DRIVER, avail)
        dev.queue_set_address(i, QueueArea.DEVICE, used)
        dev.queue_set_ready(i, True)
        # The indexes a restored device continues from (a snapshot file sets them).
        q.last_avail, q.next_used = last_avail, next_used
    dev.set_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)
    return image


def serve_all(dev: VirtioDevice, order: list[int] | None = None) -> None:
    """Serve each queue once, as its worker does after a notification."""
    from kvmkit.devices.virtio.device import Budget

    for index in order if order is not None else range(len(dev.queues)):
        dev.serve_queue(index, Budget())


# -- checksums: inputs whose CRC the harness recomputes, so that mutations reach the parser
# behind the check instead of all dying at it (a common libFuzzer practice).

def fix_snapshot_crc(data: bytes) -> bytes:
    """A snapshot state file (kvmkit.snapshot.format) from its header and payload (no
    trailer): the header's payload length set to what follows it, the CRC32 appended."""
    from kvmkit.snapshot.format import HEADER, TRAILER

    if len(data) < HEADER.size:
        return data
    magic, version, arch, _ = HEADER.unpack_from(data)
    payload = data[HEADER.size :]
    body = HEADER.pack(magic, version, arch, len(payload)) + payload
    return body + TRAILER.pack(zlib.crc32(body))


def fix_frame_crcs(data: bytes) -> bytes:
    """A migration stream (preamble, then frames) with each frame's CRC32 recomputed over
    the bytes that follow its header, and a STATE frame's snapshot CRC made right too."""
    from kvmkit.migration.stream import FRAME, PREAMBLE, Kind

    out = bytearray(data[: PREAMBLE.size])
    at = PREAMBLE.size
    while at + FRAME.size <= len(data):
        kind, flags, raw_length, _ = FRAME.unpack_from(data, at)
        length = raw_length
        payload = data[at + FRAME.size : at + FRAME.size + length]
        if kind == Kind.STATE and len(payload) == length:
            payload = fix_snapshot_crc(payload[: len(payload) - 4])
            length = len(payload)
        head = struct.pack("<HHI", kind, flags, length)
        crc = zlib.crc32(payload, zlib.crc32(head))
        out += head + struct.pack("<I", crc) + payload
        at += FRAME.size + len(data[at + FRAME.size : at + FRAME.size + raw_length])
    out += data[at:]
    return bytes(out)
