"""One GDB connection: the remote serial protocol on top of `GdbStub`'s public API.

Packets are framed by `rsp`, then dispatched by their first byte through `HANDLERS`, one
method per packet letter (the GDB manual, "Packets"). While the VM runs only queries, `v`
packets, `?`, `H`, detach and kill are taken (others get E10). Errors: bad hex, numbers or
registers E16, unmapped memory E14, a failed KVM ioctl E05.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
from collections.abc import Callable

from kvmkit.gdb import rsp, target
from kvmkit.gdb.paging import TranslationError
from kvmkit.gdb.stub import SIGTRAP, BreakpointResult, DebugCpu, GdbStub, StopEvent
from kvmkit.kvm.errors import KvmError
from kvmkit.memory.region import GuestMemoryError

log = logging.getLogger(__name__)

MAX_PAYLOAD = rsp.DEFAULT_MAX_PAYLOAD
MAX_MEM_XFER = (MAX_PAYLOAD - 32) // 2  # bytes of an `m` reply (hex doubles them)
# Packets taken while the VM runs (all-stop: the rest need stopped vCPUs).
WHILE_RUNNING = frozenset(b"qQvkD?H")


class Disconnect(Exception):
    """The session ends (detach, kill, or the connection broke)."""


class Session:
    def __init__(self, stub: GdbStub, conn: socket.socket) -> None:
        self.stub = stub
        self.conn = conn
        self.reader = rsp.PacketReader(MAX_PAYLOAD)
        self.noack = False
        self.running = False
        self.last_sent = b""
        self.features: set[str] = set()
        self.interrupting = False

    # -- I/O
    def send_raw(self, data: bytes) -> None:
        try:
            self.conn.sendall(data)
        except OSError:
            raise Disconnect() from None

    def send(self, payload: bytes) -> None:
        self.last_sent = rsp.encode_packet(payload)
        self.send_raw(self.last_sent)

    def run(self) -> None:
        """Serve the connection until it closes, GDB detaches or kills the VM."""
        stub = self.stub
        wake = stub.wake_socket
        try:
            while not stub.closed:
                ready, _, _ = select.select([self.conn, wake], [], [], 0.5)
                if wake in ready:
                    with contextlib.suppress(OSError):
                        wake.recv(4096)
                if self.conn in ready:
                    try:
                        data = self.conn.recv(65536)
                    except OSError:
                        data = b""
                    if not data:
                        return
                    for event in self.reader.feed(data):
                        self.on_event(event)
                        if stub.killed:
                            return
                if self.running:
                    self.check_stopped()
        except Disconnect:
            return

    def check_stopped(self) -> None:
        """While the VM runs: report its end, or stop every vCPU and report the stop."""
        stub = self.stub
        if stub.exited is not None:
            self.running = False
            self.send(b"W%02x" % stub.exited)
            return
        if stub.stop_requested:
            stub.stop_all()
            if stub.exited is not None:
                self.check_stopped()
                return
            self.running = False
            self.interrupting = False
            self.send(self.stop_reply(*stub.take_stop()))

    def on_event(self, event: rsp.Event) -> None:
        if isinstance(event, rsp.Packet):
            if not self.noack:
                self.send_raw(b"+")
            self.dispatch(event.payload)
        elif isinstance(event, rsp.Interrupt):
            if self.running and not self.interrupting:
                self.interrupting = True
                self.stub.interrupt()
        elif isinstance(event, rsp.Nak):
            if self.last_sent:
                self.send_raw(self.last_sent)
        elif isinstance(event, rsp.BadPacket):
            if event.reason == "checksum":
                if not self.noack:
                    self.send_raw(b"-")
            else:
                if not self.noack:
                    self.send_raw(b"+")
                self.send(b"E01" if event.reason == "oversized" else b"E02")

    # -- replies and arguments
    def stop_reply(self, c: DebugCpu, event: StopEvent) -> bytes:
        parts = [b"T%02xthread:%x;" % (event.signal, c.tid), b"cr3:%x;" % c.stop_cr3]
        if event.kind in ("swbreak", "hwbreak") and event.kind + "+" in self.features:
            parts.append(event.kind.encode() + b":;")
        elif event.kind in ("watch", "rwatch", "awatch"):
            parts.append(b"%s:%x;" % (event.kind.encode(), event.addr))
        return b"".join(parts)

    def cpu(self, tid_text: bytes) -> DebugCpu | None:
        """A thread id from GDB: hex, or -1 / 0 for all / any."""
        if tid_text in (b"-1", b"0"):
            return self.stub.selected
        try:
            tid = rsp.parse_hex_int(tid_text, max_bits=32)
        except rsp.RspError:
            return None
        if 1 <= tid <= len(self.stub.cpus):
            return self.stub.cpus[tid - 1]
        return None

    @staticmethod
    def addr_len(text: bytes) -> tuple[int, int]:
        a, comma, n = text.partition(b",")
        if not comma:
            raise rsp.RspError("expected ADDR,LENGTH")
        addr = rsp.parse_hex_int(a)
        length = rsp.parse_hex_int(n, max_bits=32)
        if length > MAX_PAYLOAD * 2:
            raise rsp.RspError("length too large")
        return addr, length

    def dispatch(self, p: bytes) -> None:
        try:
            reply = self.handle(p)
        except (rsp.RspError, ValueError):
            reply = b"E16"
        except (TranslationError, GuestMemoryError):
            reply = b"E14"
        except KvmError as err:
            log.warning("gdb: %s", err)
            reply = b"E05"
        if reply is not None:
            self.send(reply)

    def handle(self, p: bytes) -> bytes | None:
        """The reply to packet `p` (None: sent already, or none is due)."""
        if not p:
            return b""
        if self.running and p[0] not in WHILE_RUNNING:
            return b"E10"  # the VM is running
        handler = HANDLERS.get(p[:1])
        return b"" if handler is None else handler(self, p)  # "": not supported

    # -- one handler per packet letter
    def stop_status(self, p: bytes) -> bytes:  # ?
        stub = self.stub
        if stub.exited is not None:
            return b"W%02x" % stub.exited
        if stub.last_stop is None:
            return self.stop_reply(*stub.take_stop(SIGTRAP))
        return self.stop_reply(*stub.last_stop)

    def set_thread(self, p: bytes) -> bytes:  # Hg / Hc
        if len(p) < 3 or p[1:2] not in (b"g", b"c"):
            return b"E16"
        chosen = self.cpu(p[2:])
        if chosen is None:
            return b"E16"
        if p[1:2] == b"g":
            self.stub.selected = chosen
        return b"OK"

    def thread_alive(self, p: bytes) -> bytes:  # T
        return b"OK" if self.cpu(p[1:]) is not None else b"E16"

    def read_registers(self, p: bytes) -> bytes:  # g
        return rsp.hex_encode(target.read_all(self.stub.registers(self.stub.selected)))

    def write_registers(self, p: bytes) -> bytes:  # G
        stub, c = self.stub, self.stub.selected
        stub.store(c, target.write_all(stub.registers(c), rsp.hex_decode(p[1:])))
        return b"OK"

    def read_register(self, p: bytes) -> bytes:  # p
        num = rsp.parse_hex_int(p[1:], max_bits=16)
        if num >= target.NUM_REGISTERS:
            return b"E16"
        return rsp.hex_encode(target.read_register(self.stub.registers(self.stub.selected), num))

    def write_register(self, p: bytes) -> bytes:  # P
        num_text, eq, value = p[1:].partition(b"=")
        num = rsp.parse_hex_int(num_text, max_bits=16)
        if not eq or num >= target.NUM_REGISTERS:
            return b"E16"
        stub, c = self.stub, self.stub.selected
        part = target.write_register(stub.registers(c), num, rsp.hex_decode(value))
        stub.store(c, {part})
        return b"OK"

    def read_memory(self, p: bytes) -> bytes:  # m
        addr, length = self.addr_len(p[1:])
        return rsp.hex_encode(self.stub.read_memory(addr, min(length, MAX_MEM_XFER)))

    def write_memory_hex(self, p: bytes) -> bytes:  # M
        head, colon, data = p[1:].partition(b":")
        addr, length = self.addr_len(head)
        raw = rsp.hex_decode(data)
        if not colon or len(raw) != length:
            return b"E16"
        self.stub.write_memory(addr, raw)
        return b"OK"

    def write_memory_binary(self, p: bytes) -> bytes:  # X
        head, colon, data = p[1:].partition(b":")
        addr, length = self.addr_len(head)
        raw = rsp.unescape(data)
        if not colon or len(raw) != length:
            return b"E16"
        if length:
            self.stub.write_memory(addr, raw)
        return b"OK"

    def continue_or_step(self, p: bytes) -> bytes | None:  # c, s, C, S
        stub = self.stub
        if stub.exited is not None:
            return b"W%02x" % stub.exited
        cmd = p[:1]
        arg = p[1:]
        if cmd in (b"C", b"S"):
            arg = arg.partition(b";")[2]  # the signal is not delivered (no such thing here)
        if arg:
            regs = stub.registers(stub.selected)
            regs.regs.rip = rsp.parse_hex_int(arg)
            stub.store(stub.selected, {"regs"})
        actions = {c.index: "c" for c in stub.cpus}
        if cmd in (b"s", b"S"):
            actions[stub.selected.index] = "s"
        return self.resume(actions)

    def resume(self, actions: dict[int, str]) -> bytes | None:
        if not self.stub.resume(actions):
            return self.stop_reply(*self.stub.take_stop())  # a stop came first
        self.running = True
        return None

    def v_packet(self, p: bytes) -> bytes | None:  # v
        stub = self.stub
        if p == b"vCont?":
            return b"vCont;c;C;s;S"
        if p.startswith(b"vCont;"):
            if stub.exited is not None:
                return b"W%02x" % stub.exited
            actions: dict[int, str] = {}
            for item in p[6:].split(b";"):
                act, _, tid_text = item.partition(b":")
                if not act or act[:1] not in (b"c", b"C", b"s", b"S"):
                    return b"E16"
                kind = "s" if act[:1] in (b"s", b"S") else "c"
                if tid_text and tid_text not in (b"-1", b"0"):
                    c = self.cpu(tid_text)
                    if c is None:
                        return b"E16"
                    actions.setdefault(c.index, kind)
                else:
                    for each in stub.cpus:
                        actions.setdefault(each.index, kind)
            for each in stub.cpus:  # all-stop: a thread with no action keeps going
                actions.setdefault(each.index, "c")
            return self.resume(actions)
        if p.startswith(b"vKill"):
            stub.kill()
            self.send(b"OK")
            raise Disconnect()
        return b""

    def breakpoint(self, p: bytes) -> bytes:  # Z, z
        fields = p[1:].split(b";", 1)[0].split(b",")
        if len(fields) != 3 or fields[0] not in (b"0", b"1", b"2", b"3", b"4"):
            return b""
        ztype = int(fields[0])
        addr = rsp.parse_hex_int(fields[1])
        kind = rsp.parse_hex_int(fields[2], max_bits=16)
        result = self.stub.set_breakpoint(ztype, addr, kind, insert=p[:1] == b"Z")
        if result is BreakpointResult.INVALID:
            return b"E16"
        if result is BreakpointResult.NO_SLOT:
            return b"E1c"  # ENOSPC: four debug registers
        return b"OK"

    def detach(self, p: bytes) -> bytes:  # D
        self.send(b"OK")
        raise Disconnect()

    def kill(self, p: bytes) -> bytes:  # k
        self.stub.kill()
        raise Disconnect()

    def query(self, p: bytes) -> bytes | None:  # q, Q
        stub = self.stub
        name = p.split(b":", 1)[0].split(b",", 1)[0]
        if name == b"qSupported":
            feats = p.partition(b":")[2]
            self.features = {f.decode("ascii", "replace") for f in feats.split(b";") if f}
            return (
                b"PacketSize=%x;qXfer:features:read+;swbreak+;hwbreak+;vContSupported+;"
                b"QStartNoAckMode+" % MAX_PAYLOAD
            )
        if name == b"QStartNoAckMode":
            self.send(b"OK")
            self.noack = True
            return None
        if name == b"qAttached":
            return b"1"
        if name == b"qC":
            return b"QC%x" % stub.selected.tid
        if name == b"qfThreadInfo":
            return b"m" + b",".join(b"%x" % c.tid for c in stub.cpus)
        if name == b"qsThreadInfo":
            return b"l"
        if name == b"qThreadExtraInfo":
            c = self.cpu(p.partition(b",")[2])
            if c is None:
                return b"E16"
            return rsp.hex_encode(f"vCPU {c.index}".encode())
        if name == b"qSymbol":
            return b"OK"
        if p.startswith(b"qXfer:features:read:"):
            annex, _, rng = p[len(b"qXfer:features:read:") :].partition(b":")
            if annex != b"target.xml":
                return b"E00"
            off, length = self.addr_len(rng)
            chunk = target.TARGET_XML[off : off + min(length, MAX_PAYLOAD // 2)]
            more = off + len(chunk) < len(target.TARGET_XML)
            return (b"m" if more else b"l") + rsp.escape(chunk)
        if name == b"qRcmd":
            command = rsp.hex_decode(p.partition(b",")[2]).decode("utf-8", "replace")
            text = self.monitor(command.strip())
            if text is None:
                return b"E16"
            self.send(b"O" + rsp.hex_encode(text.encode()))
            return b"OK"
        return b""

    def monitor(self, command: str) -> str | None:
        stub = self.stub
        words = command.split()
        if not words or words[0] == "help":
            return (
                "kvmkit monitor commands:\n"
                "  cr3                     CR3 of the selected vCPU (and at its last stop)\n"
                "  cr3-filter HEX|off      stop at breakpoints only under this CR3\n"
                "  cr3-filter              show the filter and the hits it skipped\n"
            )
        if words[0] == "cr3" and len(words) == 1:
            c = stub.selected
            if self.running:
                return f"vCPU {c.index} is running (cr3 at its last stop: {c.stop_cr3:#x})\n"
            cr3 = int(stub.registers(c).sregs.cr3)
            return f"cr3 = {cr3:#x} (vCPU {c.index}, thread {c.tid})\n"
        if words[0] == "cr3-filter":
            if len(words) == 2:
                if words[1] == "off":
                    stub.set_cr3_filter(None)
                else:
                    try:
                        text = words[1].lower().removeprefix("0x")
                        stub.set_cr3_filter(rsp.parse_hex_int(text.encode()))
                    except rsp.RspError:
                        return f"bad CR3 value {words[1]!r}\n"
            elif len(words) > 2:
                return None
            flt = "off" if stub.cr3_filter is None else f"{stub.cr3_filter:#x}"
            return f"cr3-filter: {flt}, skipped {stub.skipped} hits\n"
        return f"unknown monitor command {command!r} (try: monitor help)\n"


Handler = Callable[[Session, bytes], "bytes | None"]
HANDLERS: dict[bytes, Handler] = {
    b"?": Session.stop_status,
    b"q": Session.query,
    b"Q": Session.query,
    b"H": Session.set_thread,
    b"T": Session.thread_alive,
    b"g": Session.read_registers,
    b"G": Session.write_registers,
    b"p": Session.read_register,
    b"P": Session.write_register,
    b"m": Session.read_memory,
    b"M": Session.write_memory_hex,
    b"X": Session.write_memory_binary,
    b"c": Session.continue_or_step,
    b"s": Session.continue_or_step,
    b"C": Session.continue_or_step,
    b"S": Session.continue_or_step,
    b"v": Session.v_packet,
    b"Z": Session.breakpoint,
    b"z": Session.breakpoint,
    b"D": Session.detach,
    b"k": Session.kill,
}
