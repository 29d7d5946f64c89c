"""virtio benchmark: virtio-blk and virtio-net throughput, kvmkit against QEMU, same guest.

Both VMMs boot the default guest image (Debian kernel + kvmkit initramfs), 1 vCPU, 256 MiB,
with two drives on raw files: a read-only "tools" drive (a tar of bench.sh and `rio`, a small
static C program, bench/rio.c, built here with `gcc -static`) and a fresh sparse "bench" disk.
The guest finds each by its serial (GET_ID), unpacks the tools into its tmpfs and measures on
the bench disk, all with O_DIRECT so the guest's page cache is out of the way:

  seq write / seq read   busybox `dd bs=1M oflag=direct` / `iflag=direct`, timed by `rio now`
                         (busybox dd and date print no sub-second times)
  rand read / rand write `rio randr|randw`: 4 KiB at random 4 KiB-aligned offsets, one request
                         at a time (queue depth 1), for a fixed time

  net tx / net rx         `rio send|recv` in the guest against `rio sink|source` on the host:
                         one TCP stream of --net-mib MiB guest -> host, then host -> guest,
                         timed on the host from accept to the peer's EOF

Three columns: kvmkit over virtio-mmio (found from the ACPI DSDT), kvmkit over virtio-pci
(`--virtio-transport pci`, MSI-X), and QEMU `-M q35` with modern-only virtio-*-pci
(`disable-legacy=on`; Debian's kernel lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES and so finds
no virtio-mmio device on a `-M microvm` command line): the two kvmkit columns say how much
of a gap to QEMU is the transport.  Both VMMs serve the images through the host page cache
(kvmkit's pread/pwrite; QEMU `cache=writeback,aio=threads`); in the lane the files are on a
tmpfs, so the figures measure each VMM's virtio path, not a disk.

Needs hardware-style KVM: on a host without VMX/SVM run it in the lane:

    python -m kvmkit lane --cpus 2 --timeout 1500 --module tun -- \
        $PWD/.venv/bin/python bench/virtio.py

(two lane vCPUs: kvmkit's device worker and vCPU threads then run side by side, as on a host)

Net: each VMM run gets its own network namespace (`ip netns add`) holding a tap made by
`kvmkit net setup` (10.0.78.1/24; the guest takes .2 with busybox `ip`); the VMM and the
host-side `rio` run in it (`ip netns exec`), so no traffic leaves it, and the namespace is
deleted after the run.  Both VMMs serve the tap from userspace: kvmkit has no vhost, and
QEMU runs `-netdev tap,...,vhost=off`.  Without /dev/net/tun (a lane without `--module tun`)
or with --net-mib 0 the net figures are skipped.

Runs are interleaved (kvmkit-mmio, kvmkit-pci, QEMU, kvmkit-mmio, ...) so that drift in the
machine's load affects all alike; the table shows medians and the ratios kvmkit/QEMU.  Not a
test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import io
import os
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvmkit.image.guest import default_image
from kvmkit.vmm.console import CommandOutput, new_nonce
from kvmkit.vmm.machine import BASE_CMDLINE, _cmdline_quote

MEM_MIB = 256
DISK_MIB = 128
TOOLS_SERIAL = "kvmkit-tools"
BENCH_SERIAL = "kvmkit-bench"
HERE = Path(__file__).resolve().parent
TAP = "bntap0"
HOST_ADDR, GUEST_ADDR = "10.0.78.1", "10.0.78.2"
GUEST_MAC = "02:00:00:00:78:02"
SINK_PORT, SOURCE_PORT = 5001, 5002

# Runs from the tools drive's contents in the guest's /tmp; @SEQ@, @SECS@, @SPAN@ filled in.
BENCH_SH = r"""
dev_of() {
    for s in /sys/block/vd*/serial; do
        if [ "$(cat "$s")" = "$1" ]; then d=${s%/serial}; echo "/dev/${d##*/}"; fi
    done
}
D=$(dev_of kvmkit-bench)
echo "DEV $D $(cat /sys/block/${D#/dev/}/size)"
t0=$(./rio now); dd if=/dev/zero of="$D" bs=1M count=@SEQ@ oflag=direct 2>/dev/null; r=$?
t1=$(./rio now); echo "SEQW $r @SEQ@ $t0 $t1"
t0=$(./rio now); dd if="$D" of=/dev/null bs=1M count=@SEQ@ iflag=direct 2>/dev/null; r=$?
t1=$(./rio now); echo "SEQR $r @SEQ@ $t0 $t1"
echo "RANDR $(./rio randr "$D" @SECS@ @SPAN@)"
echo "RANDW $(./rio randw "$D" @SECS@ @SPAN@)"
if [ @NET@ -gt 0 ]; then
    ip addr add @GADDR@/24 dev eth0; ip link set eth0 up
    echo "NETTX $(./rio send @HADDR@ @SINK@ @NET@ @NETSECS@)"
    echo "NETRX $(./rio recv @HADDR@ @SOURCE@)"
    # Diagnostics for the per-run line: TCP segments out / retransmitted, checksum errors in.
    echo "TCPSTAT $(awk '/^Tcp:/ { if (n++) print "out", $12, "retrans", $13, "csumerr", $16 }' \
        /proc/net/snmp)"
