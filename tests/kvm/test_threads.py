"""KVM_RUN releases the GIL: vCPU threads and Python threads run at the same time."""

from __future__ import annotations

import threading

from kvmkit.testing import TinyGuest

SPIN = """
    movabs $4000000000, %rcx
1:  dec %rcx
    jnz 1b
    xor %eax, %eax
    mov $0x1000, %dx
    out %eax, %dx
"""


def test_two_vcpus_and_python_run_in_parallel() -> None:
    with TinyGuest("long64", cpl=3, vcpus=2) as g:
        g.load_asm(SPIN)
        errors: list[BaseException] = []

        def run(index: int) -> None:
            try:
                g.run(vcpu=g.vcpus[index], timeout=120)
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        both_inside = 0
        python_steps = 0
        while any(t.is_alive() for t in threads):
            python_steps += 1
            if all(v._thread is not None for v in g.vcpus):
                both_inside += 1
        for t in threads:
            t.join()
        assert not errors
        # This loop kept running while both vCPU threads were inside KVM_RUN: the GIL was free.
        assert both_inside > 1000
        assert python_steps > both_inside
