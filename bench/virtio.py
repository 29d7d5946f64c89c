"""virtio benchmark: virtio-blk throughput and IOPS, kvmkit against QEMU, same guest.

Both VMMs boot the default guest image (Debian kernel + kvmkit initramfs), 1 vCPU, 256 MiB,
with two drives on raw files: a read-only "tools" drive (a tar of bench.sh and `rio`, a small
static C program, bench/rio.c, built here with `gcc -static`) and a fresh sparse "bench" disk.
The guest finds each by its serial (GET_ID), unpacks the tools into its tmpfs and measures on
the bench disk, all with O_DIRECT so the guest's page cache is out of the way:

  seq write / seq read   busybox `dd bs=1M oflag=direct` / `iflag=direct`, timed by `rio now`
                         (busybox dd and date print no sub-second times)
  rand read / rand write `rio randr|randw`: 4 KiB at random 4 KiB-aligned offsets, one request
                         at a time (queue depth 1), for a fixed time

The transports differ, and the output says so: kvmkit serves virtio-mmio (found from the ACPI
DSDT); QEMU runs `-M q35` with modern-only virtio-blk-pci (`disable-legacy=on`), because
Debian's kernel lacks CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES and so finds no virtio-mmio device
on a `-M microvm` command line.  Both VMMs serve the images through the host page cache
(kvmkit's pread/pwrite; QEMU `cache=writeback,aio=threads`); in the lane the files are on a
tmpfs, so the figures measure each VMM's virtio path, not a disk.

Needs hardware-style KVM: on a host without VMX/SVM run it in the lane:

    python -m kvmkit lane --timeout 1500 -- $PWD/.venv/bin/python bench/virtio.py [--runs N]

Runs are interleaved (kvmkit, QEMU, kvmkit, QEMU, ...) so that drift in the machine's load
affects both alike; the table shows medians and the ratios kvmkit/QEMU.  TCP over virtio-net
is not measured yet (kvmkit has no --net on this branch): a line says so.  Not a test:
nothing is asserted.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
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
)


@dataclass
class Series:
    name: str
    samples: list[dict[str, float]] = field(default_factory=list)

    def median(self, key: str) -> float:
        return statistics.median(s[key] for s in self.samples)


def build_tools(workdir: Path, seq_mib: int, seconds: float, span_mib: int) -> Path:
    """The tools drive: a tar of bench.sh and rio, padded to whole sectors."""
    rio = workdir / "rio"
    cc = shutil.which("gcc") or "gcc"
    subprocess.run([cc, "-static", "-O2", "-o", str(rio), str(HERE / "rio.c")], check=True)
    script = (BENCH_SH.replace("@SEQ@", str(seq_mib)).replace("@SECS@", str(seconds))
              .replace("@SPAN@", str(span_mib)))  # fmt: skip
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


def kvmkit_argv(tools: Path, disk: Path) -> list[str]:
    return [
        sys.executable, "-m", "kvmkit", "run", "--mem-mib", str(MEM_MIB), "--timeout", "900",
        "--drive", f"{tools},ro,serial={TOOLS_SERIAL}", "--drive", f"{disk},serial={BENCH_SERIAL}",
        "--", *GUEST_CMD,
    ]  # fmt: skip


def qemu_argv(kernel: Path, initrd: Path, tools: Path, disk: Path, nonce: str) -> list[str]:
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
    ]  # fmt: skip


def run_guest(argv: list[str], nonce: str | None, timeout: float = 900) -> dict[str, list[str]]:
    """Boot, collect the guest's `KEY values...` lines; `nonce` set: parse the raw console."""
    lines: dict[str, list[str]] = {}
    text = bytearray()
    parser = CommandOutput(nonce, text.extend) if nonce is not None else None
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdout is not None
    start = time.monotonic()
    try:
        while time.monotonic() - start < timeout:
            chunk = proc.stdout.read1(65536)  # type: ignore[attr-defined]
            if not chunk:
                break
            if parser is not None:
                parser.feed(chunk)
                if parser.status is not None:
                    break
            else:
                text.extend(chunk)
    finally:
        proc.kill()
        _, err = proc.communicate()
    for line in text.decode(errors="replace").splitlines():
        key, *values = line.split()
        if key in ("DEV", "SEQW", "SEQR", "RANDR", "RANDW"):
            lines[key] = values
    if "RANDW" not in lines:
        raise RuntimeError(
            f"{argv[0]}: the guest did not finish: {text.decode(errors='replace')[-2000:]}\n"
            f"{err.decode(errors='replace')[-2000:]}"
        )
    return lines


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


def net_line() -> str:
    helptext = subprocess.run(
        [sys.executable, "-m", "kvmkit", "run", "--help"], capture_output=True, text=True
    ).stdout
    if "--net" not in helptext:
        return "net: not measured (needs --net: virtio-net is not in this kvmkit yet)"
    return "net: not measured (kvmkit has --net, bench/virtio.py does not drive it yet)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--seq-mib", type=int, default=64, help="MiB per sequential pass")
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per random pass")
    ap.add_argument("--span-mib", type=int, default=64, help="random offsets within this span")
    args = ap.parse_args()
    if not os.path.exists("/dev/kvm"):
        print("no /dev/kvm: run this inside `kvmkit lane`", file=sys.stderr)
        return 2
    if max(args.seq_mib, args.span_mib) > DISK_MIB:
        print(f"--seq-mib and --span-mib must be at most {DISK_MIB}", file=sys.stderr)
        return 2
    image = default_image()
    series = [Series("kvmkit"), Series("qemu")]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kvmkit-bench-virtio-") as tmp:
        workdir = Path(tmp)
        tools = build_tools(workdir, args.seq_mib, args.seconds, args.span_mib)
        for run in range(args.runs):
            for s in series:
                disk = fresh_disk(workdir)
                t = time.monotonic()
                if s.name == "kvmkit":
                    lines = run_guest(kvmkit_argv(tools, disk), None)
                else:
                    nonce = new_nonce()
                    argv = qemu_argv(image.kernel, image.initrd, tools, disk, nonce)
                    lines = run_guest(argv, nonce)
                s.samples.append(figures(lines))
                print(f"run {run + 1} {s.name}: {time.monotonic() - t:.1f} s, "
                      + ", ".join(f"{k} {v:.1f}" for k, v in s.samples[-1].items()),
                      file=sys.stderr, flush=True)  # fmt: skip
    print(f"{time.strftime('%Y-%m-%d', time.gmtime())}, kernel {image.kernel_release}, "
          f"{MEM_MIB} MiB, 1 vCPU, {args.runs} runs interleaved, medians; "
          f"seq {args.seq_mib} MiB dd bs=1M direct; rand 4 KiB QD1 {args.seconds:g} s over "
          f"{args.span_mib} MiB; images: files in {tempfile.gettempdir()}")
    print("transports: kvmkit virtio-mmio (ACPI DSDT); QEMU -M q35 virtio-blk-pci "
          "(modern only), cache=writeback aio=threads")
    print(f"{'VMM':<10}" + "".join(f"{title:>24}" for _, title in FIGURES))
    for s in series:
        print(f"{s.name:<10}" + "".join(f"{s.median(key):>24.1f}" for key, _ in FIGURES))
    k, q = series
    print("kvmkit / QEMU: " + ", ".join(
        f"{title.split(' (')[0]} x{k.median(key) / q.median(key):.2f}" for key, title in FIGURES
    ))  # fmt: skip
    print(net_line())
    print(f"total {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
