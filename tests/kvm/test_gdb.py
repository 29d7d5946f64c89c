"""The GDB stub on this host's /dev/kvm with C tiny guests at CPL0, driven by real `gdb -batch`.

Breakpoints here are hardware ones (`hbreak`): on a PVM host an int3 at CPL0 ends in an
emulation failure and data watchpoints do not fire in KVM's emulator; software breakpoints and
watchpoints are tested in the lane (tests/hwvirt/test_gdb_linux.py).
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmkit.gdb import rsp
from kvmkit.gdb.stub import GdbStub, run_tiny_guest
from kvmkit.testing import GuestOutput, TinyGuest

pytestmark = pytest.mark.skipif(shutil.which("gdb") is None, reason="gdb is not installed")


def load_c_keep_elf(guest: TinyGuest, source: str, elf_path: Path) -> dict[str, int]:
    """TinyGuest.load_c, also writing the linked ELF (with -g) where gdb can read it."""
    original = guest.load_elf

    def capture(data: bytes) -> dict[str, int]:
        elf_path.write_bytes(data)
        return original(data)

    guest.load_elf = capture  # type: ignore[method-assign]
    try:
        return guest.load_c(source, ["-g"])
    finally:
        del guest.load_elf


class Session:
    """A tiny guest started stopped under a stub, and gdb running a script against it."""

    def __init__(self, guest: TinyGuest, stub: GdbStub, tmp: Path) -> None:
        self.guest, self.stub, self.tmp = guest, stub, tmp
        self.gdb: subprocess.Popen[str] | None = None

    def start_gdb(self, elf: Path, body: str, *, debug_remote: bool = False) -> None:
        script = self.tmp / "script.gdb"
        host_port = self.stub.address.removeprefix("tcp:")
        script.write_text(
            "set pagination off\nset confirm off\n"
            f"file {elf}\n"
            + ("set debug remote 1\n" if debug_remote else "")
            + f"target remote {host_port}\n"
            + textwrap.dedent(body)
        )
        self.gdb = subprocess.Popen(
            ["gdb", "-nx", "-batch", "-x", str(script)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
        )

    def finish(self, timeout: float = 60) -> tuple[GuestOutput, str]:
        out = run_tiny_guest(self.guest, self.stub, timeout=timeout)
        assert self.gdb is not None
        stdout, stderr = self.gdb.communicate(timeout=30)
        text = stdout + "\n" + stderr  # `set debug remote` writes to stderr
        (self.tmp / "gdb.log").write_text(text)  # kept by pytest for a failing test
        return out, text


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    with TinyGuest("long64") as guest:
        stub = GdbStub.for_tiny_guest(guest)
        try:
            yield Session(guest, stub, tmp_path)
        finally:
            stub.close()


ARITH = r"""
#include "kvmkit_guest.h"
volatile u64 counter;
volatile u64 poked;
__attribute__((noinline)) u64 hit(u64 i) {
    counter += i;
    __asm__ volatile("" ::: "memory");
    return counter;
}
int main(void) {
    for (u64 i = 1; i <= 3; i++) hit(i);
    guest_report(counter);
    guest_report(poked);
    return 0;
}
"""


def test_break_on_symbol_registers_memory_stepi_detach(session: Session) -> None:
    elf = session.tmp / "guest.elf"
    syms = load_c_keep_elf(session.guest, ARITH, elf)
    session.stub.start_stopped()
    session.stub.listen("tcp:127.0.0.1:0")
    session.start_gdb(
        elf,
        """
        printf "START rip=%#lx cr3=%#lx efer=%#lx cr0=%#lx\\n", $rip, $cr3, $efer, $cr0
        hbreak hit
        continue
        printf "HIT rdi=%ld pc=%#lx\\n", $rdi, $pc
        printf "CS=%#x FSBASE=%#lx\\n", $cs, $fs_base
        set var poked = 0x5eed
        set var counter = 100
        printf "MEM poked=%#lx counter=%ld\\n", poked, counter
        x/2xb hit
        set $rdi = 40
        stepi
        printf "STEP pc=%#lx\\n", $pc
        set $rax = 7
        printf "RAX %ld\\n", $rax
        info registers cr3 cr4
        delete
        detach
        """,
        debug_remote=True,
    )
    out, text = session.finish()
    assert f"START rip={syms['_start']:#x} cr3=0x10000 efer=0x501" in text, text
    assert f"HIT rdi=1 pc={syms['hit']:#x}" in text, text
    assert "CS=0x8 FSBASE=0" in text
    assert "MEM poked=0x5eed counter=100" in text
    step_pc = int(re.search(r"STEP pc=(0x[0-9a-f]+)", text).group(1), 16)  # type: ignore[union-attr]
    assert syms["hit"] < step_pc < syms["hit"] + 16
    assert "RAX 7" in text
    # Every stop reply carries the CR3 of the stopping vCPU.
    assert re.search(r"Packet received: T05thread:1;cr3:10000;", text), text
    assert "Detaching from program" in text or "[Inferior 1 (Remote target) detached]" in text
    # The guest ran on after the detach with what gdb wrote: hit(1) had loaded counter
    # (100) into rax by the stepi, rax was then set to 7 and rdi to 40, so counter became
    # 7 + 40; then hit(2) and hit(3).
    assert out.status == 0
    assert out.reports == [7 + 40 + 2 + 3, 0x5EED]


CR3_SWITCH = r"""
#include "kvmkit_guest.h"
volatile u64 counter;
static u64 pml4_b[512] __attribute__((aligned(4096)));
__attribute__((noinline)) void hit(u64 i) { counter += i; __asm__ volatile("" ::: "memory"); }
int main(void) {
    u64 a;
    __asm__ volatile("mov %%cr3, %0" : "=r"(a));
    u64 *pa = (u64 *)a;
    for (int i = 0; i < 512; i++) pml4_b[i] = pa[i];
    u64 b = (u64)pml4_b;
    for (u64 i = 0; i < 20; i++) {
        __asm__ volatile("mov %0, %%cr3" : : "r"((i & 1) ? b : a) : "memory");
        hit(i);
    }
    __asm__ volatile("mov %0, %%cr3" : : "r"(a) : "memory");
    guest_report(counter);
    return 0;
}
"""


def test_cr3_filter_stops_only_under_the_chosen_root(session: Session) -> None:
    elf = session.tmp / "guest.elf"
    syms = load_c_keep_elf(session.guest, CR3_SWITCH, elf)
    root_b = syms["pml4_b"]
    session.stub.start_stopped()
    session.stub.listen("tcp:127.0.0.1:0")
    session.start_gdb(
        elf,
        f"""
        monitor cr3
        hbreak hit
        monitor cr3-filter {root_b:#x}
        set $n = 0
        while $n < 10
          continue
          printf "STOP cr3=%#lx i=%ld\\n", $cr3, $rdi
          set $n = $n + 1
        end
        monitor cr3-filter
        monitor cr3-filter off
        monitor cr3-filter
        delete
        continue
        """,
    )
    out, text = session.finish()
    stops = re.findall(r"STOP cr3=(0x[0-9a-f]+) i=(\d+)", text)
    assert [int(c, 16) for c, _ in stops] == [root_b] * 10, text
    assert [int(i) for _, i in stops] == list(range(1, 20, 2))
    assert "cr3 = 0x10000 (vCPU 0, thread 1)" in text
    # The ten hits under the other root (i = 0, 2, ..., 18) ran on and were counted.
    assert f"cr3-filter: {root_b:#x}, skipped 10 hits" in text, text
    assert "cr3-filter: off" in text
    assert "exited normally" in text
    assert out.reports == [sum(range(20))]
    assert session.stub.skipped == 10


SPIN = r"""
#include "kvmkit_guest.h"
volatile u64 release;
volatile u64 spins;
int main(void) {
    while (!release) spins++;
    guest_report(spins > 0);
    return 0;
}
"""


def test_ctrl_c_stops_a_spinning_guest_and_detach_lets_it_finish(session: Session) -> None:
    elf = session.tmp / "guest.elf"
    load_c_keep_elf(session.guest, SPIN, elf)
    session.stub.start_stopped()
    session.stub.listen("tcp:127.0.0.1:0")
    session.start_gdb(
        elf,
        """
        continue
        printf "STOPPED spins=%ld\\n", spins
        set var release = 1
        detach
        """,
    )
    gdb = session.gdb
    assert gdb is not None

    def interrupt() -> None:
        # Wait until gdb resumed the guest, let it spin, then Ctrl-C gdb.
        deadline = time.monotonic() + 30
        while session.stub.stops < 1 or session.stub.stop_requested:
            if time.monotonic() > deadline:
                return
            time.sleep(0.05)
        time.sleep(1.0)
        gdb.send_signal(signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    out, text = session.finish()
    assert "received signal SIGINT" in text, text
    spins = int(re.search(r"STOPPED spins=(\d+)", text).group(1))  # type: ignore[union-attr]
    assert spins > 0
    assert out.status == 0 and out.reports == [1]


# -- protocol errors, from a raw socket


def _recv_until(sock: socket.socket, pred: bytes, timeout: float = 10) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while pred not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def _exchange(sock: socket.socket, raw: bytes) -> bytes:
    sock.sendall(raw)
    return _recv_until(sock, b"#")


def test_protocol_errors_get_error_replies_and_the_vm_keeps_running(session: Session) -> None:
    session.guest.load_c(SPIN)
    addr = session.stub.listen("tcp:127.0.0.1:0")
    result: list[GuestOutput] = []
    runner = threading.Thread(
        target=lambda: result.append(run_tiny_guest(session.guest, session.stub, timeout=60)),
        daemon=True,
    )
    # The kick signal needs a handler installed from the main thread (TinyGuest did that).
    runner.start()
    host, port = addr.removeprefix("tcp:").rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        # Attaching stopped the guest; `?` says so, with the CR3.
        assert re.search(rb"\+\$T05thread:1;cr3:10000;#..", _exchange(sock, b"$?#3f"))
        sock.sendall(b"$?#00")  # bad checksum: NAK, the sender must resend
        assert _recv_until(sock, b"-") == b"-"
        # Garbage outside packets is ignored; a malformed checksum is an error.
        reply = _exchange(sock, b"garbage\x01\x02$g#zz")
        assert b"$E02#" in reply
        # Oversized packet: dropped whole, then an error.
        big = b"M100000,1:" + b"0" * (rsp.DEFAULT_MAX_PAYLOAD + 100)
        reply = _exchange(sock, rsp.encode_packet(big))
        assert b"$E01#" in reply
        # Reads of unmapped or absurd addresses, bad register numbers, bad hex.
        for bad, want in (
            (b"m7fff00000000,10", b"E14"),  # beyond the 4 GiB identity map
            (b"mffff800000000000,8", b"E14"),
            (b"m1234567890123456789,8", b"E16"),  # wider than 64 bits
            (b"m100000", b"E16"),
            (b"p9999", b"E16"),
            (b"pzz", b"E16"),
            (b"P10=12", b"E16"),  # rip needs 8 bytes
            (b"Z1,100000,1", b"OK"),
            (b"z1,100000,1", b"OK"),
            (b"Z2,100001,4", b"E16"),  # unaligned watchpoint
            (b"Hg99", b"E16"),
            (b"qXfer:features:read:other.xml:0,100", b"E00"),
        ):
            reply = _exchange(sock, rsp.encode_packet(bad))
            assert b"$" + want + b"#" in reply, (bad, reply)
        # The stub still answers properly, and reads real memory.
        reply = _exchange(sock, rsp.encode_packet(b"m100000,4"))
        assert re.search(rb"\$[0-9a-f]{8}#", reply), reply
        reply = _exchange(sock, rsp.encode_packet(b"qXfer:features:read:target.xml:0,40"))
        assert b"$m<?xml" in reply
        # Run, interrupt with 0x03, then detach: the guest finishes once released.
        sock.sendall(rsp.encode_packet(b"c"))
        _recv_until(sock, b"+")
        time.sleep(0.3)
        reply = _exchange(sock, b"\x03")
        assert re.search(rb"\$T02thread:1;cr3:10000;#", reply), reply
        session.guest.mem.write_u64(_sym(session, "release"), 1)
        assert b"$OK#" in _exchange(sock, rsp.encode_packet(b"D"))
    runner.join(30)
    assert result and result[0].reports == [1]


def _sym(session: Session, name: str) -> int:
    return session.guest.symbols[name]
