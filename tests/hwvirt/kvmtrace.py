"""The host KVM's own tracepoints, recorded while a Linux-guest test runs (in the lane).

A guest that triple-faults under AMD SVM leaves nothing to read afterwards: KVM INITs the vCPU
at the SHUTDOWN intercept, so its registers are the reset state. The kernel's trace ring
(tracefs, `events/kvm/*`) still holds the last exits (with the guest RIP and the exit's
interrupt info), the exceptions and interrupts KVM injected: `KvmTrace.report()` gives the
last of them with the guest kernel's RIPs named (`guest_symbols`; boot the guest with
`nokaslr` for the names to be right).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import TracebackType

TRACEFS = Path("/sys/kernel/tracing")
EVENTS = ("kvm_exit", "kvm_inj_exception", "kvm_inj_virq", "kvm_page_fault", "kvm_cr", "kvm_msr")


class KvmTrace:
    def __init__(self, buffer_kb: int = 16384) -> None:
        self.buffer_kb = buffer_kb
        self.active = False
        self.why_not = ""

    def _write(self, rel: str, value: str) -> None:
        (TRACEFS / rel).write_text(value)

    def __enter__(self) -> KvmTrace:
        if os.geteuid() != 0:
            self.why_not = "not root"
            return self
        try:
            if not (TRACEFS / "events").is_dir():
                os.system(f"mount -t tracefs nodev {TRACEFS} 2>/dev/null")
            self._write("tracing_on", "0")
            self._write("trace", "")  # clears the ring
            self._write("buffer_size_kb", str(self.buffer_kb))
            for event in EVENTS:
                self._write(f"events/kvm/{event}/enable", "1")
            self._write("tracing_on", "1")
            self.active = True
        except OSError as err:
            self.why_not = str(err)
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        if not self.active:
            return
        try:
            self._write("tracing_on", "0")
            for event in EVENTS:
                self._write(f"events/kvm/{event}/enable", "0")
        except OSError:
            pass

    def report(self, lines: int = 80) -> str:
        """The last `lines` events, guest RIPs resolved; "" when nothing was recorded."""
        if not self.active:
            return f"(no KVM trace: {self.why_not})"
        try:
            text = (TRACEFS / "trace").read_text(errors="replace")
        except OSError as err:
            return f"(no KVM trace: {err})"
        tail = [line for line in text.splitlines() if not line.startswith("#")][-lines:]
        rips = [re.search(r"rip 0x([0-9a-f]+)", line) for line in tail]
        kernel = {int(m.group(1), 16) for m in rips if m and int(m.group(1), 16) >> 63}
        names = guest_symbols(kernel)
        out = []
        for line, match in zip(tail, rips, strict=True):
            if match and int(match.group(1), 16) in names:
                line += f"  <{names[int(match.group(1), 16)]}>"
            out.append(line.strip())
        return "\n".join(["last KVM events before the end (host tracefs):", *out])


def guest_symbols(addrs: set[int], timeout: float = 300) -> dict[int, str]:
    """Name the guest kernel functions at `addrs`: Debian ships no System.map (a placeholder)
    and a stripped vmlinux, so boot the same kernel with `nokaslr` once more and look the
    addresses up in its /proc/kallsyms (fixed-width hex sorts like numbers)."""
    if not addrs:
        return {}
    queries = " ".join(f"{a:016x}" for a in sorted(addrs))
    script = (
        f'{{ cat /proc/kallsyms; for a in {queries}; do echo "$a ~ @query"; done; }} | sort'
        ' | awk \'$3=="@query" {print $1, last; next} $2 ~ /^[tTwW]$/ {last=$1" "$3}\''
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "kvmkit", "run", "--timeout", str(int(timeout - 30)),
             "--cmdline", "nokaslr", "--", "sh", "-c", script],
            capture_output=True, timeout=timeout, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {}
    names: dict[int, str] = {}
    for row in proc.stdout.decode(errors="replace").splitlines():
        parts = row.split()
        if len(parts) == 3:
            addr, base, name = int(parts[0], 16), int(parts[1], 16), parts[2]
            names[addr] = f"{name}+{addr - base:#x}"
    return names
