"""Live migration of tiny guests between two processes over a Unix socket (real /dev/kvm).

The source is this test process; the destination is tests/kvm/migration_peer.py, a separate
process that receives the VM (kvmkit.migration.bare), reports its memory hash and registers
before running anything, then runs it and reports what the guest did.

- a CPL3 guest rewriting a counter into 4096 pages without pause (it dirties pages far
  faster than they can be sent): memory and registers are identical at the destination,
  and the counter goes on there;
- the periodic LAPIC timer recipe of the snapshot tests (tests/kvm/test_snapshot_timers.py)
  through a migration: the first tick after the remaining time, then every period, the
  guest's count continuing;
- failures: a destination that dies mid-stream, and one that refuses the final state after
  the source paused: the source's guest runs on, dirty logging is off again.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from test_snapshot_timers import MS, VECTOR, Ticks, timer_guest

from kvmkit.arch.x86_64 import regs as x86
from kvmkit.kvm import Kvm, VmExit
from kvmkit.migration.bare import BareVm, send_bare
from kvmkit.migration.send import MigrationProgress
from kvmkit.migration.stream import MigrationError
from kvmkit.snapshot.core import VmSetup
from kvmkit.snapshot.vcpu_state import lapic_reg
from kvmkit.testing import TinyGuest
from kvmkit.vmm.runstate import RunState
from kvmkit.vmm.vcpu import VcpuRunner

PEER = Path(__file__).with_name("migration_peer.py")
SRC = Path(__file__).resolve().parents[2] / "src"
PAGES = 4096
DIRTY_BASE = 0x1000000  # 16 MiB: the counter pages, above the code
# CPL3, natively fast on PVM: write the counter into PAGES pages (one store per page),
# then count the pass in `counter`; forever.
DIRTY_GUEST = f"""
    xor %rax, %rax
1:  mov ${DIRTY_BASE}, %rsi
    mov ${PAGES}, %rcx
2:  mov %rax, (%rsi)
    add $4096, %rsi
    dec %rcx
    jnz 2b
    inc %rax
    mov %rax, counter
    jmp 1b
    .balign 8
