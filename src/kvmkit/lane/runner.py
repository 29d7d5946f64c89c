"""Boot the lane VM under QEMU/TCG with emulated AMD-V and run one command in it.

Channels (all socketpairs handed to QEMU as `-chardev socket,fd=N`, so there is no socket
file to race on and nothing to clean up):
  console         the guest's ttyS0: kernel messages and init's progress markers; kept in a
                  ring buffer, shown live only with --verbose and as a tail on failure
  kvmkit.stdout   virtio-serial port carrying the command's stdout, written to our fd 1
  kvmkit.stderr   virtio-serial port carrying the command's stderr, written to our fd 2
  kvmkit.control  virtio-serial port: guest says `ready`, then `exit STATUS OUT ERR` where
                  OUT/ERR are the byte counts the guest queued on the two data ports; the
                  host answers `ack` once it has received that many bytes, and only then does
                  the guest power off.  Separate ports never interleave stdout with stderr and
                  the byte counts make the end of output exact, not a matter of timing.

QEMU runs in its own session (terminal Ctrl-C reaches only us, and we stop it in order) with
PR_SET_PDEATHSIG=SIGKILL, so a SIGKILLed kvmkit leaves no QEMU behind either.
"""

from __future__ import annotations

import collections
import ctypes
import os
import selectors
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from kvmkit.cache import cache_dir
from kvmkit.errors import UserError
from kvmkit.lane import assets, initramfs
from kvmkit.lane.init_script import MARKER

QEMU_BINARY = "qemu-system-x86_64"

# Exit statuses of the lane itself (the command's own status passes through unchanged).
EXIT_TIMEOUT = 124  # as timeout(1)
EXIT_LANE_FAILED = 125  # the lane VM did not come up or died; as timeout(1)/docker run
EXIT_SIGINT = 130
EXIT_SIGTERM = 143

# Generous, because TCG slows down a lot when another process competes for the CPU: the
# lane normally reaches the command in a few seconds.
DEFAULT_BOOT_TIMEOUT = 300.0
# After `exit`, how long to wait for the announced output bytes, then for QEMU to exit.
DRAIN_TIMEOUT = 60.0
SHUTDOWN_TIMEOUT = 30.0

CONSOLE_TAIL_LINES = 40

# Host-specific variables that mean nothing (or something wrong) inside the lane.
_ENV_DROP = frozenset({
    "SSH_AUTH_SOCK", "SSH_AGENT_PID", "DISPLAY", "WAYLAND_DISPLAY", "XAUTHORITY",
    "XDG_RUNTIME_DIR", "DBUS_SESSION_BUS_ADDRESS", "PWD", "OLDPWD", "SHLVL", "_",
})
_TMP_VARS = ("TMPDIR", "TMP", "TEMP")

_CAUSES = {
    "module": "a kernel module failed to load",
    "9p": "a 9p mount failed",
    "ports": "the virtio-serial ports did not appear",
    "mount": "mounting the lane's file systems failed",
    "switch": "switching to the host root failed",
}


@dataclass
class LaneOptions:
    command: Sequence[str]
    # One vCPU: with two, QEMU 7.2's multi-threaded TCG lets the lane kernel itself
    # triple-fault under a long nested run (docs/lane.md, "Why one vCPU").
    cpus: int = 1
    mem_mib: int = 2048
    timeout: float | None = None
    boot_timeout: float = DEFAULT_BOOT_TIMEOUT
    shares: Sequence[Path] = ()
    verbose: bool = False
    extra_modules: Sequence[str] = ()
    # QEMU devices to pass through (`NAME[,OPTIONS]`, e.g. "edu"): added behind an emulated
    # IOMMU and bound to vfio-pci inside the lane (docs/lane.md, docs/vfio.md).
    devices: Sequence[str] = ()
    cwd: Path | None = None
    env: Mapping[str, str] | None = None
    qemu: str | None = None


@dataclass
class _Stats:
    started: float = field(default_factory=time.monotonic)
    ready_at: float | None = None


def find_qemu(explicit: str | None = None) -> str:
    """The QEMU binary: `explicit`, else $KVMKIT_QEMU, else qemu-system-x86_64 on PATH."""
    name = explicit or os.environ.get("KVMKIT_QEMU") or QEMU_BINARY
    found = shutil.which(name)
    if found is None:
        raise UserError(
            f"QEMU not found: `{name}` (install qemu-system-x86, e.g. scripts/setup-host.sh)"
        )
    return found


