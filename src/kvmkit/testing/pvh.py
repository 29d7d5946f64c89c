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
