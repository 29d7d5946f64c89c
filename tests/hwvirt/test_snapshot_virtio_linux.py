"""Snapshots of a Linux guest with a virtio-blk disk (needs VMX/SVM: runs in the lane here).

One boot: the guest's shell holds `/dev/vda` open on fd 3 and appends a record through it
every tick (`sync` after each, a virtio FLUSH), printing the tick and its CLOCK_MONOTONIC.
At tick 4 the VM is paused for a full snapshot F1 and resumed; at tick 8 it is paused for a
diff snapshot D2 and, at the same point, a full snapshot F2, then stopped. Then:

- F1's memory with D2 merged into it is byte-identical to F2's memory file, but for
  KVM's steal-time and kvmclock records, which F2's capture lets KVM update;
- `kvmkit restore` of D2 (on F1) and of F2, each in a new process and from the same disk
  image, carry on: the open fd keeps its offset and writes reach the image, a read after
  `drop_caches` comes from the device, the command ends with its status, and both print
  the same ticks and the same checksum;
- across the restore the guest's monotonic clock neither went back nor jumped by more than
  a tick plus the time the snapshot took.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmkit.devices.virtio.blk import DriveConfig
from kvmkit.snapshot import core
from kvmkit.snapshot.memory import merge_diff
from kvmkit.vmm.config import MachineConfig
from kvmkit.vmm.machine import Machine
from kvmkit.vmm.snapshot import snapshot_machine

pytestmark = pytest.mark.hwvirt

TICKS = 16
SCRIPT = rf"""
mono() {{ sed -n 's/^now at \([0-9]*\) nsecs$/\1/p' /proc/timer_list; }}
exec 3<>/dev/vda
i=0
while [ $i -lt {TICKS} ]; do
    i=$((i+1))
    printf 'rec%04d\n' $i >&3
    sync
    echo "tick $i $(mono)"
    sleep 0.3
