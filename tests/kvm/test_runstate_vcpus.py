"""The vCPU run-state machine on real vCPUs: a CPL3 guest counting in memory is held by the
debugger and by a pause independently (it runs only when neither holds it), and a Machine
whose vCPUs the GDB stub holds pauses, gives its state and resumes to the debugger."""

from __future__ import annotations

import time
from pathlib import Path

from kvmkit.gdb import GdbStub
from kvmkit.kvm import Kvm
from kvmkit.testing import TinyGuest, pvh
from kvmkit.vmm.config import MachineConfig
from kvmkit.vmm.machine import Machine
from kvmkit.vmm.runstate import Event, RunState, Status
from kvmkit.vmm.vcpu import VcpuRunner

COUNTING = """
1:  incq counter
    jmp 1b
    .balign 4096
counter: .quad 0
"""


def moves(guest: TinyGuest, counter: int, wait: float = 0.2) -> bool:
    before = guest.mem.read_u64(counter)
    time.sleep(wait)
    return guest.mem.read_u64(counter) != before


def test_the_debugger_and_a_pause_hold_a_vcpu_independently() -> None:
    with Kvm() as kvm, TinyGuest("long64", cpl=3, irqchip=True, kvm=kvm) as g:
        counter = g.load_asm(COUNTING)["counter"]
        runner = VcpuRunner(g.vcpu, lambda exit_: False)
        runner.start()
        ctl = runner.control
        try:
            assert moves(g, counter)
            ctl.request(Event.DEBUG_STOP)
            assert ctl.wait_held(5) and not moves(g, counter)
            runner.pause()  # held already: returns at once
            ctl.request(Event.DEBUG_RESUME)  # the debugger lets go; the pause holds it
            assert ctl.status == Status(RunState.PAUSED) and not moves(g, counter)
            ctl.request(Event.DEBUG_STOP)
            runner.resume()  # the pause lets go; the debugger holds it
            assert ctl.status == Status(RunState.DEBUG_STOPPED) and not moves(g, counter)
            ctl.request(Event.DEBUG_RESUME)
            assert moves(g, counter) and runner.running
        finally:
            runner.stop()
        assert ctl.state is RunState.FINISHED and runner.error is None


def test_a_machine_held_by_gdb_pauses_captures_and_resumes_to_gdb(tmp_path: Path) -> None:
    cfg = MachineConfig(kernel=pvh.build(pvh.HALT, tmp_path / "halt.elf"), cmdline="",
                        mem_mib=64, vcpus=2)  # fmt: skip
    with Machine(cfg) as m:
        stub = GdbStub.for_machine(m, wait=True)  # every vCPU debug-stopped before it runs
        try:
            m.start()
            for t in m.threads:
                assert t.control.wait_held(5) and t.control.state is RunState.DEBUG_STOPPED
            m.pause()  # held by the debugger: consistent already, nothing to wait for
            assert m.paused
            state = m.capture_state()
            assert [v.id for v in state.kvm.vcpus] == [0, 1]
            m.resume()  # the VMM lets go: gdb still holds every vCPU
            assert not m.paused
            assert all(t.control.status == Status(RunState.DEBUG_STOPPED) for t in m.threads)
            assert all(t.control.parked for t in m.threads)
        finally:
            stub.close()  # the debugger lets go: the vCPUs run
        for t in m.threads:
            deadline = time.monotonic() + 5
            while t.control.parked and time.monotonic() < deadline:
                time.sleep(0.01)
            assert t.control.state is RunState.RUNNING and not t.control.parked
        m.pause()
        assert m.paused
        m.resume()
