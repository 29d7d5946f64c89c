"""Start-up benchmark: how soon a fresh VMM process answers on its control socket, and its
memory at that moment, kvmkit against QEMU, side by side and interleaved (issue 20).

For each contestant a run starts the process and polls its Unix socket (a connect every
0.5 ms) until it answers:

- `kvmkit-firecracker --api-sock S` (the console script of this checkout's venv, as a
  Firecracker-style orchestrator launches it): ready when `GET /` over the socket has its
  HTTP answer (every thread under its seccomp filter, the default; the filters come from the
  cache of compiled programs that the first run fills, docs/security.md); and the same with
  `--no-seccomp`;
- `kvmkit serve --control C` started before the runs (not measured): a run asks it over C
  for a VMM with `--api-sock S` (kvmkit.cli.serve.spawn) and is ready when that forked
  VMM answers `GET /` on S. Its RSS counts the pages it shares with the serve process;
  "private" (Private_Dirty from smaps_rollup, for every contestant) is the written memory it
  alone holds;
- QEMU: `qemu-system-x86_64 -S -nodefaults -display none -qmp unix:S,server=on,wait=off`
  (the issue's command: QEMU's default machine and accelerator, stopped before the first
  instruction, no devices): ready when the QMP greeting (`{"QMP": ...}`) arrives;
- Python's own floor: the same interpreter running `-c pass` and `-S -I -c pass` (ready when
  it exits), and `-I` with a 10-line standard-library HTTP answer on a Unix socket (socket and
  json only): the least any Python API server can cost here.

kvmkit's modules are byte-compiled first (compileall), as a `pip install` leaves them: an
editable checkout under PYTHONDONTWRITEBYTECODE would compile them from source at every start.
At the answer the benchmark reads the process's VmRSS from /proc, then kills it and takes
its CPU time (user + system, all threads) from wait4's rusage. Figures are medians over
--runs runs; contestants are interleaved and their order rotated each run. CPU time is the
figure to read on a busy machine (wall time includes waiting for a core). Prints a table
and the ratios to QEMU. Not a test: nothing is asserted. From a clean checkout:
`make bench-startup`.

Anyone can take the same figures without this script, with /usr/bin/time and a socket poll:

    S=/tmp/fc.sock; rm -f $S
    /usr/bin/time -f '%e s, max RSS %M KiB' .venv/bin/kvmkit-firecracker --api-sock $S &
    t0=$(date +%s%N)
    until curl -s --unix-socket $S http://localhost/ >/dev/null; do :; done
    echo "ready after $(( ($(date +%s%N) - t0) / 1000000 )) ms"
    grep VmRSS /proc/$(pgrep -n -f "api-sock $S")/status; pkill -n -f "api-sock $S"

and the same with `qemu-system-x86_64 -S -nodefaults -display none -qmp
unix:$S,server=on,wait=off` polled with `until socat - UNIX-CONNECT:$S </dev/null | grep -q
QMP; do :; done` (or `python3 -c` with a socket). curl's own start (~5 ms) is in that
figure: compare the two VMMs measured the same way, not against this script's numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

POLL = 0.0005  # seconds between connection attempts
TIMEOUT = 10.0

# The smallest honest Python API server: listen on a Unix socket, answer one HTTP request
# with a JSON body. Only socket and json, no kvmkit.
FLOOR_SERVER = r"""
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.bind(sys.argv[1]); s.listen(8)
while True:
    c, _ = s.accept()
    c.recv(65536)
    body = json.dumps({"id": "anonymous-instance", "state": "Not started"}).encode()
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
              + str(len(body)).encode() + b"\r\n\r\n" + body)
    c.close()
