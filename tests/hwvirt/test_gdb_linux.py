"""The GDB stub where KVM is hardware-style (in the lane here): data watchpoints and a
software breakpoint on a tiny guest, and a Linux guest booted by `kvmkit run --gdb` (attach,
break in the kernel, read $cr3, detach, the command completes).

The lane has no loopback network: the stub listens on a unix socket. QEMU/TCG's emulated SVM
delivers `int3` in the nested guest as a software interrupt without checking the #BP exception
intercept, so KVM never sees it (seen: every planted 0xCC reached the guest's own #BP
handler): the software-breakpoint test is an expected failure there. Hardware breakpoints and
watchpoints did not fire there either (2026-11-22: `hbreak` on a tiny guest and on the Linux
guest, the guest ran to its end), so the Linux test checks attach, registers, CR3, memory
through the guest's page tables and running to completion, not a kernel breakpoint."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from kvmkit.gdb.stub import GdbStub, run_tiny_guest
from kvmkit.image.guest import default_image
from kvmkit.testing import TinyGuest

pytestmark = [
    pytest.mark.hwvirt,
    pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed"),
]

GUEST = r"""
#include "kvmkit_guest.h"
volatile u64 counter, watched, bp_count;
__asm__(".globl bp_handler\nbp_handler:\n\tincq bp_count(%rip)\n\tiretq\n");
__attribute__((noinline)) void hit(u64 i) { counter += i; __asm__ volatile("" ::: "memory"); }
int main(void) {
    hit(1);
    __asm__ volatile("int3");  /* the guest's own breakpoint: its #BP handler counts it */
    hit(2);
    watched = 0x1234;
    guest_report(bp_count);
    guest_report(counter);
    return 0;
}
"""

# Inside `kvmkit lane` the debug exits below never reach KVM (see docs/gdb.md).
IN_LANE = os.environ.get("KVMKIT_IN_LANE") == "1"


def gdb_batch(script: str, tmp: Path) -> subprocess.Popen[str]:
    path = tmp / "script.gdb"
    path.write_text("set pagination off\nset confirm off\n" + textwrap.dedent(script))
    return subprocess.Popen(
        ["gdb", "-nx", "-batch", "-x", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
    )


def run_tiny(tmp_path: Path, script: str) -> tuple[list[int], str]:
    elf = tmp_path / "guest.elf"
    with TinyGuest("long64") as guest:
        original = guest.load_elf

        def capture(data: bytes) -> dict[str, int]:
            elf.write_bytes(data)
            return original(data)

        guest.load_elf = capture  # type: ignore[method-assign]
        syms = guest.load_c(GUEST, ["-g"])
        guest.set_idt_entry(3, syms["bp_handler"])
        with GdbStub.for_tiny_guest(guest) as stub:
            stub.start_stopped()
            address = stub.listen(f"unix:{tmp_path}/gdb.sock")
            gdb = gdb_batch(
                f"file {elf}\ntarget remote {address.removeprefix('unix:')}\n{script}", tmp_path
            )
            out = run_tiny_guest(guest, stub, timeout=120)
            text, err = gdb.communicate(timeout=60)
    return out.reports, text + err


@pytest.mark.xfail(
    IN_LANE, strict=True,
    reason="no debug exit reached KVM in the lane (nested SVM under QEMU/TCG); must pass on "
    "hosts with real VMX/SVM",
)  # fmt: skip
def test_hardware_breakpoint_and_watchpoint(tmp_path: Path) -> None:
    reports, text = run_tiny(
        tmp_path,
        """
        hbreak hit
        continue
        printf "HB i=%ld\\n", $rdi
        delete
        watch watched
        continue
        printf "WATCH watched=%#lx\\n", watched
        delete
        detach
        """,
    )
    assert "HB i=1" in text, text
    assert "Hardware watchpoint 2: watched" in text
    assert "WATCH watched=0x1234" in text, text
    assert reports == [1, 3]  # the guest's own int3 reached its handler


@pytest.mark.xfail(
    IN_LANE, strict=True,
    reason="QEMU/TCG's SVM does not intercept int3 as #BP (see module doc); must pass on hosts "
    "with real VMX/SVM",
)  # fmt: skip
def test_software_breakpoint_and_guest_int3(tmp_path: Path) -> None:
    reports, text = run_tiny(
        tmp_path,
        """
        break hit
        continue
        printf "SW1 i=%ld\\n", $rdi
        continue
        printf "SW2 i=%ld\\n", $rdi
        delete
        detach
        """,
    )
    assert "SW1 i=1" in text and "SW2 i=2" in text, text
    # The int3 kvmkit did not plant reached the guest's handler once (re-injected).
    assert reports == [1, 3]


def _sections(data: bytes) -> dict[str, tuple[int, int, int]]:
    """ELF64 section name -> (address, file offset, size)."""
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names_off = headers[shstrndx][4]
    out = {}
    for h in headers:
        start = names_off + h[0]
        out[data[start : data.index(b"\0", start)].decode()] = (h[3], h[4], h[5])
    return out


def exported_symbols(vmlinux: Path) -> dict[str, int]:
    """Exported kernel symbols from vmlinux's __ksymtab sections (Debian's System.map is a
    stub that points at the -dbg package). Entries are three 32-bit offsets, relative to
    themselves: value, name, namespace (CONFIG_HAVE_ARCH_PREL32_RELOCATIONS)."""
    data = vmlinux.read_bytes()
    secs = _sections(data)
    str_addr, str_off, str_size = secs["__ksymtab_strings"]
    found: dict[str, int] = {}
    for name in ("__ksymtab", "__ksymtab_gpl"):
        addr, off, size = secs[name]
        for i in range(0, size - 11, 12):
            value_off, name_off, _ = struct.unpack_from("<iii", data, off + i)
            value = (addr + i + value_off) & (2**64 - 1)
            name_addr = addr + i + 4 + name_off
            if str_addr <= name_addr < str_addr + str_size:
                start = str_off + name_addr - str_addr
                found[data[start : data.index(b"\0", start)].decode()] = value
    return found


def kernel_symbol(name: str) -> int:
    boot = default_image().kernel.parent
    release = default_image().kernel_release
    system_map = boot / f"System.map-{release}"
    if system_map.exists():
        for line in system_map.read_text(errors="replace").splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2] == name:
                return int(parts[0], 16)
    return exported_symbols(boot / f"vmlinux-{release}")[name]


def test_linux_guest_attach_cr3_memory_run_to_completion(tmp_path: Path) -> None:
    printk = kernel_symbol("_printk")  # exported symbol from the kernel package's vmlinux
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmkit", "run", "--gdb", f"unix:{tmp_path}/gdb.sock",
         "--cmdline", "nokaslr", "--", "uname", "-r"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    address = ""
    for line in iter(proc.stderr.readline, b""):
        m = re.search(rb"gdb stub on unix:(\S+) ", line)
        if m:
            address = m.group(1).decode()
            break
    assert address, "kvmkit run did not announce its gdb stub"
    err_tail: list[bytes] = []
    threading.Thread(target=lambda: err_tail.extend(proc.stderr or []), daemon=True).start()
    gdb = gdb_batch(
        f"""
        set debug remote 1
        target remote {address}
        printf "ENTRY rip=%#lx cr3=%#lx cr0=%#lx efer=%#lx\\n", $rip, $cr3, $cr0, $efer
        monitor cr3
        x/4xb $rip
        hbreak *{printk:#x}
        continue
        """,
        tmp_path,
    )
    text, debug = gdb.communicate(timeout=600)
    stdout, _ = proc.communicate(timeout=600)
    m = re.search(r"ENTRY rip=(0x[0-9a-f]+) cr3=(0x[0-9a-f]+) cr0=(0x[0-9a-f]+)", text)
    assert m, text + debug[-3000:]
    cr3 = int(m.group(2), 16)
    assert cr3 >> 12 and int(m.group(3), 16) & 0x8000_0001 == 0x8000_0001  # paging on
    assert f"cr3 = {cr3:#x}" in text + debug  # monitor output goes to stderr in batch mode
    assert re.search(r"Packet received: T05thread:1;cr3:[0-9a-f]+;", debug), debug[-3000:]
    assert re.search(r"0x[0-9a-f]+:(\s+0x[0-9a-f]{2}){4}", text), text  # memory via CR3
    assert "exited normally" in text, text
    assert proc.returncode == 0, b"".join(err_tail).decode(errors="replace")
    assert stdout.decode().strip() == default_image().kernel_release
