"""The clocks across a state transfer, on real /dev/kvm (kvmkit.snapshot.core.build_vm):

- a migration (`advance_clock=True`) moves kvmclock on by the time since the state was
  taken; a snapshot restore continues from the saved value; a source whose wall clock ran
  ahead of ours never sets the clock back;
- the TSC rate goes with the state: one within KVM's 250 ppm tolerance is set, one KVM
  cannot run (below the host's rate without TSC scaling) refuses the state with both rates
  named, before anything runs.
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from kvmkit.abi.constants import Cap
from kvmkit.kvm import Kvm
from kvmkit.memory import GuestMemory
from kvmkit.snapshot.core import KvmState, VmSetup, build_vm, capture_kvm_state
from kvmkit.snapshot.format import SnapshotError
from kvmkit.testing import TinyGuest


def captured(kvm: Kvm) -> KvmState:
    with TinyGuest("long64", irqchip=True, kvm=kvm) as g:
        return capture_kvm_state(kvm, g.vm, g.vcpus, VmSetup(irqchip=True))


def rebuilt_clock(kvm: Kvm, state: KvmState, advance: bool) -> int:
    mem = GuestMemory()
    mem.add_anonymous(0, 4 << 20)
    restored = build_vm(kvm, state, mem, advance_clock=advance)
    try:
        return int(restored.vm.get_clock().clock)
    finally:
        restored.close()


def test_a_migration_advances_kvmclock_by_the_time_away_a_restore_does_not() -> None:
    with Kvm() as kvm:
        state = captured(kvm)
        assert state.vm.realtime is not None  # recorded with the clock
        time.sleep(0.4)
        moved = rebuilt_clock(kvm, state, advance=True) - state.vm.clock
        kept = rebuilt_clock(kvm, state, advance=False) - state.vm.clock
        # The source's wall clock ahead of ours: nothing is added, nothing taken away.
        ahead = dataclasses.replace(state, vm=dataclasses.replace(
            state.vm, realtime=time.time_ns() + 10**10, clock_flags=0))  # fmt: skip
        never_back = rebuilt_clock(kvm, ahead, advance=True) - state.vm.clock
    print(f"kvmclock after 0.4 s away: migration +{moved / 1e6:.1f} ms, restore "
          f"+{kept / 1e6:.1f} ms, source clock ahead +{never_back / 1e6:.1f} ms")  # fmt: skip
    assert 0.38e9 < moved < 0.6e9
    assert 0 <= kept < 0.1e9
    assert 0 <= never_back < 0.1e9


def test_the_tsc_rate_is_kept_or_the_state_refused() -> None:
    with Kvm() as kvm:
        state = captured(kvm)
        khz = state.vcpus[0].tsc_khz
        assert khz is not None and khz > 0
        # 100 kHz off a GHz-class TSC is within KVM's 250 ppm: no scaling needed, it is set.
        near = dataclasses.replace(state, vcpus=[dataclasses.replace(state.vcpus[0],
                                                                     tsc_khz=khz + 100)])
        mem = GuestMemory()
        mem.add_anonymous(0, 4 << 20)
        restored = build_vm(kvm, near, mem)
        try:
            assert restored.vcpus[0].get_tsc_khz() == khz + 100
        finally:
            restored.close()
        if kvm.check_extension(Cap.TSC_CONTROL) > 0:
            pytest.skip("this KVM scales the TSC: every rate can be set")
        slow = dataclasses.replace(state, vcpus=[dataclasses.replace(state.vcpus[0],
                                                                     tsc_khz=khz // 2)])
        mem = GuestMemory()
        mem.add_anonymous(0, 4 << 20)
        with pytest.raises(SnapshotError, match=rf"vcpu0: the guest's TSC runs at {khz // 2} "
                           rf"kHz, this host's at {khz} kHz, and KVM cannot run it"):
            build_vm(kvm, slow, mem)
        mem.close()
