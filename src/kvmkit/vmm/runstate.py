"""The run state of one vCPU: one state machine, owned by the vCPU's thread, driven by events.

    RUNNING --PAUSE--> PAUSED --RESUME--> RUNNING            (the VMM: API, snapshots, migration)
    RUNNING --DEBUG_STOP--> DEBUG_STOPPED --DEBUG_RESUME--> RUNNING        (the GDB stub)
    any --STOP--> FINISHED                                   (the VM ends; FINISHED is final)

Firecracker's `VcpuRunState {Running, Paused, Finished}` driven by `VcpuEvent`s, with
cloud-hypervisor's debug stop (`Debuggable: Pausable`) as a state of its own, because the
VMM and a debugger hold a vCPU independently:

- PAUSE while DEBUG_STOPPED: the vCPU is already outside KVM_RUN at a consistent point (it
  stopped after a KVM_RUN that returned an exit, see below), so the pause holds at once; the
  state stays DEBUG_STOPPED with `pause_pending` set, and the debugger's DEBUG_RESUME then
  leaves the vCPU PAUSED instead of running it. RESUME while DEBUG_STOPPED clears
  `pause_pending` and leaves the vCPU with the debugger.
- DEBUG_STOP while PAUSED (gdb attaches to, or interrupts, a paused VM): DEBUG_STOPPED with
  `pause_pending`, so gdb can read the registers; its DEBUG_RESUME returns to PAUSED.

So a vCPU runs guest code only when neither the VMM nor the debugger holds it. Any other
event is an `IllegalTransition` (resuming a running vCPU, pausing a paused one, anything but
STOP after FINISHED); `transition()` is the pure table, `VcpuControl` applies it.

The hand-shake (KVM API doc, KVM_RUN): another thread asks with `request(event)`, which
changes the state at once and kicks the vCPU (`Vcpu.kick`: `immediate_exit` and a signal).
The vCPU thread calls `hold_point()` after every KVM_RUN that returned an interruption (EINTR)
or a debug exit: there it blocks while the state is not RUNNING (`parked`). A vCPU parks only
after an exit whose completion needs no re-entry: KVM finishes a port-I/O or MMIO read
(writes the value into the guest's register) only when userspace re-enters KVM_RUN ("the
corresponding operations are complete (and guest state is consistent) only after userspace
has re-entered the kernel with KVM_RUN"), and an EINTR return comes from that re-entry. So a
parked vCPU is outside KVM_RUN, not inside device emulation, with its registers final; its
state can be read (snapshots, migration, gdb) from any thread. `wait_held()` waits for that.
Work that must be done on the vCPU's own thread while it is held (a KVM_RUN that only lets
KVM deliver expired timer interrupts, `Vcpu.inject_pending_timers`) goes through
`call_held()`: the parked thread runs it and stays parked.
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


class RunState(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    DEBUG_STOPPED = "debug-stopped"
    FINISHED = "finished"


class Event(enum.Enum):
    PAUSE = "pause"
    RESUME = "resume"
    DEBUG_STOP = "debug-stop"
    DEBUG_RESUME = "debug-resume"
    STOP = "stop"


class IllegalTransition(RuntimeError):
    """An event the vCPU's state does not take (a caller's logic error)."""

    def __init__(self, status: Status, event: Event) -> None:
        super().__init__(f"vCPU {status.describe()}: {event.value} is not allowed")
        self.status = status
        self.event = event


@dataclass(frozen=True, slots=True)
class Status:
    """A vCPU's run state; `pause_pending`: held by the VMM under the debugger's stop."""

    state: RunState
    pause_pending: bool = False

    def describe(self) -> str:
        return self.state.value + (" (and paused)" if self.pause_pending else "")


_R, _P, _D, _F = RunState.RUNNING, RunState.PAUSED, RunState.DEBUG_STOPPED, RunState.FINISHED
# (state, pause_pending, event) -> the next status. Anything missing is illegal.
_TABLE: dict[tuple[RunState, bool, Event], Status] = {
    (_R, False, Event.PAUSE): Status(_P),
    (_R, False, Event.DEBUG_STOP): Status(_D),
    (_P, False, Event.RESUME): Status(_R),
    (_P, False, Event.DEBUG_STOP): Status(_D, pause_pending=True),
    (_D, False, Event.DEBUG_RESUME): Status(_R),
    (_D, False, Event.PAUSE): Status(_D, pause_pending=True),
    (_D, True, Event.DEBUG_RESUME): Status(_P),
    (_D, True, Event.RESUME): Status(_D),
}


def transition(status: Status, event: Event) -> Status:
    """The pure state machine: the status after `event`, or IllegalTransition."""
    if event is Event.STOP:
        return Status(_F)  # from anywhere, FINISHED included (stopping twice is harmless)
    found = _TABLE.get((status.state, status.pause_pending, event))
    if found is None:
        raise IllegalTransition(status, event)
    return found


@dataclass(slots=True)
class _Call:
    """A function to run on the parked vCPU thread, and its outcome."""

    fn: Callable[[], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None

    def run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as err:  # handed to the caller of call_held
            self.error = err
        finally:
            self.done.set()


class Kickable(Protocol):
    """What the control needs of a vCPU (`kvmkit.kvm.Vcpu`)."""

    def kick(self) -> None: ...

    @property
    def immediate_exit(self) -> bool: ...

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None: ...


class VcpuControl:
    """The state machine of one vCPU and its hand-shake with the vCPU's thread.

    Any thread: `request(event)` / `try_request(event)`, `wait_held(timeout)`, `status`.
    The vCPU thread only: `hold_point()` after an interrupted or debug exit, `finish()` when
    its loop ends. `on_release`, if set, runs on the vCPU thread each time it leaves a hold,
    before it re-enters KVM_RUN (the GDB stub loads the debug registers there).
    """

    def __init__(self, vcpu: Kickable) -> None:
        self.vcpu = vcpu
        self._cond = threading.Condition()
        self._status = Status(RunState.RUNNING)
        self._parked = False
        self._calls: list[_Call] = []
        self.on_release: Callable[[], None] | None = None

    @property
    def status(self) -> Status:
        return self._status

    @property
    def state(self) -> RunState:
        return self._status.state

    @property
    def parked(self) -> bool:
        """The vCPU thread is blocked in `hold_point()` (outside KVM_RUN)."""
        return self._parked

    @property
    def held(self) -> bool:
        """Stopped at a consistent point: parked and not RUNNING, or FINISHED."""
        with self._cond:
            return self._held_locked()

    def _held_locked(self) -> bool:
        state = self._status.state
        return state is RunState.FINISHED or (self._parked and state is not RunState.RUNNING)

    # -- any thread
    def request(self, event: Event) -> Status:
        """Apply `event` now (IllegalTransition if the state does not take it) and kick the
        vCPU so that its thread reaches `hold_point()`. Returns the new status."""
        with self._cond:
            self._status = transition(self._status, event)
            self._cond.notify_all()
            status = self._status
        if status.state is not RunState.RUNNING:
            self.vcpu.kick()
        return status

    def try_request(self, event: Event) -> bool:
        """`request`, or False (nothing changed) where the event is illegal: for callers that
        race with other owners (the debugger stopping a vCPU the VMM just stopped)."""
        try:
            self.request(event)
        except IllegalTransition:
            return False
        return True

    def wait_held(
        self, timeout: float | None = None, alive: Callable[[], bool] | None = None
    ) -> bool:
        """Wait until `held` (True), the thread is gone (`alive()` false: True), or `timeout`
        (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._held_locked():
                if alive is not None and not alive():
                    return True
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                # A finite wait: `alive()` can change without a notification.
                self._cond.wait(0.05 if left is None else min(left, 0.05))
            return True

    def call_held(self, fn: Callable[[], Any], timeout: float = 10.0,
                  thread_alive: Callable[[], bool] | None = None) -> Any:  # fmt: skip
        """Run `fn` on the vCPU's thread while it stays held, and return its result (or
        raise its exception). The vCPU must be held (`wait_held`). A FINISHED vCPU, or one
        whose thread is gone (`thread_alive()` false), has no thread: `fn` runs here."""
        call = _Call(fn)
        with self._cond:
            if not self._held_locked():
                raise IllegalTransition(self._status, Event.PAUSE)
            here = not self._parked or (thread_alive is not None and not thread_alive())
            if not here:
                self._calls.append(call)
                self._cond.notify_all()
        if here:
            call.run()
        elif not call.done.wait(timeout):
            with self._cond:
                if call in self._calls:  # never picked up: it will not run now
                    self._calls.remove(call)
                    raise TimeoutError(f"the vCPU thread did not run a call within {timeout} s")
            call.done.wait()  # it is running: KVM_RUN without guest entry returns at once
        if call.error is not None:
            raise call.error
        return call.result

    # -- the vCPU thread
    def hold_point(self) -> bool:
        """After an interrupted (EINTR) or debug exit: block while the vCPU is held. Returns
        False when it is FINISHED (the loop ends), True to run on."""
        # Clear the kick before looking at the state: a request made after this line kicks
        # again (its `immediate_exit` survives until the next KVM_RUN), one made before is
        # seen below. Nothing clears `immediate_exit` after the wait, so none is lost.
        self.vcpu.immediate_exit = False
        with self._cond:
            state = self._status.state
            if state is RunState.RUNNING:
                return True
            if state is RunState.FINISHED:
                return False
            self._parked = True
            self._cond.notify_all()
            while self._status.state is not RunState.RUNNING:
                if self._status.state is RunState.FINISHED:
                    self._parked = False
                    self._cond.notify_all()
                    self._fail_calls()
                    return False
                if self._calls:
                    call = self._calls.pop(0)
                    self._cond.release()
                    try:
                        call.run()
                    finally:
                        self._cond.acquire()
                    continue
                self._cond.wait()
            self._parked = False
            self._cond.notify_all()
        if self.on_release is not None:
            self.on_release()
        return True

    def finish(self) -> None:
        """The vCPU's loop ended (the guest shut down, an error, or STOP)."""
        with self._cond:
            self._status = Status(RunState.FINISHED)
            self._parked = False
            self._fail_calls()
            self._cond.notify_all()

    def _fail_calls(self) -> None:
        """Calls queued for a thread that is leaving: run them by their caller instead."""
        calls, self._calls = self._calls, []
        for call in calls:
            call.error = _Gone()
            call.done.set()


class _Gone(RuntimeError):
    def __init__(self) -> None:
        super().__init__("the vCPU thread ended before it ran the call")
