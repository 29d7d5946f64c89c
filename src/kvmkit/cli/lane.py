"""`kvmkit lane`: run a command inside the emulated hardware-virtualization lane VM."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from kvmkit.errors import UserError
from kvmkit.lane import assets, runner

DESCRIPTION = """\
Boot a QEMU/TCG VM with emulated AMD-V (so kvm_amd gives it a hardware-style /dev/kvm),
run COMMAND inside with the host's root file system read-only, the current repository (or
directory), kvmkit's cache and each --share directory writable at the same paths, stream its
stdout/stderr, and exit with its status.  Lane exit statuses: 124 timeout, 125 the lane VM
failed, 130/143 interrupted, 2 usage or missing prerequisite."""


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "lane", help="run a command inside the emulated hardware-virtualization lane",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cpus", type=int, default=1, metavar="N",
                   help="vCPUs (default 1; see docs/lane.md on more)")
    p.add_argument("--mem-mib", type=int, default=2048, metavar="M",
                   help="memory in MiB (default 2048)")
    p.add_argument("--timeout", type=float, default=None, metavar="S",
                   help="kill the lane after S seconds, boot included (default: none)")
    p.add_argument("--boot-timeout", type=float, default=runner.DEFAULT_BOOT_TIMEOUT,
                   metavar="S", help="give up if the command has not started after S seconds "
                   f"(default {runner.DEFAULT_BOOT_TIMEOUT:g})")
    p.add_argument("--share", action="append", default=[], metavar="DIR",
                   help="also share DIR writable at the same path (repeatable)")
    p.add_argument("--module", action="append", default=[], metavar="NAME",
                   help="also load kernel module NAME (and its dependencies), e.g. vfio_pci")
    p.add_argument("--device", action="append", default=[], metavar="NAME[,OPTIONS]",
                   help="add QEMU PCI device NAME (e.g. edu) behind an emulated IOMMU and bind "
                   "it to vfio-pci in the lane, for VFIO passthrough (repeatable; docs/lane.md)")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="show the QEMU command line, the kernel console and timings")
    p.add_argument("--prepare", action="store_true",
                   help="only fetch the kernel and build the initramfs, then exit")
    p.add_argument("--refresh", action="store_true",
                   help="with --prepare: fetch apt's current kernel if the cache has an older one")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    command: list[str] = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if args.prepare:
        if command:
            raise UserError("--prepare takes no command")
        started = time.monotonic()
        kernel, base = runner.prepare(args.module, refresh=args.refresh)
        print(f"kvmkit lane: kernel {kernel.package} {kernel.version} ({kernel.kver})")
        print(f"kvmkit lane: boot image {kernel.boot_image}")
        print(f"kvmkit lane: initramfs {base} ({base.stat().st_size // 1024} KiB)")
        print(f"kvmkit lane: busybox {assets.ensure_busybox()}; qemu {_qemu_or_missing()}")
        print(f"kvmkit lane: prepared in {time.monotonic() - started:.1f} s")
        return 0
    if not command:
        raise UserError("no command given (usage: kvmkit lane [OPTIONS] -- COMMAND [ARGS...])")
    opts = runner.LaneOptions(
        command=command, cpus=args.cpus, mem_mib=args.mem_mib, timeout=args.timeout,
        boot_timeout=args.boot_timeout, shares=[Path(s) for s in args.share],
        verbose=args.verbose, extra_modules=tuple(args.module), devices=tuple(args.device),
    )
    sys.stdout.flush()
    return runner.run(opts)


def _qemu_or_missing() -> str:
    try:
        return runner.find_qemu()
    except UserError:
        return "MISSING (install qemu-system-x86)"
