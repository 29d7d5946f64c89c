"""Snapshot a Linux guest mid-command and restore it in a new process with `kvmkit restore`
(needs VMX/SVM: runs in the lane here)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmkit.vmm.config import MachineConfig
from kvmkit.vmm.machine import Machine
from kvmkit.vmm.snapshot import snapshot_machine

pytestmark = pytest.mark.hwvirt

# CLOCK_MONOTONIC in ns, from the "now at N nsecs" line of /proc/timer_list (ktime_get()).
SCRIPT = (
    "mono() { sed -n 's/^now at \\([0-9]*\\) nsecs$/\\1/p' /proc/timer_list; }; "
    "echo begin $(mono); sleep 3; echo done $(mono); exit 7"
)


def test_command_continues_after_restore_in_a_new_process(tmp_path: Path) -> None:
    out = bytearray()
    state, mem = tmp_path / "vm.state", tmp_path / "vm.mem"
    with Machine(MachineConfig(command=["sh", "-c", SCRIPT]), command_output=out.extend) as vm:
        vm.start()
        # The console sees "begin" at once (the command-output parser holds bytes back).
        assert vm.console.wait_for(b"begin ", 600), vm.console.tail()
        time.sleep(1.0)  # well into the sleep
        t0 = time.monotonic()
        vm.pause()
        snapshot_machine(vm, state, mem)
        took = time.monotonic() - t0
    tail = vm.console.tail()
    assert b"done" not in tail
    begin_ns = int(tail.split(b"begin ")[1].split()[0])

    t1 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "kvmkit", "restore", "--state", str(state), "--mem", str(mem)],
        capture_output=True, timeout=600,
    )  # fmt: skip
    restore_wall = time.monotonic() - t1
    print(f"snapshot took {took:.2f} s; restore run {restore_wall:.2f} s; {proc.stdout!r}")
    assert proc.returncode == 7, proc.stderr.decode()
    words = (bytes(out) + proc.stdout).split()  # "begin" may arrive with the rest
    assert words[-2] == b"done" and b"begin" in words
    elapsed = (int(words[-1]) - begin_ns) / 1e9
    print(f"guest CLOCK_MONOTONIC from begin to done: {elapsed:.3f} s")
    # The guest's monotonic clock neither went back nor jumped by the time on disk: the
    # 3 s sleep (nanosleep on CLOCK_MONOTONIC: never less), plus the two `sed` runs and the
    # snapshot itself at most.
    assert 3.0 <= elapsed < 3.0 + took + 2


def test_bad_state_file_is_one_line_and_status_2(tmp_path: Path) -> None:
    (tmp_path / "s").write_bytes(b"KVMKSNAP" + bytes(40))
    proc = subprocess.run(
        [sys.executable, "-m", "kvmkit", "restore", "--state", str(tmp_path / "s"),
         "--mem", str(tmp_path / "m")],
        capture_output=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count(b"\n") == 1 and b"kvmkit restore:" in proc.stderr