def find_repository(start: Path) -> Path | None:
    for path in (start, *start.parents):
        if (path / ".git").exists():
            return path
    return None


def writable_shares(cwd: Path, extra: Sequence[Path]) -> list[Path]:
    """The directories shared writable, deduplicated, parents before children."""
    chosen: list[Path] = []
    base = find_repository(cwd) or cwd
    for path in (base, cache_dir(), *extra):
        real = Path(os.path.realpath(path))
        if not real.is_dir():
            raise UserError(f"--share {path}: not a directory")
        if real != Path("/"):  # the root is shared read-only by design
            chosen.append(real)
    result: list[Path] = []
    for path in sorted(set(chosen), key=lambda p: (len(p.parts), str(p))):
        # A share inside another writable share is already visible there (multidevs=remap
        # exposes submounts), and stacking a second 9p mount would only cost lookups.
        if not any(path.is_relative_to(other) for other in result):
            result.append(path)
    return result


def lane_environment(env: Mapping[str, str], shares: Sequence[Path]) -> dict[str, str]:
    out = {k: v for k, v in env.items() if k not in _ENV_DROP and "=" not in k and k}
    for var in _TMP_VARS:
        # /tmp is a fresh tmpfs inside the lane; a host temporary directory only exists
        # there if it lies in a writable share.
        value = out.get(var)
        if value and not any(Path(value).is_relative_to(s) for s in shares):
            del out[var]
    out.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    out.setdefault("HOME", str(Path.home()))
    # The lane exists to stream a command's output as it is produced; Python would otherwise
    # block-buffer it because the lane's stdout is not a terminal.
    out.setdefault("PYTHONUNBUFFERED", "1")
    out["KVMKIT_IN_LANE"] = "1"
    return out


# Passthrough devices (--device): QEMU's VT-d with interrupt remapping, which VFIO needs for
# MSI, and which QEMU allows only with the split irqchip; the lane kernel turns it on with
# intel_iommu=on (CONFIG_INTEL_IOMMU_DEFAULT_ON is off in Debian's kernel).
VFIO_MODULES = ("vfio_pci", "vfio_iommu_type1")
FIRST_DEVICE_SLOT = 0x10  # free slots for --device functions, far from QEMU's own devices


def _devfn(addr: str) -> tuple[int, int]:
    """QEMU's PCI `addr` property: SLOT[.FN], hexadecimal (qdev_prop_pci_devfn)."""
    slot_text, _, fn_text = addr.partition(".")
    slot, fn = int(slot_text, 16), int(fn_text or "0", 16)
    if not 0 <= slot < 32 or not 0 <= fn < 8:
        raise ValueError(addr)
    return slot, fn


ROOT_PORT_OPTION = "root-port=on"  # kvmkit's, not QEMU's: the device behind a root port


@dataclass(frozen=True)
class LaneDevice:
    """One `--device`: its QEMU -device arguments and what the lane's init binds to vfio-pci,
    a BDF (bus 0) or PORT/DEVFN (function DEVFN on the secondary bus of the root port at
    BDF PORT, whose number the lane's kernel chooses)."""

    qemu: tuple[str, ...]
    bind: str


