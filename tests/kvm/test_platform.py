"""Platform pieces on real /dev/kvm: the guest CPUID seen by a vCPU, the boot MSRs, and the
16550A UART driven by a tiny guest through a port-I/O Bus."""

from __future__ import annotations

from kvmkit.arch.x86_64 import msr
from kvmkit.arch.x86_64.cpuid import KVM_SIGNATURE, guest_cpuid
from kvmkit.arch.x86_64.msrs import boot_msrs
from kvmkit.arch.x86_64.topology import Topology
from kvmkit.devices.bus import Bus
from kvmkit.devices.irq import NoIrq
from kvmkit.devices.legacy.serial import COM1_PORT, PORT_COUNT, Serial8250
from kvmkit.kvm import IoExit, VmExit
from kvmkit.testing import TinyGuest

REPORT = "mov $0x1002, %dx\nout %eax, %dx\n"
DONE = "xor %eax, %eax\nmov $0x1000, %dx\nout %eax, %dx\n"


def _cpuid(leaf: int, subleaf: int) -> str:
    """CPUID, then report EAX, EBX, ECX, EDX (saved first: the report clobbers EDX)."""
    return (
        f"mov ${leaf:#x}, %eax\nmov ${subleaf}, %ecx\ncpuid\n"
        "mov %eax, %r8d\nmov %ebx, %r9d\nmov %ecx, %r10d\nmov %edx, %r11d\n"
        + "".join(f"mov %{r}, %eax\n{REPORT}" for r in ("r8d", "r9d", "r10d", "r11d"))
    )


def test_vcpu1_of_2_sees_its_apic_id_and_topology() -> None:
    # CPL0 on purpose: on a PVM host, CPUID at CPL3 runs natively and returns the *host*
    # CPU's values (e.g. the APIC ID of whichever host CPU the thread ran on); only CPL0 code
    # goes through KVM's emulator, which answers from the table set with KVM_SET_CPUID2.
    with TinyGuest("long64", cpl=0, vcpus=2) as g:
        supported = g.kvm.supported_cpuid()
        entries = guest_cpuid(supported, Topology.flat(2), 1)
        g.vcpus[1].set_cpuid2(entries)
        g.load_asm(_cpuid(1, 0) + _cpuid(0xB, 0) + _cpuid(0xB, 1) + _cpuid(0x40000000, 0) + DONE)
        out = g.run(vcpu=g.vcpus[1])
    r = out.reports
    leaf1, smt, core, sig = r[0:4], r[4:8], r[8:12], r[12:16]
    assert leaf1[1] >> 24 == 1  # initial APIC ID
    assert (leaf1[1] >> 16) & 0xFF == 2  # logical processor IDs in the package
    assert leaf1[2] & (1 << 31)  # hypervisor
    assert not leaf1[2] & (1 << 3)  # no MONITOR/MWAIT
    assert leaf1[3] & (1 << 28)  # HTT
    assert smt[3] == 1 and core[3] == 1  # x2APIC ID in EDX
    assert (smt[1] & 0xFFFF, (smt[2] >> 8) & 0xFF) == (1, 1)
    assert (core[0] & 0x1F, core[1] & 0xFFFF, (core[2] >> 8) & 0xFF) == (1, 2, 2)
    raw = b"".join(v.to_bytes(4, "little") for v in sig[1:4])
    assert raw == KVM_SIGNATURE and sig[0] >= 0x40000001


def test_boot_msrs_are_accepted() -> None:
    with TinyGuest("long64") as g:
        g.vcpu.set_cpuid2(guest_cpuid(g.kvm.supported_cpuid(), Topology.flat(1), 0))
        entries = boot_msrs()
        g.vcpu.set_msrs(entries)
        values = g.vcpu.get_msrs([i for i, _ in entries if i != msr.IA32_TSC])
    assert values[msr.IA32_MISC_ENABLE] & msr.MISC_ENABLE_FAST_STRING
    assert values[msr.IA32_MTRR_DEF_TYPE] == 0x806
    assert values[msr.IA32_LSTAR] == 0 and values[msr.IA32_SYSENTER_CS] == 0


# CPL3 guest: for each byte, poll LSR (0x3FD) until THRE, then write THR (0x3F8).
SERIAL_GUEST = (
    """
    lea msg(%rip), %rsi
1:  movzbl (%rsi), %ebx
    test %ebx, %ebx
    jz 3f
    mov $0x3fd, %dx
2:  inb %dx, %al
    test $0x20, %al
    jz 2b
    mov $0x3f8, %dx
    mov %bl, %al
    outb %al, %dx
    inc %rsi
    jmp 1b
3:  mov $0x3fd, %dx
    inb %dx, %al
    movzbl %al, %eax
"""
    + REPORT
    + DONE
    + 'msg: .asciz "hello\\n"\n'
)


def test_tiny_guest_writes_hello_through_the_uart() -> None:
    out: list[bytes] = []
    irq = NoIrq()
    serial = Serial8250(irq, out.append)
    pio = Bus("pio")
    pio.insert(serial, COM1_PORT, PORT_COUNT, "serial0")

    def on_exit(exit_: VmExit) -> bool:
        if not isinstance(exit_, IoExit) or exit_.count != 1:
            return False
        if exit_.is_out:
            return pio.write(exit_.port, exit_.data)
        return pio.read(exit_.port, exit_.data)

    with TinyGuest("long64", cpl=3) as g:
        g.load_asm(SERIAL_GUEST)
        result = g.run(on_exit=on_exit)
    assert b"".join(out) == b"hello\n"
    assert result.reports == [0x60]  # LSR idle after the last byte
    assert irq.count == 0  # IER never enabled