counter: .quad 0
"""


class Peer:
    """The destination process and its JSON lines."""

    def __init__(self, address: str, *extra: str) -> None:
        env = {**os.environ, "PYTHONPATH": f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        self.proc = subprocess.Popen(
            [sys.executable, str(PEER), address, *extra], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip
        first = self.next()
        assert first["event"] == "listening", first

    def next(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"peer ended: {self.proc.wait(10)} {self.proc.stderr.read()}")  # type: ignore[union-attr]
        value: dict[str, Any] = json.loads(line)
        return value

    def finish(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def sha256(mem: Any) -> str:
    digest = hashlib.sha256()
    for region in mem.regions:
        digest.update(region.mapping[:])
    return digest.hexdigest()


@contextmanager
def dirty_guest(kvm: Kvm) -> Iterator[tuple[TinyGuest, VcpuRunner, int]]:
    with TinyGuest("long64", cpl=3, mem_size=64 << 20, irqchip=True, kvm=kvm) as g:
        counter = g.load_asm(DIRTY_GUEST)["counter"]
        exits: list[str] = []

        def on_exit(exit_: VmExit) -> bool:
            exits.append(exit_.describe())
            return False

        runner = VcpuRunner(g.vcpu, on_exit)
        runner.start()
        deadline = time.monotonic() + 30
        while g.mem.read_u64(counter) < 3:  # every page touched, and then some
            assert time.monotonic() < deadline and not exits, exits
            time.sleep(0.01)
        try:
            yield g, runner, counter
        finally:
            runner.stop()
        assert not exits, exits


def counts_on(g: TinyGuest, counter: int, within: float = 5.0) -> bool:
    """The guest's counter moves (a pass over its pages can take a while right after the
    slots changed: PVM faults every page in again)."""
    before = g.mem.read_u64(counter)
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        time.sleep(0.05)
        if g.mem.read_u64(counter) > before + 1:
            return True
    return False


@pytest.mark.parametrize("manual", [True, False], ids=["manual-protect", "get-dirty-log"])
def test_dirtying_cpl3_guest_migrates_identical_and_continues(
    tmp_path: Path, manual: bool
) -> None:
    # Both ways of re-protecting: KVM_CLEAR_DIRTY_LOG per chunk, and KVM_GET_DIRTY_LOG's
    # own (which clears the bits as it reads them: the pages dirty when pre-copy stops must
    # still go out in the stop-and-copy).
    address = f"unix:{tmp_path}/mig.sock"
    with Kvm() as kvm, dirty_guest(kvm) as (g, runner, counter):
        peer = Peer(address, "--run", "0.5", "--counter", hex(counter))
        seen: list[MigrationProgress] = []
        result = send_bare(BareVm(kvm, g.vm, g.mem, [runner], VmSetup(irqchip=True)), address,
                           max_downtime_ms=30, progress=seen.append,
                           manual_dirty_log=manual)  # fmt: skip
        # The source guest ended with the ACK; its memory and registers are final.
        assert runner.control.state is RunState.FINISHED
        source_sha, source_regs = sha256(g.mem), bytes(g.vcpu.get_regs()).hex()
        source_counter = g.mem.read_u64(counter)
        received = peer.next()
        ran = peer.next()
        assert peer.finish() == 0
    print(f"{result.summary()}; counter {source_counter} at the pause, {ran['counter']} "
          f"after 0.5 s at the destination")  # fmt: skip
    assert received["event"] == "received"
    assert received["mem_sha256"] == source_sha, "guest memory differs at the destination"
    assert received["regs"] == source_regs
    assert ran["counter"] > source_counter, "the guest did not go on counting"
    # Dirty rounds followed the full one (the guest kept writing its pages meanwhile); the
    # pages that are zero at the source were not sent at all in round 0.
    assert result.rounds >= 2
    assert PAGES < result.pages_sent < (64 << 20) // 4096
    assert {p.state for p in seen} >= {"precopy", "stop-and-copy", "completed"}


def test_periodic_lapic_timer_through_a_migration(tmp_path: Path) -> None:
    address = f"unix:{tmp_path}/mig.sock"
    period = 400 * MS
    with Kvm() as kvm, TinyGuest("long64", irqchip=True, kvm=kvm) as g:
        symbols = g.load_asm(timer_guest(VECTOR | x86.APIC_LVT_TIMER_PERIODIC, period))
        g.set_idt_entry(VECTOR, symbols["isr"])
        host = Ticks()
        runner = VcpuRunner(g.vcpu, host.on_exit)
        runner.start()
        try:
            assert host.armed.wait(30)
            host.wait_ticks(1, 10)
            time.sleep(0.25)
            peer = Peer(address, "--run", "1.2")
            result = send_bare(BareVm(kvm, g.vm, g.mem, [runner], VmSetup(irqchip=True)),
                               address)  # fmt: skip
        finally:
            runner.stop()
        count = len(host.ticks)
        received, ran = peer.next(), peer.next()
        assert peer.finish() == 0
    remaining = lapic_reg(bytes.fromhex(received["lapic"]), x86.APIC_TMCCT) / 1e9
    delays = [t for t, _ in ran["ticks"]]
    print(f"{result.summary()}; saved remaining {remaining:.3f} s, ticks at the destination "
          f"{[round(d, 3) for d in delays]}")  # fmt: skip
    assert 0.02 < remaining < 0.4
    assert len(delays) >= 2
    assert abs(delays[0] - remaining) < 0.1, "first tick must come after the remaining time"
    assert 0.3 < delays[1] - delays[0] < 0.5  # then the full period
    assert [c for _, c in ran["ticks"][:2]] == [count + 1, count + 2]  # the count goes on


@pytest.mark.parametrize("how", ["dies-mid-stream", "refuses-the-state"])
def test_source_runs_on_when_the_destination_fails(tmp_path: Path, how: str) -> None:
    address = f"unix:{tmp_path}/mig.sock"
    extra = ["--die-after-pages", "3000"] if how == "dies-mid-stream" else ["--refuse-state"]
    with Kvm() as kvm, dirty_guest(kvm) as (g, runner, counter):
        peer = Peer(address, *extra)
        with pytest.raises(MigrationError) as info:
            send_bare(BareVm(kvm, g.vm, g.mem, [runner], VmSetup(irqchip=True)), address,
                      max_downtime_ms=30 if how == "refuses-the-state" else 300,
                      bandwidth_mib_s=None if how == "refuses-the-state" else 8)  # fmt: skip
        status = peer.finish()
        message = str(info.value)
        print(f"{how}: {message} (destination exit status {status})")
        assert "the guest runs on here" in message
        if how == "dies-mid-stream":
            assert status == 9
        else:
            assert "refuses this state" in message and status == 2
        # The source guest is running again and keeps counting; logging is off again.
        assert runner.control.state is RunState.RUNNING
        assert counts_on(g, counter)
        assert not any(r.log_dirty or r.vmm_dirty for r in g.mem.regions)
