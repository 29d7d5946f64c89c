"""`kvmkit run`: boot a Linux microVM, run a command in it or give an interactive console."""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import sys
import termios
import threading
import time
import tty
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmkit import seccomp
from kvmkit.arch.x86_64 import hyperv as hv
from kvmkit.arch.x86_64.numa import NumaNode
from kvmkit.arch.x86_64.topology import MAX_VCPUS, Topology
from kvmkit.cli.seccomp_options import add_seccomp_options, seccomp_wanted
from kvmkit.devices.virtio.blk import DriveConfig
from kvmkit.devices.virtio.net import NetConfig
from kvmkit.devices.virtio.vsock import VsockConfig
from kvmkit.errors import UserError
from kvmkit.probe import detect_implementation
from kvmkit.threads import ThreadKind, start_thread
from kvmkit.vmm.config import MachineConfig, parse_cpu_affinity

if TYPE_CHECKING:
    from kvmkit.gdb import GdbStub
    from kvmkit.vmm.machine import Machine

ESCAPE = 0x01  # Ctrl-A, then 'x' quits (as in QEMU's -nographic console)


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "run", help="boot a Linux microVM",
        description="Boot a Linux guest (the default image unless --kernel is given). With a "
        "COMMAND, run it in the guest, print its output and exit with its status; without, "
        "open the serial console (Ctrl-A x quits).",
    )  # fmt: skip
    p.add_argument("--kernel", type=Path, help="bzImage or ELF vmlinux (PVH)")
    p.add_argument("--initrd", type=Path, help="initramfs for --kernel")
    p.add_argument(
        "--cmdline",
        help="kernel command line: replaces kvmkit's defaults for --kernel, is added to them "
        "for the default image; the root drive's and the devices' parameters always follow "
        "(docs/api.md)",
    )
    p.add_argument(
        "--vcpus", type=int, default=None,
        help=f"number of vCPUs (default 1, or as many as --topology has; at most {MAX_VCPUS})",
    )  # fmt: skip
    p.add_argument("--mem-mib", type=int, default=256, help="guest memory in MiB (default 256)")
    p.add_argument("--timeout", type=float, default=None, help="stop the VM after S seconds")
    p.add_argument(
        "--topology", metavar="sockets=S,dies=D,cores=C,threads=T",
        help="CPU topology (levels not given are 1; the product is the vCPU count); APIC IDs "
        "follow it, with gaps where a level is not a power of two (docs/topology.md)",
    )  # fmt: skip
    p.add_argument(
        "--numa", action="append", default=[], metavar="cpus=A-B,mem-mib=M[,host-node=N]",
        help="a guest NUMA node (repeat for each): its vCPUs (cpus= may repeat), its memory "
        "(the nodes' memory adds up to --mem-mib) and the host node to bind that memory to",
    )  # fmt: skip
    p.add_argument(
        "--huge-pages", choices=("2M",), default=None,
        help="back guest memory with 2 MiB huge pages (hugetlbfs); the host must have enough "
        "free (/proc/sys/vm/nr_hugepages)",
    )  # fmt: skip
    p.add_argument(
        "--cpu-affinity", action="append", default=[], metavar="[V=]CPUS",
        help="host CPUs for the vCPU threads: CPUS (a list like 0-3,6) for every vCPU, "
        "V=CPUS for vCPU V (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--nested", action="store_true",
        help="let the guest run VMs of its own: expose the host's VMX/SVM (hidden otherwise); "
        "the default image then loads kvm and kvm_amd/kvm_intel (docs/nested.md)",
    )  # fmt: skip
    p.add_argument(
        "--hyperv", nargs="?", const="all", default=None, metavar="FEATURE,...",
        help="Hyper-V enlightenments: every one the host offers, or those named ("
        + ", ".join(hv.FEATURES) + "); KVM's own CPUID leaves are hidden (docs/hyperv.md)",
    )  # fmt: skip
    p.add_argument(
        "--hyperv-kvm-leaves", action="store_true",
        help="with --hyperv: keep KVM's CPUID leaves too, at 0x40000100 (Linux then uses KVM's "
        "paravirtual interface, Windows Hyper-V's)",
    )  # fmt: skip
    p.add_argument(
        "--gdb", metavar="tcp:HOST:PORT|unix:PATH", help="serve GDB's remote protocol there"
    )
    p.add_argument(
        "--gdb-wait", choices=("yes", "no"), default="yes",
        help="with --gdb: start stopped and wait for gdb (yes, default) or run at once (no)",
    )  # fmt: skip
    p.add_argument(
        "--snapshot-after", type=float, metavar="S",
        help="after S seconds pause the VM, write a snapshot (--snapshot-state/--snapshot-mem) "
        "and stop it; `kvmkit restore` resumes it",
    )  # fmt: skip
    p.add_argument("--snapshot-state", type=Path, default=Path("kvmkit.state"))
    p.add_argument("--snapshot-mem", type=Path, default=Path("kvmkit.mem"))
    p.add_argument(
        "--stats", action="store_true",
        help="at the end, print to stderr the run time, vCPU exits and console bytes",
    )  # fmt: skip
    p.add_argument(
        "--rootfs", metavar="PATH[,ro]",
        help="boot this root file system image (ext4, ...): the first drive, /dev/vda, "
        "with root=/dev/vda on the kernel command line; the default image's init mounts it "
        "and runs its /sbin/init (or runs COMMAND in it); ro: read-only",
    )  # fmt: skip
    p.add_argument(
        "--drive", action="append", default=[],
        metavar="PATH[,ro][,serial=ID][,cache=unsafe|writeback][,root]",
        help="a raw disk image as a virtio-blk drive (/dev/vda, vdb, ... in order); "
        "ro: read-only (guest writes fail); cache: whether a guest flush is fdatasync "
        "(writeback, the default) or not offered (unsafe); root: the root device",
    )
    p.add_argument("--rng", action="store_true", help="a virtio-rng device (/dev/hwrng)")
    p.add_argument(
        "--virtio-transport", choices=("mmio", "pci"), default="mmio",
        help="how the guest finds the virtio devices: virtio-mmio (default) or virtio-pci",
    )  # fmt: skip
    p.add_argument(
        "--net", action="append", default=[], metavar="tap=NAME[,mac=MAC]",
        help="a virtio-net device on host tap NAME (opened, or created if missing); "
        "eth0, eth1, ... in order (docs/virtio.md)",
    )  # fmt: skip
    p.add_argument(
        "--vsock", metavar="cid=N,uds=PATH",
        help="a virtio-vsock device, guest CID N; host side: Unix socket PATH "
        "(Firecracker's CONNECT protocol, docs/virtio.md)",
    )  # fmt: skip
    p.add_argument(
        "--vfio", action="append", default=[], metavar="DDDD:BB:DD.F",
        help="give the guest this host PCI device (bound to vfio-pci; repeatable; "
        "docs/vfio.md)",
    )  # fmt: skip
    p.add_argument(
        "--api-sock", metavar="PATH",
        help="serve kvmkit's Firecracker-compatible API on this Unix socket (docs/api.md); "
        "without a kernel, command or config file, wait for InstanceStart",
    )  # fmt: skip
    p.add_argument(
        "--config-file", type=Path, metavar="F",
        help="boot from a JSON file in Firecracker's --config-file shape",
    )  # fmt: skip
    add_seccomp_options(p)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    p.set_defaults(func=run)


