"""The tiny-guest harness: modes, toolchains, the ucall channel, failures made visible."""

from __future__ import annotations

import pytest

from kvmkit.testing import GuestAssertionError, GuestError, GuestTimeout, TinyGuest, ToolchainError


def test_cpl3_loop_of_1e8_iterations_reports_its_count() -> None:
    with TinyGuest("long64", cpl=3) as g:
        g.load_asm(
            """
            xor %ebx, %ebx
        1:  inc %rbx
            cmp $100000000, %rbx
            jne 1b
            mov %ebx, %eax
            mov $0x1002, %dx
            out %eax, %dx
            xor %eax, %eax
            mov $0x1000, %dx
            out %eax, %dx
            """
        )
        out = g.run(timeout=60)
        assert out.reports == [100_000_000]
        assert g.vcpu.get_sregs().cs.dpl == 3


C_GUEST = r"""
#include "kvmkit_guest.h"

static u64 fib(u64 n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }

int main(void)
{
	guest_print("computing");
	guest_report2(fib(20), 42);
	guest_sync(1);
	return 5;
}
"""


@pytest.mark.parametrize("cpl", [0, 3])
def test_c_guest_prints_reports_and_returns(cpl: int) -> None:
    with TinyGuest("long64", cpl=cpl) as g:
        symbols = g.load_c(C_GUEST.replace("fib(20)", "fib(20)" if cpl == 3 else "fib(8)"))
        assert symbols["main"] >= 0x100000 and symbols["_start"] == 0x100000
        out = g.run()
    assert out.prints == ["computing"]
    assert out.reports == [6765 if cpl == 3 else 21, 42]
    assert out.syncs == [1]
    assert out.status == 5


def test_guest_assertion_failure_becomes_a_test_failure_with_its_message() -> None:
    source = (
        '#include "kvmkit_guest.h"\nint main(void)\n{\n\tu64 x = 1;\n'
        "\tGUEST_ASSERT_EQ(x, 2);\n\treturn 0;\n}\n"
    )
    with TinyGuest("long64", cpl=3) as g:
        g.load_c(source)
        with pytest.raises(GuestAssertionError) as info:
            g.run()
    assert str(info.value) == "guest assertion failed at guest.c:5: x == 2 (values 0x1, 0x2)"


def test_guest_page_fault_is_reported_with_address() -> None:
    with TinyGuest("long64", cpl=3) as g:
        g.load_asm("movabs $0x200000000, %rax\nmov (%rax), %rbx")
        with pytest.raises(GuestError, match=r"#PF at rip=0x10000a cr2=0x200000000"):
            g.run()


def test_ucall_pointer_outside_guest_memory_is_an_error_not_a_crash() -> None:
    with TinyGuest("long64", cpl=3) as g:
        g.load_asm("mov $0x7ffff000, %eax\nmov $0x1000, %dx\nout %eax, %dx")
        with pytest.raises(GuestError, match="outside guest memory"):
            g.run()


def test_spinning_guest_times_out() -> None:
    with TinyGuest("long64", cpl=3) as g:
        g.load_asm("1: jmp 1b")
        with pytest.raises(GuestTimeout, match=r"did not finish within 0\.3 s"):
            g.run(timeout=0.3)
        # The vCPU is usable again afterwards.
        g.load_asm("xor %eax, %eax\nmov $0x1000, %dx\nout %eax, %dx")
        assert g.run().status == 0


def test_assembler_errors_are_reported() -> None:
    with TinyGuest("long64") as g, pytest.raises(ToolchainError, match="no such instruction"):
        g.load_asm("frobnicate %rax")