done
echo 3 > /proc/sys/vm/drop_caches
echo "readback $(head -c {8 * TICKS} /dev/vda | md5sum | cut -d' ' -f1)"
echo "clock $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource) \
$(cat /sys/devices/system/clockevents/clockevent0/current_device)"
grep -E 'LOC|virtio|NMI' /proc/interrupts
exit 5
"""
RECORDS = b"".join(b"rec%04d\n" % i for i in range(1, TICKS + 1))
TICK = re.compile(rb"tick (\d+) (\d+)\r?\n")  # whole lines only
FILL = b"\xee"


def ticks(data: bytes) -> dict[int, int]:
    return {int(n): int(t) for n, t in TICK.findall(data)}


def wait_tick(vm: Machine, n: int, timeout: float = 600) -> None:
    """Until tick n's line is complete on the console (a pause mid-line would cut the
    number it prints)."""
    deadline = time.monotonic() + timeout
    while n not in ticks(vm.console.tail()):
        assert time.monotonic() < deadline, vm.console.tail()
        time.sleep(0.02)


def pause_snapshot(vm: Machine, *snaps: tuple[Path, Path, bool]) -> float:
    t0 = time.monotonic()
    vm.pause()
    for state, mem, diff in snaps:
        snapshot_machine(vm, state, mem, diff=diff)
    return time.monotonic() - t0


def restore(state: Path, mem: Path, extra: list[str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "kvmkit", "restore", "--state", str(state), "--mem", str(mem),
         *extra, "--timeout", "400"],
        capture_output=True, timeout=500,
    )  # fmt: skip


def differing_pages(a: Path, b: Path) -> list[int]:
    """The numbers of the 4 KiB pages that differ (a missing tail reads as zeros)."""
    size = max(a.stat().st_size, b.stat().st_size)
    differ = []
    with a.open("rb") as fa, b.open("rb") as fb:
        for base in range(0, size, 1 << 20):
            ca, cb = fa.read(1 << 20).ljust(1 << 20, b"\0"), fb.read(1 << 20).ljust(1 << 20, b"\0")
            if ca != cb:
                differ += [(base + i) >> 12 for i in range(0, 1 << 20, 4096)
                           if ca[i : i + 4096] != cb[i : i + 4096]]  # fmt: skip
    return differ


# KVM's paravirtual records it writes into guest memory itself on a KVM_RUN (Linux's
# Documentation/virt/kvm/x86/msr.rst): steal time on every entry after the vCPU was loaded
# on a CPU, kvmclock on a clock update. MSR value: the record's guest-physical address,
# low bits flags.
MSR_KVM_STEAL_TIME, MSR_KVM_SYSTEM_TIME_NEW = 0x4B564D03, 0x4B564D01


def kvm_record_pages(state: Path) -> set[int]:
    pages = set()
    for vcpu in core.read(state).vcpus:
        for index, value in vcpu.msrs:
            if index in (MSR_KVM_STEAL_TIME, MSR_KVM_SYSTEM_TIME_NEW) and value & 1:
                pages.add((value & ~0x3F) >> 12)
    return pages


def test_blk_guest_with_open_fd_restores_and_diff_equals_full(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(FILL * (1 << 20))
    f1, d2, f2 = (tmp_path / f"{n}.state" for n in ("f1", "d2", "f2"))
    f1m, d2m, f2m = (tmp_path / f"{n}.mem" for n in ("f1", "d2", "f2"))
    cfg = MachineConfig(
        mem_mib=128, command=["sh", "-c", SCRIPT], drives=[DriveConfig(img, serial="snap")]
    )
    with Machine(cfg) as vm:
        vm.start()
        wait_tick(vm, 4)
        took1 = pause_snapshot(vm, (f1, f1m, False))
        vm.resume()
        wait_tick(vm, 8)
        took2 = pause_snapshot(vm, (d2, d2m, True), (f2, f2m, False))
        image_t2 = img.read_bytes()  # the pause fdatasync'ed what the device wrote
        before = ticks(vm.console.tail())
    print(f"snapshot F1 {took1:.2f} s, D2+F2 {took2:.2f} s; ticks before {sorted(before)}")
    last = max(before)
    assert 8 <= last < TICKS
    # Every record up to the last tick printed was written and synced through fd 3.
    assert image_t2[: 8 * last] == RECORDS[: 8 * last]

    # F1 + D2 is F2: the diff holds every page that changed, the VMM's writes included.
    merged = tmp_path / "merged.mem"
    subprocess.run(["cp", "--sparse=always", str(f1m), str(merged)], check=True)
    merge_diff(core.read(d2).memory, d2m, merged)
    # Except the steal-time and kvmclock records: taking F2 lets KVM deliver pending timer
    # interrupts (a KVM_RUN that enters no guest code, docs/snapshot.md), and that KVM_RUN
    # updates them after D2 was taken.
    differ = differing_pages(merged, f2m)
    print(f"pages F1+D2 and F2 differ in: {differ}")
    assert set(differ) <= kvm_record_pages(f2), (differ, kvm_record_pages(f2))
    assert d2m.stat().st_blocks < f2m.stat().st_blocks  # and it is smaller than a full one

    outputs = []
    for state, mem, extra in ((d2, d2m, ["--base-mem", str(f1m)]), (f2, f2m, [])):
        img.write_bytes(image_t2)  # each restore starts from the disk as it was at t2
        t0 = time.monotonic()
        proc = restore(state, mem, extra)
        wall = time.monotonic() - t0
        print(f"restore {state.name}: {wall:.2f} s, status {proc.returncode}")
        print(proc.stdout.decode(errors="replace"))
        assert proc.returncode == 5, proc.stderr.decode(errors="replace")
        # The open fd went on at its offset; the data is in the image, the rest untouched.
        disk = img.read_bytes()
        assert disk[: len(RECORDS)] == RECORDS
        assert disk[len(RECORDS) :] == FILL * ((1 << 20) - len(RECORDS))
        outputs.append(proc.stdout)
    # The read after drop_caches came from the device and saw every record.
    expected_md5 = hashlib.md5(RECORDS).hexdigest().encode()
    for out in outputs:
        assert b"readback " + expected_md5 in out, out
    # Both restores continue from the same state with the same output (times aside).
    after = [ticks(out) for out in outputs]
    assert sorted(after[0]) == sorted(after[1])
    assert sorted(set(before) | set(after[0])) == list(range(1, TICKS + 1))

    # The monotonic clock across the restore: forward by at least the 0.3 s sleep, and by no
    # more than the longest tick seen while running plus the time the snapshot took.
    for got in after:
        times = {**before, **got}
        gaps = [(times[i + 1] - times[i]) / 1e9 for i in range(1, TICKS)]
        cross = gaps[last - 1]  # tick last -> last + 1 spans the snapshot
        normal = max(g for i, g in enumerate(gaps) if i != last - 1 and i != 3)
        print("gaps", " ".join(f"{g:.2f}" for g in gaps))
        print(f"monotonic gap across the restore {cross:.3f} s, longest other {normal:.3f} s")
        assert 0.3 <= cross <= normal + took2 + 0.5
