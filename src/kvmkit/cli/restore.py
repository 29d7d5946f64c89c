"""`kvmkit restore`: resume a microVM from a snapshot (`kvmkit run --snapshot-after`), or
receive one live migration (`--incoming unix:PATH|tcp:HOST:PORT`, sent by `kvmkit migrate`).

A command the guest was running under `kvmkit run -- COMMAND` continues: its output goes to
stdout and its exit status becomes kvmkit restore's. Without a command the guest's console
is printed. A bad state or memory file, or a migration stream that is refused (malformed,
corrupted, another version, a drive image that differs): one line, exit status 2, no VM run.
With `--api-sock` the restored microVM is served by kvmkit's API (it can be paused,
snapshotted or migrated on).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmkit.errors import UserError
from kvmkit.probe import detect_implementation

if TYPE_CHECKING:
    from kvmkit.cli.run import StateDump
    from kvmkit.vmm.machine import Machine, MachineResult


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "restore", help="resume a microVM from a snapshot or an incoming migration",
        description="Restore a snapshot (state file and guest-memory file) into a new VM and "
        "resume it where it was paused, or (--incoming) receive a live migration from "
        "`kvmkit migrate` and run the guest here.",
    )  # fmt: skip
    p.add_argument("--state", type=Path, help="snapshot state file")
    p.add_argument("--mem", type=Path, help="snapshot guest-memory file")
    p.add_argument(
        "--base-mem", type=Path, help="for a diff snapshot: the memory file it was taken after"
    )
    p.add_argument("--incoming", metavar="URL",
                   help="listen at unix:PATH or tcp:HOST:PORT for one live migration")  # fmt: skip
    p.add_argument("--api-sock", metavar="PATH",
                   help="serve kvmkit's API for the restored microVM on this socket")  # fmt: skip
    p.add_argument("--timeout", type=float, default=None,
                   help="stop the VM after S seconds (--incoming: once it arrived)")  # fmt: skip
    p.add_argument(
        "--cpu-affinity", action="append", default=[], metavar="[V=]CPUS",
        help="host CPUs for the vCPU threads, as for kvmkit run (the snapshot or migration "
        "does not carry the host's CPUs)",
    )  # fmt: skip
    from kvmkit.cli.seccomp_options import add_seccomp_options

    add_seccomp_options(p)
    p.set_defaults(func=restore)


def _check_host(how: str) -> None:
    implementation, why = detect_implementation()
    if not implementation.startswith("hardware-") and not os.environ.get("KVMKIT_FORCE_RUN"):
        raise UserError(
            f"this host's /dev/kvm is {implementation} ({why}): Linux guests cannot run on it; "
            f"use the lane: kvmkit lane -- kvmkit restore {how}"
        )


def restore(args: argparse.Namespace) -> int:
    from kvmkit import seccomp
    from kvmkit.cli.run import StateDump
    from kvmkit.cli.seccomp_options import seccomp_wanted
    from kvmkit.vmm.config import parse_cpu_affinity

    seccomp.start_strace()  # KVMKIT_SECCOMP_STRACE: list this process's calls (security.md)
    # A bad --seccomp-filter is refused first, in one line, before anything starts.
    args.filters = seccomp.cli_filters(seccomp_wanted(args), args.seccomp_filter)
    dump = StateDump()  # kill -USR1 prints the VM's state (kvmkit run's)
    args.affinity = parse_cpu_affinity(args.cpu_affinity)
    if args.incoming is not None:
        if args.state is not None or args.mem is not None or args.base_mem is not None:
            raise UserError("--incoming receives the state and memory: no --state/--mem")
        return _incoming(args, dump)
    if args.state is None or args.mem is None:
        raise UserError("give --state and --mem (a snapshot), or --incoming URL")
    from kvmkit.vmm.snapshot import read_snapshot, restore_machine

    # A bad file (format, checksum, any state or device in it, a drive image that changed)
    # is reported before anything else: one line, exit status 2, no VM.
    read_snapshot(args.state)
    _check_host(f"--state {args.state} --mem {args.mem}")
    _filter(args)
    write_out = _stdout_writer()
    machine = restore_machine(
        args.state, args.mem, base_mem=args.base_mem, command_output=write_out
    )
    return _run(args, machine, write_out, dump)


def _filter(args: argparse.Namespace) -> None:
    """Put the process under its seccomp filters (docs/security.md) once the snapshot file
    is checked and before the VM, the API or the migration listener exists: from here on
    every thread kvmkit restore starts runs under its kind's filter."""
    if args.filters is not None:
        from kvmkit import seccomp

        seccomp.install_for_cli(args.filters, "kvmkit restore")


