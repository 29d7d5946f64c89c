"""Interrupts through the in-kernel irqchip (irqfd, GSI routing) and ioeventfd."""

from __future__ import annotations

import os

import pytest

from kvmkit.kvm import IoExit, VmExit
from kvmkit.kvm.vm import default_x86_routes, route_msi
from kvmkit.testing import TinyGuest

READY_PORT = 0x2000
VECTOR = 0x35

# CPL0 long mode: enable the LAPIC, mask the PICs, route IOAPIC pin 5 to VECTOR, tell the host
# it is ready, then halt until the handler has run twice; report the count.
GUEST = f"""
    mov $0xff, %al
    out %al, $0x21
    out %al, $0xa1
    mov $0xFEE000F0, %ebx
    movl $0x1FF, (%rbx)
    mov $0xFEC00000, %ebx
    movl $0x1A, (%rbx)
    movl ${VECTOR}, 0x10(%rbx)
    movl $0x1B, (%rbx)
    movl $0, 0x10(%rbx)
    sti
    mov ${READY_PORT}, %dx
    out %eax, %dx
1:  hlt
    cmpl $2, count
    jb 1b
    mov count, %eax
    mov $0x1002, %dx
    out %eax, %dx
    xor %eax, %eax
    mov $0x1000, %dx
    out %eax, %dx
isr:
    incl count
    mov $0xFEE000B0, %ebx
    movl $0, (%rbx)
    mov ${READY_PORT}, %dx
    out %eax, %dx
    iretq
count: .long 0
"""


@pytest.mark.parametrize("route", ["ioapic", "msi"])
def test_irqfd_interrupt_reaches_guest_idt_handler(route: str) -> None:
    with TinyGuest("long64", irqchip=True) as g:
        symbols = g.load_asm(GUEST)
        g.set_idt_entry(VECTOR, symbols["isr"])
        efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            gsi = 5
            if route == "msi":
                # A GSI of its own routed as an MSI straight to APIC 0 with VECTOR.
                gsi = 40
                g.vm.set_gsi_routing([*default_x86_routes(), route_msi(gsi, 0xFEE00000, VECTOR)])
            g.vm.irqfd(efd, gsi)
            fired = 0

            def on_exit(exit_: VmExit) -> bool:
                nonlocal fired
                if isinstance(exit_, IoExit) and exit_.port == READY_PORT:
                    if fired < 2:  # before the loop and after the first interrupt
                        fired += 1
                        os.eventfd_write(efd, 1)
                    return True
                return False

            out = g.run(on_exit=on_exit, timeout=60)
        finally:
            os.close(efd)
    assert out.reports == [2]


def test_ioeventfd_signals_without_an_exit() -> None:
    with TinyGuest("long64", cpl=3) as g:
        g.load_asm(
            """
            mov $0x3000, %dx
            mov $7, %eax
            out %eax, %dx
            mov $8, %eax
            out %eax, %dx
            out %eax, %dx
            xor %eax, %eax
            mov $0x1000, %dx
            out %eax, %dx
            """
        )
        any_write = os.eventfd(0, os.EFD_NONBLOCK)
        only_eight = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            g.vm.ioeventfd(only_eight, 0x3000, 4, pio=True, datamatch=8)
            exits: list[str] = []

            def on_exit(exit_: VmExit) -> bool:
                exits.append(exit_.describe())
                return isinstance(exit_, IoExit) and exit_.port == 0x3000 and exit_.value == 7

            g.run(on_exit=on_exit)
            # value 7 does not match: it exits to userspace; both 8s are absorbed by KVM
            assert exits == ["IO out port=0x3000 size=4 count=1"]
            assert os.eventfd_read(only_eight) == 2
            g.vm.ioeventfd(only_eight, 0x3000, 4, pio=True, datamatch=8, deassign=True)
            g.vm.ioeventfd(any_write, 0x3000, 4, pio=True)
            g.set_entry(0x100000)
            g.run()
            assert os.eventfd_read(any_write) == 3
        finally:
            os.close(any_write)
            os.close(only_eight)
