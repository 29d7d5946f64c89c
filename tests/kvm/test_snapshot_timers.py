"""LAPIC timers across snapshot/restore into a new VM (KVM-BEHAVIOURS.md section 1 recipes).

A CPL0 tiny guest programs its LAPIC timer and counts interrupts in an IDT handler, which
reports each tick (with its count) on a port. The host pauses it mid-period, snapshots it,
restores the snapshot into a fresh VM and times the ticks there. Periods are hundreds of
milliseconds so that "the remaining time" and "a full period" are far apart on a noisy
machine. APIC bus cycle: 1 ns (KVM's default), divider 1: TMICT counts nanoseconds.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from kvmkit.arch.x86_64 import msr
from kvmkit.arch.x86_64 import regs as x86
from kvmkit.kvm import IoExit, Kvm, VmExit
from kvmkit.snapshot import core
from kvmkit.snapshot.vcpu_state import lapic_reg
from kvmkit.testing import TinyGuest
from kvmkit.vmm.vcpu import VcpuRunner

VECTOR = 0x40
TICK_PORT = 0x2100
ARMED_PORT = 0x2101
MS = 1_000_000  # APIC counts per millisecond


def timer_guest(lvt: int, count: int) -> str:
    return f"""
    mov $0xff, %al
    out %al, $0x21
    out %al, $0xa1
    mov $0xFEE000F0, %ebx
    movl $0x1FF, (%rbx)
    mov $0xFEE003E0, %ebx
    movl $0xB, (%rbx)
    mov $0xFEE00320, %ebx
    movl ${lvt}, (%rbx)
    mov $0xFEE00380, %ebx
    movl ${count}, (%rbx)
    mov ${ARMED_PORT}, %dx
    out %eax, %dx
    sti
1:  hlt
    jmp 1b
isr:
    incl count
    mov count, %eax
    mov ${TICK_PORT}, %dx
    out %eax, %dx
    mov $0xFEE000B0, %ebx
    movl $0, (%rbx)
    iretq
count: .long 0
"""


class Ticks:
    """Host side of the guest: times of ARMED and of each tick (with the guest's count)."""

    def __init__(self) -> None:
        self.armed = threading.Event()
        self.ticks: list[tuple[float, int]] = []
        self.cond = threading.Condition()
        self.unexpected: list[str] = []

    def on_exit(self, exit_: VmExit) -> bool:
        if isinstance(exit_, IoExit) and exit_.port == TICK_PORT:
            with self.cond:
                self.ticks.append((time.monotonic(), exit_.value))
                self.cond.notify_all()
            return True
        if isinstance(exit_, IoExit) and exit_.port == ARMED_PORT:
            self.armed.set()
            return True
        self.unexpected.append(exit_.describe())
        return False

    def wait_ticks(self, n: int, timeout: float) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.ticks) >= n, timeout), self.ticks


def snapshot_timer_guest(
    tmp_path: Path, kvm: Kvm, lvt: int, count: int, *, ticks_before: int, then_sleep: float
) -> tuple[core.Snapshot, int]:
    """Run the guest until `ticks_before` ticks plus `then_sleep` s, pause, snapshot; returns
    the snapshot and the guest's tick count at the pause."""
    with TinyGuest("long64", irqchip=True, kvm=kvm) as g:
        symbols = g.load_asm(timer_guest(lvt, count))
        g.set_idt_entry(VECTOR, symbols["isr"])
        host = Ticks()
        runner = VcpuRunner(g.vcpu, host.on_exit)
        runner.start()
        try:
            assert host.armed.wait(30), "guest never armed its timer"
            if ticks_before:
                host.wait_ticks(ticks_before, 10)
            time.sleep(then_sleep)
            runner.pause()
            snap = core.capture(
                kvm, g.vm, g.vcpus, g.mem, tmp_path / "mem", core.VmSetup(irqchip=True)
            )
            core.save(tmp_path / "state", snap)
        finally:
            runner.stop()
        assert not host.unexpected, host.unexpected
        return snap, len(host.ticks)


def restore_and_time(tmp_path: Path, kvm: Kvm, duration: float) -> tuple[list[float], list[int]]:
    """Restore the snapshot into a new VM, run it `duration` s; tick delays since restore
    and the counts the guest reported."""
    snap = core.read(tmp_path / "state")
    host = Ticks()
    t0 = time.monotonic()
    restored = core.load(kvm, snap, tmp_path / "mem")
    try:
        restored.resume()
        runner = VcpuRunner(restored.vcpus[0], host.on_exit)
        runner.start()
        time.sleep(duration)
        runner.stop()
    finally:
        restored.close()
    assert not host.unexpected, host.unexpected
    return [t - t0 for t, _ in host.ticks], [c for _, c in host.ticks]


def test_periodic_timer_first_tick_after_the_remaining_time(tmp_path: Path) -> None:
    period = 400 * MS
    with Kvm() as kvm:
        snap, count = snapshot_timer_guest(
            tmp_path, kvm, VECTOR | x86.APIC_LVT_TIMER_PERIODIC, period,
            ticks_before=1, then_sleep=0.25,
        )  # fmt: skip
        lapic = snap.vcpus[0].lapic
        assert lapic is not None
        remaining = lapic_reg(lapic, x86.APIC_TMCCT) / 1e9
        assert lapic_reg(lapic, x86.APIC_TMICT) == period
        delays, counts = restore_and_time(tmp_path, kvm, 1.2)
    print(f"periodic 0.4 s: saved remaining {remaining:.3f} s, ticks after restore at "
          f"{[round(d, 3) for d in delays]}")  # fmt: skip
    assert 0.05 < remaining < 0.3  # snapshot taken mid-period
    assert len(delays) >= 2
    assert abs(delays[0] - remaining) < 0.1, "first tick must come after the remaining time"
    assert delays[0] < 0.4 - 0.05  # not a full period
    assert 0.3 < delays[1] - delays[0] < 0.5  # then the full period again
    assert counts[:2] == [count + 1, count + 2]  # the guest's count continues


