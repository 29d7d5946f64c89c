"""setup_boot_vcpu on a real /dev/kvm: a fake "kernel" at each entry point reports the state
it starts in (a few CPL0 instructions: emulated on PVM, fast enough)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmkit.arch.x86_64 import layout
from kvmkit.arch.x86_64 import regs as x86
from kvmkit.boot.loader import BootSetup, setup_boot_vcpu
from kvmkit.kvm import HltExit, IoExit, Kvm, Vcpu, Vm
from kvmkit.memory.guest import GuestMemory

PORT = 0x1234
MEM_SIZE = 4 << 20


@pytest.fixture
def machine() -> Iterator[tuple[Kvm, Vm, GuestMemory, Vcpu]]:
    kvm = Kvm()
    vm = kvm.create_vm()
    mem = GuestMemory()
    try:
        vm.set_tss_addr(0xFFFB_D000)
        mem.add_anonymous(0, MEM_SIZE)
        mem.register(vm)
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid2(kvm.supported_cpuid())
        yield kvm, vm, mem, vcpu
    finally:
        vm.close()
        mem.close()
        kvm.close()


def run_reports(vcpu: Vcpu, limit: int = 20) -> list[int]:
    """Values OUT to PORT until HLT."""
    reports: list[int] = []
    for _ in range(limit):
        ex = vcpu.run()
        if isinstance(ex, HltExit):
            return reports
        assert isinstance(ex, IoExit) and ex.is_out and ex.port == PORT, ex.describe()
        reports.append(ex.value)
    raise AssertionError(f"no HLT after {limit} exits; reports {reports}")


def test_linux64_entry_state(machine: tuple[Kvm, Vm, GuestMemory, Vcpu]) -> None:
    _kvm, _vm, mem, vcpu = machine
    setup = BootSetup("linux64", layout.KERNEL_LOAD_ADDR + 0x200, layout.ZERO_PAGE_ADDR)
    code = bytes.fromhex(
        "66ba3412"  # mov $0x1234, %dx
        "89f0"  # mov %esi, %eax
        "ef"  # out %eax, (%dx)            -> RSI, the zero page
        "48b88877665544332211"  # movabs $0x1122334455667788, %rax (only in 64-bit mode)
        "48c1e820"  # shr $32, %rax
        "ef"  # out                         -> 0x11223344
        "56"  # push %rsi                  (the boot stack is mapped and writable)
        "58"  # pop %rax
        "ef"  # out                         -> RSI again
        "8cc8"  # mov %cs, %eax
        "ef"  # out                         -> __BOOT_CS
        "8cd8"  # mov %ds, %eax
        "ef"  # out                         -> __BOOT_DS
        "a1"
        + (0x100000).to_bytes(8, "little").hex()  # movabs 0x100000, %eax (paged read)
        + "ef"  # out                       -> the marker at the load address
        "f4"  # hlt
    )
    mem.write(layout.KERNEL_LOAD_ADDR, b"MARK")
    mem.write(setup.entry, code)
    setup_boot_vcpu(vcpu, setup, mem)
    assert run_reports(vcpu) == [
        layout.ZERO_PAGE_ADDR,
        0x11223344,
        layout.ZERO_PAGE_ADDR,
        0x10,
        0x18,
        int.from_bytes(b"MARK", "little"),
    ]
    sregs = vcpu.get_sregs()
    assert sregs.efer & x86.EFER_LMA and sregs.cs.l == 1
    assert sregs.cr0 & x86.CR0_PG and sregs.cr4 & x86.CR4_PAE
    assert sregs.cr3 == layout.PML4_ADDR
    regs = vcpu.get_regs()
    assert regs.rsp == layout.BOOT_STACK_TOP
    assert not regs.rflags & x86.RFLAGS_IF


def test_pvh_entry_state(machine: tuple[Kvm, Vm, GuestMemory, Vcpu]) -> None:
    _kvm, _vm, mem, vcpu = machine
    entry = 0x100000
    setup = BootSetup("pvh", entry, layout.PVH_INFO_ADDR)
    mem.write_u32(layout.PVH_INFO_ADDR, 0x336EC578)
    code = bytes.fromhex(
        "66ba3412"  # mov $0x1234, %dx
        "89d8"  # mov %ebx, %eax
        "ef"  # out                  -> EBX, the start info
        "8b03"  # mov (%ebx), %eax
        "ef"  # out                  -> its magic
        "b801000000"  # mov $1, %eax
        "48"  # dec %eax in 32-bit mode (a REX prefix in 64-bit mode)
        "ef"  # out                  -> 0 in 32-bit mode, 1 in 64-bit mode
        "0f20c0"  # mov %cr0, %eax
        "ef"  # out                  -> CR0
        "f4"  # hlt
    )
    mem.write(entry, code)
    setup_boot_vcpu(vcpu, setup, mem)
    reports = run_reports(vcpu)
    assert reports[:3] == [layout.PVH_INFO_ADDR, 0x336EC578, 0]
    assert reports[3] & x86.CR0_PE and not reports[3] & x86.CR0_PG
    sregs = vcpu.get_sregs()
    assert sregs.cs.db == 1 and sregs.cs.l == 0 and not sregs.efer & x86.EFER_LMA
    assert sregs.cr4 == 0
    assert sregs.tr.base == 0 and sregs.tr.limit == 0x67


def test_elf_without_pvh_note_enters_in_64bit_mode_at_its_entry(tmp_path: Path) -> None:
    """A tiny ELF64 "vmlinux" without a PVH note (as Firecracker's guides build kernels),
    loaded by load_linux: entered at e_entry in 64-bit mode with RSI at the zero page, which
    holds the header magic and the command line pointer."""
    import subprocess

    from kvmkit.boot.loader import load_linux

    src = tmp_path / "k.S"
    src.write_text(
        "\t.text\n\t.code64\n\t.globl _start\n"
        "\t.skip 0x40\n"  # the entry is not the segment's first byte
        "_start:\n"
        "\tmovw $0x1234, %dx\n"
        "\tmovl %esi, %eax\n\toutl %eax, %dx\n"  # RSI: the zero page
        "\tmovl 0x202(%rsi), %eax\n\toutl %eax, %dx\n"  # the header magic "HdrS"
        "\tmovl 0x228(%rsi), %ebx\n\tmovzbl (%rbx), %eax\n\toutl %eax, %dx\n"  # cmdline[0]
        "\tleaq _start(%rip), %rax\n\toutl %eax, %dx\n"  # where it runs
        "\thlt\n"
    )
    obj, elf = tmp_path / "k.o", tmp_path / "k.elf"
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True)
    subprocess.run(["ld", "-m", "elf_x86_64", "-N", "-Ttext=0x200000", "-e", "_start", "-o",
                    str(elf), str(obj)], check=True, capture_output=True)  # fmt: skip
    mem_size = 8 << 20
    with Kvm() as kvm, kvm.create_vm() as vm:
        mem = GuestMemory()
        try:
            vm.set_tss_addr(0xFFFB_D000)
            mem.add_anonymous(0, mem_size)
            mem.register(vm)
            setup = load_linux(mem, elf, initrd=None, cmdline="Xroot=/dev/vda",
                               mem_size=mem_size)  # fmt: skip
            assert setup.protocol == "linux64" and setup.entry == 0x200040
            vcpu = vm.create_vcpu(0)
            vcpu.set_cpuid2(kvm.supported_cpuid())
            setup_boot_vcpu(vcpu, setup, mem)
            assert run_reports(vcpu) == [
                layout.ZERO_PAGE_ADDR, int.from_bytes(b"HdrS", "little"), ord("X"), 0x200040,
            ]  # fmt: skip
        finally:
            mem.close()
