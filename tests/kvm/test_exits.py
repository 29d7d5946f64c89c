"""VM exits seen by the host: port I/O, MMIO, HLT, on real /dev/kvm with tiny guests."""

from __future__ import annotations

import pytest

from kvmkit.kvm import HltExit, IoExit, MmioExit
from kvmkit.testing import TinyGuest


def test_real_mode_port_output_reaches_host() -> None:
    with TinyGuest("real") as g:
        g.load_asm(
            """
            mov $0x3f8, %dx
            mov $0x41, %al
            outb %al, %dx
            mov $0x1234, %ax
            mov $0x80, %dx
            outw %ax, %dx
            mov $0xdeadbeef, %eax
            mov $0x510, %dx
            outl %eax, %dx
            hlt
            """
        )
        seen = []
        for _ in range(3):
            e = g.vcpu.run()
            assert isinstance(e, IoExit), e
            assert e.is_out and not e.is_in
            seen.append((e.port, e.size, e.count, bytes(e.data)))
        assert seen == [
            (0x3F8, 1, 1, b"A"),
            (0x80, 2, 1, (0x1234).to_bytes(2, "little")),
            (0x510, 4, 1, (0xDEADBEEF).to_bytes(4, "little")),
        ]
        assert isinstance(g.vcpu.run(), HltExit)


def test_port_input_is_answered_by_the_host() -> None:
    with TinyGuest("real") as g:
        g.load_asm(
            """
            mov $0x60, %dx
            inb %dx, %al
            mov %al, %bl
            mov $0x61, %dx
            inw %dx, %ax
            mov %ax, %cx
            mov $0x62, %dx
            inl %dx, %eax
            hlt
            """
        )
        answers = {0x60: 0x5A, 0x61: 0xBEEF, 0x62: 0x12345678}
        for _ in range(3):
            e = g.vcpu.run()
            assert isinstance(e, IoExit) and e.is_in
            e.set_value(answers[e.port])
        assert isinstance(g.vcpu.run(), HltExit)
        regs = g.vcpu.get_regs()
        assert regs.rbx & 0xFF == 0x5A
        assert regs.rcx & 0xFFFF == 0xBEEF
        assert regs.rax & 0xFFFFFFFF == 0x12345678


MMIO_ADDR = 0xD000_0000  # identity-mapped, not backed by RAM: every access exits


@pytest.mark.parametrize(
    ("size", "suffix", "reg", "value"),
    [(1, "b", "%al", 0xA5), (2, "w", "%ax", 0xBEEF), (4, "l", "%eax", 0xCAFEF00D),
     (8, "q", "%rax", 0x0123456789ABCDEF)],
)  # fmt: skip
def test_mmio_reads_and_writes(size: int, suffix: str, reg: str, value: int) -> None:
    with TinyGuest("long64") as g:
        g.load_asm(
            f"""
            mov ${MMIO_ADDR:#x}, %rbx
            movabs ${value:#x}, %rax
            mov{suffix} {reg}, (%rbx)
            xor %eax, %eax
            mov{suffix} 8(%rbx), {reg}
            mov %rax, %r12
            hlt
            """
        )
        e = g.vcpu.run()
        assert isinstance(e, MmioExit), e
        assert (e.phys_addr, e.len, e.is_write, e.value) == (MMIO_ADDR, size, True, value)
        e = g.vcpu.run()
        assert isinstance(e, MmioExit), e
        assert (e.phys_addr, e.len, e.is_write) == (MMIO_ADDR + 8, size, False)
        answer = 0xF0E1D2C3B4A59687 & ((1 << (8 * size)) - 1)
        e.set_value(answer)
        assert isinstance(g.vcpu.run(), HltExit)
        assert g.vcpu.get_regs().r12 == answer


def test_hlt_exit_at_cpl0() -> None:
    with TinyGuest("long64") as g:
        g.load_asm("mov $7, %ebx\nhlt")
        e = g.vcpu.run()
        assert isinstance(e, HltExit)
        assert g.vcpu.get_regs().rbx == 7


def test_protected_mode_guest_runs() -> None:
    with TinyGuest("prot32") as g:
        g.load_asm(
            """
            mov $0x1002, %dx
            mov %cr0, %eax
            out %eax, %dx
            xor %eax, %eax
            mov $0x1000, %dx
            out %eax, %dx
            """
        )
        out = g.run()
        assert out.reports and out.reports[0] & 1  # CR0.PE set: we really are in protected mode
