"""Snapshot benchmark: kvmkit against QEMU, snapshot create and restore-to-running latency.

For each guest size (128 MiB and 2 GiB by default) and each VMM, one boot of the default
guest image whose command fills a quarter of guest memory with data (a copy of a random
seed, so neither VMM can skip it as zero pages), prints "ready", then ticks every 0.1 s.

- create: from the request to pause until the snapshot is complete on disk. kvmkit:
  `Machine.pause()` + `snapshot_machine(machine, state, mem)` (full). QEMU: QMP `stop`, then
  `migrate "exec:cat > FILE"` (the classic way to save a VM to a file; QEMU 7.2 has no
  `file:` URI) with max-bandwidth unlimited, polled with `query-migrate` until completed.
- restore to running: from starting the restoring process until the guest prints its next
  tick (it runs again). kvmkit: `kvmkit restore --state --mem` (includes the Python
  interpreter's start, measured alone too); QEMU: the same command line plus
  `-incoming "exec:cat FILE"`. kvmkit in-process: `restore_machine()` + `start()` until the
  next tick, i.e. without the interpreter.

kvmkit maps the memory file MAP_PRIVATE (pages are read when first touched), so its restore
should not grow with guest memory; QEMU's incoming migration reads the whole stream first.
Needs hardware-style KVM: on a host without VMX/SVM run it in the lane, with memory for the
2 GiB guest, its files and QEMU's:

    python -m kvmkit lane --mem-mib 8192 -- .venv/bin/python bench/snapshot.py [--runs N]

Prints a table and the ratios kvmkit/QEMU. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvmkit.image.guest import default_image
from kvmkit.vmm.config import MachineConfig
from kvmkit.vmm.console import new_nonce
from kvmkit.vmm.machine import BASE_CMDLINE, Machine, _cmdline_quote
from kvmkit.vmm.snapshot import restore_machine, snapshot_machine

SEED_MIB = 16


def guest_command(fill_mib: int) -> list[str]:
    copies = max(fill_mib // SEED_MIB, 0)
    script = (
        f"head -c {SEED_MIB}m /dev/urandom > /tmp/seed; "
        f"i=0; while [ $i -lt {copies} ]; do cat /tmp/seed >> /tmp/fill; i=$((i+1)); done; "
        "echo ready; n=0; while :; do n=$((n+1)); echo tick $n; sleep 0.1; done"
    )
    return ["sh", "-c", script]


class Ticks:
    """Guest command output: when "ready" and the first tick after a mark were seen."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.lock = threading.Condition()

    def feed(self, data: bytes) -> None:
        with self.lock:
            self.buf += data
            self.lock.notify_all()

    def wait_for(self, needle: bytes, start: int = 0, timeout: float = 300) -> bool:
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.buf.find(needle, start) < 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.lock.wait(left)
            return True


def reader(stream: Any, sink: Callable[[bytes], None]) -> threading.Thread:
    def run() -> None:
        while chunk := stream.read1(65536):
            sink(chunk)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


# -- kvmkit


def kvmkit_create(mem_mib: int, fill_mib: int, work: Path) -> tuple[float, Path, Path]:
    ticks = Ticks()
    cfg = MachineConfig(mem_mib=mem_mib, command=guest_command(fill_mib))
    state, mem = work / "vm.state", work / "vm.mem"
    with Machine(cfg, command_output=ticks.feed) as vm:
        vm.start()
        if not ticks.wait_for(b"tick 1\n"):
            raise RuntimeError(f"kvmkit guest did not start ticking: {vm.console.tail()!r}")
        t0 = time.monotonic()
        vm.pause()
        snapshot_machine(vm, state, mem)
        took = time.monotonic() - t0
    return took, state, mem


def kvmkit_restore_process(state: Path, mem: Path) -> float:
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmkit", "restore", "--state", str(state), "--mem", str(mem)],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    ticks = Ticks()
    reader(proc.stdout, ticks.feed)
    ok = ticks.wait_for(b"tick ")
    took = time.monotonic() - t0
    proc.kill()
    proc.wait()
    if not ok:
        raise RuntimeError("kvmkit restore: the guest did not tick")
    return took


def kvmkit_restore_inprocess(state: Path, mem: Path) -> float:
    ticks = Ticks()
    t0 = time.monotonic()
    vm = restore_machine(state, mem, command_output=ticks.feed)
    try:
        vm.start()
        if not ticks.wait_for(b"tick "):
            raise RuntimeError("restore_machine: the guest did not tick")
        return time.monotonic() - t0
    finally:
        vm.close()


def python_start() -> float:
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", "import kvmkit.cli.main"], check=True)
    return time.monotonic() - t0


# -- QEMU


class Qmp:
    def __init__(self, path: Path, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.connect(str(path))
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.file = self.sock.makefile("rwb")
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self.file.readline()
            if not line:
                raise RuntimeError("QMP connection closed")
            msg: dict[str, Any] = json.loads(line)
            if "event" not in msg:
                return msg

    def cmd(self, name: str, **args: Any) -> Any:
        self.file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self.file.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"QMP {name}: {reply['error']}")
        return reply.get("return")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def qemu_argv(mem_mib: int, nonce: str, fill_mib: int, qmp: Path) -> list[str]:
    image = default_image()
    cmdline = (
        f"{BASE_CMDLINE} quiet kvmkit.nonce={nonce} "
        f"kvmkit.cmd={_cmdline_quote(guest_command(fill_mib))}"
    )
    return [
        shutil.which("qemu-system-x86_64") or "qemu-system-x86_64",
        "-M", "pc,accel=kvm", "-cpu", "host", "-m", f"{mem_mib}M", "-smp", "1",
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline,
        "-no-reboot", "-qmp", f"unix:{qmp},server=on,wait=off",
    ]  # fmt: skip


