"""Tiny guests: small programs run on a bare vCPU, for tests, examples and benchmarks.

A `TinyGuest` creates a VM with one region of RAM, puts a vCPU in real mode, 32-bit
protected mode or 64-bit long mode (CPL0 or CPL3) with GDT, TSS, IDT and identity page tables
built here, loads code (raw bytes, GNU `as` source, or freestanding C compiled with gcc) and
runs it, serving the ucall channel (kvmkit/testing/ucall.py).

Guest-physical memory map (the default 4 MiB of RAM):

    0x000000 +----------------------------+
             | real-mode IVT / BDA        |
    0x001000 | GDT                        |
    0x002000 | IDT                        |
    0x003000 | TSS + I/O permission bitmap|  every port allowed at CPL3
    0x006000 | default exception stubs    |  vector -> OUT EXCEPTION_PORT
    0x008000 | real-mode code             |  (REAL_LOAD_ADDR)
    0x010000 | page tables (PML4, PDPT,   |  identity map of 4 GiB, 2 MiB pages,
             |   4 page directories)      |  U/S set so CPL3 reaches everything
    0x07F000 | interrupt stack top (RSP0) |
    0x100000 | 32/64-bit code and data    |  (LOAD_ADDR; C guests are linked here)
       ...   |                            |
    top-4K   | main stack top             |
             +----------------------------+
    0xFEE00000 local APIC (in-kernel irqchip); any other unbacked address is MMIO

On a PVM host, CPL0 code runs in KVM's instruction emulator (~1.5 M instructions/s) and CPL3
code natively: use `cpl=3` for anything that must be fast.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from types import TracebackType
from typing import Literal

from kvmkit.abi import structs
from kvmkit.arch.x86_64 import regs as x86
from kvmkit.arch.x86_64.cpuid import guest_cpuid
from kvmkit.arch.x86_64.paging import build_identity_map
from kvmkit.arch.x86_64.segments import (
    CODE32,
    CODE64,
    DATA,
    USER_CODE32,
    USER_CODE64,
    USER_DATA,
    Descriptor,
    real_mode_segment,
    tss_descriptor,
)
from kvmkit.arch.x86_64.topology import Topology
from kvmkit.boot.elf import ElfFile
from kvmkit.kvm import IoExit, Kvm, Vcpu, Vm, VmExit
from kvmkit.kvm.exits import HltExit, IntrExit
from kvmkit.kvm.kick import install_kick_handler
from kvmkit.memory.guest import GuestMemory
from kvmkit.testing.ucall import (
    EXCEPTION_PORT,
    REPORT32_PORT,
    UCALL_PORT,
    GuestAssertionError,
    GuestError,
    GuestOutput,
    GuestTimeout,
    UcallCmd,
    read_ucall,
)
from kvmkit.vmm import cpus

Mode = Literal["real", "prot32", "long64"]

GDT_ADDR = 0x1000
IDT_ADDR = 0x2000
TSS_ADDR = 0x3000
STUBS_ADDR = 0x6000
REAL_LOAD_ADDR = 0x8000
PAGE_TABLE_ADDR = 0x10000
INTERRUPT_STACK_TOP = 0x7F000
LOAD_ADDR = 0x100000
DEFAULT_MEM_SIZE = 4 << 20
IDENTITY_MAP_SIZE = 4 << 30
# 104-byte TSS, then an I/O permission bitmap of 65536 bits (all zero: every port allowed)
# and the terminating 0xFF byte (SDM vol. 1 19.5.2). IOPL=3 alone is not enough on PVM,
# which runs CPL3 natively with the real IOPL at 0; the bitmap works everywhere.
IO_BITMAP_OFFSET = 104
TSS_LIMIT = IO_BITMAP_OFFSET + 8192

SEL_CODE = 0x08
SEL_DATA = 0x10
SEL_USER_CODE = 0x18 | 3
SEL_USER_DATA = 0x20 | 3
SEL_TSS = 0x28

# Exceptions that push an error code (SDM vol. 3A table 6-1), to find the faulting RIP.
_ERROR_CODE_VECTORS = {8, 10, 11, 12, 13, 14, 17, 21, 29, 30}
EXCEPTION_NAMES = {
    0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM",
    8: "#DF", 10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF",
    17: "#AC", 18: "#MC", 19: "#XM",
}  # fmt: skip

_DATA_FILES = resources.files("kvmkit.testing")


class ToolchainError(GuestError):
    """Assembling or compiling a tiny guest failed; the message holds the tool's output."""