def lane_devices(specs: Sequence[str]) -> list[LaneDevice]:
    """The QEMU devices and lane addresses of each `--device` NAME[,OPTIONS]: a device
    without `addr=` gets the next free slot from 0x10 on bus 0; with `root-port=on` it sits
    alone behind a PCI Express root port (QEMU's pcie-root-port) in that slot, so a PCIe
    device is a PCIe endpoint (function-level reset, as on real hosts) rather than an
    integrated one on the root bus."""
    taken: set[int] = set()
    parsed: list[tuple[str, list[str], tuple[int, int] | None, bool]] = []
    for spec in specs:
        name, *opts = spec.split(",")
        if not name or not all("=" in o for o in opts):
            raise UserError(f"--device {spec!r}: expected NAME[,KEY=VALUE...]")
        port = ROOT_PORT_OPTION in opts
        opts = [o for o in opts if o != ROOT_PORT_OPTION]
        if any(o.startswith("root-port=") for o in opts):
            raise UserError(f"--device {spec!r}: root-port takes only `on`")
        addr = next((o.split("=", 1)[1] for o in opts if o.startswith("addr=")), None)
        if any(o.startswith("bus=") for o in opts):
            raise UserError(f"--device {spec!r}: bus 0 only (or root-port=on)")
        try:
            devfn = _devfn(addr) if addr is not None else None
        except ValueError:
            raise UserError(f"--device {spec!r}: addr must be SLOT[.FN] in hex") from None
        if port and devfn is not None and devfn[1]:
            raise UserError(f"--device {spec!r}: a root port takes a whole slot (addr=SLOT)")
        if devfn is not None:
            taken.add(devfn[0])
        parsed.append((name, [o for o in opts if not o.startswith("addr=")], devfn, port))
    out: list[LaneDevice] = []
    next_slot = FIRST_DEVICE_SLOT
    ports = 0
    for name, opts, devfn, port in parsed:
        if devfn is None:
            while next_slot in taken:
                next_slot += 1
            if next_slot >= 32:
                raise UserError("--device: no free PCI slot left on the lane's bus 0")
            devfn = (next_slot, 0)
            taken.add(next_slot)
        at = f"0000:00:{devfn[0]:02x}.{devfn[1]}"
        if port:
            ports += 1
            # chassis/slot must be unique per port (QEMU's pcie_chassis_add_slot).
            port_id = f"kvmkit_rp{ports}"
            qemu = (
                f"pcie-root-port,id={port_id},chassis={ports},addr={devfn[0]:#x}.0",
                ",".join([name, *opts, f"bus={port_id}", "addr=0x0.0"]),
            )
            out.append(LaneDevice(qemu, f"{at}/00.0"))
        else:
            device = ",".join([name, *opts, f"addr={devfn[0]:#x}.{devfn[1]}"])
            out.append(LaneDevice((device,), at))
    return out


def run_script(command: Sequence[str], cwd: Path, env: Mapping[str, str],
               shares: Sequence[Path], vfio_bdfs: Sequence[str] = ()) -> str:
    """The per-run /kvmkit/run.sh sourced by both init stages."""
    q = shlex.quote
    lines = ["kvmkit_shares() {", "    :"]
    lines += [f"    share kvmkit{i} {q(str(p))}" for i, p in enumerate(shares)]
    lines += ["}", "kvmkit_vfio() {", "    :"]
    lines += [f"    bind_vfio {q(bdf)}" for bdf in vfio_bdfs]
    lines += ["}", "kvmkit_command() {"]
    # `env -i` drops the kernel's init environment; the host's /bin/sh (not busybox, whose
    # shell would prefer its own applets over the host's programs) changes directory and
    # execs the command, so `ls` is the host's ls and a missing command gives status 127.
    words = ['"$BB"', "env", "-i"]
    words += [q(f"{k}={v}") for k, v in sorted(env.items())]
    words += ["/bin/sh", "-c",
              q('cd -- "$1" || { echo "kvmkit lane: cannot cd to $1" >&2; exit 125; }; '
                'shift; exec "$@"'),
              "kvmkit-lane", q(str(cwd))]
    words += [q(arg) for arg in command]
    lines += ["    " + " ".join(words), "}", ""]
    return "\n".join(lines)


def _virtfs(path: Path, tag: str, readonly: bool) -> str:
    escaped = str(path).replace(",", ",,")  # QEMU's option syntax doubles literal commas
    opts = f"local,path={escaped},mount_tag={tag},security_model=none,multidevs=remap"
    return opts + (",readonly=on" if readonly else "")


