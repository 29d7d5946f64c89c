"""`kvmkit restore`: resume a microVM from a snapshot (`kvmkit run --snapshot-after`).

A command the guest was running under `kvmkit run -- COMMAND` continues: its output goes to
stdout and its exit status becomes kvmkit restore's. Without a command the guest's console
is printed. A bad state or memory file: one line, exit status 2, no VM created.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from kvmkit.errors import UserError
from kvmkit.probe import detect_implementation


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "restore", help="resume a microVM from a snapshot",
        description="Restore a snapshot (state file and guest-memory file) into a new VM and "
        "resume it where it was paused.",
    )  # fmt: skip
    p.add_argument("--state", type=Path, required=True, help="snapshot state file")
    p.add_argument("--mem", type=Path, required=True, help="snapshot guest-memory file")
    p.add_argument(
        "--base-mem", type=Path, help="for a diff snapshot: the memory file it was taken after"
    )
    p.add_argument("--timeout", type=float, default=None, help="stop the VM after S seconds")
    p.add_argument(
        "--cpu-affinity", action="append", default=[], metavar="[V=]CPUS",
        help="host CPUs for the vCPU threads, as for kvmkit run (the snapshot does not "
        "carry the host's CPUs)",
    )  # fmt: skip
    p.set_defaults(func=restore)


def restore(args: argparse.Namespace) -> int:
    from kvmkit.cli.run import StateDump
    from kvmkit.vmm.config import parse_cpu_affinity
    from kvmkit.vmm.snapshot import read_snapshot, restore_machine

    dump = StateDump()  # kill -USR1 prints the VM's state (kvmkit run's)
    # A bad file (format, checksum, any state or device in it, a drive image that changed)
    # is reported before anything else: one line, exit status 2, no VM.
    read_snapshot(args.state)
    affinity = parse_cpu_affinity(args.cpu_affinity)
    implementation, why = detect_implementation()
    if not implementation.startswith("hardware-") and not os.environ.get("KVMKIT_FORCE_RUN"):
        raise UserError(
            f"this host's /dev/kvm is {implementation} ({why}): Linux guests cannot run on it; "
            f"use the lane: kvmkit lane -- kvmkit restore --state {args.state} --mem {args.mem}"
        )
    stdout = sys.stdout.buffer

    def write_out(data: bytes) -> None:
        stdout.write(data)
        stdout.flush()

    machine = restore_machine(
        args.state, args.mem, base_mem=args.base_mem, command_output=write_out
    )
    dump.machine = machine
    with machine:
        machine.config.cpu_affinity = affinity
        machine.config.validate_affinity()
        if not machine.config.command:
            machine.console.add_listener(write_out)
        machine.start()
        result = machine.wait(args.timeout)
        if result is None:
            machine.stop()
            machine.wait(10)
            print(f"\nkvmkit restore: timed out after {args.timeout} s", file=sys.stderr)
            return 124
    if machine.config.command and result.command_status is not None:
        return result.command_status
    print(f"kvmkit restore: {result.message}", file=sys.stderr)
    return result.exit_status
