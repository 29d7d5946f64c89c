"""One thread per vCPU: run it, hand each exit to `handle_exit`, hold it when asked.

Each thread owns its vCPU's run state (`control`, a `kvmkit.vmm.runstate.VcpuControl`):
pausing (API, snapshots, migration), the debugger's stops and stopping the VM are events on
it, and the loop parks at its hold point after an interrupted exit. How the vCPU ended is
reported once through `on_stopped(vcpu_id, Stopped)`; the machine then stops every vCPU.

    VcpuThread   the machine's vCPUs: exits go to the port-I/O and MMIO buses
    VcpuRunner   a vCPU of a tiny guest or test, exits go to a callback
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from kvmkit.devices.bus import Bus
from kvmkit.kvm import IntrExit, Vcpu, VmExit
from kvmkit.kvm.errors import KvmError
from kvmkit.threads import ThreadKind, name_thread
from kvmkit.vmm.dispatch import (
    HANDLED,
    DebugHook,
    ExitStats,
    Peripherals,
    StopKind,
    Stopped,
    handle_exit,
)
from kvmkit.vmm.runstate import Event, RunState, VcpuControl

log = logging.getLogger(__name__)


class VcpuThread:
    def __init__(
        self,
        vcpu: Vcpu,
        pio: Bus,
        mmio: Bus,
        on_stopped: Callable[[int, Stopped], None],
    ) -> None:
        self.vcpu = vcpu
        self.on_stopped = on_stopped
        self.control = VcpuControl(vcpu)
        self.peripherals = Peripherals(vcpu, pio, mmio)
        self.exits = 0
        # Drains the coalesced MMIO/PIO ring (kvmkit.kvm.coalesced) before each exit is
        # handled, so devices see queued writes in order with every other access.
        self.drain: Callable[[], None] | None = None
        self.thread = threading.Thread(target=self._main, name=f"vcpu{vcpu.id}", daemon=True)

    @property
    def stats(self) -> ExitStats:
        return self.peripherals.stats

    @property
    def debug(self) -> DebugHook | None:
        return self.peripherals.debug

    @debug.setter
    def debug(self, hook: DebugHook | None) -> None:
        """Attach a debugger (kvmkit.gdb) before the thread starts: it takes debug exits."""
        self.peripherals.debug = hook

    @property
    def alive(self) -> bool:
        """Not started yet, or running its loop."""
        return self.thread.ident is None or self.thread.is_alive()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """The STOP event: the loop ends at its next hold point (a paused vCPU at once)."""
        self.control.request(Event.STOP)

    def join(self, timeout: float | None = None) -> None:
        if self.thread.ident is not None:  # a restored machine closed before it started
            self.thread.join(timeout)

    def _main(self) -> None:
        name_thread(ThreadKind.VCPU, str(self.vcpu.id))
        try:
            stopped = self._loop()
        except KvmError as err:
            stopped = Stopped(StopKind.ERROR, str(err))
        except Exception as err:  # a device bug must end the VM cleanly, not hang it
            log.exception("vcpu%d: unexpected error", self.vcpu.id)
            stopped = Stopped(StopKind.ERROR, f"{type(err).__name__}: {err}")
        self.control.finish()
        self.on_stopped(self.vcpu.id, stopped)

    def _loop(self) -> Stopped:
        vcpu, p, control, drain = self.vcpu, self.peripherals, self.control, self.drain
        while True:
            exit_ = vcpu.run()
            self.exits += 1
            if drain is not None:
                drain()
            outcome = handle_exit(exit_, p)
            if outcome is HANDLED:
                continue
            if isinstance(outcome, Stopped):
                return outcome
            if not control.hold_point():  # INTERRUPTED: held while paused/debug-stopped
                return Stopped(StopKind.STOPPED)


class VcpuRunner:
    """Run one vCPU in a thread, handing each exit but interruptions to `on_exit` (return
    False to end the loop), on the same run-state machine as `VcpuThread`: `pause()`,
    `resume()`, `stop()`. For tiny guests and tests."""

    def __init__(self, vcpu: Vcpu, on_exit: Callable[[VmExit], bool]) -> None:
        self.vcpu = vcpu
        self.on_exit = on_exit
        self.control = VcpuControl(vcpu)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name=f"runner{vcpu.id}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _main(self) -> None:
        try:
            while True:
                exit_ = self.vcpu.run()
                if isinstance(exit_, IntrExit):
                    if not self.control.hold_point():
                        return
                    continue
                if not self.on_exit(exit_):
                    return
        except BaseException as err:  # reported by stop()
            self.error = err
        finally:
            self.control.finish()

    def pause(self, timeout: float = 10.0) -> None:
        self.control.request(Event.PAUSE)
        if not self.control.wait_held(timeout, self.thread.is_alive):
            raise TimeoutError(f"vcpu{self.vcpu.id} did not pause within {timeout} s")

    def resume(self) -> None:
        self.control.request(Event.RESUME)

    def stop(self, timeout: float = 10.0) -> None:
        self.control.request(Event.STOP)
        self.thread.join(timeout)
        self.vcpu.immediate_exit = False
        if self.error is not None:
            raise self.error

    @property
    def running(self) -> bool:
        return self.thread.is_alive() and self.control.state is RunState.RUNNING
