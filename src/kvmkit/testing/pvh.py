"""Tiny PVH ELF "kernels" for tests of the VMM (they run on any KVM, PVM included): built
with `as` and `ld` from a few lines of 32-bit assembly entered through the PVH note."""

from __future__ import annotations

import subprocess
from pathlib import Path

_NOTE = """
	.section .note.Xen, "", @note
	.balign 4
	.long 4, 4, 18
	.asciz "Xen"
	.long _start
	.text
	.code32
	.globl _start
_start:
"""

# Writes '.' to the serial port (0x3F8) in a loop, with a busy wait between characters: the
# console output keeps growing while the VM runs and stops while it is paused.
SERIAL_LOOP = _NOTE + """
1:	movw $0x3f8, %dx
	movb $'.', %al
	outb %al, %dx
	movl $DELAY, %ecx
2:	decl %ecx
	jnz 2b
	jmp 1b
"""

# Halts for good with interrupts off: a guest that is "running" and touches nothing (a
# machine to pause, snapshot and restore around its devices).
HALT = _NOTE + """
	cli
1:	hlt
	jmp 1b
"""

# Loads an empty IDT and executes ud2: #UD -> #DF -> triple fault at once (the machine is
# built whole, then ends with KVM_EXIT_SHUTDOWN).
TRIPLE_FAULT = _NOTE + """
	lidt idtr
	ud2
idtr:	.word 0
	.long 0
"""


# Rewrites a counter into every page from 16 MiB to 16 MiB + PAGES pages, then writes '.' to
# the serial port and counts the pass: a guest that keeps dirtying memory (at CPL0 it runs
# in PVM's emulator: a pass of 2048 pages takes some milliseconds) and whose console shows
# that it runs. The pass count is kept at 0x7000.
DIRTY_LOOP = _NOTE + """
	xorl %eax, %eax
1:	movl $0x1000000, %edi
	movl $PAGES, %ecx
2:	movl %eax, (%edi)
	addl $4096, %edi
	decl %ecx
	jnz 2b
	incl %eax
	movl %eax, 0x7000
	movw $0x3f8, %dx
	movl %eax, %ebx
	movb $'.', %al
	outb %al, %dx
	movl %ebx, %eax
	jmp 1b
"""
DIRTY_COUNTER = 0x7000


def build(source: str, out: Path) -> Path:
    """Assemble and link `source` (which starts with the PVH note) into the ELF `out`."""
    src, obj = out.with_suffix(".S"), out.with_suffix(".o")
    src.write_text(source)
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True)
    subprocess.run(
        ["ld", "-m", "elf_x86_64", "-N", "-Ttext=0x100000", "-e", "_start", "-o", str(out),
         str(obj)],
        check=True, capture_output=True,
    )  # fmt: skip
    return out


def serial_loop_kernel(out: Path, delay: int = 20000) -> Path:
    return build(SERIAL_LOOP.replace("DELAY", str(delay)), out)


def dirty_loop_kernel(out: Path, pages: int = 2048) -> Path:
    """DIRTY_LOOP over `pages` pages from 16 MiB (the guest needs 16 MiB + pages x 4 KiB of
    RAM)."""
    return build(DIRTY_LOOP.replace("PAGES", str(pages)), out)