def qemu_argv(qemu: str, opts: LaneOptions, kernel: assets.LaneKernel, initrd: Path,
              shares: Sequence[Path], fds: Mapping[str, int]) -> list[str]:
    # nohz=off highres=off: a periodic tick. Under QEMU/TCG with nested SVM the lane kernel
    # sometimes lost its one-shot timer interrupt and then idled for good (QEMU at 0% CPU, no
    # timeout inside firing); with a periodic tick a lost interrupt costs one tick.
    append = (
        "console=ttyS0 rdinit=/init panic=-1 random.trust_cpu=on mitigations=off"
        " nohz=off highres=off"
    )
    if not opts.verbose:
        append += " quiet"
    devices = lane_devices(opts.devices)
    machine = "q35,accel=tcg"
    iommu: list[str] = []
    if devices:
        machine += ",kernel-irqchip=split"
        append += " intel_iommu=on"
        # Before every other PCI device, so that all of them sit behind it.
        iommu = ["-device", "intel-iommu,intremap=on"]
    argv = [
        qemu, "-M", machine, "-cpu", "EPYC,+svm,+npt",
        "-smp", str(opts.cpus), "-m", str(opts.mem_mib),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        *_firmware(qemu), *iommu,
        "-kernel", str(kernel.boot_image), "-initrd", str(initrd), "-append", append,
        "-chardev", f"socket,id=console,fd={fds['console']}", "-serial", "chardev:console",
        "-device", "virtio-serial-pci,id=vser",
    ]
    for name in ("stdout", "stderr", "control"):
        argv += ["-chardev", f"socket,id={name},fd={fds[name]}",
                 "-device", f"virtserialport,bus=vser.0,chardev={name},name=kvmkit.{name}"]
    argv += ["-virtfs", _virtfs(Path("/"), "hostroot", readonly=True)]
    for i, path in enumerate(shares):
        argv += ["-virtfs", _virtfs(path, f"kvmkit{i}", readonly=False)]
    for device in devices:
        for arg in device.qemu:
            argv += ["-device", arg]
    # For experiments and extra devices (e.g. `-device edu`) without a new option each time.
    argv += shlex.split(os.environ.get("KVMKIT_LANE_QEMU_ARGS", ""))
    return argv


def _firmware(qemu: str) -> list[str]:
    """qboot instead of SeaBIOS when QEMU ships it: it reaches the kernel ~0.5 s sooner."""
    datadirs = [Path(qemu).resolve().parent.parent / "share" / "qemu", Path("/usr/share/qemu")]
    for d in datadirs:
        if (d / "qboot.rom").is_file():
            return ["-bios", str(d / "qboot.rom")]
    return []


def _child_setup() -> None:
    # Runs in the forked child before exec: die with the parent, whatever kills it.
    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent already died between fork and prctl
        os._exit(1)