"""


@dataclass
class Sample:
    ready_ms: float
    cpu_ms: float
    rss_kib: int
    private_kib: int = 0


@dataclass
class Contestant:
    name: str
    argv: Callable[[str], list[str]]  # socket path -> command line
    greeting: bytes | None  # bytes to send once connected (None: read a greeting)
    answer: bytes  # the answer starts with this
    socket: bool = True  # False: ready when the process exits
    spawn: Callable[[list[str]], int] | None = None  # start through `kvmkit serve`: -> pid
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return statistics.median(getattr(s, attr) for s in self.samples)


def vm_rss_kib(pid: int) -> int:
    """VmRSS of a live process (proc(5))."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def private_kib(pid: int) -> int:
    """Private_Dirty (proc(5) smaps_rollup): the written memory only this process holds (its
    heap, its stacks). A process forked by `kvmkit serve` shares the rest with its parent;
    clean file pages (the executable, libraries) are left out because they count as private
    only while no other process maps the same file (QEMU's binary beside a running lane)."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Private_Dirty:"):
                return int(line.split()[1])
    return 0


def kill_cpu_ms(proc: subprocess.Popen[bytes]) -> float:
    """SIGKILL `proc` and reap it: its CPU time in ms (user + system, every thread), from
    wait4's rusage (finer than /proc's clock ticks)."""
    proc.send_signal(signal.SIGKILL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return (usage.ru_utime + usage.ru_stime) * 1000


def measure_socket(c: Contestant, path: str) -> Sample:
    with open(os.devnull, "wb") as null:
        t0 = time.monotonic()
        if c.spawn is not None:
            proc = None
            pid = c.spawn(c.argv(path))
        else:
            proc = subprocess.Popen(c.argv(path), stdin=subprocess.DEVNULL, stdout=null,
                                    stderr=null)  # fmt: skip
            pid = proc.pid
    try:
        deadline = t0 + TIMEOUT
        while True:
            if time.monotonic() > deadline or (proc is not None and proc.poll() is not None):
                raise RuntimeError(f"{c.name}: no answer on {path}")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
            except OSError:
                s.close()
                time.sleep(POLL)
                continue
            try:
                s.settimeout(TIMEOUT)
                if c.greeting is not None:
                    s.sendall(c.greeting)
                data = b""
                while not data.startswith(c.answer) and len(data) < len(c.answer):
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    data += chunk
            finally:
                s.close()
            ready = time.monotonic() - t0
            if not data.startswith(c.answer):
                raise RuntimeError(f"{c.name}: unexpected answer {data[:80]!r}")
            rss, private = vm_rss_kib(pid), private_kib(pid)
            if proc is None:  # a child of `kvmkit serve`: its CPU time is in /proc
                cpu = proc_cpu_ms(pid)
                os.kill(pid, signal.SIGKILL)
                return Sample(ready * 1000, cpu, rss, private)
            return Sample(ready * 1000, kill_cpu_ms(proc), rss, private)
    finally:
        if proc is not None and proc.returncode is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        elif proc is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            while os.path.exists(f"/proc/{pid}"):  # reaped by `kvmkit serve`
                time.sleep(0.001)
        with_suppress_unlink(path)


def proc_cpu_ms(pid: int) -> float:
    """CPU time of a process that is not this one's child: the sum over its threads of the
    first field of /proc/PID/task/TID/schedstat (time on a CPU, ns)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total / 1e6


def measure_exit(c: Contestant) -> Sample:
    t0 = time.monotonic()
    proc = subprocess.Popen(c.argv(""))
    _, status, usage = os.wait4(proc.pid, 0)
    ready = time.monotonic() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{c.name}: exit status {proc.returncode}")
    # No RSS: ru_maxrss of a spawned child can be the forked parent's, not the interpreter's.
    return Sample(ready * 1000, (usage.ru_utime + usage.ru_stime) * 1000, 0)


