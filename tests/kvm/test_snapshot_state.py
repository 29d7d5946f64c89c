"""Snapshot/restore of a running tiny guest into a new VM: registers and memory identical,
a CPL3 counter continues, diff snapshots, bad files rejected, lazy memory mapping."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kvmkit.kvm import IoExit, Kvm, VmExit
from kvmkit.memory import PAGE_SIZE, GuestMemory
from kvmkit.snapshot import SnapshotError, core
from kvmkit.snapshot.memory import enable_dirty_log
from kvmkit.testing import TinyGuest
from kvmkit.vmm.vcpu import VcpuRunner

REPORT_PORT = 0x2200
STEP = 1 << 22
# CPL3: count in r12, store it in its own page, report every STEP iterations.
COUNTER_GUEST = f"""
    xor %r12, %r12
1:  inc %r12
    mov %r12, counter
    test ${STEP - 1}, %r12
    jnz 1b
    mov %r12d, %eax
    mov ${REPORT_PORT}, %dx
    out %eax, %dx
    jmp 1b
    .balign 4096
counter: .quad 0
"""


class Reports:
    def __init__(self) -> None:
        self.values: list[int] = []
        self.cond = threading.Condition()
        self.unexpected: list[str] = []

    def on_exit(self, exit_: VmExit) -> bool:
        if isinstance(exit_, IoExit) and exit_.port == REPORT_PORT:
            with self.cond:
                self.values.append(exit_.value)
                self.cond.notify_all()
            return True
        self.unexpected.append(exit_.describe())
        return False

    def wait(self, n: int, timeout: float = 20) -> None:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.values) >= n, timeout), self.values


def memory_digest(mem: GuestMemory) -> str:
    h = hashlib.sha256()
    for r in mem.regions:
        h.update(r.mapping[:])
    return h.hexdigest()


def counter_guest(kvm: Kvm, mem_size: int = 4 << 20) -> tuple[TinyGuest, int]:
    g = TinyGuest("long64", cpl=3, irqchip=True, kvm=kvm, mem_size=mem_size)
    symbols = g.load_asm(COUNTER_GUEST)
    return g, symbols["counter"]


def test_registers_and_memory_identical_and_counter_continues(tmp_path: Path) -> None:
    with Kvm() as kvm:
        g, counter = counter_guest(kvm)
        with g:
            host = Reports()
            runner = VcpuRunner(g.vcpu, host.on_exit)
            runner.start()
            host.wait(5)
            runner.pause()
            saved_counter = g.mem.read_u64(counter)
            regs, sregs = bytes(g.vcpu.get_regs()), bytes(g.vcpu.get_sregs())
            digest = memory_digest(g.mem)
            last = host.values[-1]
            snap = core.capture(kvm, g.vm, g.vcpus, g.mem, tmp_path / "mem", core.VmSetup())
            core.save(tmp_path / "state", snap)
            runner.stop()
        assert saved_counter >= last
        assert g.vcpu.fd == -1  # the source VM is gone

        restored = core.load(kvm, core.read(tmp_path / "state"), tmp_path / "mem")
        with_restored = Reports()
        try:
            cpu = restored.vcpus[0]
            assert bytes(cpu.get_regs()) == regs
            assert bytes(cpu.get_sregs()) == sregs
            assert memory_digest(restored.mem) == digest
            restored.resume()
            runner = VcpuRunner(cpu, with_restored.on_exit)
            runner.start()
            with_restored.wait(3)
            runner.stop()
        finally:
            restored.close()
    assert not with_restored.unexpected, with_restored.unexpected
    # The next report is the next multiple of STEP after where the guest was paused.
    assert with_restored.values[0] == (saved_counter // STEP + 1) * STEP
    assert with_restored.values[:3] == [with_restored.values[0] + i * STEP for i in range(3)]


def test_diff_snapshot_holds_only_dirtied_pages_and_restores_on_its_base(tmp_path: Path) -> None:
    with Kvm() as kvm:
        g, counter = counter_guest(kvm, mem_size=16 << 20)
        with g:
            enable_dirty_log(g.mem, g.vm)
            host = Reports()
            runner = VcpuRunner(g.vcpu, host.on_exit)
            runner.start()
            host.wait(2)
            runner.pause()
            base = core.capture(kvm, g.vm, g.vcpus, g.mem, tmp_path / "base.mem", core.VmSetup())
            runner.resume()
            host.wait(len(host.values) + 3)
            g.mem.write(0x800000, b"written by the VMM")  # VMM-side dirty tracking
            runner.pause()
            diff = core.capture(
                kvm, g.vm, g.vcpus, g.mem, tmp_path / "diff.mem", core.VmSetup(), diff=True
            )
            core.save(tmp_path / "diff.state", diff)
            digest, regs = memory_digest(g.mem), bytes(g.vcpu.get_regs())
            saved_counter = g.mem.read_u64(counter)
            runner.stop()
        assert base.memory.diff is False and diff.memory.diff is True
        (entry,) = diff.memory.regions
        assert entry.dirty is not None
        pages = {i * 8 + b for i, byte in enumerate(entry.dirty) for b in range(8) if byte >> b & 1}
        print(f"diff snapshot: {len(pages)} dirty pages of {entry.size // PAGE_SIZE}")
        assert counter // PAGE_SIZE in pages and 0x800000 // PAGE_SIZE in pages
        assert len(pages) < 32  # the counter page, the VMM's page, page-table A/D bits
        st = os.stat(tmp_path / "diff.mem")
        assert st.st_size == 16 << 20 and st.st_blocks * 512 <= (len(pages) + 16) * PAGE_SIZE

        with pytest.raises(SnapshotError, match="base"):
            core.load(kvm, core.read(tmp_path / "diff.state"), tmp_path / "diff.mem")
        snap = core.read(tmp_path / "diff.state")
        restored = core.load(kvm, snap, tmp_path / "diff.mem", base_mem=tmp_path / "base.mem")
        after = Reports()
        try:
            assert memory_digest(restored.mem) == digest
            assert bytes(restored.vcpus[0].get_regs()) == regs
            restored.resume()
            runner = VcpuRunner(restored.vcpus[0], after.on_exit)
            runner.start()
            after.wait(2)
            runner.stop()
        finally:
            restored.close()
    assert after.values[0] == (saved_counter // STEP + 1) * STEP


def _good_snapshot(tmp_path: Path, kvm: Kvm) -> None:
    g, _ = counter_guest(kvm)
    with g:
        host = Reports()
        runner = VcpuRunner(g.vcpu, host.on_exit)
        runner.start()
        host.wait(1)
        runner.pause()
        core.save(
            tmp_path / "state",
            core.capture(kvm, g.vm, g.vcpus, g.mem, tmp_path / "mem", core.VmSetup()),
        )
        runner.stop()


class CountingKvm(Kvm):
    created = 0

    def create_vm(self, machine_type: int = 0):  # type: ignore[no-untyped-def]
        CountingKvm.created += 1
        return super().create_vm(machine_type)


@pytest.mark.parametrize("damage", ["truncate", "flip", "version", "arch", "short-mem", "no-mem"])
def test_bad_snapshot_files_rejected_before_any_vm_exists(tmp_path: Path, damage: str) -> None:
    with CountingKvm() as kvm:
        _good_snapshot(tmp_path, kvm)
        state, mem = tmp_path / "state", tmp_path / "mem"
        data = bytearray(state.read_bytes())
        if damage == "truncate":
            state.write_bytes(data[: len(data) // 2])
        elif damage == "flip":
            data[len(data) // 2] ^= 0x40
            state.write_bytes(data)
        elif damage == "version":
            data[8] = 2
            state.write_bytes(data)
        elif damage == "arch":
            data[12:20] = b"aarch64\0"
            state.write_bytes(data)
        elif damage == "short-mem":
            os.truncate(mem, PAGE_SIZE)
        else:
            mem.unlink()
        CountingKvm.created = 0
        with pytest.raises(SnapshotError) as info:
            core.load(kvm, core.read(state), mem)
        assert CountingKvm.created == 0
    print(f"{damage}: {info.value}")


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_restore_maps_memory_privately_and_lazily(tmp_path: Path) -> None:
    figures = []
    with Kvm() as kvm:
        for size in (64 << 20, 1 << 30):
            g, _ = counter_guest(kvm, mem_size=size)
            with g:
                g.mem.fill(size // 2, 1 << 20, 0xA5)  # some non-zero data in the middle
                host = Reports()
                runner = VcpuRunner(g.vcpu, host.on_exit)
                runner.start()
                host.wait(1)
                runner.pause()
                snap = core.capture(kvm, g.vm, g.vcpus, g.mem, tmp_path / "m", core.VmSetup())
                core.save(tmp_path / "s", snap)
                runner.stop()
            data_bytes = os.stat(tmp_path / "m").st_blocks * 512
            rss0 = _rss_kib()
            t0 = time.perf_counter()
            restored = core.load(kvm, core.read(tmp_path / "s"), tmp_path / "m")
            restored.resume()
            elapsed = time.perf_counter() - t0
            try:
                after = Reports()
                runner = VcpuRunner(restored.vcpus[0], after.on_exit)
                runner.start()
                after.wait(2)
                runner.stop()
                rss_growth = (_rss_kib() - rss0) << 10
                maps = Path("/proc/self/maps").read_text()
                lines = [ln for ln in maps.splitlines() if ln.endswith(str(tmp_path / "m"))]
                assert lines and all(ln.split()[1][3] == "p" for ln in lines)  # MAP_PRIVATE
                assert restored.mem.read(size // 2, 4) == b"\xa5" * 4
            finally:
                restored.close()
            figures.append((size >> 20, elapsed, rss_growth >> 20, data_bytes >> 20))
            assert rss_growth < size // 4, "restore must not load guest memory eagerly"
    for mib, elapsed, rss, data in figures:
        print(f"restore of a {mib} MiB guest: {elapsed * 1000:.1f} ms to runnable, "
              f"RSS +{rss} MiB, memory file {data} MiB of data")  # fmt: skip


RESTORE_SCRIPT = """
import sys
from kvmkit.kvm import IoExit, Kvm
from kvmkit.kvm.kick import install_kick_handler
from kvmkit.snapshot import core
install_kick_handler()
with Kvm() as kvm:
    r = core.load(kvm, core.read(sys.argv[1]), sys.argv[2])
    r.resume()
    seen = []
    while len(seen) < 2:
        e = r.vcpus[0].run()
        if isinstance(e, IoExit) and e.port == 0x2200:
            seen.append(e.value)
    print(*seen)
"""


def test_restore_in_a_new_process(tmp_path: Path) -> None:
    with Kvm() as kvm:
        _good_snapshot(tmp_path, kvm)
    snap = core.read(tmp_path / "state")
    env = dict(os.environ, PYTHONPATH=str(Path(core.__file__).parents[2]))
    proc = subprocess.run(
        [sys.executable, "-c", RESTORE_SCRIPT, str(tmp_path / "state"), str(tmp_path / "mem")],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    first, second = map(int, proc.stdout.split())
    regs = snap.vcpus[0].regs
    r12 = int.from_bytes(regs[12 * 8 : 13 * 8], "little")  # kvm_regs: rax..r15, r12 is 13th
    assert first == (r12 // STEP + 1) * STEP and second == first + STEP