fi
echo DONE
"""

# The command both guests run (kept short: it travels on the kernel command line).
GUEST_CMD = [
    "sh", "-c",
    f"for s in /sys/block/vd*/serial; do [ \"$(cat $s)\" = {TOOLS_SERIAL} ] && t=${{s%/serial}};"
    " done; mkdir /tmp/b && cd /tmp/b && tar xf /dev/${t##*/} && sh bench.sh",
]  # fmt: skip

FIGURES = (
    ("seq_write", "seq write (MiB/s)"),
    ("seq_read", "seq read (MiB/s)"),
    ("rand_read", "rand read 4K (IOPS)"),
    ("rand_write", "rand write 4K (IOPS)"),
    ("net_tx", "net tx (MiB/s)"),
    ("net_rx", "net rx (MiB/s)"),
)
VMMS = ("kvmkit-mmio", "kvmkit-pci", "qemu")


@dataclass
class Series:
    name: str
    samples: list[dict[str, float]] = field(default_factory=list)
    failed: int = 0

    def median(self, key: str) -> float:
        """NaN when every run failed."""
        return statistics.median(s[key] for s in self.samples) if self.samples else float("nan")


def build_tools(
    workdir: Path, seq_mib: int, seconds: float, span_mib: int, net_mib: int, net_secs: float
) -> Path:
    """The tools drive: a tar of bench.sh and rio, padded to whole sectors."""
    rio = workdir / "rio"
    cc = shutil.which("gcc") or "gcc"
    subprocess.run([cc, "-static", "-O2", "-o", str(rio), str(HERE / "rio.c")], check=True)
    fill = {"@SEQ@": seq_mib, "@SECS@": seconds, "@SPAN@": span_mib, "@NET@": net_mib,
            "@NETSECS@": net_secs, "@GADDR@": GUEST_ADDR, "@HADDR@": HOST_ADDR, "@SINK@": SINK_PORT,
            "@SOURCE@": SOURCE_PORT}  # fmt: skip
    script = BENCH_SH
    for key, value in fill.items():
        script = script.replace(key, str(value))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        tar.add(rio, arcname="rio")
        info = tarfile.TarInfo("bench.sh")
        info.size, info.mode = len(script), 0o644
        tar.addfile(info, io.BytesIO(script.encode()))
    data = buf.getvalue()
    data += bytes(-len(data) % 512)  # a block device has whole sectors
    tools = workdir / "tools.img"
    tools.write_bytes(data)
    return tools


def fresh_disk(workdir: Path) -> Path:
    disk = workdir / "bench.img"
    disk.unlink(missing_ok=True)
    with open(disk, "wb") as fh:
        fh.truncate(DISK_MIB << 20)  # sparse: both VMMs start from the same empty file
    return disk


def kvmkit_argv(
    tools: Path, disk: Path, transport: str, net: bool, timeout: float
) -> list[str]:  # fmt: skip
    # kvmkit's own --timeout is a backstop behind the bench's (which diagnoses a live process).
    return [
        sys.executable, "-m", "kvmkit", "run", "--mem-mib", str(MEM_MIB),
        "--timeout", str(int(timeout) + 60),
        "--virtio-transport", transport,
        "--drive", f"{tools},ro,serial={TOOLS_SERIAL}", "--drive", f"{disk},serial={BENCH_SERIAL}",
        *(["--net", f"tap={TAP},mac={GUEST_MAC}"] if net else []),
        "--", *GUEST_CMD,
    ]  # fmt: skip


def qemu_argv(
    kernel: Path, initrd: Path, tools: Path, disk: Path, nonce: str, net: bool
) -> list[str]:
    # The same command line as kvmkit's default image, minus pci=off (the disks are on PCI).
    cmdline = (f"{BASE_CMDLINE} quiet kvmkit.nonce={nonce} kvmkit.cmd={_cmdline_quote(GUEST_CMD)}"
               .replace("pci=off ", ""))  # fmt: skip
    return [
        shutil.which("qemu-system-x86_64") or "qemu-system-x86_64",
        "-M", "q35,accel=kvm,memory-backend=mem", "-cpu", "host",
        "-object", f"memory-backend-memfd,id=mem,size={MEM_MIB}M",
        "-m", f"{MEM_MIB}M", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", "stdio", "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
        "-no-reboot",
        "-drive", f"file={tools},format=raw,if=none,id=tools,readonly=on",
        "-device", f"virtio-blk-pci,drive=tools,serial={TOOLS_SERIAL},disable-legacy=on",
        "-drive", f"file={disk},format=raw,if=none,id=bench,cache=writeback,aio=threads",
        "-device", f"virtio-blk-pci,drive=bench,serial={BENCH_SERIAL},disable-legacy=on",
        *(["-netdev", f"tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off",
           "-device", f"virtio-net-pci,netdev=n0,mac={GUEST_MAC},disable-legacy=on"
           + os.environ.get("BENCH_QEMU_NET_OPTS", "")]
          if net else []),
    ]  # fmt: skip


class RunTimeout(RuntimeError):
    """A VMM run went past --run-timeout; the message carries what was seen of it."""


def run_guest(
    argv: list[str], nonce: str | None, timeout: float, host_state: Callable[[], str] | None = None
) -> dict[str, list[str]]:  # fmt: skip
    """Boot, collect the guest's `KEY values...` lines; `nonce` set: parse the raw console.

    stdout and stderr are both read as they come (a VMM blocked on a full stderr pipe would
    look like a stalled guest), and the whole run is bounded by `timeout`: past it the VMM's
    state is captured (`diagnose`; kvmkit also prints its own on SIGUSR1, read for a few more
    seconds; `host_state()` adds the host side) and the run fails with RunTimeout instead of
    hanging."""
    lines: dict[str, list[str]] = {}
    text = bytearray()
    err = bytearray()
    parser = CommandOutput(nonce, text.extend) if nonce is not None else None
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    deadline = time.monotonic() + timeout
    timed_out = False
    report = ""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, "out")
        sel.register(proc.stderr, selectors.EVENT_READ, "err")
        try:
            while sel.get_map():
                left = deadline - time.monotonic()
                if left <= 0 and not timed_out:
                    timed_out = True
                    report = diagnose(proc.pid) + (host_state() if host_state else "")
                    if "kvmkit" in argv:
                        os.kill(proc.pid, signal.SIGUSR1)  # kvmkit run: its device state
                    deadline = time.monotonic() + 3
                    continue
                if left <= 0:
                    break
                for key, _ in sel.select(min(left, 5.0)):
                    chunk = os.read(key.fd, 65536)
                    if not chunk:
                        sel.unregister(key.fileobj)
                    elif key.data == "err":
                        err += chunk
                    elif parser is not None:
                        parser.feed(chunk)
                    else:
                        text.extend(chunk)
                if parser is not None and parser.status is not None:
                    break
        finally:
            proc.kill()
            proc.wait()
    console = text.decode(errors="replace")
    if timed_out:
        raise RunTimeout(
            f"{argv[0]}: no result after {timeout:.0f} s; last output:\n{console[-2000:]}\n"
            f"stderr:\n{err.decode(errors='replace')[-2000:]}\n{report}"
        )
    for line in console.splitlines():
        tag, *values = line.split() or [""]
        if tag in ("DEV", "SEQW", "SEQR", "RANDR", "RANDW", "NETTX", "NETRX", "TCPSTAT", "DONE"):
            lines[tag] = values
    if "DONE" not in lines:
        raise RuntimeError(
            f"{argv[0]}: the guest did not finish: {console[-2000:]}\n"
            f"{err.decode(errors='replace')[-2000:]}"
        )
    return lines


def _kvm_stats(pid: int) -> dict[str, int]:
    """The per-VM counters KVM keeps in debugfs (`/sys/kernel/debug/kvm/PID-FD/`), summed
    over the process's VMs; empty without debugfs."""
    out: dict[str, int] = {}
    for vmdir in Path("/sys/kernel/debug/kvm").glob(f"{pid}-*"):
        for f in vmdir.iterdir():
            if f.is_file():
                try:
                    out[f.name] = out.get(f.name, 0) + int(f.read_text().split()[0])
                except (OSError, ValueError, IndexError):
                    pass
    return out