def test_oneshot_armed_fires_once_at_the_remaining_time(tmp_path: Path) -> None:
    with Kvm() as kvm:
        snap, count = snapshot_timer_guest(
            tmp_path, kvm, VECTOR, 700 * MS, ticks_before=0, then_sleep=0.3
        )
        assert count == 0
        lapic = snap.vcpus[0].lapic
        assert lapic is not None
        remaining = lapic_reg(lapic, x86.APIC_TMCCT) / 1e9
        delays, counts = restore_and_time(tmp_path, kvm, 1.3)
    print(f"one-shot 0.7 s: saved remaining {remaining:.3f} s, ticks after restore at "
          f"{[round(d, 3) for d in delays]}")  # fmt: skip
    assert 0.1 < remaining < 0.6
    assert len(delays) == 1, "a one-shot timer fires exactly once"
    assert abs(delays[0] - remaining) < 0.1
    assert counts == [1]


def test_oneshot_expired_gives_no_spurious_tick(tmp_path: Path) -> None:
    with Kvm() as kvm:
        snap, count = snapshot_timer_guest(
            tmp_path, kvm, VECTOR, 100 * MS, ticks_before=1, then_sleep=0.1
        )
        assert count == 1
        lapic = snap.vcpus[0].lapic
        assert lapic is not None
        # KVM kept TMICT for the expired timer (the quirk); kvmkit saved 0 instead.
        assert lapic_reg(lapic, x86.APIC_TMCCT) == 0
        assert lapic_reg(lapic, x86.APIC_TMICT) == 0
        delays, _ = restore_and_time(tmp_path, kvm, 0.8)
    assert delays == [], f"spurious timer interrupt after restore at {delays}"


def tsc_deadline_guest(delta: int) -> str:
    """LVT timer in TSC-deadline mode; deadline = now + delta TSC ticks (0: none armed)."""
    arm = (
        f"""
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    mov ${delta}, %rbx
    add %rbx, %rax
    mov %rax, %rdx
    shr $32, %rdx
    mov $0x6E0, %ecx
    wrmsr
"""
        if delta
        else ""
    )
    return f"""
    mov $0xff, %al
    out %al, $0x21
    out %al, $0xa1
    mov $0xFEE000F0, %ebx
    movl $0x1FF, (%rbx)
    mov $0xFEE00320, %ebx
    movl ${VECTOR | x86.APIC_LVT_TIMER_TSCDEADLINE}, (%rbx)
    {arm}
    mov ${ARMED_PORT}, %dx
    out %eax, %dx
    sti
1:  hlt
    jmp 1b
isr:
    incl count
    mov count, %eax
    mov ${TICK_PORT}, %dx
    out %eax, %dx
    mov $0xFEE000B0, %ebx
    movl $0, (%rbx)
    iretq
count: .long 0
"""


def _with_tsc_deadline_cpuid(g: TinyGuest) -> None:
    # KVM emulates the TSC-deadline timer but leaves CPUID.1:ECX[24] out of the supported
    # CPUID; without the bit the LVT mode is dropped (KVM-BEHAVIOURS.md section 1).
    entries = [
        e.with_regs(ecx=e.ecx | (1 << 24)) if e.function == 1 else e
        for e in g.kvm.supported_cpuid()
    ]
    g.vcpu.set_cpuid2(entries)


@pytest.mark.parametrize("armed", [True, False])
def test_tsc_deadline_timer_across_restore(tmp_path: Path, armed: bool) -> None:
    with Kvm() as kvm, TinyGuest("long64", irqchip=True, kvm=kvm) as g:
        _with_tsc_deadline_cpuid(g)
        khz = g.vcpu.get_tsc_khz()
        symbols = g.load_asm(tsc_deadline_guest(khz * 600 if armed else 0))  # 600 ms
        g.set_idt_entry(VECTOR, symbols["isr"])
        host = Ticks()
        runner = VcpuRunner(g.vcpu, host.on_exit)
        runner.start()
        try:
            assert host.armed.wait(30)
            armed_at = time.monotonic()
            time.sleep(0.2)
            runner.pause()
            snap = core.capture(
                kvm, g.vm, g.vcpus, g.mem, tmp_path / "mem", core.VmSetup(irqchip=True)
            )
            core.save(tmp_path / "state", snap)
        finally:
            runner.stop()
        assert host.ticks == []
        deadline = dict(snap.vcpus[0].msrs).get(msr.IA32_TSC_DEADLINE)
        order = [i for i, _ in snap.vcpus[0].msrs]
        assert order[0] == msr.IA32_TSC and order[-1] == msr.IA32_TSC_DEADLINE
        assert (deadline != 0) == armed
        paused_for = time.monotonic() - armed_at
        delays, counts = restore_and_time(tmp_path, kvm, 1.0)
    print(f"TSC deadline armed={armed}: ticks after restore at {[round(d, 3) for d in delays]} "
          f"(paused {paused_for:.3f} s after arming)")  # fmt: skip
    if armed:
        assert counts == [1], "an armed deadline fires once after restore"
        # ~0.4 s left: TSC continues across restore here, same as the saved remaining time
        assert 0.2 < delays[0] < 0.6
    else:
        assert delays == [], "a deadline of 0 must never fire"
