"""`kvmkit-jailer`: Firecracker's jailer for `kvmkit-firecracker`, with its command line
(Firecracker's docs/jailer.md). It builds the jail `<chroot-base-dir>/<exec-file name>/<id>/root`,
enters a new mount namespace (and, with --new-pid-ns, a new pid namespace) rooted there,
joins --netns, places itself in a cgroup v2 group, drops to --uid/--gid with no capability
left and execs the copied exec file, which then sees nothing of the host but what the jail
holds (docs/security.md, "The jailer").
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvmkit import jail
from kvmkit.cli.firecracker import DEFAULT_API_SOCK, INSTANCE_ID
from kvmkit.errors import UserError

PROG = "kvmkit-jailer"
DEFAULT_BASE = "/srv/jailer"  # Firecracker's default chroot base
DEFAULT_NOFILE = 2048  # Firecracker's no-file bound when no --resource-limit is given
RESOURCES = {"fsize": resource.RLIMIT_FSIZE, "no-file": resource.RLIMIT_NOFILE}
# The device nodes a kvmkit VMM opens (mode 0600, owned by --uid/--gid, as Firecracker's
# jailer makes /dev/kvm and /dev/net/tun; /dev/urandom keeps its usual 0666). kvmkit serves
# virtio in user space and opens no /dev/vhost-* node, so the jail has none.
DEVICES = (("/dev/kvm", 0o600), ("/dev/net/tun", 0o600), ("/dev/urandom", 0o666))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, usage=f"{PROG} --id ID --exec-file FILE --uid UID --gid GID [options] "
        "[-- kvmkit-firecracker options]",
        description="Start kvmkit-firecracker confined as Firecracker's jailer confines "
        "firecracker (docs/security.md).",
    )  # fmt: skip
    p.add_argument("--id", required=True, help="microVM id: 1-64 characters, alphanumeric or -")
    p.add_argument("--exec-file", required=True, type=Path,
                   help="the kvmkit-firecracker program (its name must contain 'firecracker')")
    p.add_argument("--uid", required=True, type=_id_number, help="uid the VMM runs as")
    p.add_argument("--gid", required=True, type=_id_number, help="gid the VMM runs as")
    p.add_argument("--chroot-base-dir", default=DEFAULT_BASE, type=Path,
                   help=f"where jails are built (default {DEFAULT_BASE})")
    p.add_argument("--netns", type=Path, help="network namespace file to join "
                   "(e.g. /var/run/netns/NAME)")  # fmt: skip
    p.add_argument("--daemonize", action="store_true",
                   help="new session, standard I/O to /dev/null")
    p.add_argument("--new-pid-ns", action="store_true",
                   help="run the VMM as pid 1 of a new pid namespace; its pid (as the host "
                   "sees it) goes to <jail>/<exec-file name>.pid")  # fmt: skip
    p.add_argument("--cgroup", action="append", default=[], type=_setting, metavar="FILE=VALUE",
                   help="write VALUE to the VMM's cgroup file FILE (repeatable)")
    p.add_argument("--cgroup-version", default="2", choices=["1", "2"],
                   help="2 (the default; cgroup v1 is not supported: 1 is refused)")
    p.add_argument("--parent-cgroup", help="the VMM's cgroup is <cgroup2 mount>/PARENT/<id> "
                   "(default: the exec file's name)")  # fmt: skip
    p.add_argument("--resource-limit", action="append", default=[], type=_setting,
                   metavar="RESOURCE=VALUE",
                   help="fsize or no-file (repeatable; default no-file=2048)")
    return p


def _id_number(text: str) -> int:
    if not text.isdigit() or int(text) >= (1 << 32) - 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a uid/gid (0 to 4294967294)")
    return int(text)


def _setting(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key or not value:
        raise argparse.ArgumentTypeError(f"{text!r} is not of the form NAME=VALUE")
    return key, value


@dataclass
class Plan:
    """Everything checked before anything is made."""

    jail_id: str
    exec_file: Path
    name: str
    uid: int
    gid: int
    chroot: Path  # <base>/<name>/<id>/root
    netns_fd: int | None
    daemonize: bool
    new_pid_ns: bool
    cgroup: jail.Cgroup | None
    cgroup_settings: list[tuple[str, str]]
    limits: list[tuple[int, int]]
    runtime: list[str]
    vmm_args: list[str]
    env: dict[str, str] = field(default_factory=dict)


def main(argv: Sequence[str] | None = None) -> int:
    start_us = time.monotonic_ns() // 1000
    start_cpu_us = time.process_time_ns() // 1000
    # Only standard I/O is passed on to the VMM (Firecracker closes every other inherited fd).
    os.closerange(3, resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    argv = list(sys.argv[1:] if argv is None else argv)
    vmm_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, vmm_args = argv[:cut], argv[cut + 1 :]
    args = build_parser().parse_args(argv)
    try:
        plan = check(args, vmm_args)
    except UserError as err:
        print(f"{PROG}: {err}", file=sys.stderr)
        return err.exit_status
    vmm_argv = [f"/{plan.name}", f"--id={plan.jail_id}", f"--start-time-us={start_us}",
                f"--start-time-cpu-us={start_cpu_us}", *plan.vmm_args]  # fmt: skip
    return run(plan, vmm_argv)


def check(args: argparse.Namespace, vmm_args: list[str]) -> Plan:
    """Validate every input (Firecracker's first step) so that a refusal leaves nothing
    behind: the id, the exec file, the netns, the cgroup and limit settings, root."""
    if os.geteuid() != 0:
        raise UserError("must run as root (it makes device nodes, mounts and namespaces, "
                        "then drops to --uid/--gid)")  # fmt: skip
    if not INSTANCE_ID.match(args.id):
        raise UserError(f"--id {args.id!r}: 1 to 64 characters, alphanumeric or '-'")
    exec_file: Path = args.exec_file
    if not exec_file.is_file():
        raise UserError(f"--exec-file {exec_file}: no such file")
    name = exec_file.name
    if "firecracker" not in name:
        # Firecracker's rule: the jailer is for the Firecracker binary only.
        raise UserError(f"--exec-file {exec_file}: the file name must contain 'firecracker'")
    interpreter = jail.shebang(exec_file)
    runtime: list[str] = []
    if interpreter is not None:
        mine = os.path.realpath(sys.executable)
        if os.path.realpath(interpreter) != mine:
            raise UserError(
                f"--exec-file {exec_file}: its interpreter {interpreter} is not this "
                f"{PROG}'s Python ({sys.executable}); run the {PROG} of the same installation"
            )
        runtime = jail.python_runtime(interpreter)
    if args.cgroup_version == "1":
        raise UserError("--cgroup-version 1: kvmkit-jailer supports cgroup v2 only")
    cgroup = None
    if args.cgroup or args.parent_cgroup:
        base = jail.cgroup2_mount()
        if base is None:
            raise UserError("--cgroup: no cgroup v2 hierarchy is mounted (/proc/mounts)")
        parent = args.parent_cgroup if args.parent_cgroup is not None else name
        parts = [p for p in parent.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise UserError(f"--parent-cgroup {parent!r}: a path inside the hierarchy")
        cgroup = jail.Cgroup(base, "/".join([*parts, args.id]))
        cgroup.check(args.cgroup)
        for key, _ in args.cgroup:
            if "/" in key or key.startswith("."):
                raise UserError(f"--cgroup {key}: a file name of the VMM's cgroup")
    limits = []
    given = dict(args.resource_limit)
    if not given:
        given = {"no-file": str(DEFAULT_NOFILE)}
    for key, value in given.items():
        if key not in RESOURCES:
            raise UserError(f"--resource-limit {key}: one of {', '.join(RESOURCES)}")
        if not value.isdigit():
            raise UserError(f"--resource-limit {key}={value}: not a number")
        limits.append((RESOURCES[key], int(value)))
    netns_fd = None
    if args.netns is not None:
        try:
            netns_fd = os.open(args.netns, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as err:
            raise UserError(f"--netns {args.netns}: {err.strerror}") from None
        try:
            jail.setns(netns_fd, jail.CLONE_NEWNET)  # joining is the check (EINVAL if not)
        except OSError as err:
            os.close(netns_fd)
            raise UserError(f"--netns {args.netns}: not a network namespace ({err})") from None
    # The VMM's environment: Firecracker's jailer passes none; kvmkit's own settings
    # (KVMKIT_*) go through. The runtime is read-only in the jail, so Python is told not to
    # try writing bytecode: that attempt (mkdir of __pycache__) is a call the seccomp
    # filters forbid.
    env = {k: v for k, v in os.environ.items() if k.startswith("KVMKIT_")}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    from kvmkit.probe import JAILED_KVM_ENV, detect_implementation

    implementation, why = detect_implementation()
    env[JAILED_KVM_ENV] = f"{implementation}: {why}"
    chroot = Path(args.chroot_base_dir).absolute() / name / args.id / "root"
    return Plan(
        jail_id=args.id, exec_file=exec_file, name=name, uid=args.uid, gid=args.gid,
        chroot=chroot, netns_fd=netns_fd, daemonize=args.daemonize,
        new_pid_ns=args.new_pid_ns, cgroup=cgroup, cgroup_settings=args.cgroup, limits=limits,
        runtime=runtime, vmm_args=vmm_args, env=env,
    )  # fmt: skip


def run(plan: Plan, vmm_argv: list[str]) -> int:
    """Build the jail and exec the VMM in it; on a failure, undo what was made and return 1."""
    instance_dir = plan.chroot.parent
    made: list[Path] = []  # directories created here, outermost first
    for d in reversed([plan.chroot, *plan.chroot.parents]):
        if not d.exists():
            made.append(d)
    host_mnt_ns = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC) if plan.daemonize else None
    unshared = False
    try:
        for res, value in plan.limits:
            resource.setrlimit(res, (value, value))
        plan.chroot.mkdir(parents=True, exist_ok=True)
        os.chmod(plan.chroot, 0o755)
        shutil.copy2(plan.exec_file, plan.chroot / plan.name)
        os.chmod(plan.chroot / plan.name, 0o755)
        if plan.cgroup is not None:
            plan.cgroup.create(plan.cgroup_settings)
        # The mount namespace, private so that nothing mounted here reaches the host.
        jail.unshare(jail.CLONE_NEWNS)
        unshared = True
        jail.mount(None, "/", None, jail.MS_REC | jail.MS_PRIVATE)
        root = str(plan.chroot)
        jail.mount(root, root, None, jail.MS_BIND)  # pivot_root needs a mount point
        view = jail.RuntimeView(root)
        for path in plan.runtime:
            view.expose(path)
        for sub in ("dev", "dev/net", "run"):
            os.makedirs(os.path.join(root, sub), 0o755, exist_ok=True)
        for host, mode in DEVICES:
            jail.device_node(host, root + host, mode, plan.uid, plan.gid)
        # The VMM owns its root and /run (its API socket, Firecracker's default
        # /run/firecracker.socket, and anything it creates: snapshots, logs).
        os.chown(root, plan.uid, plan.gid)
        os.chown(os.path.join(root, os.path.dirname(DEFAULT_API_SOCK).lstrip("/")),
                 plan.uid, plan.gid)  # fmt: skip
        os.chdir(root)
        os.makedirs("old_root", exist_ok=True)
        jail.pivot_root(".", "old_root")
        jail.umount2("old_root", jail.MNT_DETACH)
        os.rmdir("old_root")
        os.chroot(".")
        os.chdir("/")
        if devnull is not None:
            _daemonize(devnull)
        if plan.new_pid_ns:
            jail.unshare(jail.CLONE_NEWPID)
            child = os.fork()  # the first child in the new namespace is its pid 1
            if child:
                # Written whole under a temporary name, then renamed: a reader never sees
                # the file empty.
                Path(f"/{plan.name}.pid.tmp").write_text(f"{child}\n")
                os.rename(f"/{plan.name}.pid.tmp", f"/{plan.name}.pid")
                os._exit(0)
        jail.drop_privileges(plan.uid, plan.gid, last_cap)
        os.execve(vmm_argv[0], vmm_argv, plan.env)
    except (OSError, UserError) as err:
        message = err if isinstance(err, UserError) else (err.strerror or str(err))
        if isinstance(err, OSError) and err.filename:
            message = f"{err.filename}: {message}"
        print(f"{PROG}: {message}", file=sys.stderr)
        if os.getuid() == 0:
            _undo(plan, made, instance_dir, host_mnt_ns if unshared else None)
        return err.exit_status if isinstance(err, UserError) else 1
    return 1  # not reached: execve returned without raising


def _daemonize(devnull: int) -> None:
    """setsid and standard I/O to /dev/null (Firecracker's --daemonize). setsid fails for a
    process group leader (a command started by a shell is one), so such a jailer forks
    first and its parent exits 0, leaving the child to go on."""
    if os.getpgrp() == os.getpid() and os.fork():
        os._exit(0)
    os.setsid()
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    os.close(devnull)


def _undo(plan: Plan, made: list[Path], instance_dir: Path, host_mnt_ns: int | None) -> None:
    """Leave nothing half-made: back in the host's mount namespace (where the jail's mounts
    do not exist, so removing the tree cannot reach the bind-mounted runtime), remove the
    directories this run created and its cgroup."""
    if host_mnt_ns is not None:
        jail.setns(host_mnt_ns, jail.CLONE_NEWNS)
    if plan.cgroup is not None:
        plan.cgroup.undo()
    if instance_dir in made:
        shutil.rmtree(instance_dir, ignore_errors=True)
        for d in reversed(made[: made.index(instance_dir)]):
            try:
                d.rmdir()  # a base directory this run made, unless another jail is in it now
            except OSError:
                break
    else:
        # The instance directory existed: remove only what this run put in it.
        (plan.chroot / plan.name).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