def diagnose(pid: int) -> str:
    """What a stalled VMM process is doing: each thread's kernel state and wait channel, the
    Python stacks (py-spy, when installed), and whether the guest still runs (KVM's exit
    counters over two seconds: counters that move say the guest executes; still ones, a
    guest that stopped or a vCPU thread that never re-enters KVM_RUN)."""
    parts = []
    for task in sorted(Path(f"/proc/{pid}/task").glob("*")):
        try:
            comm = (task / "comm").read_text().strip()
            wchan = (task / "wchan").read_text().strip()
            state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        parts.append(f"  thread {task.name} {comm}: state {state} wchan {wchan}")
    before = _kvm_stats(pid)
    time.sleep(2)
    after = _kvm_stats(pid)
    moved = {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}
    parts.append(f"  KVM counters moving over 2 s: {moved or 'none'}")
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if os.path.exists(spy):
        res = subprocess.run([spy, "dump", "--pid", str(pid)], capture_output=True, text=True,
                             timeout=60, check=False)  # fmt: skip
        parts.append(res.stdout + res.stderr)
    return "diagnosis:\n" + "\n".join(parts)


def rate(values: list[str]) -> float:
    """MiB/s from rio's `bytes N secs S`."""
    fields = dict(zip(values[::2], values[1::2], strict=False))
    return int(fields["bytes"]) / float(fields["secs"]) / (1 << 20)


