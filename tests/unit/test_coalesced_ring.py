"""The coalesced-ring drainer's shutdown is bounded. The ring is a page of plain memory that
KVM fills (kvm/coalesced.py); here the test writes the producer's side itself."""

from __future__ import annotations

import struct
import threading
import time

from kvmkit.kvm.coalesced import CoalescedRing, RingDrainer

_ENTRY = struct.Struct("<QII8s")  # struct kvm_coalesced_mmio: phys_addr, len, pio, data


def ring_with_one_write() -> tuple[CoalescedRing, memoryview]:
    page = memoryview(bytearray(4096))
    _ENTRY.pack_into(page, 8, 0x3F8, 1, 1, b"A")  # one THR write of 'A' to COM1
    struct.pack_into("<II", page, 0, 0, 1)  # first 0, last 1: KVM published it
    return CoalescedRing(page), page


def test_stop_is_bounded_when_the_handler_is_stuck() -> None:
    """A handler that never returns (a device stuck on its output) holds the drain thread:
    stop() gives up after its timeout instead of joining forever, and says so."""
    ring, _ = ring_with_one_write()
    entered, release = threading.Event(), threading.Event()

    def stuck(pio: bool, addr: int, size: int, data: bytes) -> None:
        entered.set()
        release.wait()

    drainer = RingDrainer(ring, stuck, interval=0.01)
    drainer.start()
    assert entered.wait(5)
    done: list[bool] = []
    t0 = time.monotonic()
    stopper = threading.Thread(target=lambda: done.append(drainer.stop()), daemon=True)
    stopper.start()
    stopper.join(10)
    assert done == [False] and time.monotonic() - t0 < 8
    release.set()


def test_stop_hands_over_what_is_left() -> None:
    ring, _ = ring_with_one_write()
    got: list[tuple[bool, int, int, bytes]] = []
    drainer = RingDrainer(ring, lambda *w: got.append(w), interval=60)  # never by itself
    drainer.start()
    assert drainer.stop(timeout=5)
    assert got == [(True, 0x3F8, 1, b"A")] and not ring.pending()
