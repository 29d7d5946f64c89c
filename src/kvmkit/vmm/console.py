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
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kvmkit.snapshot.format import Fields
from kvmkit.threads import ThreadKind, start_thread

log = logging.getLogger(__name__)


def new_nonce() -> str:
    return secrets.token_hex(8)


# The console's output buffer (between the vCPU that writes and the thread that hands the
# bytes to the readers): past BUFFER bytes the UART stops taking more for lossless readers
# (flow control, see ConsoleStream); SLACK covers what a guest still writes after the UART
# said stop (a FIFO load already under way, the kernel's polled printk giving up after
# 10 ms per character), beyond which bytes are dropped.
BUFFER = 64 * 1024  # as much again as a pipe holds (Linux's default pipe size)
SLACK = 16 * 1024
FLUSH_STALL = 30.0  # flush() gives up when the readers took nothing for this long


class _Listener:
    __slots__ = ("fn", "lossless")

    def __init__(self, fn: Callable[[bytes], None], lossless: bool) -> None:
        self.fn = fn
        self.lossless = lossless


class ConsoleStream:
    """Everything the guest wrote to the serial port, for several readers.

    `feed` runs on the thread that handled the guest's write (a vCPU, or the coalesced
    ring's drain thread) and never blocks: it keeps the tail (`tail`, `wait_for`) and appends
    to a bounded buffer that a `console` thread hands to the listeners. A reader that is slow
    or never reads (a full stdout pipe) therefore never stops a vCPU: pause, stop, the
    timeout and the other vCPUs go on. What happens to the guest's output then depends on
    the readers:

    - lossless (the default; `kvmkit run -- CMD`'s command output, the interactive console,
      `kvmkit restore`): nothing is lost. Once BUFFER bytes wait, the UART reports its
      transmitter busy (LSR THRE clear, no THRE interrupt: `has_room()` is False), so the
      guest's serial driver holds its output, as with a real UART under flow control, and
      the program writing it blocks as it would on a full pipe; when the reader has taken
      half of it the UART is ready again (`on_room`). A command whose reader never reads
      stops at its next write until `--timeout`.
    - lossy (Firecracker's console on the VMM's stdout: `add_listener(fn, lossless=False)`):
      the guest never waits; bytes that do not fit in BUFFER are dropped and counted
      (`dropped`; Firecracker drops them the same way, counting uart missed writes).

    Bytes a guest writes beyond BUFFER + SLACK (ignoring the UART's busy state) are dropped
    for every reader. A reader that fails (EPIPE: the pipe's reader is gone) is dropped, with
    one log line. (Moving delivery off the vCPU thread was once tried and backed out because
    the lane's nested guests triple-faulted under long output; that was the lane's two-vCPU
    MTTCG fault found later, docs/lane.md, and the lane tests of long output pass with this.)
    """

    def __init__(self, keep_bytes: int = 1 << 20) -> None:
        self._lock = threading.Condition()
        self._tail = bytearray()  # the last `keep_bytes` bytes, for diagnostics
        self._keep = keep_bytes
        self.total = 0
        self.dropped = 0  # bytes not handed to the listeners (see the class docstring)
        self._listeners: list[_Listener] = []
        self._lossless = False  # some listener is lossless: flow control applies
        self._out = bytearray()  # waiting for the console thread
        self._delivering = 0  # bytes the console thread took and has not delivered yet
        self._delivered = 0  # bytes handed to the listeners so far (flush's progress)
        self._blocked = False  # has_room() said no since the last on_room
        self._stop = False
        self._thread: threading.Thread | None = None
        # Called (console thread) when the buffer has room again after has_room() said no:
        # the UART raises THRE (Machine wires it to Serial8250.tx_ready).
        self.on_room: Callable[[], None] | None = None

    def add_listener(self, fn: Callable[[bytes], None], *, lossless: bool = True) -> None:
        with self._lock:
            self._listeners.append(_Listener(fn, lossless))
            self._lossless = any(x.lossless for x in self._listeners)
            if self._thread is None and not self._stop:
                self._thread = start_thread(ThreadKind.CONSOLE, "out", self._run)

    def feed(self, data: bytes) -> None:
        with self._lock:
            self.total += len(data)
            self._tail += data
            if len(self._tail) > 2 * self._keep:
                del self._tail[: len(self._tail) - self._keep]
            if self._listeners:
                limit = BUFFER + SLACK if self._lossless else BUFFER
                room = limit - len(self._out) - self._delivering
                if len(data) > room:
                    self.dropped += len(data) - max(room, 0)
                    data = data[: max(room, 0)]
                self._out += data
            self._lock.notify_all()

    def has_room(self) -> bool:
        """Whether the UART may take more output (module docstring: flow control for
        lossless readers). False marks the stream blocked: `on_room` follows."""
        with self._lock:
            if not self._lossless or len(self._out) + self._delivering < BUFFER:
                return True
            self._blocked = True
            return False

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._out and not self._stop:
                    self._lock.wait()
                if self._stop:
                    return
                data, self._out = bytes(self._out), bytearray()
                self._delivering = len(data)
                listeners = list(self._listeners)
            for listener in listeners:
                try:
                    listener.fn(data)
                except Exception as err:
                    # A reader that cannot take output any more (EPIPE, a closed file):
                    # drop it rather than stop the others, or retry forever.
                    log.warning("console: a reader failed (%s); it gets no more output", err)
                    with self._lock:
                        if listener in self._listeners:
                            self._listeners.remove(listener)
                            self._lossless = any(x.lossless for x in self._listeners)
            with self._lock:
                self._delivering = 0
                self._delivered += len(data)
                self._lock.notify_all()
                wake = self._blocked and len(self._out) < BUFFER // 2
                if wake:
                    self._blocked = False
            if wake and self.on_room is not None:
                self.on_room()

    def flush(self, stall: float = FLUSH_STALL) -> bool:
        """Wait until the listeners have every byte fed so far; give up (False) when they
        took nothing for `stall` seconds (a reader that stopped reading)."""
        def pending() -> bool:
            return bool(self._out or self._delivering)

        with self._lock:
            while pending():
                if self._thread is None or self._stop:
                    return False
                seen = self._delivered

                def moved(seen: int = seen) -> bool:
                    return self._delivered != seen or not pending()

                if not self._lock.wait_for(moved, stall):
                    return False
            return True

    def close(self, timeout: float = 5.0) -> None:
        """Stop the console thread (bounded: one stuck in a reader's write is left behind,
        a daemon thread); output not delivered yet is dropped."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

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
        # While the machine is paused its state may be taken (a snapshot, a migration): a
        # newline released then would be released again by whoever restores that state.
        self._frozen = False

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
                and not self.sent and not self._frozen
                and time.monotonic() - self._last_feed >= quiet
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

    def freeze(self, frozen: bool) -> None:
        """Hold back newline releases (the machine is paused: its state may be taken)."""
        with self._lock:
            self._frozen = frozen

    def status_in(self, raw: bytes) -> int | None:
        """The exit status in raw console output (the EXIT marker), for when the output
        could not all be parsed: a reader that stopped reading held it back."""
        found = list(self._exit.finditer(raw))
        return int(found[-1].group(1)) & 0xFF if found else None

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
