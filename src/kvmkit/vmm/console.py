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

import base64
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvmkit.snapshot.format import Fields


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


# The parser holds back at most a marker's length; more than this is not a state kvmkit saves.
MAX_COMMAND_BUF = 1 << 16


@dataclass(frozen=True)
class CommandState:
    """Where the command-output parser was: past BEGIN, how much of `buf` the sink has."""

    started: bool
    sent: int
    buf: bytes

    def to_dict(self) -> dict[str, Any]:
        return {"started": self.started, "sent": self.sent,
                "buf": base64.b64encode(self.buf).decode()}  # fmt: skip

    @classmethod
    def from_dict(cls, obj: Any, path: str = "meta.command") -> CommandState:
        f = Fields(obj, path)
        buf = f.get_blob("buf", max_size=MAX_COMMAND_BUF)
        # `sent` came with the newline release; older states have none.
        sent = f.get_int("sent", 0, len(buf)) if f.has("sent") else 0
        return cls(f.get_bool("started"), sent, buf)


class CommandOutput:
    """Splits the console into the command's output (passed to `sink`) and the exit status.

    Bytes before BEGIN (kernel and init messages) are not passed on; bytes between BEGIN
    and EXIT are, except for a hold-back long enough to recognise a marker split across
    writes. The marker starts with a newline, so a command's own last newline is held back
    too; `release_newline` lets it go once the console has been quiet for a moment (a guest
    printing a line and then working or sleeping shows the whole line), and the EXIT marker
    is still recognised after it (`sent` counts the buffer's first bytes that the sink
    already has). The one thing a release cannot tell apart is the marker's own newline
    followed by a quiet spell before the rest of the marker: the guest's init writes the
    marker with one write(2), so that would need the console to stall mid-write for the
    whole quiet period (the output would then end with one extra newline).
    """

    def __init__(self, nonce: str, sink: Callable[[bytes], None]) -> None:
        self._begin = f"KVMKIT-{nonce}-BEGIN\n".encode()
        self._exit = re.compile(rb"\nKVMKIT-" + nonce.encode() + rb"-EXIT (\d+)\r?\n")
        self._exit_prefix = b"\nKVMKIT-" + nonce.encode() + b"-EXIT "
        self._sink = sink
        self._buf = bytearray()
        self.sent = 0  # leading bytes of _buf already passed to the sink (a released newline)
        self.started = False
        self.status: int | None = None
        self.done = threading.Event()
        # feed() runs on the vCPU thread that wrote the bytes, release_newline() on the
        # machine's watcher thread.
        self._lock = threading.Lock()
        self._last_feed = time.monotonic()

    def feed(self, data: bytes) -> None:
        with self._lock:
            self._last_feed = time.monotonic()
            self._feed(data)

    def _emit(self, end: int) -> None:
        """Pass `_buf[:end]` on (less what the sink already has) and drop it."""
        if end > self.sent:
            self._sink(bytes(self._buf[self.sent : end]))
        del self._buf[:end]
        self.sent = max(0, self.sent - end)

    def _feed(self, data: bytes) -> None:
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
            status = int(m.group(1)) & 0xFF  # before _emit: m reads the buffer it changes
            self._emit(m.start())
            self.status = status
            self._buf.clear()
            self.sent = 0
            self.done.set()
            return
        # Pass on everything that cannot be part of a marker still arriving.
        hold = self._holdback()
        if len(self._buf) > hold:
            self._emit(len(self._buf) - hold)

    def release_newline(self, quiet: float) -> None:
        """If all that is held back is a newline and nothing arrived for `quiet` seconds,
        give it to the sink now (it stays in the buffer, marked sent, so that an EXIT
        marker arriving later still matches)."""
        with self._lock:
            if (
                self.started and self.status is None and self._buf == b"\n"
                and not self.sent and time.monotonic() - self._last_feed >= quiet
            ):  # fmt: skip
                self._sink(b"\n")
                self.sent = 1

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

    # -- snapshots: where the parser was, so the restoring process goes on reporting
    def save(self) -> CommandState:
        with self._lock:
            return CommandState(self.started, self.sent, bytes(self._buf[-MAX_COMMAND_BUF:]))

    def restore(self, state: CommandState) -> None:
        with self._lock:
            self.started = state.started
            self._buf[:] = state.buf
            self.sent = state.sent

    def flush(self) -> None:
        """At the end of the VM: pass on whatever is left (the guest died mid-command)."""
        with self._lock:
            if self.started and self.status is None and self._buf:
                self._emit(len(self._buf))