def _stdout_writer() -> Callable[[bytes], None]:
    stdout = sys.stdout.buffer

    def write_out(data: bytes) -> None:
        try:
            stdout.write(data)
            stdout.flush()
        except (OSError, ValueError):
            pass

    return write_out


def _incoming(args: argparse.Namespace, dump: StateDump) -> int:
    from kvmkit.migration import Incoming

    _check_host(f"--incoming {args.incoming}")
    _filter(args)
    write_out = _stdout_writer()
    server, vmm = _api(args)
    try:
        with Incoming(args.incoming) as incoming:
            print(f"kvmkit restore: waiting for a migration on {incoming.address}",
                  file=sys.stderr, flush=True)  # fmt: skip
            if vmm is not None:
                vmm.migration = {"state": "incoming"}
            with _sigterm_as_interrupt():
                machine = incoming.receive(
                    command_output=write_out,
                    log=lambda text: print(f"kvmkit restore: {text}", file=sys.stderr),
                )  # fmt: skip
        print("kvmkit restore: migration received, the guest runs here", file=sys.stderr,
              flush=True)  # fmt: skip
        if vmm is not None:
            vmm.migration = {"state": "none"}
        return _run(args, machine, write_out, dump, vmm)
    finally:
        if server is not None:
            server.close()
        if vmm is not None:
            vmm.close()


def _api(args: argparse.Namespace) -> tuple[Any, Any]:
    if args.api_sock is None:
        return None, None
    from kvmkit.api.actions import Vmm
    from kvmkit.api.server import ApiServer

    vmm = Vmm()
    try:
        server = ApiServer(vmm, args.api_sock).start()
    except OSError as err:
        vmm.close()
        raise UserError(f"--api-sock: {err.strerror or err}") from None
    print(f"kvmkit restore: API on {args.api_sock}", file=sys.stderr, flush=True)
    return server, vmm


def _run(args: argparse.Namespace, machine: Machine, write_out: Callable[[bytes], None],
         dump: StateDump, vmm: Any = None) -> int:  # fmt: skip
    """Run a rebuilt machine to its end, as `kvmkit run` would; its exit status. With an
    API (`vmm`) the action layer runs it and closes it."""
    dump.machine = machine
    server = None
    if vmm is None and args.api_sock is not None:
        try:
            server, vmm = _api(args)
        except BaseException:
            machine.close()
            raise
    try:
        machine.config.cpu_affinity = args.affinity
        machine.config.validate_affinity()
        if not machine.config.command:
            if vmm is not None:
                vmm.console_output = write_out
            else:
                machine.console.add_listener(write_out)
        if vmm is not None:
            vmm.adopt(machine)
            wait: Callable[[float], MachineResult | None] = vmm.wait
        else:
            machine.start()
            wait = machine.wait
        with _sigterm_as_interrupt():
            result = _wait(wait, args.timeout)
        if result is None:
            machine.stop()
            machine.wait(10)
            print(f"\nkvmkit restore: timed out after {args.timeout} s", file=sys.stderr)
            return 124
    finally:
        if vmm is None:
            machine.close()
        if server is not None:
            server.close()
            vmm.close()
    if machine.config.command and result.command_status is not None:
        return result.command_status
    print(f"kvmkit restore: {result.message}", file=sys.stderr)
    return result.exit_status


def _wait(wait: Callable[[float], MachineResult | None],
          timeout: float | None) -> MachineResult | None:  # fmt: skip
    """Wait in short steps (a signal is handled between them) until the VM ends."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        step = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
        result = wait(step)
        if result is not None:
            return result
        if deadline is not None and time.monotonic() >= deadline:
            return None


class _sigterm_as_interrupt:
    """SIGTERM ends the wait like Ctrl-C (exit status 130), so the VM is closed cleanly."""

    def __enter__(self) -> None:
        self.old: Any = None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGTERM, _raise_interrupt)

    def __exit__(self, *exc: object) -> None:
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
