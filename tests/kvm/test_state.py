"""vCPU and VM state round trips through the get/set ioctls."""

from __future__ import annotations

import errno
import time

import pytest

from kvmkit.abi import structs
from kvmkit.abi.constants import MpState
from kvmkit.arch.x86_64 import msr
from kvmkit.arch.x86_64 import regs as x86
from kvmkit.kvm import Kvm, KvmError
from kvmkit.probe import detect_implementation
from kvmkit.testing import TinyGuest

REG_NAMES = [name for name, _ in structs.kvm_regs._fields_]


def test_regs_round_trip() -> None:
    with TinyGuest("long64") as g:
        regs = structs.kvm_regs()
        for i, name in enumerate(REG_NAMES):
            setattr(regs, name, 0x1111_0000_0000_0000 + i * 0x1000 + i)
        regs.rflags = 0x202 | x86.RFLAGS_CF
        g.vcpu.set_regs(regs)
        got = g.vcpu.get_regs()
        assert bytes(got) == bytes(regs)


def test_sregs_round_trip() -> None:
    with TinyGuest("long64") as g:
        sregs = g.vcpu.get_sregs()
        sregs.cr3 = 0x0012_3000
        sregs.cr8 = 5
        sregs.gdt.base, sregs.gdt.limit = 0x5000, 0x7F
        g.vcpu.set_sregs(sregs)
        got = g.vcpu.get_sregs()
        assert (got.cr3, got.cr8, got.gdt.base, got.gdt.limit) == (0x123000, 5, 0x5000, 0x7F)
        assert got.efer & x86.EFER_LMA and got.cs.l == 1
        assert got.cr0 & x86.CR0_PG


def test_lapic_round_trip_and_live_timer_count() -> None:
    with TinyGuest("long64", irqchip=True) as g:
        lapic = g.vcpu.get_lapic()
        lapic.set_reg(x86.APIC_SPIV, x86.APIC_SPIV_ENABLE | 0xFF)
        lapic.set_reg(x86.APIC_TPR, 0x20)
        lapic.set_reg(x86.APIC_LVTT, x86.APIC_LVT_MASKED | 0x40)
        lapic.set_reg(x86.APIC_TDCR, x86.APIC_TDCR_DIV_1)
        lapic.set_reg(x86.APIC_TMICT, 1_000_000_000)
        lapic.set_reg(x86.APIC_TMCCT, 1_000_000_000)
        g.vcpu.set_lapic(lapic)
        time.sleep(0.1)
        got = g.vcpu.get_lapic()
        assert got.get_reg(x86.APIC_SPIV) == x86.APIC_SPIV_ENABLE | 0xFF
        assert got.get_reg(x86.APIC_TPR) == 0x20
        assert got.get_reg(x86.APIC_TMICT) == 1_000_000_000
        assert 0 < got.get_reg(x86.APIC_TMCCT) < 1_000_000_000  # live since Linux 5.8
        with pytest.raises(ValueError):
            got.get_reg(0x391)


def test_msrs_round_trip() -> None:
    values = {
        msr.IA32_SYSENTER_CS: 0x10,
        msr.IA32_SYSENTER_ESP: 0xFFFF_8000_0000_1000,
        msr.IA32_SYSENTER_EIP: 0xFFFF_8000_0000_2000,
        msr.IA32_STAR: 0x0023_0010_0000_0000,
        msr.IA32_LSTAR: 0xFFFF_FFFF_8100_0000,
        msr.IA32_KERNEL_GS_BASE: 0x1234_5000,
    }
    with TinyGuest("long64") as g:
        g.vcpu.set_msrs(values)
        assert g.vcpu.get_msrs(values) == values


def test_tsc_write() -> None:
    with TinyGuest("long64") as g:
        before = g.vcpu.get_msrs([msr.IA32_TSC])[msr.IA32_TSC]
        g.vcpu.set_msrs([(msr.IA32_TSC, before + (1 << 40))])
        after = g.vcpu.get_msrs([msr.IA32_TSC])[msr.IA32_TSC]
    if detect_implementation()[0] == "pvm":
        # PVM runs guest code natively without a TSC offset: a host write is accepted and
        # has no effect (measured on the build machines). Snapshot restore must not rely on it.
        assert before <= after < before + (1 << 40)
    else:
        assert after >= before + (1 << 40)


