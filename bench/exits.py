"""Exit benchmark: the cost of one port-I/O VM exit served by a VMM's device bus, kvmkit
against QEMU running the same guest, side by side and interleaved (issue 20).

The guest is a tiny PVH ELF (kvmkit.testing.pvh.build) that both VMMs boot with `-kernel`:
its 32-bit entry code builds identity page tables, enters 64-bit long mode and drops to CPL3
with IOPL 3 (Intel SDM vol. 1 §19.5.1: I/O instructions are allowed when CPL <= IOPL), where
PVM runs guest code natively (on PVM, CPL0 code goes through KVM's emulator; the TSS's I/O
bitmap allows every port, as PVM keeps RFLAGS.IOPL at 0 for CPL3). At CPL3 it
writes 'S' to the serial port, then N times a byte to the 16550's scratch register (port
0x3FF, SCR: a plain register in both VMMs' UART models, so each write is one exit served
by the device and nothing else), then 'E', then executes `hlt` at CPL3, which faults with no
IDT (a triple fault: both VMMs end). The host timestamps 'S' and 'E' as they arrive on the
VMM's stdout: microseconds per exit = (t_E - t_S) / N.

    kvmkit:  kvmkit run --kernel ELF --mem-mib 64 --vcpus 1      (the console on stdout)
    QEMU:    qemu-system-x86_64 -M microvm -accel kvm -m 64 -smp 1 -nodefaults
             -no-user-config -display none -serial stdio -kernel ELF -no-reboot

Prints medians over --runs interleaved runs and the ratio kvmkit/QEMU (µs per exit: below 1.0
is faster). From a clean checkout: `make bench-exits`. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvmkit.testing.pvh import build

SCR_PORT = 0x3FF  # COM1 base 0x3F8 + 7: the 16550 scratch register (PC16550D datasheet)

# 32-bit PVH entry (Xen docs/misc/pvh.pandoc: protected mode, paging off, CPL0) to 64-bit
# CPL3. Long mode per Intel SDM vol. 3 §10.8.5: CR4.PAE, CR3 = PML4, EFER.LME (MSR
# 0xC0000080 bit 8), CR0.PG, then a far jump to a 64-bit code segment. The page tables map
# the first 2 MiB (the ELF is linked at 1 MiB) with one 2 MiB page, U/S set at every level
# so that CPL3 may use it. The GDT holds kernel code64 (0x08), kernel data (0x10), user
# data (0x18), user code64 (0x20) and a 64-bit TSS (0x28) whose I/O permission bitmap allows
# every port (SDM vol. 1 §19.5.2; PVM keeps RFLAGS.IOPL at 0 for the guest's CPL3, so the
# bitmap is what lets CPL3 do port I/O there); IRETQ to CPL3 with RFLAGS.IOPL = 3 too.
EXIT_LOOP = """
	cli
	lgdt gdtr
	movl $pml4, %eax
	movl %eax, %cr3
	movl %cr4, %eax
	orl $0x20, %eax
	movl %eax, %cr4
	movl $0xC0000080, %ecx
	rdmsr
	orl $0x100, %eax
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax
	movl %eax, %cr0
	ljmp $0x08, $long64
	.code64
long64:
	movw $0x10, %ax
	movw %ax, %ds
	movw %ax, %es
	movw %ax, %ss
	movq $stack_top, %rsp
	movl $tss, %eax
	movw %ax, gdt_tss + 2
	shrl $16, %eax
	movb %al, gdt_tss + 4
	movb %ah, gdt_tss + 7
	movw $0x28, %ax
	ltr %ax
	pushq $0x1b
	pushq $stack_top
	pushq $0x3002
	pushq $0x23
	pushq $user
	iretq
user:
	movw $0x3f8, %dx
	movb $'S', %al
	outb %al, %dx
	movl $COUNT, %ecx
	movw $SCR, %dx
1:	outb %al, %dx
	decl %ecx
	jnz 1b
	movw $0x3f8, %dx
	movb $'E', %al
	outb %al, %dx
	hlt
	.data
	.balign 8
gdt:	.quad 0
	.quad 0x00AF9A000000FFFF
	.quad 0x00CF92000000FFFF
	.quad 0x00CFF2000000FFFF
	.quad 0x00AFFA000000FFFF
gdt_tss:
	.word tss_end - tss - 1
	.word 0
	.byte 0, 0x89, 0, 0
	.quad 0