def with_suppress_unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def kvmkit_firecracker() -> str:
    """The console script beside this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).parent / "kvmkit-firecracker"
    found = str(here) if here.exists() else shutil.which("kvmkit-firecracker")
    if found is None:
        sys.exit("bench/startup.py: kvmkit-firecracker not found (make setup)")
    return found


def contestants(qemu: str, control: str) -> list[Contestant]:
    from kvmkit.cli.serve import spawn

    fc = kvmkit_firecracker()
    py = sys.executable
    http_ok = b"HTTP/1.1 200"
    return [
        Contestant("kvmkit-firecracker", lambda p: [fc, "--api-sock", p],
                   b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", http_ok),
        Contestant("kvmkit-fc --no-seccomp", lambda p: [fc, "--api-sock", p, "--no-seccomp"],
                   b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", http_ok),
        Contestant("kvmkit serve (fork)", lambda p: ["--api-sock", p],
                   b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", http_ok,
                   spawn=lambda args: spawn(control, args)),
        Contestant("qemu -S (QMP)", lambda p: [
            qemu, "-S", "-nodefaults", "-display", "none", "-qmp",
            f"unix:{p},server=on,wait=off"], None, b'{"QMP"'),
        Contestant("python: HTTP floor", lambda p: [py, "-I", "-c", FLOOR_SERVER, p],
                   b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n", http_ok),
        Contestant("python -c pass", lambda p: [py, "-c", "pass"], None, b"", socket=False),
        Contestant("python -S -I -c pass", lambda p: [py, "-S", "-I", "-c", "pass"], None, b"",
                   socket=False),
    ]  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=21, help="runs of each contestant (default 21)")
    ap.add_argument("--qemu", default="qemu-system-x86_64", help="QEMU binary")
    args = ap.parse_args()
    qemu = shutil.which(args.qemu)
    if qemu is None:
        sys.exit(f"bench/startup.py: {args.qemu} not found")
    version = subprocess.run([qemu, "--version"], capture_output=True, text=True).stdout
    # kvmkit's bytecode as `pip install` leaves it (a non-editable install compiles every
    # module): with PYTHONDONTWRITEBYTECODE set, as in some shells here, an editable
    # checkout would otherwise compile ~50 modules from source at every start (~25 ms).
    import compileall

    import kvmkit

    compileall.compile_dir(str(Path(kvmkit.__file__).parent), quiet=1)
    with tempfile.TemporaryDirectory(prefix="kvmkit-startup-") as tmp:
        path = os.path.join(tmp, "api.sock")
        control = os.path.join(tmp, "serve.sock")
        kvmkit_cli = str(Path(kvmkit_firecracker()).with_name("kvmkit"))
        server = subprocess.Popen([kvmkit_cli, "serve", "--control", control],
                                  stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not os.path.exists(control):  # `kvmkit serve` warming up (not measured)
                if server.poll() is not None or time.monotonic() > deadline:
                    sys.exit("bench/startup.py: kvmkit serve did not start")
                time.sleep(0.01)
            cs = contestants(qemu, control)
            for run in range(args.runs):
                k = run % len(cs)
                for c in cs[k:] + cs[:k]:  # interleaved, the order rotated each run
                    c.samples.append(measure_socket(c, path) if c.socket else measure_exit(c))
        finally:
            server.terminate()
            server.wait()
    load = os.getloadavg()
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"start-up, {args.runs} runs, medians; {when}; {os.cpu_count()} CPUs, "
          f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"python {sys.version.split()[0]} ({sys.executable}); {version.splitlines()[0]}")
    print(f"{'':<24}{'ready ms':>10}{'CPU ms':>10}{'RSS MiB':>10}{'private':>10}"
          "   ready min-max")
    for c in cs:
        lo = min(s.ready_ms for s in c.samples)
        hi = max(s.ready_ms for s in c.samples)
        rss = (f"{c.median('rss_kib') / 1024:>10.1f}{c.median('private_kib') / 1024:>10.1f}"
               if c.socket else f"{'-':>10}{'-':>10}")
        note = "" if c.socket else "  (ready: exited)"
        print(f"{c.name:<24}{c.median('ready_ms'):>10.1f}{c.median('cpu_ms'):>10.1f}{rss}"
              f"   {lo:.1f}-{hi:.1f}{note}")
    q = next(c for c in cs if c.name.startswith("qemu"))
    for c in cs:
        if c is q or not c.socket:
            continue
        print(f"{c.name} / QEMU: ready x{c.median('ready_ms') / q.median('ready_ms'):.2f}, "
              f"CPU x{c.median('cpu_ms') / q.median('cpu_ms'):.2f}, "
              f"RSS x{c.median('rss_kib') / q.median('rss_kib'):.2f}, "
              f"private x{c.median('private_kib') / q.median('private_kib'):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