class _Terminated(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _terminate_on_signals() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise _Terminated(signum)

    saved = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


def _write_all(fd: int, data: bytes) -> bool:
    """Write to our stdout/stderr; False once the reader is gone (then output is dropped)."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BrokenPipeError:
            return False
        view = view[n:]
    return True


class _Lane:
    def __init__(self, opts: LaneOptions) -> None:
        self.opts = opts
        self.console = collections.deque[str](maxlen=400)
        self.console_partial = b""
        self.qemu_stderr = b""
        self.stage = "qemu"
        self.failure: tuple[str, str] | None = None
        self.stats = _Stats()
        self.exit_info: tuple[int, int | None, int | None] | None = None
        self.exit_at: float | None = None
        self.received = {"stdout": 0, "stderr": 0}
        self.acked = False
        self.control_partial = b""
        self.out_open = {"stdout": True, "stderr": True}

    def log(self, message: str) -> None:
        print(f"kvmkit lane: {message}", file=sys.stderr, flush=True)

    # -- console and control parsing --------------------------------------------------------

    def on_console(self, data: bytes) -> None:
        if self.opts.verbose:
            _write_all(2, data)
        lines = (self.console_partial + data).split(b"\n")
        self.console_partial = lines.pop()
        for raw in lines:
            line = raw.decode(errors="replace").rstrip("\r")
            self.console.append(line)
            idx = line.find(MARKER)
            if idx < 0:
                continue
            words = line[idx + len(MARKER):].strip().split(" ", 2)
            if words[0] == "stage" and len(words) > 1:
                self.stage = words[1]
            elif words[0] == "fail" and len(words) > 1:
                self.failure = (words[1], words[2] if len(words) > 2 else "")

    def on_control(self, data: bytes) -> None:
        lines = (self.control_partial + data).split(b"\n")
        self.control_partial = lines.pop()
        for raw in lines:
            words = raw.decode(errors="replace").split()
            if words == ["ready"]:
                self.stats.ready_at = time.monotonic()
                self.stage = "run"
                if self.opts.verbose:
                    took = self.stats.ready_at - self.stats.started
                    self.log(f"lane ready after {took:.2f} s")
            elif len(words) == 4 and words[0] == "exit":
                counts = [int(w) if w.isdigit() else None for w in words[2:]]
                self.exit_info = (int(words[1]), counts[0], counts[1])
                self.exit_at = time.monotonic()

    def output_complete(self) -> bool:
        assert self.exit_info is not None
        _, out, err = self.exit_info
        return all(
            want is None or self.received[name] >= want or not self.out_open[name]
            for name, want in (("stdout", out), ("stderr", err))
        )

    # -- failure reporting ------------------------------------------------------------------

    def console_tail(self) -> str:
        lines = [*self.console]
        if self.console_partial:
            lines.append(self.console_partial.decode(errors="replace"))
        return "\n".join(lines[-CONSOLE_TAIL_LINES:])

    def report_failure(self, summary: str) -> None:
        if not self.opts.verbose:
            tail = self.console_tail()
            if tail.strip():
                print(f"--- lane console (last {CONSOLE_TAIL_LINES} lines) ---\n{tail}\n---",
                      file=sys.stderr)
            qerr = "\n".join(
                line for line in self.qemu_stderr.decode(errors="replace").splitlines()
                # TCG lacks some of the EPYC model's features and says so at every start.
                if "TCG doesn't support requested feature" not in line
            ).strip()
            if qerr:
                print(f"--- qemu stderr ---\n{qerr}\n---", file=sys.stderr)
        self.log(summary)

    def boot_failure(self) -> str:
        if self.failure is not None:
            cause, detail = self.failure
            return f"lane failed to come up: {_CAUSES.get(cause, cause)}: {detail}"
        text = "\n".join(self.console)
        if self.stage == "qemu":
            if "Kernel panic" in text:
                return "lane failed to come up: the kernel panicked before kvmkit's init ran"
            return "lane failed to come up: QEMU exited before kvmkit's init ran"
        return f"lane failed to come up: the VM stopped during stage {self.stage!r}"


def prepare(modules: Sequence[str] = (), refresh: bool = False) -> tuple[assets.LaneKernel, Path]:
    """Fetch the kernel and build the base initramfs (what `kvmkit lane --prepare` does)."""
    kernel = assets.ensure_kernel(refresh=refresh)
    assets.ensure_vmlinux(kernel)
    busybox = assets.ensure_busybox()
    base = initramfs.base_initramfs(kernel, busybox, (*assets.LANE_MODULES, *modules))
    return kernel, base


def run(opts: LaneOptions) -> int:
    """Run the lane; return the command's exit status or one of the EXIT_* codes."""
    if not opts.command:
        raise UserError("no command given (usage: kvmkit lane [OPTIONS] -- COMMAND [ARGS...])")
    qemu = find_qemu(opts.qemu)
    if opts.cpus < 1 or opts.mem_mib < 256:
        raise UserError("--cpus must be >= 1 and --mem-mib >= 256")
    cwd = Path(os.path.realpath(opts.cwd or Path.cwd()))
    shares = writable_shares(cwd, [Path(p) for p in opts.shares])
    env = lane_environment(os.environ if opts.env is None else opts.env, shares)
    devices = lane_devices(opts.devices)
    modules = (*opts.extra_modules, *(VFIO_MODULES if devices else ()))
    kernel, base = prepare(modules)
    script = run_script(opts.command, cwd, env, shares, [d.bind for d in devices])

    lane = _Lane(opts)
    with tempfile.TemporaryDirectory(prefix="kvmkit-lane-") as tmp:
        initrd = Path(tmp) / "initrd.cpio"
        initramfs.write_initrd(base, script, initrd)
        pairs = {name: socket.socketpair() for name in ("console", "stdout", "stderr",
                                                         "control")}
        fds = {name: pair[1].fileno() for name, pair in pairs.items()}
        argv = qemu_argv(qemu, opts, kernel, initrd, shares, fds)
        if opts.verbose:
            lane.log(" ".join(shlex.quote(a) for a in argv))
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, pass_fds=list(fds.values()),
                start_new_session=True, preexec_fn=_child_setup,
            )
        except OSError as exc:
            for a, b in pairs.values():
                a.close()
                b.close()
            raise UserError(f"cannot start QEMU ({qemu}): {exc.strerror}") from exc
        for _, theirs in pairs.values():
            theirs.close()
        ours = {name: pair[0] for name, pair in pairs.items()}
        try:
            with _terminate_on_signals():
                return _supervise(lane, proc, ours)
        except KeyboardInterrupt:
            lane.log("interrupted; lane VM stopped")
            return EXIT_SIGINT
        except _Terminated as exc:
            lane.log(f"terminated by signal {exc.signum}; lane VM stopped")
            return EXIT_SIGTERM if exc.signum == signal.SIGTERM else 128 + exc.signum
        finally:
            _stop(proc)
            for sock in ours.values():
                sock.close()
            if proc.stderr is not None:
                proc.stderr.close()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    # Signals here must not interrupt the clean-up that guarantees no QEMU is left behind.
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM,
                                                    signal.SIGHUP})
    try:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _supervise(lane: _Lane, proc: subprocess.Popen[bytes], socks: dict[str, socket.socket]
               ) -> int:
    opts = lane.opts
    sel = selectors.DefaultSelector()
    for name, sock in socks.items():
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ, name)
    assert proc.stderr is not None
    os.set_blocking(proc.stderr.fileno(), False)
    sel.register(proc.stderr, selectors.EVENT_READ, "qemu")
    start = lane.stats.started
    deadline = start + opts.timeout if opts.timeout else None
    out_fd = {"stdout": 1, "stderr": 2}
    shutdown_at: float | None = None

    while sel.get_map():
        now = time.monotonic()
        limits = []
        if deadline is not None:
            limits.append(deadline)
        if lane.stats.ready_at is None:
            limits.append(start + opts.boot_timeout)
        if lane.exit_at is not None and not lane.acked:
            limits.append(lane.exit_at + DRAIN_TIMEOUT)
        if shutdown_at is not None:
            limits.append(shutdown_at + SHUTDOWN_TIMEOUT)
        wait = max(0.0, min(limits) - now) if limits else None
        events = sel.select(wait)
        for key, _ in events:
            name = key.data
            try:
                data = (key.fileobj.recv(1 << 16) if isinstance(key.fileobj, socket.socket)
                        else os.read(proc.stderr.fileno(), 1 << 16))
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(key.fileobj)
                if name in lane.out_open:
                    lane.out_open[name] = False
                continue
            if name in out_fd:
                lane.received[name] += len(data)
                if lane.out_open[name] and not _write_all(out_fd[name], data):
                    lane.out_open[name] = False  # our reader left; keep draining the VM
            elif name == "console":
                lane.on_console(data)
            elif name == "control":
                lane.on_control(data)
            else:
                lane.qemu_stderr = (lane.qemu_stderr + data)[-65536:]

        now = time.monotonic()
        if lane.exit_info is not None and not lane.acked:
            late = now >= lane.exit_at + DRAIN_TIMEOUT if lane.exit_at else False
            if lane.output_complete() or late:
                if late:
                    lane.log("warning: some command output did not arrive before the deadline")
                try:
                    socks["control"].sendall(b"ack\n")
                except OSError:
                    pass
                lane.acked = True
                shutdown_at = now
        if shutdown_at is not None and now >= shutdown_at + SHUTDOWN_TIMEOUT:
            lane.log("warning: the lane VM did not power off; stopping QEMU")
            break
        if lane.stats.ready_at is None and now >= start + opts.boot_timeout \
                and lane.exit_info is None:
            lane.report_failure(
                f"timeout: the lane did not come up within {opts.boot_timeout:g} s "
                f"(stuck in stage {lane.stage!r}); QEMU killed"
            )
            return EXIT_TIMEOUT
        if deadline is not None and now >= deadline and lane.exit_info is None:
            if lane.stats.ready_at is None:
                lane.report_failure(
                    f"timeout: the lane did not come up within --timeout {opts.timeout:g} s "
                    f"(stuck in stage {lane.stage!r}); QEMU killed"
                )
            else:
                lane.log(f"timeout: command still running after --timeout {opts.timeout:g} s;"
                         " QEMU killed")
            return EXIT_TIMEOUT

    _stop(proc)
    if lane.exit_info is not None:
        if opts.verbose and lane.stats.ready_at is not None and lane.exit_at is not None:
            lane.log(f"boot {lane.stats.ready_at - start:.2f} s, command "
                     f"{lane.exit_at - lane.stats.ready_at:.2f} s, total "
                     f"{time.monotonic() - start:.2f} s")
        return lane.exit_info[0]
    if lane.stats.ready_at is None:
        lane.report_failure(lane.boot_failure())
    else:
        lane.report_failure("the lane VM stopped before the command finished "
                            f"(QEMU exit status {proc.returncode})")
    return EXIT_LANE_FAILED
