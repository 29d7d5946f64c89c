"""Pausing vCPU loops at a consistent point: Running -> Paused -> Running.

`pause()` kicks the vCPU out of KVM_RUN with `immediate_exit` and a signal. The loop parks
only after KVM_RUN returned that EINTR: re-entering KVM_RUN first completes any port I/O or
MMIO read the previous exit left pending (KVM API doc, KVM_RUN: "the corresponding operations
are complete (and guest state is consistent) only after userspace has re-entered the kernel
with KVM_RUN"), so a parked vCPU is outside KVM_RUN, not inside device emulation, and its
registers are final. The same `PausePoint` serves `kvmkit.vmm.vcpu.VcpuThread` and
`VcpuRunner` below (tiny guests, tests).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from kvmkit.kvm import IntrExit, Vcpu, VmExit


class PausePoint:
    """The pause hand-shake of one vCPU loop."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._requested = False
        self._parked = False

    @property
    def requested(self) -> bool:
        return self._requested

    @property
    def parked(self) -> bool:
        return self._parked

    def request(self, vcpu: Vcpu) -> None:
        """Any thread: ask the loop to park at its next EINTR exit, and kick it there."""
        with self._cond:
            self._requested = True
        vcpu.kick()

    def wait_parked(self, timeout: float | None, alive: Callable[[], bool]) -> bool:
        """True once the loop is parked (or has ended: `alive()` false)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._parked and alive():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.05 if left is None else min(left, 0.05))
            return True

    def release(self) -> None:
        """Any thread: let a parked loop run again (also used to cancel a request)."""
        with self._cond:
            self._requested = False
            self._cond.notify_all()

    def park_if_requested(self, vcpu: Vcpu) -> bool:
        """vCPU thread, right after an IntrExit: block while a pause is requested. Returns
        True if it parked."""
        with self._cond:
            if not self._requested:
                return False
            self._parked = True
            self._cond.notify_all()
            while self._requested:
                self._cond.wait()
            self._parked = False
        vcpu.immediate_exit = False
        return True


class VcpuRunner:
    """Run one vCPU in a thread, handing each exit to `on_exit` (return False to end the
    loop), with pause()/resume() for snapshots. For tiny guests and tests."""

    def __init__(self, vcpu: Vcpu, on_exit: Callable[[VmExit], bool]) -> None:
        self.vcpu = vcpu
        self.on_exit = on_exit
        self.pause_point = PausePoint()
        self.error: BaseException | None = None
        self._stop = False
        self.thread = threading.Thread(target=self._main, name=f"runner{vcpu.id}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _main(self) -> None:
        try:
            while not self._stop:
                exit_ = self.vcpu.run()
                if isinstance(exit_, IntrExit):
                    self.vcpu.immediate_exit = False
                    self.pause_point.park_if_requested(self.vcpu)
                    continue
                if not self.on_exit(exit_):
                    return
        except BaseException as err:  # reported by join()
            self.error = err

    def pause(self, timeout: float = 10.0) -> None:
        self.pause_point.request(self.vcpu)
        if not self.pause_point.wait_parked(timeout, self.thread.is_alive):
            raise TimeoutError(f"vcpu{self.vcpu.id} did not pause within {timeout} s")

    def resume(self) -> None:
        self.pause_point.release()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop = True
        self.pause_point.release()
        if self.thread.is_alive():
            self.vcpu.kick()
        self.thread.join(timeout)
        self.vcpu.immediate_exit = False
        if self.error is not None:
            raise self.error

    @property
    def running(self) -> bool:
        return self.thread.is_alive() and not self.pause_point.parked