def start_qemu(argv: list[str]) -> tuple[subprocess.Popen[bytes], Ticks]:
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    # The raw console: a restored QEMU prints only what the guest writes after the restore,
    # without the console protocol's BEGIN marker.
    ticks = Ticks()
    reader(proc.stdout, ticks.feed)
    return proc, ticks


def qemu_create(mem_mib: int, fill_mib: int, work: Path) -> tuple[float, list[str], Path]:
    nonce = new_nonce()
    qmp_path = work / "qmp.sock"
    argv = qemu_argv(mem_mib, nonce, fill_mib, qmp_path)
    proc, ticks = start_qemu(argv)
    out = work / "qemu.mig"
    try:
        qmp = Qmp(qmp_path)
        if not ticks.wait_for(b"tick 1\n"):
            raise RuntimeError("QEMU guest did not start ticking")
        qmp_path.unlink()  # the restoring QEMU binds the same path
        # QEMU 7.2 throttles migration to 32 MiB/s by default: lift it for a local file.
        qmp.cmd("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        t0 = time.monotonic()
        qmp.cmd("stop")
        qmp.cmd("migrate", uri=f"exec:cat > {out}")
        while True:
            status = qmp.cmd("query-migrate").get("status")
            if status == "completed":
                break
            if status in ("failed", "cancelled"):
                raise RuntimeError(f"QEMU migrate: {status}")
            time.sleep(0.005)
        took = time.monotonic() - t0
        qmp.close()
    finally:
        proc.kill()
        proc.wait()
    return took, argv, out


def qemu_restore(argv: list[str], mig: Path, qmp_path: Path) -> float:
    t0 = time.monotonic()
    proc, ticks = start_qemu([*argv, "-incoming", f"exec:cat {mig}"])
    try:
        # The stream carries the source's run state (stopped for the snapshot), so the
        # restored VM waits paused once the stream is in: resume it, as a user would.
        qmp = Qmp(qmp_path)
        while (status := qmp.cmd("query-status")["status"]) == "inmigrate":
            time.sleep(0.002)
        if status != "running":
            qmp.cmd("cont")
        qmp.close()
        if not ticks.wait_for(b"tick "):
            raise RuntimeError("QEMU -incoming: the guest did not tick")
        return time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
        qmp_path.unlink(missing_ok=True)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def data_mib(path: Path) -> float:
    return path.stat().st_blocks * 512 / (1 << 20)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="restores per snapshot (medians)")
    ap.add_argument("--sizes", default="128,2048", help="guest sizes in MiB")
    args = ap.parse_args()
    if not os.path.exists("/dev/kvm"):
        print("no /dev/kvm: run this inside `kvmkit lane`", file=sys.stderr)
        return 2
    image = default_image()
    interp = statistics.median(python_start() for _ in range(args.runs))
    progress(f"interpreter start {interp:.2f} s")
    rows = []
    for mem_mib in (int(s) for s in args.sizes.split(",")):
        fill = mem_mib // 4
        with tempfile.TemporaryDirectory(prefix="kvmkit-bench-") as tmp:
            work = Path(tmp)
            k_create, state, mem = kvmkit_create(mem_mib, fill, work)
            progress(f"{mem_mib} MiB: kvmkit create {k_create:.2f} s")
            k_proc = statistics.median(kvmkit_restore_process(state, mem)
                                       for _ in range(args.runs))  # fmt: skip
            k_inproc = statistics.median(kvmkit_restore_inprocess(state, mem)
                                         for _ in range(args.runs))  # fmt: skip
            progress(f"{mem_mib} MiB: kvmkit restore {k_proc:.2f} s, in-process {k_inproc:.2f} s")
            k_file = data_mib(mem)
            mem.unlink()
            q_create, argv, mig = qemu_create(mem_mib, fill, work)
            progress(f"{mem_mib} MiB: QEMU create {q_create:.2f} s")
            q_restore = statistics.median(qemu_restore(argv, mig, work / "qmp.sock")
                                          for _ in range(args.runs))  # fmt: skip
            q_file = data_mib(mig)
        rows.append((mem_mib, fill, k_create, q_create, k_proc, k_inproc, q_restore, k_file,
                     q_file))  # fmt: skip
        progress(f"{mem_mib} MiB: QEMU restore {q_restore:.2f} s")
    print(f"kernel {image.kernel_release}, 1 vCPU, guest data = 1/4 of RAM, restores: median "
          f"of {args.runs}; Python interpreter + kvmkit import alone: {interp:.2f} s")
    print(f"{'guest':>8} {'data':>6} | {'create kvmkit':>13} {'QEMU':>7} | "
          f"{'restore kvmkit':>14} {'in-proc':>8} {'QEMU':>7} | {'file kvmkit':>11} {'QEMU':>7}")
    for mem_mib, fill, kc, qc, kp, ki, qr, kf, qf in rows:
        print(f"{mem_mib:>5} MiB {fill:>4}M | {kc:>12.2f}s {qc:>6.2f}s | {kp:>13.2f}s "
              f"{ki:>7.2f}s {qr:>6.2f}s | {kf:>8.0f}MiB {qf:>4.0f}MiB")
    for mem_mib, _, kc, qc, kp, ki, qr, _, _ in rows:
        print(f"{mem_mib} MiB: kvmkit / QEMU create x{kc / qc:.2f}, restore (process) "
              f"x{kp / qr:.2f}, restore (in-process) x{ki / qr:.2f}")
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        print(f"restore growth {a[0]} MiB -> {b[0]} MiB: kvmkit in-process x{b[5] / a[5]:.2f}, "
              f"kvmkit process x{b[4] / a[4]:.2f}, QEMU x{b[6] / a[6]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
