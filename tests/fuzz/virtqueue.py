"""Fuzz target: the split-virtqueue walker (kvmkit.devices.virtio.queue, virtio 1.2 §2.7)
over guest memory built from the input: descriptor chains, indirect tables, the rings'
indexes, event-index suppression.

Input: u8 flags (bit 0 EVENT_IDX, bit 1 INDIRECT_DESC), u8 log2 queue size (0..7), u16
desc/avail/used addresses, u16 last_avail and next_used, then the guest memory image at
GPA 0. The only rejection is QueueError (the device would enter NEEDS_RESET)."""

from __future__ import annotations

import struct

from common import guest_memory

from kvmkit.devices.virtio.queue import QueueError, SplitQueue

HEADER = struct.Struct("<BBHHHHH")


def TestOneInput(data: bytes) -> None:
    head = data[: HEADER.size].ljust(HEADER.size, b"\0")
    flags, size_log2, desc, avail, used, last_avail, next_used = HEADER.unpack(head)
    mem = guest_memory(data[HEADER.size :])
    q = SplitQueue(128)
    q.set_size(1 << (size_log2 & 7))
    q.desc_addr, q.avail_addr, q.used_addr = desc, avail, used
    q.event_idx, q.indirect = bool(flags & 1), bool(flags & 2)
    q.last_avail, q.next_used = last_avail, next_used
    try:
        q.enable(mem)
        for _ in range(4):
            chains = q.pop_batch(mem, 8)
            if not chains:
                q.notify_on_next(mem)
                break
            for chain in chains:
                # A chain's buffers lie in guest memory: reading or writing them whole
                # must work (the walker checked them).
                for buf in chain.readable:
                    mem.read(buf.addr, buf.length)
                for buf in chain.writable:
                    mem.view(buf.addr, buf.length, write=True)
            q.push_batch(mem, [(c.head, c.writable_length) for c in chains])
            q.needs_interrupt(mem)
    except QueueError:
        pass