def test_every_saveable_msr_can_be_read() -> None:
    with Kvm() as kvm, TinyGuest("long64", kvm=kvm) as g:
        indices = kvm.msr_index_list()
        assert (msr.IA32_TSC in indices and msr.IA32_EFER in indices) or len(indices) > 10
        readable = {}
        for index in indices:
            try:
                readable.update(g.vcpu.get_msrs([index]))
            except KvmError:
                pass
        assert msr.IA32_TSC in readable
        assert len(readable) >= len(indices) // 2


def test_refused_msr_names_itself() -> None:
    with TinyGuest("long64") as g, pytest.raises(KvmError, match="MSR 0xdead0000 not readable"):
        g.vcpu.get_msrs([msr.IA32_TSC, 0xDEAD0000])


def test_fpu_xsave_xcrs_debugregs_events_mp_state_round_trip() -> None:
    with TinyGuest("long64", irqchip=True) as g:
        cpu = g.vcpu
        fpu = cpu.get_fpu()
        fpu.fcw = 0x37F
        fpu.xmm[3][0] = 0xAB
        cpu.set_fpu(fpu)
        got = cpu.get_fpu()
        assert (got.fcw, got.xmm[3][0]) == (0x37F, 0xAB)

        # MXCSR travels in the XSAVE area (legacy region offset 24, SDM vol. 1 13.4.1); it
        # is loaded only when XSTATE_BV (header offset 512) marks the SSE component present.
        area = bytearray(cpu.get_xsave())
        assert len(area) >= 4096
        area[24:28] = (0x1FA0).to_bytes(4, "little")
        xstate_bv = int.from_bytes(area[512:520], "little") | 0b10
        area[512:520] = xstate_bv.to_bytes(8, "little")
        cpu.set_xsave(bytes(area))
        got_area = cpu.get_xsave()
        assert got_area[24:28] == (0x1FA0).to_bytes(4, "little")

        xcrs = cpu.get_xcrs()
        assert xcrs.nr_xcrs >= 1 and xcrs.xcrs[0].value & 1  # XCR0.x87 is always set
        cpu.set_xcrs(xcrs)

        dregs = cpu.get_debugregs()
        for i in range(4):
            dregs.db[i] = 0x1000 * (i + 1)
        cpu.set_debugregs(dregs)
        assert list(cpu.get_debugregs().db) == [0x1000, 0x2000, 0x3000, 0x4000]

        events = cpu.get_vcpu_events()
        events.flags = 0
        cpu.set_vcpu_events(events)

        cpu.set_mp_state(MpState.HALTED)
        assert cpu.get_mp_state() == MpState.HALTED
        cpu.set_mp_state(MpState.RUNNABLE)
        assert cpu.get_mp_state() == MpState.RUNNABLE


def test_vm_state_round_trip_pit_clock_irqchip() -> None:
    with TinyGuest("long64", irqchip=True) as g:
        g.vm.create_pit2()
        pit = g.vm.get_pit2()
        g.vm.set_pit2(pit)
        clock = g.vm.get_clock()
        clock.clock += 5_000_000_000
        clock.flags = 0
        g.vm.set_clock(clock)
        assert g.vm.get_clock().clock >= clock.clock
        ioapic = g.vm.get_irqchip(2)
        ioapic.chip.ioapic.redirtbl[3].bits = 0x10033
        g.vm.set_irqchip(ioapic)
        assert g.vm.get_irqchip(2).chip.ioapic.redirtbl[3].fields.vector == 0x33


def test_errors_carry_operation_and_errno() -> None:
    with TinyGuest("long64") as g:
        with pytest.raises(KvmError) as info:
            g.vm.create_vcpu(0)
        assert info.value.op == "KVM_CREATE_VCPU"
        assert info.value.errno == errno.EEXIST
        assert "KVM_CREATE_VCPU failed" in str(info.value)


def test_translate_walks_guest_page_tables() -> None:
    with TinyGuest("long64") as g:
        tr = g.vcpu.translate(0x123456)
        assert tr.valid and tr.physical_address == 0x123456


def test_sync_regs_expose_cr3_after_exit() -> None:
    from kvmkit.abi.constants import SyncRegs

    with TinyGuest("long64", cpl=3) as g:
        g.load_asm("mov $0x1002, %dx\nout %eax, %dx")
        g.vcpu.set_sync_valid(SyncRegs.REGS | SyncRegs.SREGS)
        g.vcpu.run()
        assert g.vcpu.sync_regs.sregs.cr3 == g.vcpu.get_sregs().cr3 == 0x10000
        assert g.vcpu.sync_regs.regs.rdx == 0x1002
