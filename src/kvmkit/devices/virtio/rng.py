"""virtio-rng, the entropy device (virtio 1.2 §5.4): one request queue whose device-writable
buffers the device fills from the host's getrandom(2)."""

from __future__ import annotations

import os

from kvmkit.devices.virtio.device import Budget, VirtioDevice

VIRTIO_ID_RNG = 4
QUEUE_SIZE = 256
# Bytes served per request at most (§5.4.6.1 lets the device write fewer than asked): a
# guest cannot make the VMM allocate more than this at once.
MAX_REQUEST = 64 * 1024


class VirtioRng(VirtioDevice):
    DEVICE_ID = VIRTIO_ID_RNG

    def __init__(self, name: str = "rng") -> None:
        super().__init__(name, [QUEUE_SIZE], 0)

    def process_queue(self, index: int, budget: Budget) -> None:
        assert self.mem is not None
        queue = self.queues[index]
        done = False
        while budget.take() and (chain := queue.pop(self.mem)) is not None:
            written = 0
            for buf in chain.writable:
                n = min(buf.length, MAX_REQUEST - written)
                if n <= 0:
                    break
                view = self.mem.view(buf.addr, n, write=True)
                view[:] = os.getrandom(n)
                written += n
            self.complete(index, chain.head, written)
            done = True
        if done:
            self.signal_used(index)