def _progress(line: str) -> None:
    print(f"kvmkit: {line}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _raw_terminal(fd: int) -> Iterator[None]:
    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _forward_input(machine: Machine, fd: int, stop: threading.Event) -> None:
    pending_escape = False
    while not stop.is_set():
        ready, _, _ = select.select([fd], [], [], 0.2)
        if not ready:
            continue
        data = os.read(fd, 1024)
        if not data:
            return
        out = bytearray()
        for b in data:
            if pending_escape:
                pending_escape = False
                if b in (ord("x"), ord("X")):
                    machine.stop()
                    return
                if b != ESCAPE:
                    out.append(ESCAPE)
            elif b == ESCAPE:
                pending_escape = True
                continue
            out.append(b)
        if out:
            machine.write_console(bytes(out))


def _api_devices(args: argparse.Namespace) -> dict[str, Any]:
    """--drive, --net and --vsock as the API's drives, network interfaces and vsock (with
    --api-sock the action layer builds the machine; they used to be dropped silently)."""
    out: dict[str, Any] = {}
    try:
        drives = [DriveConfig.parse(spec) for spec in args.drive]
        nets = [NetConfig.parse(spec) for spec in args.net]
        vsock = VsockConfig.parse(args.vsock) if args.vsock else None
    except ValueError as err:
        raise UserError(str(err)) from None
    if drives:
        # The API's drive id is the drive's serial (GET_ID), as `serial=` gives it.
        out["drives"] = [
            {"drive_id": d.serial or f"drive{i}", "path_on_host": str(d.path),
             "is_root_device": False, "is_read_only": d.read_only}
            for i, d in enumerate(drives)
        ]  # fmt: skip
    if nets:
        out["network-interfaces"] = [
            {"iface_id": f"eth{i}", "host_dev_name": n.tap, **({"guest_mac": n.mac} if n.mac
                                                               else {})}
            for i, n in enumerate(nets)
        ]  # fmt: skip
    if vsock is not None:
        out["vsock"] = {"guest_cid": vsock.cid, "uds_path": str(vsock.uds_path)}
    if args.vfio:
        out["vfio-devices"] = [{"device_id": f"vfio{i}", "bdf": b} for i, b in enumerate(args.vfio)]
    return out


def run(args: argparse.Namespace) -> int:
    seccomp.start_strace()  # KVMKIT_SECCOMP_STRACE: list this process's calls (security.md)
    dump = StateDump()
    # A bad --seccomp-filter is refused first, in one line, before anything starts.
    filters = seccomp.cli_filters(seccomp_wanted(args), args.seccomp_filter)
    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if getattr(args, "api_sock", None) or getattr(args, "config_file", None):
        from kvmkit.cli.api_run import run_api

        if args.gdb or args.snapshot_after is not None:
            raise UserError(
                "--gdb and --snapshot-after do not combine with --api-sock/--config-file"
            )
        if args.rootfs or args.rng:
            # Not silently dropped (--drive, --net and --vsock become the API's devices).
            raise UserError(
                "--rootfs and --rng do not combine with --api-sock/--config-file: configure "
                "them through the API or the config file (PUT /drives/{id} with "
                "is_root_device, PUT /entropy)"
            )
        if args.topology or args.numa or args.huge_pages or args.cpu_affinity:
            raise UserError(
                "--topology, --numa, --huge-pages and --cpu-affinity do not combine with "
                "--api-sock/--config-file (use machine-config's smt and huge_pages)"
            )
        if args.hyperv is not None or args.hyperv_kvm_leaves:
            raise UserError("--hyperv does not combine with --api-sock/--config-file")
        if args.nested:  # what this host lacks, in one line, before the API serves
            _check_extensions(MachineConfig(nested=True))
        return run_api(
            api_sock=args.api_sock, config_file=args.config_file, kernel=args.kernel,
            initrd=args.initrd, cmdline=args.cmdline,
            vcpus=args.vcpus if args.vcpus is not None else 1, mem_mib=args.mem_mib,
            command=command, timeout=args.timeout, virtio_transport=args.virtio_transport,
            extra_config=_api_devices(args) or None,
            seccomp_filters=filters, nested=args.nested,
        )  # fmt: skip
    config = MachineConfig(
        kernel=args.kernel, initrd=args.initrd, cmdline=args.cmdline,
        mem_mib=args.mem_mib, command=command,
    )  # fmt: skip
    _cpu_options(config, args)
    try:
        config.drives = [DriveConfig.parse(spec) for spec in args.drive]
        if args.rootfs:
            root = DriveConfig.parse(args.rootfs)
            if root.root or root.serial or set(args.rootfs.split(",")[1:]) - {"ro", "readonly"}:
                raise ValueError(f"--rootfs {args.rootfs}: the only option is ro")
            root.root = True
            config.drives.insert(0, root)
        config.nets = [NetConfig.parse(spec) for spec in args.net]
        config.vsock = VsockConfig.parse(args.vsock) if args.vsock else None
    except ValueError as err:
        raise UserError(str(err)) from None
    config.rng = args.rng
    config.virtio_transport = args.virtio_transport
    _extension_options(config, args)
    config.vfio = list(args.vfio)
    if config.vfio and args.snapshot_after is not None:
        from kvmkit.vmm.machine import VFIO_NO_SNAPSHOT

        raise UserError(f"--snapshot-after: {VFIO_NO_SNAPSHOT}")
    config.validate()
    if config.nested or config.hyperv is not False:
        _check_extensions(config)  # before the PVM refusal: say what this host lacks
    implementation, why = detect_implementation()
    if not implementation.startswith("hardware-") and not os.environ.get("KVMKIT_FORCE_RUN"):
        raise UserError(
            f"this host's /dev/kvm is {implementation} ({why}): unmodified Linux guests cannot "
            "run on it; run them in the emulated hardware-virtualization lane instead: "
            f"kvmkit lane -- kvmkit run {' '.join(command) if command else ''}".rstrip()
        )
    stdout = sys.stdout.buffer

    def write_out(data: bytes) -> None:
        stdout.write(data)
        stdout.flush()

    if config.kernel is None:
        from kvmkit.image.guest import default_image

        default_image(progress=_progress)
    from kvmkit.vmm.machine import EndReason, Machine  # here: `kvmkit --help` stays light

    if filters is not None:
        seccomp.install_for_cli(filters, "kvmkit run")
    with Machine(config, command_output=write_out) as machine:
        dump.machine = machine
        machine.build()
        gdb_stub = _start_gdb(machine, args) if getattr(args, "gdb", None) else None
        interactive = not command
        stop_input = threading.Event()
        stdin_fd = sys.stdin.fileno() if sys.stdin is not None else -1
        if interactive:
            machine.console.add_listener(write_out)
        with contextlib.ExitStack() as stack:
            if interactive and stdin_fd >= 0 and os.isatty(stdin_fd):
                stack.enter_context(_raw_terminal(stdin_fd))
                _progress("console attached; Ctrl-A x quits\r")
            if interactive and stdin_fd >= 0:
                start_thread(ThreadKind.INPUT, "stdin", _forward_input, machine, stdin_fd,
                             stop_input)  # fmt: skip
            machine.start()
            if args.snapshot_after is not None:
                from kvmkit.vmm.snapshot import snapshot_after

                status = snapshot_after(
                    machine, args.snapshot_after, args.snapshot_state, args.snapshot_mem
                )
                if status is not None:
                    return status
            result = machine.wait(args.timeout)
            if getattr(args, "stats", False):
                _print_stats(machine)
            if gdb_stub is not None:
                gdb_stub.vm_exited(result.exit_status if result is not None else 0)
                gdb_stub.close()
            stop_input.set()
            if result is None:
                machine.stop()
                machine.wait(10)
                tail = machine.console.tail(2000).decode("utf-8", "replace")
                print(f"\n--- last console output ---\n{tail}\n---", file=sys.stderr)
                print(f"kvmkit run: timed out after {args.timeout} s", file=sys.stderr)
                return 124
    if command and result.command_status is not None:
        if result.reason not in (EndReason.POWEROFF, EndReason.STOPPED):
            print(f"kvmkit run: after the command, {result.message}", file=sys.stderr)
        return result.command_status
    print(f"kvmkit run: {result.message}", file=sys.stderr)
    return result.exit_status


class StateDump:
    """`kill -USR1 PID` prints the VM's state (vCPUs, console, virtio queues beside the
    guest's rings, worker threads) to stderr: what to look at when a run seems stuck.
    Installed first thing, so a signal sent while the VM is still being built is answered
    (not the default action, which ends the process)."""

    def __init__(self) -> None:
        import signal

        self.machine: Machine | None = None
        signal.signal(signal.SIGUSR1, self._dump)

    def _dump(self, signum: int, frame: object) -> None:
        try:
            machine = self.machine
            text = machine.describe() if machine is not None else "kvmkit: no VM yet\n"
            sys.stderr.write(text)
            sys.stderr.flush()
        except Exception as err:  # a diagnostic must not end the run
            print(f"kvmkit: state dump failed: {err!r}", file=sys.stderr)


def _cpu_options(config: MachineConfig, args: argparse.Namespace) -> None:
    """--vcpus, --topology, --numa, --huge-pages and --cpu-affinity into `config` (their
    checks against each other are MachineConfig.validate's)."""
    if args.topology is not None:
        try:
            config.topology = Topology.parse(args.topology)
        except ValueError as err:
            raise UserError(f"--topology {args.topology}: {err}") from None
    if args.vcpus is not None:
        config.vcpus = args.vcpus
    elif config.topology is not None:
        config.vcpus = config.topology.vcpus
    for spec in args.numa:
        try:
            config.numa.append(NumaNode.parse(spec))
        except ValueError as err:
            raise UserError(f"--numa {spec}: {err}") from None
    config.huge_pages = args.huge_pages
    config.cpu_affinity = parse_cpu_affinity(args.cpu_affinity)


def _extension_options(config: MachineConfig, args: argparse.Namespace) -> None:
    """--nested, --hyperv[=FEATURE,...] and --hyperv-kvm-leaves into `config`."""
    config.nested = args.nested
    if args.hyperv is not None:
        try:
            wanted = hv.parse_features(args.hyperv)
        except ValueError as err:
            raise UserError(str(err)) from None
        config.hyperv = True if wanted is None else wanted
    config.hyperv_kvm_leaves = args.hyperv_kvm_leaves


def _check_extensions(config: MachineConfig) -> None:
    """Refuse --nested / --hyperv the host cannot serve (one line, status 2)."""
    from kvmkit.kvm import Kvm
    from kvmkit.probe import device_from_env
    from kvmkit.vmm.extensions import resolve

    try:
        kvm = Kvm(device_from_env())
    except OSError as err:
        raise UserError(str(err.strerror or err)) from None
    with kvm:
        resolve(config, kvm)


def _print_stats(machine: Machine) -> None:
    ring = machine.ring.ring.drained if machine.ring is not None else 0
    print(
        f"kvmkit run: {time.monotonic() - machine.started_at:.1f} s, {machine.exits} vCPU "
        f"exits, {machine.console.total} console bytes ({ring} serial writes without an exit)",
        file=sys.stderr,
    )


def _start_gdb(machine: Machine, args: argparse.Namespace) -> GdbStub:
    """`--gdb`: hook the GDB stub into the machine's vCPU threads and start listening."""
    from kvmkit.gdb import GdbStub

    wait = args.gdb_wait == "yes"
    stub = GdbStub.for_machine(machine, wait=wait)
    try:
        address = stub.listen(args.gdb)
    except (ValueError, OSError) as err:
        stub.close()
        raise UserError(f"--gdb {args.gdb}: {err}") from None
    note = "the VM waits for it" if wait else "the VM runs until it attaches"
    where = address.split(":", 1)[1]
    _progress(f"gdb stub on {address} ({note}): gdb -ex 'target remote {where}'")
    return stub
