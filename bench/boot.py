"""Boot benchmark: kvmkit against QEMU (-M microvm and -M pc), same kernel and initramfs.

Measures, for each VMM, the time from process start to the guest's init starting the command
(the BEGIN marker of the console protocol) and to the command's completion (the EXIT marker),
and the VMM's resident memory excluding guest RAM (RssAnon + RssFile: guest RAM is a memfd for
both VMMs, so it is shared memory and not counted). Needs hardware-style KVM: on a host
without VMX/SVM run it in the lane:

    python -m kvmkit lane -- .venv/bin/python bench/boot.py [--runs N]

Prints a table and the ratios kvmkit/QEMU. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvmkit.image.guest import default_image
from kvmkit.vmm.console import CommandOutput, new_nonce
from kvmkit.vmm.machine import BASE_CMDLINE, _cmdline_quote

COMMAND = ["true"]
MEM_MIB = 256


@dataclass
class Sample:
    to_init: float
    to_done: float
    rss_kib: int


@dataclass
class Series:
    name: str
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)


def rss_kib(pid: int) -> int:
    fields: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile"):
                    fields[key] = int(value.split()[0])
    except OSError:
        return 0
    return fields.get("RssAnon", 0) + fields.get("RssFile", 0)


def measure(argv: list[str], nonce: str, timeout: float = 600) -> Sample:
    start = time.monotonic()
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    marks: dict[str, float] = {}
    parser = CommandOutput(nonce, lambda data: None)
    peak = 0

    def sample_rss() -> None:
        nonlocal peak
        while proc.poll() is None:
            peak = max(peak, rss_kib(proc.pid))
            time.sleep(0.05)

    watcher = threading.Thread(target=sample_rss, daemon=True)
    watcher.start()
    assert proc.stdout is not None
    while time.monotonic() - start < timeout:
        chunk = proc.stdout.read1(65536)  # type: ignore[attr-defined]
        if not chunk:
            break
        parser.feed(chunk)
        if parser.started and "init" not in marks:
            marks["init"] = time.monotonic() - start
        if parser.status is not None:
            marks["done"] = time.monotonic() - start
            break
    proc.kill()
    proc.wait()
    watcher.join()
    if "done" not in marks:
        raise RuntimeError(f"{argv[0]}: the guest did not finish the command")
    return Sample(marks["init"], marks["done"], peak)


def kvmkit_argv(kernel: Path, initrd: Path, nonce: str) -> list[str]:
    # kvmkit run adds its own nonce; pass ours through --cmdline so one parser serves all.
    return [
        sys.executable, "-m", "kvmkit", "run", "--kernel", str(kernel), "--initrd", str(initrd),
        "--mem-mib", str(MEM_MIB), "--cmdline",
        f"{BASE_CMDLINE} quiet kvmkit.nonce={nonce} kvmkit.cmd={_cmdline_quote(COMMAND)}",
    ]  # fmt: skip


def qemu_argv(machine: str, kernel: Path, initrd: Path, nonce: str) -> list[str]:
    cmdline = f"{BASE_CMDLINE} quiet kvmkit.nonce={nonce} kvmkit.cmd={_cmdline_quote(COMMAND)}"
    if machine == "microvm":
        cmdline = cmdline.replace("pci=off ", "")
    return [
        shutil.which("qemu-system-x86_64") or "qemu-system-x86_64",
        "-M", f"{machine},accel=kvm,memory-backend=mem", "-cpu", "host",
        "-object", f"memory-backend-memfd,id=mem,size={MEM_MIB}M",
        "-m", f"{MEM_MIB}M", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none",
        "-serial", "stdio", "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
        "-no-reboot",
    ]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    if not os.path.exists("/dev/kvm"):
        print("no /dev/kvm: run this inside `kvmkit lane`", file=sys.stderr)
        return 2
    image = default_image()
    series = [Series("kvmkit"), Series("qemu -M microvm"), Series("qemu -M pc")]
    for _ in range(args.runs):
        # Interleave the VMMs so that drift in the machine's load affects all alike.
        for s in series:
            nonce = new_nonce()
            if s.name == "kvmkit":
                argv = kvmkit_argv(image.kernel, image.initrd, nonce)
            else:
                argv = qemu_argv(s.name.split()[-1], image.kernel, image.initrd, nonce)
            s.samples.append(measure(argv, nonce))
    print(f"kernel {image.kernel_release}, {MEM_MIB} MiB, 1 vCPU, command {COMMAND}, "
          f"{args.runs} runs, medians")
    print(f"{'VMM':<18}{'to init (s)':>12}{'to done (s)':>12}{'RSS w/o RAM (MiB)':>19}")
    for s in series:
        print(f"{s.name:<18}{s.median('to_init'):>12.2f}{s.median('to_done'):>12.2f}"
              f"{s.median('rss_kib') / 1024:>19.1f}")
    k = series[0]
    for q in series[1:]:
        print(f"kvmkit / {q.name}: to init x{k.median('to_init') / q.median('to_init'):.2f}, "
              f"to done x{k.median('to_done') / q.median('to_done'):.2f}, "
              f"RSS x{k.median('rss_kib') / max(q.median('rss_kib'), 1):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