gdt_end:
gdtr:	.word gdt_end - gdt - 1
	.long gdt
	.balign 4096
pml4:	.quad pdpt + 7
	.fill 511, 8, 0
pdpt:	.quad pd + 7
	.fill 511, 8, 0
pd:	.quad 0x87
	.fill 511, 8, 0
	.fill 512, 8, 0
stack_top:
tss:	.fill 0x66, 1, 0
	.word tss_bitmap - tss
tss_bitmap:
	.fill 8192, 1, 0
	.byte 0xff
tss_end:
"""


# The PVH note (Xen's ELF note type 18, XEN_ELFNOTE_PHYS32_ENTRY) in an allocated section:
# QEMU looks for it through the PT_NOTE program header, which ld makes only for those.
NOTE = """
	.section .note.Xen, "a", @note
	.balign 4
	.long 4, 4, 18
	.asciz "Xen"
	.long _start
	.text
	.code32
	.globl _start
_start:
"""


def kernel(out: Path, count: int) -> Path:
    source = NOTE + EXIT_LOOP.replace("COUNT", str(count)).replace("SCR", str(SCR_PORT))
    return build(source, out)


def kvmkit_argv(elf: Path) -> list[str]:
    here = Path(sys.executable).parent / "kvmkit"
    exe = str(here) if here.exists() else (shutil.which("kvmkit") or "kvmkit")
    return [exe, "run", "--kernel", str(elf), "--mem-mib", "64", "--vcpus", "1"]


def qemu_argv(qemu: str, machine: str, elf: Path) -> list[str]:
    return [qemu, "-M", machine, "-accel", "kvm", "-m", "64", "-smp", "1",
            "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
            "-kernel", str(elf), "-no-reboot"]  # fmt: skip


def us_per_exit(argv: list[str], count: int, timeout: float) -> float:
    """Run the guest under `argv`; microseconds per exit between 'S' and 'E' on stdout."""
    # KVMKIT_FORCE_RUN: `kvmkit run` refuses PVM hosts for Linux guests; this guest is fine.
    env = dict(os.environ, KVMKIT_FORCE_RUN="1")
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env)  # fmt: skip
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    t_start = t_end = None
    deadline = time.monotonic() + timeout
    seen = b""
    try:
        while t_end is None:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]}: no end marker after {timeout} s: {seen[-80:]!r}")
            chunk = os.read(fd, 4096)
            now = time.monotonic()
            if not chunk:
                raise RuntimeError(f"{argv[0]}: ended before the end marker: {seen[-200:]!r}")
            seen += chunk
            if t_start is None and b"S" in chunk:
                t_start = now
            if t_start is not None and b"E" in seen[seen.index(b"S"):]:
                t_end = now
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    assert t_start is not None
    return (t_end - t_start) * 1e6 / count


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5, help="runs of each VMM (default 5)")
    ap.add_argument("--exits", type=int, default=100_000, help="port writes per run")
    ap.add_argument("--machine", default="microvm", help="QEMU machine (default microvm)")
    ap.add_argument("--timeout", type=float, default=300.0)
    args = ap.parse_args()
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        sys.exit("bench/exits.py: qemu-system-x86_64 not found")
    with tempfile.TemporaryDirectory(prefix="kvmkit-exits-") as tmp:
        elf = kernel(Path(tmp) / "exits.elf", args.exits)
        series: dict[str, list[float]] = {"kvmkit": [], f"qemu -M {args.machine}": []}
        argvs = {"kvmkit": kvmkit_argv(elf), f"qemu -M {args.machine}":
                 qemu_argv(qemu, args.machine, elf)}  # fmt: skip
        names = list(series)
        for run in range(args.runs):
            for name in names[run % 2:] + names[: run % 2]:  # interleaved, order alternating
                series[name].append(us_per_exit(argvs[name], args.exits, args.timeout))
    load = os.getloadavg()
    print(f"port-I/O exits (OUT to the UART's scratch register at CPL3), {args.exits} per run, "
          f"{args.runs} runs, medians; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")  # fmt: skip
    for name, values in series.items():
        print(f"{name:<20}{statistics.median(values):>8.2f} µs/exit   "
              f"(runs: {', '.join(f'{v:.2f}' for v in values)})")
    k, q = (statistics.median(v) for v in series.values())
    print(f"kvmkit / QEMU: x{k / q:.2f} µs per exit (exit rate x{q / k:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
