"""The serial port's THR writes go through KVM's coalesced PIO ring and still reach the
console complete and in order with every other access (real /dev/kvm, a tiny PVH kernel)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from kvmkit.vmm.config import MachineConfig
from kvmkit.vmm.machine import EndReason, Machine

PVH_NOTE = """
	.section .note.Xen, "", @note
	.balign 4
	.long 4, 4, 18
	.asciz "Xen"
	.long _start
	.text
	.code32
	.globl _start
"""

# 300 bytes 0..255,0..43 to THR, then halt with interrupts off: no exit follows the writes,
# so only the VMM's periodic drain can deliver them.
WRITE_THEN_HALT = PVH_NOTE + """
_start:
	mov $0x3f8, %dx
	xor %ecx, %ecx
1:	mov %cl, %al
	out %al, %dx
	inc %ecx
	cmp $300, %ecx
	jne 1b
	cli
2:	hlt
	jmp 2b
"""

# "AB", then with DLAB set a write to offset 0 (the divisor latch, not output), then "CD",
# a read of the divisor back, "E" plus the value read, then ACPI poweroff (S5 | SLP_EN).
ORDERED = PVH_NOTE + """
_start:
	mov $0x3f8, %dx
	mov $'A', %al
	out %al, %dx
	mov $'B', %al
	out %al, %dx
	mov $0x3fb, %dx
	mov $0x83, %al
	out %al, %dx
	mov $0x3f8, %dx
	mov $0x05, %al
	out %al, %dx
	mov $0x3fb, %dx
	mov $0x03, %al
	out %al, %dx
	mov $0x3f8, %dx
	mov $'C', %al
	out %al, %dx
	mov $'D', %al
	out %al, %dx
	mov $0x3fb, %dx
	mov $0x83, %al
	out %al, %dx
	mov $0x3f8, %dx
	in %dx, %al
	mov %al, %bl
	mov $0x3fb, %dx
	mov $0x03, %al
	out %al, %dx
	mov $0x3f8, %dx
	mov $'E', %al
	out %al, %dx
	mov %bl, %al
	add $'0', %al
	out %al, %dx
	mov $0x604, %dx
	mov $0x3400, %ax
	out %ax, %dx
1:	hlt
	jmp 1b
"""


def build(tmp_path: Path, name: str, source: str) -> Path:
    src, obj, elf = tmp_path / f"{name}.S", tmp_path / f"{name}.o", tmp_path / f"{name}.elf"
    src.write_text(source)
    subprocess.run(["as", "--32", "-o", str(obj), str(src)], check=True)
    subprocess.run(
        ["ld", "-m", "elf_i386", "-N", "-Ttext=0x100000", "-e", "_start", "-o", str(elf),
         str(obj)],
        check=True, capture_output=True,
    )  # fmt: skip
    return elf


def machine(kernel: Path, **kw: bool) -> Machine:
    return Machine(MachineConfig(kernel=kernel, cmdline="", mem_mib=64, **kw))


def wait_for_console(m: Machine, n: int, timeout: float) -> bytes:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        m.console.flush()
        data = m.console.tail(64 * 1024)
        if len(data) >= n:
            return data
        time.sleep(0.05)
    return m.console.tail(64 * 1024)


def test_writes_followed_by_no_exit_still_reach_the_console(tmp_path: Path) -> None:
    expected = bytes(range(256)) + bytes(range(44))
    with machine(build(tmp_path, "halt", WRITE_THEN_HALT)) as m:
        m.start()
        if m.ring is None:
            pytest.fail("this KVM has no KVM_CAP_COALESCED_PIO")
        assert wait_for_console(m, len(expected), 60) == expected
        # The bytes came through the ring, not one exit each.
        assert m.ring.ring.drained >= 250
        assert m.exits < 50


def test_coalesced_writes_keep_their_order_with_register_changes(tmp_path: Path) -> None:
    with machine(build(tmp_path, "ordered", ORDERED)) as m:
        m.start()
        assert m.ring is not None
        result = m.wait(60)
        assert result is not None and result.reason == EndReason.POWEROFF
        # The divisor write under DLAB is not output, and the divisor read back is 5.
        assert m.console.tail() == b"ABCDE5"


def test_without_the_fast_paths_every_byte_is_an_exit(tmp_path: Path) -> None:
    expected = bytes(range(256)) + bytes(range(44))
    kernel = build(tmp_path, "halt", WRITE_THEN_HALT)
    with machine(kernel, coalesce_serial=False, serial_fifo64=False) as m:
        m.start()
        assert m.ring is None
        assert wait_for_console(m, len(expected), 60) == expected
        assert m.exits >= 300
