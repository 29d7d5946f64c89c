"""Soak test: many concurrent tiny-guest microVMs through the API, with traffic and lifecycle,
watched for failures and for resource growth (issue 19).

    make soak                                  # 50 VMs for 10 minutes
    make soak SOAK_ARGS="--vms 10 --duration 120"
    .venv/bin/python bench/soak.py --help

Each VM is a `kvmkit-firecracker --api-sock` process configured through the API with a
virtio-blk drive and a vsock device, booting bench/soak_guest.c (a PVH kernel whose drivers
run at CPL3, natively on a PVM host, and which sleeps in HLT between rounds). The guest
keeps writing, reading back and checking a sector, and sending 64 bytes over vsock to host
port 5000, where this script echoes them; the guest checks the echo.

Lifecycle, per VM, every --lifecycle seconds (staggered), in turn:
  1. pause, snapshot create, destroy the process (SIGTERM), restore the snapshot in a new
     process (PUT /snapshot/load with resume_vm): the guest reconnects after the vsock
     transport reset;
  2. pause, then resume;
  3. destroy, then create a fresh VM (configure and InstanceStart).

Every --sample seconds it records, per VMM process, open fds (/proc/PID/fd), RSS and threads
(/proc/PID/status) and CPU time, prints the totals with the range across VMMs, and checks:
no VMM died unexpectedly, no API request failed, no guest printed FAIL, every VM that ran
through the interval made progress (its console and its echo count grew). At the end it
checks for growth after warm-up: per VMM process (its first samples after --vmm-warmup
against its last), and in total per VMM. Any failure is printed and the exit status is 1.
All samples go to WORKDIR/samples.csv.

Not a CI test (`make soak`). Needs root (for /dev/kvm) and gcc.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import selectors
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmkit.api.client import request

HERE = Path(__file__).resolve().parent
GUEST_SOURCE = HERE / "soak_guest.c"
VSOCK_PORT = 5000  # the guest's bench/soak_guest.c VSOCK_PORT
TICK_MS = 20  # its SOAK_TICK_MS
CLK_TCK = os.sysconf("SC_CLK_TCK")


def build_guest(out: Path) -> Path:
    subprocess.run([
        "gcc", "-m64", "-O2", "-std=gnu11", "-ffreestanding", "-fno-builtin", "-nostdlib",
        "-static", "-fno-pic", "-fno-pie", "-no-pie", "-mno-red-zone", "-mgeneral-regs-only",
        "-fno-stack-protector", "-fno-asynchronous-unwind-tables", "-fcf-protection=none",
        "-Wall", "-Werror", "-Wl,-Ttext=0x100000", "-Wl,--build-id=none", "-Wl,-N",
        "-Wl,--no-warn-rwx-segments", "-e", "_start", "-o", str(out), str(GUEST_SOURCE),
    ], check=True)  # fmt: skip
    return out


class Echo:
    """The host end of every VM's vsock traffic: a listener at `<uds_path>_5000` per VM
    (where the VMM connects a guest's connection to host port 5000), echoing what comes in
    and counting it per VM, all on one thread."""

    def __init__(self) -> None:
        self.sel = selectors.DefaultSelector()
        self.lock = threading.Lock()
        self.bytes: dict[int, int] = {}
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="echo", daemon=True)

    def listen(self, slot: int, path: Path) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(str(path))
        s.listen(8)
        s.setblocking(False)
        self.bytes[slot] = 0
        self.sel.register(s, selectors.EVENT_READ, ("listen", slot))

    def _run(self) -> None:
        while not self.stopping:
            for key, _ in self.sel.select(0.5):
                kind, slot = key.data
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                if kind == "listen":
                    with contextlib.suppress(OSError):
                        conn, _ = sock.accept()
                        conn.setblocking(False)
                        self.sel.register(conn, selectors.EVENT_READ, ("conn", slot))
                    continue
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self.sel.unregister(sock)
                    sock.close()
                    continue
                with contextlib.suppress(OSError):
                    sock.sendall(data)  # 64-byte rounds: the socket buffer always has room
                with self.lock:
                    self.bytes[slot] += len(data)

    def count(self, slot: int) -> int:
        with self.lock:
            return self.bytes[slot]

    def close(self) -> None:
        self.stopping = True
        self.thread.join(5)
        for key in list(self.sel.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        self.sel.close()


@dataclass
class Vmm:
    """One kvmkit-firecracker process."""

    slot: int
    generation: int
    proc: subprocess.Popen[bytes]
    sock: str
    console: Path
    err: Path
    started: float
    how: str  # "boot" or "restore"
    samples: list[tuple[float, int, int, int]] = field(default_factory=list)  # t, fds, rss, thr


@dataclass
class Slot:
    index: int
    dir: Path
    vmm: Vmm | None = None
    generations: int = 0
    step: int = 0  # the next lifecycle step
    busy: bool = False  # a lifecycle step is running
    running_since: float = 0.0  # the guest has been running (not paused) since
    last_dots: int = 0
    last_echo: int = 0
    ops: dict[str, int] = field(default_factory=dict)


class Soak:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.kernel = build_guest(workdir / "soak.elf")
        self.echo = Echo()
        self.failures: list[str] = []
        self.fail_lock = threading.Lock()
        self.slots = [Slot(i, workdir / f"vm{i:02d}") for i in range(args.vms)]
        self.finished: list[Vmm] = []  # VMM processes that ended (lifecycle)
        self.cpu_seen: dict[int, float] = {}  # pid -> CPU seconds at its last sample
        self.t0 = time.monotonic()
        self.env = dict(os.environ, KVMKIT_FORCE_RUN="1")
        for s in self.slots:
            s.dir.mkdir()
            with (s.dir / "disk.img").open("wb") as f:
                f.truncate(1 << 20)
            self.echo.listen(s.index, s.dir / f"v.sock_{VSOCK_PORT}")

    # -- failures
    def fail(self, message: str) -> None:
        with self.fail_lock:
            self.failures.append(message)
        print(f"[{self.now():7.1f}s] FAILURE: {message}", flush=True)

    def now(self) -> float:
        return time.monotonic() - self.t0

    # -- one VMM process
    def spawn(self, slot: Slot, how: str) -> Vmm:
        slot.generations += 1
        g = slot.generations
        sock = str(slot.dir / "api.sock")
        console, err = slot.dir / f"console.{g}", slot.dir / f"err.{g}"
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvmkit.cli.firecracker", "--api-sock", sock,
             "--id", f"soak-{slot.index}-{g}"],
            stdout=console.open("wb"), stderr=err.open("wb"), stdin=subprocess.DEVNULL,
            env=self.env, cwd=slot.dir,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
                raise RuntimeError(f"vm{slot.index}: the API socket did not appear: "
                                   f"{err.read_text(errors='replace')[-500:]}")  # fmt: skip
            time.sleep(0.05)
        return Vmm(slot.index, g, proc, sock, console, err, time.monotonic(), how)

    def api(self, vmm: Vmm, method: str, path: str, body: Any = None) -> Any:
        status, value = request(vmm.sock, method, path, body, timeout=120)
        if status not in (200, 204):
            raise RuntimeError(f"vm{vmm.slot}.{vmm.generation}: {method} {path}: {status} {value}")
        return value

    def _abandon(self, vmm: Vmm) -> None:
        """A VMM whose start or restore failed (reported by the caller): killed, not left
        holding its slot's sockets."""
        if vmm.proc.poll() is None:
            vmm.proc.kill()
            vmm.proc.wait(10)
        self.finished.append(vmm)

    def boot(self, slot: Slot) -> None:
        vmm = self.spawn(slot, "boot")
        try:
            self._configure(slot, vmm)
        except BaseException:
            self._abandon(vmm)
            raise
        slot.vmm = vmm
        self._running(slot)

    def _configure(self, slot: Slot, vmm: Vmm) -> None:
        self.api(vmm, "PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32})
        self.api(vmm, "PUT", "/boot-source", {
            "kernel_image_path": str(self.kernel),
            "boot_args": f"soak.ticks={max(1, self.args.round_ms // TICK_MS)}",
        })  # fmt: skip
        self.api(vmm, "PUT", "/drives/disk", {"drive_id": "disk", "is_root_device": False,
                                              "path_on_host": str(slot.dir / "disk.img")})
        self.api(vmm, "PUT", "/vsock", {"guest_cid": 3, "uds_path": str(slot.dir / "v.sock")})
        self.api(vmm, "PUT", "/actions", {"action_type": "InstanceStart"})

    def restore(self, slot: Slot) -> None:
        vmm = self.spawn(slot, "restore")
        try:
            self.api(vmm, "PUT", "/snapshot/load", {
                "snapshot_path": str(slot.dir / "snap.state"),
                "mem_backend": {"backend_type": "File",
                                "backend_path": str(slot.dir / "snap.mem")},
                "resume_vm": True,
            })  # fmt: skip
        except BaseException:
            self._abandon(vmm)
            raise
        slot.vmm = vmm
        self._running(slot)

    def _running(self, slot: Slot) -> None:
        slot.running_since = time.monotonic()
        assert slot.vmm is not None
        slot.last_dots = slot.vmm.console.read_bytes().count(b".")
        slot.last_echo = self.echo.count(slot.index)

    def destroy(self, slot: Slot) -> None:
        vmm = slot.vmm
        assert vmm is not None
        slot.vmm = None
        vmm.proc.send_signal(signal.SIGTERM)
        try:
            status = vmm.proc.wait(60)
        except subprocess.TimeoutExpired:
            vmm.proc.kill()
            vmm.proc.wait(10)
            self.fail(f"vm{slot.index}.{vmm.generation}: did not exit within 60 s of SIGTERM")
            return
        if status != 130:
            self.fail(f"vm{slot.index}.{vmm.generation}: exit status {status} after SIGTERM "
                      "(130 expected)")  # fmt: skip
        self.check_console(slot, vmm)
        text = vmm.err.read_text(errors="replace")
        if "Traceback" in text:
            self.fail(f"vm{slot.index}.{vmm.generation}: traceback on stderr:\n{text[-2000:]}")
        self.finished.append(vmm)

    def check_console(self, slot: Slot, vmm: Vmm) -> int:
        """The guest's progress marks ('.'); a FAIL line is a failure."""
        text = vmm.console.read_bytes()
        at = text.find(b"FAIL")
        if at >= 0:
            line = text[at:].split(b"\n")[0].decode(errors="replace")
            self.fail(f"vm{slot.index}.{vmm.generation}: the guest says: {line}")
            vmm.console.write_bytes(text.replace(b"FAIL", b"fail"))  # report once
        return text.count(b".")

    # -- lifecycle
    def lifecycle(self, slot: Slot) -> None:
        step = slot.step % 3
        slot.step += 1
        try:
            vmm = slot.vmm
            if vmm is None:  # its VMM died (reported): a new one
                self.boot(slot)
                return
            if step in (0, 1):
                self.api(vmm, "PATCH", "/vm", {"state": "Paused"})
                slot.running_since = float("inf")
            if step == 0:
                self.api(vmm, "PUT", "/snapshot/create", {
                    "snapshot_path": str(slot.dir / "snap.state"),
                    "mem_file_path": str(slot.dir / "snap.mem"),
                })  # fmt: skip
                self.destroy(slot)
                self.restore(slot)
                name = "snapshot+destroy+restore"
            elif step == 1:
                self.api(vmm, "PATCH", "/vm", {"state": "Resumed"})
                self._running(slot)
                name = "pause+resume"
            else:
                self.destroy(slot)
                self.boot(slot)
                name = "destroy+create"
            slot.ops[name] = slot.ops.get(name, 0) + 1
        except Exception as err:  # every failure is reported; the soak goes on
            self.fail(f"vm{slot.index}: lifecycle step {step}: {err}")
            with contextlib.suppress(Exception):
                if slot.vmm is not None:
                    self.destroy(slot)
                self.boot(slot)
        finally:
            slot.busy = False

    # -- sampling
    def sample(self, writer: Any, interval_start: float) -> dict[str, Any]:
        now = time.monotonic()
        fds, rss, thr, cpu = [], [], [], 0.0
        for slot in self.slots:
            vmm = slot.vmm
            if vmm is None or slot.busy:
                continue
            pid = vmm.proc.pid
            if vmm.proc.poll() is not None:
                if slot.vmm is vmm and not slot.busy:
                    self.fail(f"vm{slot.index}.{vmm.generation}: the VMM exited with "
                              f"{vmm.proc.returncode}: "
                              f"{vmm.err.read_text(errors='replace')[-1000:]}")  # fmt: skip
                    slot.vmm = None  # the next lifecycle step boots a new one
                    self.finished.append(vmm)
                continue
            try:
                n_fds = len(os.listdir(f"/proc/{pid}/fd"))
                status = Path(f"/proc/{pid}/status").read_text()
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            fields = {k: v.split() for k, v in (ln.split(":", 1) for ln in status.splitlines())}
            r, t = int(fields["VmRSS"][0]), int(fields["Threads"][0])
            parts = stat[stat.rindex(")") + 2 :].split()
            used = (int(parts[11]) + int(parts[12])) / CLK_TCK
            cpu += used - self.cpu_seen.get(pid, 0.0)  # a new process: all it used so far
            self.cpu_seen[pid] = used
            vmm.samples.append((now, n_fds, r, t))
            fds.append(n_fds)
            rss.append(r)
            thr.append(t)
            writer.writerow([f"{self.now():.1f}", slot.index, vmm.generation, vmm.how, pid,
                             n_fds, r, t])  # fmt: skip
            # progress of a guest that ran through the whole interval
            dots = self.check_console(slot, vmm)
            echo = self.echo.count(slot.index)
            if slot.running_since <= interval_start:
                if dots <= slot.last_dots:
                    self.fail(f"vm{slot.index}.{vmm.generation}: no progress on the console "
                              f"in {now - interval_start:.0f} s")  # fmt: skip
                if echo <= slot.last_echo:
                    self.fail(f"vm{slot.index}.{vmm.generation}: no vsock echo in "
                              f"{now - interval_start:.0f} s")  # fmt: skip
            slot.last_dots, slot.last_echo = dots, echo
        own_fds = len(os.listdir("/proc/self/fd"))
        return {"t": self.now(), "n": len(fds), "fds": fds, "rss": rss, "thr": thr,
                "cpu": cpu, "own_fds": own_fds}  # fmt: skip

    def run(self) -> int:
        args = self.args
        self.echo.thread.start()
        print(f"soak: {args.vms} VMs, {args.duration} s, lifecycle every {args.lifecycle} s "
              f"per VM, a round every {args.round_ms} ms, samples every {args.sample} s; "
              f"workdir {self.workdir}", flush=True)  # fmt: skip
        print(f"soak: host load average at start: {os.getloadavg()[0]:.2f} "
              f"({os.cpu_count()} CPUs)", flush=True)  # fmt: skip
        pool = ThreadPoolExecutor(max_workers=args.parallel)
        t_start = time.monotonic()
        for fut in [pool.submit(self.boot, s) for s in self.slots]:
            try:
                fut.result()
            except Exception as err:
                self.fail(f"start: {err}")
        print(f"soak: {sum(s.vmm is not None for s in self.slots)} VMs started in "
              f"{time.monotonic() - t_start:.1f} s", flush=True)  # fmt: skip
        # staggered lifecycle: slot i's first step after lifecycle * (i + 1) / vms seconds
        begin = time.monotonic()
        next_op = {s.index: begin + args.lifecycle * (s.index + 1) / args.vms for s in self.slots}
        history: list[dict[str, Any]] = []
        next_sample = begin + args.sample
        interval_start = begin
        with (self.workdir / "samples.csv").open("w", newline="") as out:
            writer = csv.writer(out)
            writer.writerow(["t_s", "vm", "generation", "how", "pid", "fds", "rss_kib",
                             "threads"])  # fmt: skip
            while time.monotonic() - begin < args.duration:
                now = time.monotonic()
                for s in self.slots:
                    if not s.busy and now >= next_op[s.index]:
                        s.busy = True
                        next_op[s.index] = now + args.lifecycle
                        pool.submit(self.lifecycle, s)
                if now >= next_sample:
                    point = self.sample(writer, interval_start)
                    out.flush()
                    interval_start = now
                    next_sample += args.sample
                    history.append(point)
                    self._print(point, point["cpu"] if len(history) > 1 else None)
                time.sleep(0.2)
        pool.shutdown(wait=True)
        for s in self.slots:
            if s.vmm is not None:
                self.destroy(s)
        self.echo.close()
        self.check_growth(history)
        self.report(history)
        if self.failures:
            print(f"SOAK FAILED: {len(self.failures)} failure(s):", flush=True)
            for line in self.failures:
                print(f"  - {line}")
            return 1
        print("SOAK PASSED", flush=True)
        return 0

    def _print(self, p: dict[str, Any], cpu_delta: float | None) -> None:
        def rng(values: list[int], scale: float = 1.0) -> str:
            if not values:
                return "-"
            lo, hi = min(values) / scale, max(values) / scale
            return f"{sum(values) / scale:.0f} ({lo:.0f}-{hi:.0f})"

        busy = sum(s.busy for s in self.slots)
        # CPU the sampled VMM processes used since the previous sample (a new process: since
        # it started), in % of one CPU
        cpu = (f"  VMM CPU {100 * cpu_delta / self.args.sample:.0f}%" if cpu_delta is not None
               else "")  # fmt: skip
        print(f"[{p['t']:7.1f}s] VMMs {p['n']:3d} (+{busy} in lifecycle)  fds {rng(p['fds'])}  "
              f"RSS MiB {rng(p['rss'], 1024)}  threads {rng(p['thr'])}{cpu}  "
              f"load {os.getloadavg()[0]:.1f}  failures {len(self.failures)}", flush=True)

    def check_growth(self, history: list[dict[str, Any]]) -> None:
        args = self.args
        # per VMM process: the first samples after its own warm-up against its last ones
        for vmm in [*self.finished, *(s.vmm for s in self.slots if s.vmm is not None)]:
            late = [x for x in vmm.samples if x[0] - vmm.started >= args.vmm_warmup]
            if len(late) < 4:
                continue
            first, last = late[:2], late[-2:]
            name = f"vm{vmm.slot}.{vmm.generation} ({vmm.how})"
            for i, what, slack in ((1, "fds", 2), (3, "threads", 2)):
                a, b = min(x[i] for x in first), min(x[i] for x in last)
                if b > a + slack:
                    self.fail(f"{name}: {what} grew from {a} to {b} over "
                              f"{late[-1][0] - late[0][0]:.0f} s after warm-up")  # fmt: skip
            a, b = min(x[2] for x in first), min(x[2] for x in last)
            if b > a * 1.10 + 2048:
                self.fail(f"{name}: RSS grew from {a} KiB to {b} KiB over "
                          f"{late[-1][0] - late[0][0]:.0f} s after warm-up")  # fmt: skip
        # in total, per VMM (the number of VMMs sampled varies with the lifecycle)
        points = [p for p in history if p["t"] >= args.warmup and p["n"]]
        if len(points) < 6:
            print(f"soak: only {len(points)} samples after the {args.warmup} s warm-up: the "
                  "total growth check needs 6", flush=True)  # fmt: skip
            return
        third = len(points) // 3
        for key, what, limit in (("fds", "fds", 1.05), ("thr", "threads", 1.05),
                                 ("rss", "RSS", 1.10)):  # fmt: skip
            per = [sum(p[key]) / p["n"] for p in points]
            a, b = statistics.mean(per[:third]), statistics.mean(per[-third:])
            if b > a * limit:
                self.fail(f"total {what} per VMM grew after warm-up: {a:.1f} -> {b:.1f}")
        own = [p["own_fds"] for p in points]
        if own[-1] > own[0] + 5:
            self.fail(f"the soak's own fds grew: {own[0]} -> {own[-1]}")

    def report(self, history: list[dict[str, Any]]) -> None:
        print("\nper VM (all its VMM processes): generations, lifecycle operations, "
              "fds / RSS MiB / threads as min-max over its samples", flush=True)
        allv = [*self.finished]
        for s in self.slots:
            mine = [v for v in allv if v.slot == s.index]
            samples = [x for v in mine for x in v.samples]
            if not samples:
                print(f"  vm{s.index:02d}: no samples")
                continue
            done = ", ".join(f"{k} {v}" for k, v in sorted(s.ops.items()))
            fd, rs, th = ([x[i] for x in samples] for i in (1, 2, 3))
            print(f"  vm{s.index:02d}: {s.generations} processes ({done}); "
                  f"fds {min(fd)}-{max(fd)}, RSS {min(rs) / 1024:.1f}-{max(rs) / 1024:.1f}, "
                  f"threads {min(th)}-{max(th)}")
        late = [p for p in history if p["t"] >= self.args.warmup and p["n"]]
        if late:
            def span(key: str, scale: float = 1.0) -> str:
                per = [sum(p[key]) / p["n"] / scale for p in late]
                tot = [sum(p[key]) / scale for p in late]
                return (f"per VMM {per[0]:.1f} -> {per[-1]:.1f} (min {min(per):.1f}, max "
                        f"{max(per):.1f}); total {tot[0]:.0f} -> {tot[-1]:.0f}")

            print(f"after warm-up ({len(late)} samples, {late[0]['t']:.0f}-{late[-1]['t']:.0f} s):")
            print(f"  fds:     {span('fds')}")
            print(f"  RSS MiB: {span('rss', 1024)}")
            print(f"  threads: {span('thr')}")
        ops: dict[str, int] = {}
        for s in self.slots:
            for k, v in s.ops.items():
                ops[k] = ops.get(k, 0) + v
        echo = sum(self.echo.bytes.values())
        procs = sum(s.generations for s in self.slots)
        print(f"lifecycle operations: {ops}; VMM processes: {procs}; vsock bytes echoed: {echo}",
              flush=True)  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=50)
    ap.add_argument("--duration", type=float, default=600, help="seconds (default 600)")
    ap.add_argument("--lifecycle", type=float, default=90,
                    help="seconds between lifecycle steps of one VM (default 90)")
    ap.add_argument("--round-ms", type=int, default=200,
                    help="the guest's sleep between rounds of traffic (default 200 ms)")
    ap.add_argument("--sample", type=float, default=15, help="seconds between samples")
    ap.add_argument("--warmup", type=float, default=120,
                    help="seconds before the total growth check starts (default 120)")
    ap.add_argument("--vmm-warmup", type=float, default=30,
                    help="seconds of a VMM process's life before its growth check starts")
    ap.add_argument("--parallel", type=int, default=4, help="lifecycle operations at once")
    ap.add_argument("--workdir", type=Path, help="default: a temporary directory, removed")
    ap.add_argument("--keep", action="store_true", help="keep the workdir")
    args = ap.parse_args()
    if args.vms < 1 or args.duration <= 0:
        ap.error("--vms and --duration must be positive")
    if shutil.which("gcc") is None:
        print("soak: gcc is needed to build the guest", file=sys.stderr)
        return 2
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kvmkit-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    soak = Soak(args, workdir)
    try:
        return soak.run()
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return 130
    finally:
        for s in soak.slots:
            if s.vmm is not None and s.vmm.proc.poll() is None:
                s.vmm.proc.kill()
                s.vmm.proc.wait(10)
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
        elif args.keep or args.workdir is not None:
            print(f"soak: samples in {workdir / 'samples.csv'}")


if __name__ == "__main__":
    sys.exit(main())
