"""The vCPU run-state machine (kvmkit.vmm.runstate): every transition of the table, the
illegal ones, and the hand-shake with a vCPU thread. The thread here is a loop that stands in
for `VcpuThread._loop` (a kick makes the next "KVM_RUN" return EINTR), so the hand-shake
is tested without KVM; tests/kvm/test_runstate_vcpus.py runs it on real vCPUs."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

import pytest

from kvmkit.vmm.runstate import (
    Event,
    IllegalTransition,
    RunState,
    Status,
    VcpuControl,
    transition,
)

R, P, D, F = RunState.RUNNING, RunState.PAUSED, RunState.DEBUG_STOPPED, RunState.FINISHED

LEGAL = [
    (Status(R), Event.PAUSE, Status(P)),
    (Status(R), Event.DEBUG_STOP, Status(D)),
    (Status(P), Event.RESUME, Status(R)),
    # gdb stops a paused VM: it can read registers; its continue leaves the VM paused
    (Status(P), Event.DEBUG_STOP, Status(D, pause_pending=True)),
    (Status(D, pause_pending=True), Event.DEBUG_RESUME, Status(P)),
    (Status(D), Event.DEBUG_RESUME, Status(R)),
    # the VMM pauses a debug-stopped vCPU: held at once, stays with the debugger
    (Status(D), Event.PAUSE, Status(D, pause_pending=True)),
    (Status(D, pause_pending=True), Event.RESUME, Status(D)),
]
ALL = [Status(R), Status(P), Status(D), Status(D, pause_pending=True), Status(F)]


@pytest.mark.parametrize(("before", "event", "after"), LEGAL)
def test_legal_transitions(before: Status, event: Event, after: Status) -> None:
    assert transition(before, event) == after


@pytest.mark.parametrize("before", ALL)
def test_stop_is_legal_from_every_state_and_final(before: Status) -> None:
    assert transition(before, Event.STOP) == Status(F)


def test_every_other_transition_is_illegal() -> None:
    legal = {(b, e) for b, e, _ in LEGAL} | {(s, Event.STOP) for s in ALL}
    illegal = [(s, e) for s, e in itertools.product(ALL, Event) if (s, e) not in legal]
    # e.g. resuming a running vCPU, pausing a paused one, anything after FINISHED
    assert (Status(R), Event.RESUME) in illegal and (Status(P), Event.PAUSE) in illegal
    assert (Status(F), Event.RESUME) in illegal and (Status(R), Event.DEBUG_RESUME) in illegal
    for status, event in illegal:
        with pytest.raises(IllegalTransition, match=f"{event.value} is not allowed"):
            transition(status, event)


class Vcpu:
    """What VcpuControl needs of a vCPU: `kick()` and `immediate_exit`."""

    def __init__(self) -> None:
        self.immediate_exit = False
        self.kicked = threading.Event()
        self.kicks = 0

    def kick(self) -> None:
        self.kicks += 1
        self.immediate_exit = True
        self.kicked.set()


class Loop:
    """A vCPU thread: "runs" until kicked (`immediate_exit`), then goes to the hold point,
    counting the rounds it ran guest code."""

    def __init__(self) -> None:
        self.vcpu = Vcpu()
        self.control = VcpuControl(self.vcpu)
        self.ran = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while True:
                while not self.vcpu.immediate_exit:  # "KVM_RUN"
                    self.ran += 1
                    time.sleep(0.001)
                if not self.control.hold_point():  # the EINTR exit
                    return
        finally:
            self.control.finish()

    def running_now(self) -> bool:
        before = self.ran
        time.sleep(0.05)
        return self.ran > before


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    lp.thread.start()
    yield lp
    lp.control.request(Event.STOP)
    lp.thread.join(5)
    assert not lp.thread.is_alive()


def test_pause_parks_the_thread_and_resume_runs_it(loop: Loop) -> None:
    c = loop.control
    assert c.request(Event.PAUSE) == Status(P)
    assert c.wait_held(5) and c.parked and c.held and not loop.running_now()
    c.request(Event.RESUME)
    assert loop.running_now() and not c.parked and c.state is R


def test_pause_while_debug_stopped_holds_until_both_let_go(loop: Loop) -> None:
    c = loop.control
    c.request(Event.DEBUG_STOP)
    assert c.wait_held(5)
    kicks = loop.vcpu.kicks
    c.request(Event.PAUSE)
    assert c.held  # held already: nothing to wait for
    c.request(Event.DEBUG_RESUME)  # the debugger continues: the VMM still holds it
    assert c.status == Status(P) and c.held and not loop.running_now()
    c.request(Event.DEBUG_STOP)  # gdb interrupts the paused VM and can read it
    assert c.status == Status(D, pause_pending=True) and c.held
    c.request(Event.RESUME)  # the VMM resumes: the debugger still holds it
    assert c.status == Status(D) and not loop.running_now()
    assert loop.vcpu.kicks > kicks
    c.request(Event.DEBUG_RESUME)
    assert loop.running_now()


def test_a_request_right_after_a_resume_is_not_lost(loop: Loop) -> None:
    # A kick that lands while the thread leaves its hold must still stop it: the thread
    # clears immediate_exit before it reads the state, never after.
    c = loop.control
    for _ in range(200):
        c.request(Event.PAUSE)
        assert c.wait_held(5)
        c.request(Event.RESUME)
    c.request(Event.PAUSE)
    assert c.wait_held(5)


def test_stop_releases_a_held_thread_and_finishes(loop: Loop) -> None:
    c = loop.control
    c.request(Event.DEBUG_STOP)
    assert c.wait_held(5)
    c.request(Event.STOP)
    loop.thread.join(5)
    assert not loop.thread.is_alive() and c.state is F and c.held
    with pytest.raises(IllegalTransition):
        c.request(Event.RESUME)
    assert not c.try_request(Event.PAUSE)  # racing owners use try_request
    c.request(Event.STOP)  # stopping twice is harmless


def test_wait_held_times_out_when_nothing_was_asked(loop: Loop) -> None:
    assert not loop.control.wait_held(0.1)
    assert loop.control.wait_held(0.1, alive=lambda: False)  # the thread is gone


def test_a_vcpu_asked_to_pause_before_its_thread_starts_parks_at_once() -> None:
    lp = Loop()
    lp.control.request(Event.PAUSE)  # sets immediate_exit: the first "KVM_RUN" returns
    lp.thread.start()
    try:
        assert lp.control.wait_held(5) and lp.ran == 0
    finally:
        lp.control.request(Event.STOP)
        lp.thread.join(5)


def test_on_release_runs_on_the_vcpu_thread_before_it_runs_again(loop: Loop) -> None:
    seen: list[tuple[str, int]] = []
    c = loop.control
    c.on_release = lambda: seen.append((threading.current_thread().name, loop.ran))
    c.request(Event.DEBUG_STOP)
    assert c.wait_held(5)
    ran = loop.ran
    c.request(Event.DEBUG_RESUME)
    assert loop.running_now()
    assert seen == [(loop.thread.name, ran)]
