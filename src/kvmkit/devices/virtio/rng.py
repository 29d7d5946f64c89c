"""virtio-rng, the entropy device (virtio 1.2 §5.4): one request queue whose device-writable
buffers the device fills from the host's getrandom(2).

An optional rate limiter (Firecracker's `/entropy` `rate_limiter`, `ratelimit.py`) is
applied per request: one op and the bytes the request asks for (at most MAX_REQUEST). A
request that must wait stays taken and held; the limiter's timer brings the device back."""

from __future__ import annotations

import os

from kvmkit.devices.virtio.device import Budget, VirtioDevice
from kvmkit.devices.virtio.queue import DescriptorChain
from kvmkit.devices.virtio.ratelimit import DeviceLimiter, RateLimiterConfig

VIRTIO_ID_RNG = 4
QUEUE_SIZE = 256
# Bytes served per request at most (§5.4.6.1 lets the device write fewer than asked): a
# guest cannot make the VMM allocate more than this at once.
MAX_REQUEST = 64 * 1024


class VirtioRng(VirtioDevice):
    DEVICE_ID = VIRTIO_ID_RNG

    def __init__(self, name: str = "rng", rate_limiter: RateLimiterConfig | None = None) -> None:
        super().__init__(name, [QUEUE_SIZE], 0)
        self.limiter = DeviceLimiter(self, 0, rate_limiter)
        self._throttled: DescriptorChain | None = None
        # Firecracker's entropy metrics: requests served and bytes given to the guest.
        self.entropy_event_count = 0
        self.entropy_bytes = 0

    def update_rate_limiter(self, update: RateLimiterConfig) -> None:
        self.limiter.reconfigure(update)

    def describe_device(self) -> str:
        limiter = self.limiter.describe(self._throttled is not None)
        return f"{self.entropy_bytes} bytes served{'; ' + limiter if limiter else ''}"

    def held_chains(self) -> dict[int, int]:
        return {0: 1} if self._throttled is not None else {}

    def reset_device(self) -> None:
        self._throttled = None
        self.limiter.unwatch()

    def stop_host_io(self) -> None:
        self.limiter.unwatch()

    def close(self) -> None:
        self.limiter.close()
        super().close()

    def process_queue(self, index: int, budget: Budget) -> None:
        assert self.mem is not None
        queue, limiter = self.queues[index], self.limiter
        done = False
        while budget.take():
            chain, self._throttled = self._throttled, None
            if chain is None and (chain := queue.pop(self.mem)) is None:
                break
            if limiter.limits and not limiter.consume_request(
                min(chain.writable_length, MAX_REQUEST)
            ):
                self._throttled = chain
                limiter.wait()
                break
            written = 0
            for buf in chain.writable:
                n = min(buf.length, MAX_REQUEST - written)
                if n <= 0:
                    break
                view = self.mem.view(buf.addr, n, write=True)
                view[:] = os.getrandom(n)
                written += n
            self.complete(index, chain.head, written)
            self.entropy_event_count += 1
            self.entropy_bytes += written
            done = True
        if done:
            self.signal_used(index)
