"""The serial console seen from the host: a stream of guest bytes, and the protocol by which
the default guest image reports a command's output and exit status.

Protocol (the default image's init, kvmkit/image/guest_init.py, is the other side): the kernel
command line carries `kvmkit.nonce=<hex>`; after setting the console to raw mode the init
prints `KVMKIT-<nonce>-BEGIN\\n`, runs the command with the console as its stdout/stderr, then
prints `\\nKVMKIT-<nonce>-EXIT <status>\\n` (the leading newline makes the marker start a
line even if the command's output did not end with one; the host removes it). The random
nonce keeps a command's own output from faking a marker.
"""

from __future__ import annotations

import re
import secrets
import threading
from collections.abc import Callable


def new_nonce() -> str:
    return secrets.token_hex(8)


class ConsoleStream:
    """Everything the guest wrote to the serial port, readable by several consumers.

    Listeners are called synchronously, on the vCPU thread that wrote the byte. (A delivery
    thread batching bytes was tried and made long outputs faster, but the lane's nested
    guests then ended in triple faults and hangs that were not understood in time; it was
    taken back out, see the issue notes.)
    """

    def __init__(self, keep_bytes: int = 1 << 20) -> None:
        self._lock = threading.Condition()
        self._tail = bytearray()  # the last `keep_bytes` bytes, for diagnostics
        self._keep = keep_bytes
        self.total = 0
        self._listeners: list[Callable[[bytes], None]] = []

    def add_listener(self, fn: Callable[[bytes], None]) -> None:
        with self._lock:
            self._listeners.append(fn)

    def feed(self, data: bytes) -> None:
        with self._lock:
            self.total += len(data)
            self._tail += data
            if len(self._tail) > 2 * self._keep:
                del self._tail[: len(self._tail) - self._keep]
            listeners = list(self._listeners)
            self._lock.notify_all()
        for fn in listeners:
            fn(data)

    def flush(self) -> None:
        """Listeners are called as bytes arrive: nothing is ever pending."""

    def close(self) -> None:
        """Nothing to release (kept for callers that close their streams)."""

    def tail(self, n: int = 4096) -> bytes:
        with self._lock:
            return bytes(self._tail[-min(n, self._keep) :])

    def wait_for(self, pattern: bytes, timeout: float) -> bool:
        """Block until `pattern` appears in the kept output (tests and scripts)."""
        with self._lock:
            return self._lock.wait_for(lambda: pattern in self._tail, timeout)


class CommandOutput:
    """Splits the console into the command's output (passed to `sink`) and the exit status.

    Bytes before BEGIN (kernel and init messages) are not passed on; bytes between BEGIN
    and EXIT are, except for a hold-back long enough to recognise a marker split across
    writes.
    """

    def __init__(self, nonce: str, sink: Callable[[bytes], None]) -> None:
        self._begin = f"KVMKIT-{nonce}-BEGIN\n".encode()
        self._exit = re.compile(rb"\nKVMKIT-" + nonce.encode() + rb"-EXIT (\d+)\r?\n")
        self._exit_prefix = b"\nKVMKIT-" + nonce.encode() + b"-EXIT "
        self._sink = sink
        self._buf = bytearray()
        self.started = False
        self.status: int | None = None
        self.done = threading.Event()

    def feed(self, data: bytes) -> None:
        if self.status is not None:
            return
        self._buf += data
        if not self.started:
            at = self._buf.find(self._begin)
            if at < 0:
                # Keep only what could still be the start of the marker.
                if len(self._buf) > len(self._begin):
                    del self._buf[: len(self._buf) - len(self._begin)]
                return
            del self._buf[: at + len(self._begin)]
            self.started = True
        m = self._exit.search(self._buf)
        if m is not None:
            if m.start():
                self._sink(bytes(self._buf[: m.start()]))
            self.status = int(m.group(1)) & 0xFF
            self._buf.clear()
            self.done.set()
            return
        # Pass on everything that cannot be part of a marker still arriving.
        hold = self._holdback()
        if len(self._buf) > hold:
            self._sink(bytes(self._buf[: len(self._buf) - hold]))
            del self._buf[: len(self._buf) - hold]

    def _holdback(self) -> int:
        """Length of the buffer's tail that may be the start of the EXIT marker."""
        limit = len(self._exit_prefix) + 6  # prefix, up to 3 digits, CR, LF
        for i in range(max(0, len(self._buf) - limit), len(self._buf)):
            if self._buf[i] == 0x0A and self._could_be_marker(bytes(self._buf[i:])):
                return len(self._buf) - i
        return 0

    def _could_be_marker(self, tail: bytes) -> bool:
        prefix = self._exit_prefix
        if len(tail) <= len(prefix):
            return prefix.startswith(tail)
        rest = tail[len(prefix) :]
        return tail.startswith(prefix) and re.fullmatch(rb"\d{0,3}\r?", rest) is not None

    def flush(self) -> None:
        """At the end of the VM: pass on whatever is left (the guest died mid-command)."""
        if self.started and self.status is None and self._buf:
            self._sink(bytes(self._buf))
            self._buf.clear()