class NetNs:
    """A network namespace with the bench tap and the host-side `rio sink` and `rio source`
    listening in it; deleted (tap and all) on exit."""

    def __init__(self, rio: Path, net_mib: int, net_secs: float) -> None:
        self.name = f"kvmkit-bn-{uuid.uuid4().hex[:8]}"
        self.rio, self.net_mib, self.net_secs = rio, net_mib, net_secs
        self.procs: list[subprocess.Popen[str]] = []

    def wrap(self, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def __enter__(self) -> NetNs:
        subprocess.run(["ip", "netns", "add", self.name], check=True, timeout=30)
        try:
            subprocess.run(
                self.wrap([sys.executable, "-m", "kvmkit", "net", "setup", TAP,
                           "--address", f"{HOST_ADDR}/24"]),
                check=True, capture_output=True, timeout=300,
            )  # fmt: skip
            source = ["source", str(SOURCE_PORT), str(self.net_mib), str(self.net_secs)]
            for cmd in (["sink", str(SINK_PORT)], source):
                proc = subprocess.Popen(self.wrap([str(self.rio), *cmd]), stdin=subprocess.DEVNULL,
                                        stdout=subprocess.PIPE, text=True)  # fmt: skip
                self.procs.append(proc)
                assert proc.stdout is not None
                if proc.stdout.readline().strip() != "listening":
                    raise RuntimeError(f"host rio {cmd[0]} did not start")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def state(self) -> str:
        """The host side of the namespace, for a stalled run: the tap's counters and the
        TCP sockets of the host-side rio (queues, retransmits, state)."""
        out = []
        for argv in (["ip", "-n", self.name, "-s", "link", "show", TAP],
                     ["ip", "netns", "exec", self.name, "ss", "-tnie"]):  # fmt: skip
            res = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30)
            out.append(f"  $ {' '.join(argv)}\n{res.stdout}{res.stderr}")
        return "\n".join(out)

    def results(self) -> tuple[float, float]:
        """(guest -> host, host -> guest) MiB/s as the host-side rio timed them."""
        out = []
        for proc in self.procs:
            text, _ = proc.communicate(timeout=60)
            out.append(rate(text.split()))
        # The tap's counters (drops on the host side), for the per-run diagnostics.
        stats = subprocess.run(["ip", "-n", self.name, "-s", "-o", "link", "show", TAP],
                               capture_output=True, text=True, check=False)  # fmt: skip
        print(f"  tap: {' '.join(stats.stdout.split())}", file=sys.stderr, flush=True)
        return out[0], out[1]

    def __exit__(self, *exc: object) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()
        subprocess.run(["ip", "netns", "del", self.name], check=False, timeout=30)


