"""Live-migration benchmark: kvmkit against QEMU, downtime and total time.

For each guest size (256 MiB and 2 GiB by default), each workload and each VMM, one boot of
the default guest image, migrated once from a source to a destination process on the same
host over a Unix socket, runs interleaved (kvmkit, QEMU, kvmkit, QEMU, ...):

- idle: the guest fills a quarter of its RAM with data (copies of a random seed, so neither
  VMM can send it as zero pages), prints "ready", then only ticks every 0.1 s;
- dirty: the same, then a loop of `dd bs=16M count=1` copies 16 MiB of data (not zeros:
  both VMMs send zero pages as markers) into a fresh buffer as fast as the guest can,
  while it ticks.

kvmkit: the source is a `Machine` in this process, `Machine.migrate()` to a
`kvmkit restore --incoming unix:...` started (and waiting) beforehand. QEMU 7.2: `-M pc`
with KVM, QMP `migrate-set-parameters` (the same downtime limit and bandwidth), `migrate
unix:...` to a QEMU started with `-incoming unix:...`, polled with `query-migrate`.
Reported per migration: the VMM's own downtime and total time (kvmkit: pause to the
destination's acknowledgement, and the whole `migrate()`; QEMU: `downtime` and
`total-time` of `query-migrate`), and the tick gap both see from outside: the time between
the last tick the source printed and the first the destination printed (0.1 s of it is the
tick period; a guest slowed down while its memory goes out counts too). Medians over the
runs, and the ratios kvmkit / QEMU.

A guest that dirties memory faster than it can be sent never fits the downtime target.
kvmkit then stops pre-copy on its own (no fewer dirty pages than the best of the last three
rounds, or 30 rounds) and copies the rest paused. QEMU 7.2 without auto-converge iterates
forever; the benchmark applies kvmkit's rule to it (`dirty-sync-count` rounds and `ram
remaining`) and then raises its downtime limit to 60 s, which makes it stop and copy at
once. Such migrations are marked `forced`.

Needs hardware-style KVM: on a host without VMX/SVM run it in the lane, with room for a
2 GiB source and destination:

    python -m kvmkit lane --cpus 2 --mem-mib 8192 --timeout 7200 -- \\
        .venv/bin/python bench/migration.py [--runs 3] [--sizes 256,2048] [--bandwidth-mib-s N]

(`make bench-migration`). Prints a table. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from snapshot import Qmp, Ticks, reader  # bench/snapshot.py: QMP client, output buffers

from kvmkit.image.guest import default_image
from kvmkit.vmm.config import MachineConfig
from kvmkit.vmm.console import new_nonce
from kvmkit.vmm.machine import BASE_CMDLINE, Machine, _cmdline_quote

SEED_MIB = 16
MIGRATE_TIMEOUT = 900.0  # seconds a migration may take before the run is given up
WORKLOADS = ("idle", "dirty")


def guest_command(fill_mib: int, workload: str) -> list[str]:
    copies = max(fill_mib // SEED_MIB, 0)
    dirty = (
        "yes kvmkit-dirty-data | head -c 16m > /tmp/dseed; "
        "(while :; do dd if=/tmp/dseed of=/dev/null bs=16M count=1 2>/dev/null; done) & "
    ) if workload == "dirty" else ""  # fmt: skip
    script = (
        f"head -c {SEED_MIB}m /dev/urandom > /tmp/seed; "
        f"i=0; while [ $i -lt {copies} ]; do cat /tmp/seed >> /tmp/fill; i=$((i+1)); done; "
        f"{dirty}echo ready; n=0; while :; do n=$((n+1)); echo tick $n; sleep 0.1; done"
    )
    return ["sh", "-c", script]


class TickClock:
    """Host times of each `tick N` line a guest printed (through a Ticks buffer)."""

    def __init__(self) -> None:
        self.ticks = Ticks()
        self.seen: list[float] = []  # when each "tick " arrived (it may come in pieces)

    def feed(self, data: bytes) -> None:
        self.ticks.feed(data)
        now = time.monotonic()
        while len(self.seen) < self.ticks.buf.count(b"tick "):
            self.seen.append(now)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def wait_ready(clock: TickClock, what: str) -> None:
    # Ticks start once the memory is filled (and the dirtying loop runs).
    if not clock.ticks.wait_for(b"tick 3", timeout=900):
        raise RuntimeError(f"{what}: the guest never started ticking")
    time.sleep(1.0)  # let the workload run a little


# -- kvmkit


def run_kvmkit(mem_mib: int, workload: str, downtime_ms: int, bandwidth: float | None,
               work: Path) -> dict[str, float]:  # fmt: skip
    url = f"unix:{work}/k.sock"
    dest_out = TickClock()
    dest = subprocess.Popen(
        [sys.executable, "-m", "kvmkit", "restore", "--incoming", url, "--timeout", "600"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    reader(dest.stdout, dest_out.feed)
    try:
        assert dest.stderr is not None
        line = dest.stderr.readline().decode()
        if "waiting" not in line:
            raise RuntimeError(f"kvmkit restore --incoming: {line}")
        src_out = TickClock()
        cfg = MachineConfig(mem_mib=mem_mib, command=guest_command(mem_mib // 4, workload))
        with Machine(cfg, command_output=src_out.feed) as vm:
            vm.start()
            wait_ready(src_out, "kvmkit")
            result = vm.migrate(url, max_downtime_ms=downtime_ms, bandwidth_mib_s=bandwidth)
        if not dest_out.ticks.wait_for(b"tick ", timeout=120):
            raise RuntimeError("kvmkit: the guest did not tick at the destination")
        gap = dest_out.seen[0] - src_out.seen[-1]
        return {"downtime_ms": result.downtime_ms, "total_s": result.total_s,
                "gap_ms": gap * 1000, "rounds": result.rounds,
                "mib": result.bytes_sent / (1 << 20),
                "forced": float(not result.converged)}  # fmt: skip
    finally:
        dest.kill()
        dest.wait()


# -- QEMU


def qemu_argv(mem_mib: int, workload: str, qmp: Path) -> list[str]:
    image = default_image()
    nonce = new_nonce()
    cmd = _cmdline_quote(guest_command(mem_mib // 4, workload))
    cmdline = f"{BASE_CMDLINE} quiet kvmkit.nonce={nonce} kvmkit.cmd={cmd}"
    return [
        "qemu-system-x86_64", "-M", "pc,accel=kvm", "-cpu", "host", "-m", f"{mem_mib}M",
        "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", "stdio", "-kernel", str(image.kernel), "-initrd", str(image.initrd),
        "-append", cmdline, "-no-reboot", "-qmp", f"unix:{qmp},server=on,wait=off",
    ]  # fmt: skip


def start(argv: list[str], sink: Callable[[bytes], None]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    reader(proc.stdout, sink)
    return proc


def run_qemu(mem_mib: int, workload: str, downtime_ms: int, bandwidth: float | None,
             work: Path) -> dict[str, float]:  # fmt: skip
    src_qmp, dst_qmp, mig = work / "qs.sock", work / "qd.sock", work / "q.sock"
    src_out, dest_out = TickClock(), TickClock()
    argv = qemu_argv(mem_mib, workload, src_qmp)
    dest_argv = [a if a != f"unix:{src_qmp},server=on,wait=off"
                 else f"unix:{dst_qmp},server=on,wait=off" for a in argv]  # fmt: skip
    dest = start([*dest_argv, "-incoming", f"unix:{mig}"], dest_out.feed)
    src = start(argv, src_out.feed)
    try:
        qmp = Qmp(src_qmp)
        Qmp(dst_qmp).close()  # the destination is up and listening
        wait_ready(src_out, "QEMU")
        # QEMU 7.2 caps migration at 32 MiB/s unless told otherwise: the same cap as kvmkit
        # (none unless --bandwidth-mib-s), the same downtime limit.
        rate = int(bandwidth * (1 << 20)) if bandwidth else 1 << 40
        qmp.cmd("migrate-set-parameters", **{"max-bandwidth": rate,
                                             "downtime-limit": downtime_ms})  # fmt: skip
        qmp.cmd("migrate", uri=f"unix:{mig}")
        forced, syncs, remaining = False, 0, []
        deadline = time.monotonic() + MIGRATE_TIMEOUT
        while True:
            info: dict[str, Any] = qmp.cmd("query-migrate")
            if info.get("status") == "completed":
                break
            if info.get("status") in ("failed", "cancelled") or time.monotonic() > deadline:
                raise RuntimeError(f"QEMU migrate: {info}")
            ram = info.get("ram", {})
            if not forced and ram.get("dirty-sync-count", 0) > syncs:
                # kvmkit's rule (kvmkit/migration/send.py): no new low in what is left for
                # three rounds, or 30 rounds: stop and copy.
                syncs = ram["dirty-sync-count"]
                left = ram.get("remaining", 0)
                if (len(remaining) >= 3 and left >= min(remaining[-3:])) or syncs >= 30:
                    qmp.cmd("migrate-set-parameters", **{"downtime-limit": 60000})
                    forced = True
                remaining.append(left)
            time.sleep(0.01)
        qmp.close()
        if not dest_out.ticks.wait_for(b"tick ", timeout=120):
            raise RuntimeError("QEMU: the guest did not tick at the destination")
        ram = info.get("ram", {})
        gap = dest_out.seen[0] - src_out.seen[-1]
        return {"downtime_ms": float(info["downtime"]), "total_s": info["total-time"] / 1000,
                "gap_ms": gap * 1000, "rounds": float(ram.get("dirty-sync-count", 0)),
                "mib": ram.get("transferred", 0) / (1 << 20), "forced": float(forced)}  # fmt: skip
    finally:
        for p in (src, dest):
            p.kill()
            p.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="migrations per case (medians)")
    ap.add_argument("--sizes", default="256,2048", help="guest sizes in MiB")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--max-downtime-ms", type=int, default=300, help="both VMMs' target")
    ap.add_argument("--bandwidth-mib-s", type=float, default=None, help="both VMMs' cap")
    args = ap.parse_args()
    if not os.path.exists("/dev/kvm"):
        print("no /dev/kvm: run this inside `kvmkit lane`", file=sys.stderr)
        return 2
    image = default_image()
    sizes = [int(s) for s in args.sizes.split(",")]
    workloads = args.workloads.split(",")
    results: dict[tuple[int, str, str], list[dict[str, float]]] = {}
    runners = {"kvmkit": run_kvmkit, "QEMU": run_qemu}
    for run in range(args.runs):
        for mem_mib in sizes:
            for workload in workloads:
                for vmm, fn in runners.items():
                    with tempfile.TemporaryDirectory(prefix="kvmkit-bench-", dir="/tmp") as tmp:
                        t0 = time.monotonic()
                        r = fn(mem_mib, workload, args.max_downtime_ms, args.bandwidth_mib_s,
                               Path(tmp))  # fmt: skip
                    results.setdefault((mem_mib, workload, vmm), []).append(r)
                    progress(f"run {run + 1}: {mem_mib} MiB {workload} {vmm}: "
                             f"downtime {r['downtime_ms']:.0f} ms, total {r['total_s']:.2f} s, "
                             f"tick gap {r['gap_ms']:.0f} ms, {r['mib']:.0f} MiB sent"
                             f"{', forced' if r['forced'] else ''} "
                             f"({time.monotonic() - t0:.0f} s with the boot)")  # fmt: skip
    cap = f"{args.bandwidth_mib_s} MiB/s" if args.bandwidth_mib_s else "no bandwidth cap"
    print(f"kernel {image.kernel_release}, 1 vCPU, a quarter of RAM filled with data, "
          f"downtime target {args.max_downtime_ms} ms, {cap}; medians of {args.runs}")
    print(f"{'guest':>9} {'load':>5} {'VMM':>6} | {'downtime':>9} {'tick gap':>9} "
          f"{'total':>8} {'rounds':>6} {'sent':>9} {'forced':>6}")
    med: dict[tuple[int, str, str], dict[str, float]] = {}
    for key, rs in results.items():
        med[key] = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
    for (mem_mib, workload, vmm), m in med.items():
        forced = sum(int(r["forced"]) for r in results[(mem_mib, workload, vmm)])
        print(f"{mem_mib:>5} MiB {workload:>5} {vmm:>6} | {m['downtime_ms']:>6.0f} ms "
              f"{m['gap_ms']:>6.0f} ms {m['total_s']:>6.2f} s {m['rounds']:>6.0f} "
              f"{m['mib']:>5.0f} MiB {forced:>3}/{len(results[(mem_mib, workload, vmm)])}")
    for mem_mib in sizes:
        for workload in workloads:
            k, q = med.get((mem_mib, workload, "kvmkit")), med.get((mem_mib, workload, "QEMU"))
            if k and q:
                print(f"{mem_mib} MiB {workload}: kvmkit / QEMU downtime "
                      f"x{k['downtime_ms'] / max(q['downtime_ms'], 1e-3):.2f}, tick gap "
                      f"x{k['gap_ms'] / max(q['gap_ms'], 1e-3):.2f}, total "
                      f"x{k['total_s'] / max(q['total_s'], 1e-3):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