def _run_tool(argv: list[str]) -> None:
    if shutil.which(argv[0]) is None:
        raise ToolchainError(f"{argv[0]} is not installed (needed to build tiny guests)")
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ToolchainError(f"{' '.join(argv)} failed:\n{proc.stderr.strip()}")


class TinyGuest:
    """One VM, one RAM region, one (or a few) vCPUs set up for a tiny program."""

    def __init__(
        self,
        mode: Mode = "long64",
        *,
        cpl: int = 0,
        mem_size: int = DEFAULT_MEM_SIZE,
        irqchip: bool = False,
        kvm: Kvm | None = None,
        vcpus: int = 1,
        set_cpuid: bool = True,
        topology: Topology | None = None,
        huge_page_size: int = 0,
    ) -> None:
        """`topology`: create its vCPUs as a Machine does (ids = APIC IDs, KVM_CAP_X2APIC_API
        when an ID is above 254, each vCPU's CPUID from `guest_cpuid`); `vcpus` is ignored.
        `huge_page_size`: RAM in a hugetlb memfd with pages of that size."""
        if mode not in ("real", "prot32", "long64"):
            raise ValueError(f"unknown mode {mode!r}")
        if cpl not in (0, 3) or (mode == "real" and cpl):
            raise ValueError(f"cpl {cpl} is not available in {mode} mode")
        install_kick_handler()
        self.mode: Mode = mode
        self.cpl = cpl
        self.mem_size = mem_size
        self._own_kvm = kvm is None
        self.kvm = kvm or Kvm()
        self.vm: Vm = self.kvm.create_vm()
        self.mem = GuestMemory()
        self.symbols: dict[str, int] = {}
        self.output = GuestOutput()
        self.entry = REAL_LOAD_ADDR if mode == "real" else LOAD_ADDR
        try:
            # Intel needs a TSS area for real mode; harmless elsewhere (above RAM, below 4 GiB).
            self.vm.set_tss_addr(0xFFFBD000)
            self.x2apic_api = cpus.prepare_vm(self.vm, topology) if topology else 0
            if irqchip:
                self.vm.create_irqchip()
            if huge_page_size:
                self.mem.add_memfd(0, mem_size, huge_page_size=huge_page_size)
            else:
                self.mem.add_anonymous(0, mem_size)
            self.mem.register(self.vm)
            self._build_tables()
            cpuid = self.kvm.supported_cpuid() if set_cpuid else None
            self.vcpus: list[Vcpu] = []
            for i in range(topology.vcpus if topology else vcpus):
                if topology is None:
                    vcpu = self.vm.create_vcpu(i)
                else:
                    vcpu = cpus.create_vcpu(self.vm, topology, i)
                # Without KVM_SET_CPUID2 the LAPIC timer modes are masked off (ENVIRONMENT.md).
                if cpuid is not None:
                    vcpu.set_cpuid2(cpuid if topology is None else guest_cpuid(cpuid, topology, i))
                self._setup_vcpu(vcpu, i)
                self.vcpus.append(vcpu)
        except BaseException:
            self.close()
            raise

    @property
    def vcpu(self) -> Vcpu:
        return self.vcpus[0]

    # -- life cycle
    def close(self) -> None:
        self.vm.close()
        self.mem.close()
        if self._own_kvm:
            self.kvm.close()

    def __enter__(self) -> TinyGuest:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- machine set-up
    def _gdt(self) -> list[Descriptor | None]:
        if self.mode == "long64":
            return [None, CODE64, DATA, USER_CODE64, USER_DATA]
        return [None, CODE32, DATA, USER_CODE32, USER_DATA]

    def _build_tables(self) -> None:
        if self.mode == "real":
            return
        long_mode = self.mode == "long64"
        gdt = bytearray()
        for desc in self._gdt():
            gdt += (desc.encode() if desc else 0).to_bytes(8, "little")
        tss = tss_descriptor(TSS_ADDR, TSS_LIMIT)
        if long_mode:
            low, high = tss.encode_system64()
            gdt += low.to_bytes(8, "little") + high.to_bytes(8, "little")
        else:
            gdt += tss.encode().to_bytes(8, "little")
        self.mem.write(GDT_ADDR, bytes(gdt))
        self._gdt_limit = len(gdt) - 1

        # TSS: RSP0 (64-bit, offset 4) or SS0:ESP0 (32-bit, offsets 8 and 4) for CPL3 -> CPL0
        # transitions; then the I/O bitmap allowing every port.
        tss_bytes = bytearray(TSS_LIMIT + 1)
        tss_bytes[TSS_LIMIT] = 0xFF
        if long_mode:
            tss_bytes[4:12] = INTERRUPT_STACK_TOP.to_bytes(8, "little")
        else:
            tss_bytes[4:8] = INTERRUPT_STACK_TOP.to_bytes(4, "little")
            tss_bytes[8:12] = SEL_DATA.to_bytes(4, "little")
        tss_bytes[102:104] = IO_BITMAP_OFFSET.to_bytes(2, "little")
        self.mem.write(TSS_ADDR, bytes(tss_bytes))

        # Default handlers: `push $vector; jmp common`, common: `pop %eax; mov $port,%dx;
        # out %eax,%dx; hlt`. The same bytes decode identically in 32- and 64-bit mode.
        common = STUBS_ADDR + 256 * 16
        stubs = bytearray(256 * 16)
        for v in range(256):
            at = v * 16
            stubs[at : at + 5] = b"\x68" + v.to_bytes(4, "little")
            rel = common - (STUBS_ADDR + at + 10)
            stubs[at + 5 : at + 10] = b"\xe9" + rel.to_bytes(4, "little", signed=True)
        tail = b"\x58\x66\xba" + EXCEPTION_PORT.to_bytes(2, "little") + b"\xef\xf4\xeb\xfd"
        self.mem.write(STUBS_ADDR, bytes(stubs) + tail)
        for v in range(256):
            self.set_idt_entry(v, STUBS_ADDR + v * 16)

        if long_mode:
            build_identity_map(self.mem, PAGE_TABLE_ADDR, IDENTITY_MAP_SIZE, user=True)

    def set_idt_entry(self, vector: int, handler: int, dpl: int = 0) -> None:
        """Install an interrupt gate for `vector` pointing at guest address `handler`."""
        if self.mode == "real":
            # Real-mode IVT: segment:offset, 4 bytes per vector.
            self.mem.write_u16(vector * 4, handler & 0xF)
            self.mem.write_u16(vector * 4 + 2, handler >> 4)
            return
        attrs = 0x8E | (dpl << 5)  # present, interrupt gate
        if self.mode == "long64":
            low = (
                (handler & 0xFFFF)
                | (SEL_CODE << 16)
                | (attrs << 40)
                | (((handler >> 16) & 0xFFFF) << 48)
            )
            self.mem.write_u64(IDT_ADDR + vector * 16, low)
            self.mem.write_u64(IDT_ADDR + vector * 16 + 8, handler >> 32)
        else:
            gate = (
                (handler & 0xFFFF)
                | (SEL_CODE << 16)
                | (attrs << 40)
                | (((handler >> 16) & 0xFFFF) << 48)
            )
            self.mem.write_u64(IDT_ADDR + vector * 8, gate)

    def _setup_vcpu(self, vcpu: Vcpu, index: int) -> None:
        sregs = vcpu.get_sregs()
        if self.mode == "real":
            sregs.cs = real_mode_segment(0, code=True)
            for name in ("ds", "es", "fs", "gs", "ss"):
                setattr(sregs, name, real_mode_segment(0))
            sregs.cr0 = x86.CR0_ET
            vcpu.set_sregs(sregs)
            regs = structs.kvm_regs()
            regs.rip, regs.rflags, regs.rsp = self.entry, x86.RFLAGS_RESERVED1, 0x7000
            vcpu.set_regs(regs)
            return

        long_mode = self.mode == "long64"
        gdt = self._gdt()
        if self.cpl == 3:
            code, data = gdt[3], gdt[4]
            cs_sel, ds_sel = SEL_USER_CODE, SEL_USER_DATA
        else:
            code, data = gdt[1], gdt[2]
            cs_sel, ds_sel = SEL_CODE, SEL_DATA
        assert code is not None and data is not None
        sregs.cs = code.segment(cs_sel)
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, data.segment(ds_sel))
        sregs.tr = tss_descriptor(TSS_ADDR, TSS_LIMIT).segment(SEL_TSS)
        sregs.gdt.base, sregs.gdt.limit = GDT_ADDR, self._gdt_limit
        sregs.idt.base, sregs.idt.limit = IDT_ADDR, (256 * (16 if long_mode else 8)) - 1
        sregs.cr0 = x86.CR0_PE | x86.CR0_MP | x86.CR0_ET | x86.CR0_NE
        sregs.cr4 = x86.CR4_OSFXSR | x86.CR4_OSXMMEXCPT
        if long_mode:
            sregs.cr0 |= x86.CR0_PG | x86.CR0_WP
            sregs.cr4 |= x86.CR4_PAE
            sregs.cr3 = PAGE_TABLE_ADDR
            sregs.efer = x86.EFER_LME | x86.EFER_LMA | x86.EFER_SCE
        vcpu.set_sregs(sregs)

        regs = structs.kvm_regs()
        regs.rip = self.entry
        # 64 KiB of stack per vCPU, 16 apart (machines with more vCPUs run a few at a time)
        regs.rsp = self.mem_size - 0x1000 - (index % 16) * 0x10000
        regs.rflags = x86.RFLAGS_RESERVED1
        if self.cpl == 3:
            regs.rflags |= x86.RFLAGS_IOPL3  # cli/sti (and port I/O where IOPL is honoured)
        vcpu.set_regs(regs)

    def set_entry(self, rip: int) -> None:
        self.entry = rip
        for vcpu in self.vcpus:
            regs = vcpu.get_regs()
            regs.rip = rip
            vcpu.set_regs(regs)

    # -- loading code
    def load_bytes(self, code: bytes, addr: int | None = None) -> int:
        """Copy raw machine code into guest memory (at the mode's load address by default)
        and point every vCPU at it."""
        at = self.entry if addr is None else addr
        self.mem.write(at, code)
        self.set_entry(at)
        return at

    def load_elf(self, data: bytes) -> dict[str, int]:
        elf = ElfFile(data)
        for seg in elf.load_segments:
            self.mem.write(seg.paddr, elf.segment_data(seg))
            if seg.memsz > seg.filesz:
                self.mem.fill(seg.paddr + seg.filesz, seg.memsz - seg.filesz)
        self.symbols = elf.symbols()
        self.set_entry(elf.entry)
        return self.symbols

    def load_asm(self, source: str) -> dict[str, int]:
        """Assemble GNU `as` source (AT&T syntax) at the load address; `_start` is prepended
        so execution begins at the first instruction. Returns the symbol table."""
        bits64 = self.mode == "long64"
        prologue = ".code16\n" if self.mode == "real" else ""
        text = f"{prologue}.text\n.globl _start\n_start:\n{source}\n"
        with tempfile.TemporaryDirectory(prefix="kvmkit-asm-") as tmp:
            src, obj, exe = Path(tmp, "guest.S"), Path(tmp, "guest.o"), Path(tmp, "guest.elf")
            src.write_text(text)
            _run_tool(["as", "--64" if bits64 else "--32", "-o", str(obj), str(src)])
            _run_tool([
                "ld", "-m", "elf_x86_64" if bits64 else "elf_i386", "-nostdlib", "-static",
                f"-Ttext={self.entry:#x}", "-e", "_start", "-o", str(exe), str(obj),
            ])  # fmt: skip
            return self.load_elf(exe.read_bytes())

    def load_c(self, source: str, extra_cflags: Sequence[str] = ()) -> dict[str, int]:
        """Compile freestanding C (64-bit long mode) with the tiny-guest runtime and load it.
        `main` runs with the stack set up; its return value becomes `output.status`."""
        if self.mode != "long64":
            raise ValueError("C tiny guests run in long64 mode")
        with tempfile.TemporaryDirectory(prefix="kvmkit-c-") as tmp:
            tmpdir = Path(tmp)
            for name in ("kvmkit_guest.h", "kvmkit_guest.c", "crt0.S", "guest.ld"):
                (tmpdir / name).write_bytes(_DATA_FILES.joinpath(name).read_bytes())
            (tmpdir / "guest.c").write_text(source)
            exe = tmpdir / "guest.elf"
            _run_tool([
                "gcc", "-m64", "-O2", "-std=gnu11", "-ffreestanding", "-nostdlib", "-static",
                "-fno-pic", "-fno-pie", "-no-pie", "-mno-red-zone", "-mgeneral-regs-only",
                "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fcf-protection=none",
                f"-I{tmpdir}", f"-ffile-prefix-map={tmpdir}/=", "-Wl,--build-id=none",
                f"-Wl,--defsym=KVMKIT_LOAD_ADDR={self.entry:#x}",
                "-Wl,-T", "-Wl," + str(tmpdir / "guest.ld"), "-o", str(exe),
                str(tmpdir / "crt0.S"), str(tmpdir / "kvmkit_guest.c"), str(tmpdir / "guest.c"),
                *extra_cflags,
            ])  # fmt: skip
            return self.load_elf(exe.read_bytes())

    # -- running
    def run(
        self,
        *,
        vcpu: Vcpu | None = None,
        timeout: float | None = 60.0,
        on_exit: Callable[[VmExit], bool] | None = None,
        on_intr: Callable[[VmExit], bool] | None = None,
        stop_on_hlt: bool = False,
    ) -> GuestOutput:
        """Run until the guest signals DONE (ucall) and return what it reported.

        `on_exit` sees every exit the ucall channel does not consume and returns True when it
        handled it. A guest assertion raises GuestAssertionError; any other unexpected exit,
        an exception in the guest, or `timeout` seconds without DONE raise GuestError.
        `on_intr` sees kicks (IntrExit) other than the timeout's and returns True when it
        consumed one (a debugger holding the vCPU); `immediate_exit` is then its business.
        """
        cpu = vcpu or self.vcpu
        timed_out = threading.Event()
        timer: threading.Timer | None = None
        if timeout is not None:

            def expire() -> None:
                timed_out.set()
                cpu.kick()

            timer = threading.Timer(timeout, expire)
            timer.daemon = True
            timer.start()
        try:
            while True:
                exit_ = cpu.run()
                if isinstance(exit_, IoExit) and self._handle_io(cpu, exit_):
                    if self.output.status is not None:
                        return self.output
                    continue
                if isinstance(exit_, IntrExit):
                    if timed_out.is_set():
                        raise GuestTimeout(
                            f"tiny guest did not finish within {timeout} s "
                            f"(rip={cpu.get_regs().rip:#x})"
                        )
                    if on_intr is None or not on_intr(exit_):
                        cpu.immediate_exit = False
                    continue
                if on_exit is not None and on_exit(exit_):
                    continue
                if stop_on_hlt and isinstance(exit_, HltExit):
                    return self.output
                raise GuestError(
                    f"unexpected exit {exit_.describe()} at rip={cpu.get_regs().rip:#x}"
                )
        finally:
            if timer is not None:
                timer.cancel()
            cpu.immediate_exit = False

    def _handle_io(self, cpu: Vcpu, exit_: IoExit) -> bool:
        port = exit_.port
        if port == UCALL_PORT and exit_.is_out:
            if exit_.size != 4:
                raise GuestError(f"ucall with a {exit_.size}-byte OUT (must be 4)")
            gpa = exit_.value
            if gpa == 0:
                self.output.status = 0
                return True
            uc = read_ucall(self.mem, gpa)
            if uc.cmd == UcallCmd.PRINT:
                self.output.prints.append(uc.msg)
            elif uc.cmd == UcallCmd.REPORT:
                self.output.reports.extend(uc.args)
            elif uc.cmd == UcallCmd.SYNC:
                self.output.syncs.extend(uc.args)
            elif uc.cmd == UcallCmd.DONE:
                self.output.status = uc.args[0] if uc.args else 0
            elif uc.cmd == UcallCmd.ASSERT:
                values = ""
                if any(uc.args):
                    values = f" (values {uc.args[0]:#x}, {uc.args[1]:#x})"
                raise GuestAssertionError(
                    f"guest assertion failed at {uc.file}:{uc.line}: {uc.msg}{values}"
                )
            return True
        if port == REPORT32_PORT and exit_.is_out:
            self.output.reports.append(exit_.value)
            return True
        if port == EXCEPTION_PORT and exit_.is_out:
            raise GuestError(self._describe_exception(cpu, exit_.value))
        return False

    def _describe_exception(self, cpu: Vcpu, vector: int) -> str:
        regs, sregs = cpu.get_regs(), cpu.get_sregs()
        word = 8 if self.mode == "long64" else 4
        frame = regs.rsp + (word if vector in _ERROR_CODE_VECTORS else 0)
        try:
            raw = self.mem.read(frame, word)
            rip = f"{int.from_bytes(raw, 'little'):#x}"
        except ValueError:
            rip = "unknown"
        name = EXCEPTION_NAMES.get(vector, f"vector {vector}")
        extra = f" cr2={sregs.cr2:#x}" if vector == 14 else ""
        return f"guest exception {name} at rip={rip}{extra}"