def figures(lines: dict[str, list[str]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for key, name in (("SEQW", "seq_write"), ("SEQR", "seq_read")):
        status, mib, t0, t1 = lines[key]
        if status != "0":
            raise RuntimeError(f"guest dd for {name} failed with status {status}")
        out[name] = int(mib) / (float(t1) - float(t0))
    for key, name in (("RANDR", "rand_read"), ("RANDW", "rand_write")):
        values = dict(zip(lines[key][::2], lines[key][1::2], strict=False))
        out[name] = int(values["ops"]) / float(values["secs"])
    return out


def run_one(
    name: str, tools: Path, disk: Path, netns: NetNs | None, timeout: float,
) -> dict[str, float]:  # fmt: skip
    net = netns is not None
    if name.startswith("kvmkit"):
        argv = kvmkit_argv(tools, disk, name.removeprefix("kvmkit-"), net, timeout)
        nonce = None
    else:
        nonce = new_nonce()
        # Looked up per run, as kvmkit does: the image in the shared cache may be rebuilt
        # (a new kernel package) while the bench runs.
        image = default_image()
        argv = qemu_argv(image.kernel, image.initrd, tools, disk, nonce, net)
    lines = run_guest(netns.wrap(argv) if netns is not None else argv, nonce, timeout,
                      netns.state if netns is not None else None)  # fmt: skip
    out = figures(lines)
    if netns is not None:
        out["net_tx"], out["net_rx"] = netns.results()
        # The guest's own timing of the same streams, as a cross-check (not in the table).
        out["guest_tx"], out["guest_rx"] = rate(lines["NETTX"]), rate(lines["NETRX"])
        stat = dict(zip(lines["TCPSTAT"][::2], lines["TCPSTAT"][1::2], strict=False))
        out["guest_tcp_out"], out["guest_retrans"] = float(stat["out"]), float(stat["retrans"])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--seq-mib", type=int, default=64, help="MiB per sequential pass")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per random pass")
    ap.add_argument("--span-mib", type=int, default=64, help="random offsets within this span")
    ap.add_argument("--net-mib", type=int, default=64, help="MiB per TCP stream (0: no net)")
    ap.add_argument("--net-seconds", type=float, default=10.0, help="at most this long per stream")
    ap.add_argument("--vmms", default=",".join(VMMS), help=f"columns, of {','.join(VMMS)}")
    ap.add_argument(
        "--run-timeout", type=float, default=300.0,
        help="give up on one VMM run after this many seconds (default 300; a normal run in a "
        "two-vCPU lane takes about 50 s): its state is printed and the bench goes on",
    )  # fmt: skip
    args = ap.parse_args()
    if not os.path.exists("/dev/kvm"):
        print("no /dev/kvm: run this inside `kvmkit lane`", file=sys.stderr)
        return 2
    if max(args.seq_mib, args.span_mib) > DISK_MIB:
        print(f"--seq-mib and --span-mib must be at most {DISK_MIB}", file=sys.stderr)
        return 2
    net_mib = args.net_mib
    if net_mib > 0 and not os.path.exists("/dev/net/tun"):
        print("no /dev/net/tun (run the lane with --module tun): net skipped", file=sys.stderr)
        net_mib = 0
    image = default_image()
    series = [Series(name) for name in args.vmms.split(",")]
    if not series or any(s.name not in VMMS for s in series):
        print(f"--vmms: a comma-separated list of {','.join(VMMS)}", file=sys.stderr)
        return 2
    shown = FIGURES if net_mib > 0 else FIGURES[:4]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvmkit-bench-virtio-") as tmp:
        workdir = Path(tmp)
        tools = build_tools(workdir, args.seq_mib, args.seconds, args.span_mib, net_mib,
                            args.net_seconds)  # fmt: skip
        for run in range(args.runs):
            for s in series:
                disk = fresh_disk(workdir)
                t = time.monotonic()
                try:
                    if net_mib > 0:
                        with NetNs(workdir / "rio", net_mib, args.net_seconds) as ns:
                            sample = run_one(s.name, tools, disk, ns,
                                             args.run_timeout)  # fmt: skip
                    else:
                        sample = run_one(s.name, tools, disk, None,
                                         args.run_timeout)  # fmt: skip
                except (RuntimeError, subprocess.SubprocessError) as err:
                    # One failed run is reported and the others go on: the table says how
                    # many of each column failed.
                    s.failed += 1
                    print(f"run {run + 1} {s.name}: FAILED after {time.monotonic() - t:.1f} s: "
                          f"{err}", file=sys.stderr, flush=True)  # fmt: skip
                    continue
                s.samples.append(sample)
                print(f"run {run + 1} {s.name}: {time.monotonic() - t:.1f} s, "
                      + ", ".join(f"{k} {v:.2f}" for k, v in s.samples[-1].items()),
                      file=sys.stderr, flush=True)  # fmt: skip
    print(f"{time.strftime('%Y-%m-%d', time.gmtime())}, kernel {image.kernel_release}, "
          f"{MEM_MIB} MiB, 1 vCPU, {args.runs} runs interleaved, medians; "
          f"seq {args.seq_mib} MiB dd bs=1M direct; rand 4 KiB QD1 {args.seconds:g} s over "
          f"{args.span_mib} MiB; images: files in {tempfile.gettempdir()}")
    print("transports: kvmkit-mmio virtio-mmio (ACPI DSDT); kvmkit-pci virtio-pci, MSI-X; "
          "QEMU -M q35 virtio-*-pci (modern only), cache=writeback aio=threads")
    if net_mib > 0:
        print(f"net: one TCP stream each way of {net_mib} MiB or at most {args.net_seconds:g} s, "
              "through a tap in a fresh netns, vhost off for both, timed by the host-side rio")
    else:
        print("net: not measured (--net-mib 0, or no /dev/net/tun)")
    print(f"{'VMM':<12}" + "".join(f"{title:>22}" for _, title in shown))
    for s in series:
        print(f"{s.name:<12}" + "".join(f"{s.median(key):>22.2f}" for key, _ in shown))
    failed = [f"{s.name} {s.failed} of {args.runs}" for s in series if s.failed]
    if failed:
        print(f"FAILED runs (not in the medians): {', '.join(failed)}")
    status = 1 if failed else 0
    q = series[-1]
    if q.name != "qemu" or not q.samples:
        print(f"total {time.monotonic() - started:.0f} s")
        return status
    for k in series[:-1]:
        print(f"{k.name} / QEMU: " + ", ".join(
            f"{title.split(' (')[0]} x{k.median(key) / q.median(key):.2f}" for key, title in shown
        ))  # fmt: skip
    print(f"total {time.monotonic() - started:.0f} s")
    return status


if __name__ == "__main__":
    sys.exit(main())
