"""The coalesced MMIO/PIO ring: writes KVM queued instead of exiting.

A range registered with `Vm.register_coalesced_mmio` (ports with ``pio=True``,
KVM_CAP_COALESCED_PIO) no longer exits on guest writes: KVM appends each write to a ring in
the page at KVM_COALESCED_MMIO_PAGE_OFFSET of every vCPU's mapping (one ring per VM) and the
vCPU runs on. Reads still exit. The device must still see the writes in order with every
other access, so the VMM drains the ring before it handles any exit (QEMU does the same), and
a timer drains it for guests that write and then only halt (Documentation/virt/kvm/api.rst,
"KVM_(UN)REGISTER_COALESCED_MMIO"; include/uapi/linux/kvm.h).

KVM fills entries and advances `last`; userspace takes entries from `first` and advances it.
When the ring is full the write exits as usual, after the queued ones: nothing is lost or
reordered as long as every exit drains first.
"""

from __future__ import annotations

import ctypes
import struct
import threading
import time
from collections.abc import Callable

from kvmkit.abi import structs
from kvmkit.threads import ThreadKind, start_thread

_HEADER = ctypes.sizeof(structs.kvm_coalesced_mmio_ring)
_ENTRY = ctypes.sizeof(structs.kvm_coalesced_mmio)
_DATA = structs.kvm_coalesced_mmio.data.offset
_ENTRY_HEAD = struct.Struct("<QII")  # phys_addr, len, pio
STOP_TIMEOUT = 5.0  # seconds RingDrainer.stop waits for its thread

# handle(pio, addr, size, data): `data` holds len(data) // size writes of `size` bytes each
# to the same address, in guest order.
WriteHandler = Callable[[bool, int, int, bytes], None]


class CoalescedRingError(RuntimeError):
    pass


class CoalescedRing:
    """Reader of the ring in one page of a vCPU mapping (any vCPU's: the page is shared)."""

    def __init__(self, page: memoryview) -> None:
        if len(page) < _HEADER + _ENTRY:
            raise ValueError("coalesced ring page too small")
        self._page = page
        self._header = page[:_HEADER].cast("I")
        self.capacity = (len(page) - _HEADER) // _ENTRY
        self._lock = threading.Lock()
        self.drained = 0  # writes taken so far (for tests and metrics)

    def release(self) -> None:
        """Drop the views of the vCPU mapping (so the vCPU can unmap it)."""
        with self._lock:
            self._header.release()
            self._page.release()

    def pending(self) -> bool:
        """Whether KVM queued writes not taken yet (cheap: two loads, no lock)."""
        header = self._header
        return bool(header[0] != header[1])

    def drain(self, handle: WriteHandler, timeout: float | None = None) -> int:
        """Take every queued write in order and pass runs of writes to the same address and
        size to `handle` in one call. Returns the number of writes taken. Serialized: two
        threads draining at once hand the writes over in ring order. With `timeout`, gives
        up (returns -1) if another drain holds the ring that long (its handler is stuck)."""
        if not self._lock.acquire(timeout=-1 if timeout is None else max(0.0, timeout)):
            return -1
        try:
            return self._drain_locked(handle)
        finally:
            self._lock.release()

    def _drain_locked(self, handle: WriteHandler) -> int:
        header, page, cap = self._header, self._page, self.capacity
        first, last = header[0], header[1]
        if first >= cap or last >= cap:
            raise CoalescedRingError(f"coalesced ring indexes out of range ({first}, {last})")
        taken = 0
        run_key: tuple[bool, int, int] | None = None
        run: list[bytes] = []
        while first != last:
            off = _HEADER + first * _ENTRY
            addr, length, pio = _ENTRY_HEAD.unpack_from(page, off)
            length = min(length, 8)
            data = bytes(page[off + _DATA : off + _DATA + length])
            key = (bool(pio), addr, length)
            if key != run_key:
                if run_key is not None:
                    handle(*run_key, b"".join(run))
                run_key, run = key, []
            run.append(data)
            taken += 1
            first = (first + 1) % cap
        header[0] = first  # free the slots; the copies above are what the handler sees
        if run_key is not None:
            handle(*run_key, b"".join(run))
        self.drained += taken
        return taken


class RingDrainer:
    """Drains a ring from a thread of its own, for writes not followed by any exit (a guest
    that writes and halts): when entries have waited a whole `interval` with nobody taking
    them. While the vCPUs exit and drain by themselves (Linux's 8250 driver reads IIR/LSR
    after each burst) this thread only looks, so the device work stays on the vCPU thread,
    as it was before the ring: in the lane, extra work on a second thread during long
    serial output went with guest triple faults (not understood, see issue notes)."""

    def __init__(self, ring: CoalescedRing, handle: WriteHandler, interval: float = 0.02) -> None:
        self.ring = ring
        self._handle = handle
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = start_thread(ThreadKind.DRAIN, "coalesced", self._main)

    def stop(self, timeout: float = STOP_TIMEOUT) -> bool:
        """Stop the thread and hand over what is left in the ring; bounded: if the thread is
        stuck in a handler (a device that blocks) it is left behind (a daemon thread), and
        the last drain is skipped if it cannot get the ring within `timeout`. False then."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        thread = self._thread
        if thread is not None and thread.is_alive():
            thread.join(timeout)
            if thread.is_alive():
                return False
        if self.ring.pending():
            return self.ring.drain(self._handle, max(0.0, deadline - time.monotonic())) >= 0
        return True

    def drain(self, timeout: float | None = None) -> None:
        """Hand queued writes over now (from any thread); with `timeout`, give up if a
        drain stuck in a handler holds the ring that long."""
        if self.ring.pending():
            self.ring.drain(self._handle, timeout)

    def _main(self) -> None:
        seen = -1
        while not self._stop.wait(self._interval):
            if not self.ring.pending():
                seen = -1
                continue
            if seen == self.ring.drained:  # pending since the last look, nobody drained
                self.drain()
            seen = self.ring.drained
