"""`GdbStub`: a GDB remote-protocol server for a running VM, in all-stop mode.

Threads are vCPUs (thread id = vCPU index + 1). The vCPU threads belong to whoever runs the
VM (kvmkit.vmm's `VcpuThread`, or `run_tiny_guest` here); they call `on_debug(vcpu, exit)` on
each `DebugExit` and on each `IntrExit`. While the debugger has the VM stopped, that call does
not return: the vCPU is *parked* in it, outside KVM_RUN, and the server thread reads and
writes its registers. Stopping the VM (a breakpoint on one vCPU, Ctrl-C from GDB, a new
client) kicks every other vCPU out of KVM_RUN (`Vcpu.kick()`), and the stop is reported once
all are parked.

What kvmkit adds to a plain stub: each stop reply carries the stopping vCPU's CR3
(`T05thread:1;cr3:1234000;` - GDB skips fields it does not know), `cr3` is a register of the
target description, and `monitor cr3-filter VALUE` makes breakpoint and watchpoint hits under
any other CR3 resume transparently (the vCPU steps over the breakpoint with it lifted, then it
is put back), counting them. CR3 is read at each stop from `kvm_run`'s synchronized
registers (KVM_CAP_SYNC_REGS) when KVM offers them, without an extra ioctl.

Breakpoints: Z0 plants 0xCC in guest memory (KVM_GUESTDBG_USE_SW_BP); an int3 the stub did
not plant belongs to the guest and is given back to it (KVM_GUESTDBG_INJECT_BP). Z1-Z4 use
DR0-DR3/DR7 (KVM_GUESTDBG_USE_HW_BP).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kvmkit.abi.constants import Cap, GuestDebug, SyncRegs
from kvmkit.gdb import rsp, target
from kvmkit.gdb.paging import PagingState, TranslationError, read_virtual, translate, write_virtual
from kvmkit.kvm import DebugExit, Vcpu, VmExit
from kvmkit.kvm.errors import KvmError
from kvmkit.memory.guest import GuestMemory
from kvmkit.memory.region import GuestMemoryError
from kvmkit.vmm.runstate import Event, VcpuControl

if TYPE_CHECKING:
    from kvmkit.testing.tinyguest import TinyGuest
    from kvmkit.testing.ucall import GuestOutput
    from kvmkit.vmm.machine import Machine

log = logging.getLogger(__name__)

SIGINT, SIGTRAP = 2, 5
DR6_BS = 1 << 14
DR7_FIXED = 0x0600  # GE and the reserved bit 10 (read as 1)
CR3_ROOT_MASK = 0x000F_FFFF_FFFF_F000  # the page-table root, without PCID/flags bits
MAX_PAYLOAD = rsp.DEFAULT_MAX_PAYLOAD
MAX_MEM_XFER = (MAX_PAYLOAD - 32) // 2  # bytes of an `m` reply (hex doubles them)
_HW_TYPE_BITS = {1: 0b00, 2: 0b01, 3: 0b11, 4: 0b11}  # Z type -> DR7 R/W (read: use R/W)
_HW_LEN_BITS = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}
_WATCH_NAMES = {2: "watch", 3: "rwatch", 4: "awatch"}


def parse_address(text: str) -> tuple[str, tuple[str, int] | str]:
    """`tcp:HOST:PORT`, `HOST:PORT`, `:PORT` or `unix:PATH` -> ("tcp", (host, port)) or
    ("unix", path)."""
    if text.startswith("unix:"):
        path = text[5:]
        if not path:
            raise ValueError("unix: needs a socket path")
        return "unix", path
    rest = text[4:] if text.startswith("tcp:") else text
    host, sep, port_text = rest.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"bad gdb address {text!r} (tcp:HOST:PORT or unix:PATH)")
    return "tcp", (host.strip("[]") or "127.0.0.1", int(port_text))


@dataclass
class StopEvent:
    signal: int
    kind: str  # swbreak, hwbreak, watch, rwatch, awatch, step, trap, interrupt
    addr: int = 0


@dataclass
class SwBreakpoint:
    va: int
    phys: int
    orig: int


@dataclass
class HwSlot:
    ztype: int  # 1 exec, 2 write, 3 read, 4 access
    addr: int
    length: int


@dataclass
class _Cpu:
    vcpu: Vcpu
    index: int
    control: VcpuControl  # the vCPU's run state (kvmkit.vmm.runstate), shared with its owner
    stepping: bool = False
    step_over: tuple[str, int] | None = None
    pending: StopEvent | None = None
    stop_cr3: int = 0
    applied: tuple[int, tuple[int, ...]] | None = None
    regcache: target.RegisterState | None = None
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def tid(self) -> int:
        return self.index + 1


class _Disconnect(Exception):
    pass


class GdbStub:
    def __init__(
        self,
        vcpus: Sequence[Vcpu],
        mem: GuestMemory,
        *,
        controls: Sequence[VcpuControl] | None = None,
        alive: Callable[[int], bool] | None = None,
        on_kill: Callable[[], None] | None = None,
    ) -> None:
        """`controls`: each vCPU's run state, owned by the thread that runs it (a
        `VcpuThread`'s); one is made per vCPU when not given (tiny guests)."""
        if not vcpus:
            raise ValueError("a GDB stub needs at least one vCPU")
        if controls is None:
            controls = [VcpuControl(v) for v in vcpus]
        if len(controls) != len(vcpus):
            raise ValueError("one run-state control per vCPU")
        self.mem = mem
        pairs = zip(vcpus, controls, strict=True)
        self._cpus = [_Cpu(v, i, ctl) for i, (v, ctl) in enumerate(pairs)]
        self._by_vcpu = {id(c.vcpu): c for c in self._cpus}
        self._alive = alive or (lambda i: True)
        self._on_kill = on_kill
        self._cond = threading.Condition()
        self._stop_wanted = False
        self._client = False
        self._closed = False
        self.killed = False
        self.exited: int | None = None  # exit status once the VM ended
        self._sw: dict[int, SwBreakpoint] = {}
        self._hw: list[HwSlot | None] = [None, None, None, None]
        self.cr3_filter: int | None = None
        self.skipped = 0
        self.stops = 0
        self._g = self._cpus[0]
        self._last_stop: tuple[_Cpu, StopEvent] | None = None
        self._listener: socket.socket | None = None
        self._server: threading.Thread | None = None
        self._unix_path: str | None = None
        self.address = ""
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        vm = vcpus[0].vm
        try:
            sync = vm.check_extension(Cap.SYNC_REGS)
            blockirq = vm.check_extension(Cap.SET_GUEST_DEBUG2) & int(GuestDebug.BLOCKIRQ)
        except KvmError:
            sync, blockirq = 0, 0
        self._sync_sregs = bool(sync & SyncRegs.SREGS)
        self._step_flags = int(GuestDebug.SINGLESTEP) | (
            int(GuestDebug.BLOCKIRQ) if blockirq else 0
        )
        if self._sync_sregs:
            for c in self._cpus:
                c.vcpu.set_sync_valid(SyncRegs.SREGS)
        for c in self._cpus:
            c.control.on_release = functools.partial(self._released, c)

    # ------------------------------------------------------------------ set-up / API
    @classmethod
    def for_tiny_guest(cls, guest: TinyGuest) -> GdbStub:
        """A stub for vCPU 0 of a tiny guest; run the guest with `run_tiny_guest`."""
        stub = cls([guest.vcpu], guest.mem)
        return stub

    @classmethod
    def for_machine(cls, machine: Machine, *, wait: bool = True) -> GdbStub:
        """Hook a built (not yet started) Machine: every VcpuThread consults the stub.
        With `wait` the vCPUs stop before their first instruction until GDB resumes them."""
        if machine.vm is None:
            machine.build()
        threads = machine.threads

        def alive(i: int) -> bool:
            t = threads[i].thread
            return t.ident is None or t.is_alive()

        stub = cls([t.vcpu for t in threads], machine.mem,
                   controls=[t.control for t in threads], alive=alive,
                   on_kill=machine.stop)  # fmt: skip
        for t in threads:
            t.debug = stub.debug_hook(t.vcpu)
        if wait:
            stub.start_stopped()
        return stub

    def start_stopped(self) -> None:
        """DEBUG_STOP every vCPU before it next runs guest code (the VM waits for GDB)."""
        with self._cond:
            self._stop_wanted = True
        for c in self._cpus:
            c.control.try_request(Event.DEBUG_STOP)

    def control_of(self, vcpu: Vcpu) -> VcpuControl:
        """The run state the stub stops and resumes `vcpu` with."""
        return self._by_vcpu[id(vcpu)].control

    def debug_hook(self, vcpu: Vcpu) -> Callable[[DebugExit], bool]:
        """`vcpu`'s hook for KVM_EXIT_DEBUG (kvmkit.vmm.dispatch.DebugHook)."""
        return functools.partial(self.on_debug_exit, vcpu)

    def listen(self, address: str) -> str:
        """Start serving on `address` (see parse_address); returns the bound address
        (`tcp:HOST:PORT` with the real port when 0 was asked)."""
        kind, where = parse_address(address)
        if kind == "unix":
            assert isinstance(where, str)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(where)
            sock.bind(where)
            self._unix_path = where
            self.address = f"unix:{where}"
        else:
            assert isinstance(where, tuple)
            family = socket.AF_INET6 if ":" in where[0] else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(where)
            host, port = sock.getsockname()[:2]
            self.address = f"tcp:{host}:{port}"
        sock.listen(1)
        self._listener = sock
        self._server = threading.Thread(target=self._serve, name="gdbstub", daemon=True)
        self._server.start()
        return self.address

    @property
    def port(self) -> int:
        return int(self.address.rpartition(":")[2]) if self.address.startswith("tcp:") else 0

    @property
    def client_connected(self) -> bool:
        return self._client

    def wait_for_client(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._client:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(left if left is not None else 0.5)
        return True

    def vm_exited(self, status: int = 0) -> None:
        """The VM ended: a waiting GDB gets `W` (process exited), every vCPU is FINISHED."""
        with self._cond:
            if self.exited is None:
                self.exited = status & 0xFF
            self._cond.notify_all()
        for c in self._cpus:
            c.control.request(Event.STOP)
        self._wake()

    def close(self) -> None:
        """Stop serving: breakpoints are lifted and every parked vCPU runs on."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cleanup_debug_locked()
            self._stop_wanted = False
            self._cond.notify_all()
        for c in self._cpus:
            c.control.try_request(Event.DEBUG_RESUME)
        self._wake()
        if self._listener is not None:
            with contextlib.suppress(OSError):
                self._listener.close()
        if self._server is not None and self._server is not threading.current_thread():
            self._server.join(5)
        if self._unix_path:
            with contextlib.suppress(OSError):
                os.unlink(self._unix_path)
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> GdbStub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    # ------------------------------------------------------------------ vCPU side
    def _read_cr3(self, vcpu: Vcpu) -> int:
        if self._sync_sregs:
            return int(vcpu.sync_regs.sregs.cr3)
        return int(vcpu.get_sregs().cr3)

    def on_debug_exit(self, vcpu: Vcpu, exit_: DebugExit) -> bool:
        """A vCPU thread's KVM_EXIT_DEBUG. True: the debugger's (the vCPU then goes to its
        hold point, debug-stopped when this exit is a stop to report); False: not the
        debugger's vCPU."""
        c = self._by_vcpu.get(id(vcpu))
        if c is None:
            return False
        exc, pc, dr6 = exit_.exception, exit_.pc, exit_.dr6
        cr3 = self._read_cr3(vcpu)
        stop = False
        with self._cond:
            event = self._classify(c, exc, pc, dr6, cr3)
            if event is not None and self._client and not self._closed:
                c.pending = event
                c.stop_cr3 = cr3
                self._stop_wanted = True
                stop = True
            elif event is None and self._stop_wanted and c.step_over is None:
                # A stop was asked while this vCPU finished a step-over: it stops now.
                c.stop_cr3 = cr3
                stop = True
            else:
                c.stepping = False  # no debugger to report to
        if stop:
            c.control.try_request(Event.DEBUG_STOP)
            self._wake()  # the server reports the stop once every vCPU is held
        else:
            self._apply(c)
        return True

    def _released(self, c: _Cpu) -> None:
        """The vCPU's thread leaves a hold (VcpuControl.on_release): its registers may have
        been written and breakpoints changed meanwhile; load its debug controls."""
        c.regcache = None
        self._apply(c)

    def _control(self, c: _Cpu) -> tuple[int, tuple[int, ...]]:
        if self._closed or not self._client:
            return 0, ()
        ctl = 0
        if self._sw:
            ctl |= GuestDebug.ENABLE | GuestDebug.USE_SW_BP
        dregs: tuple[int, ...] = ()
        if any(self._hw):
            ctl |= GuestDebug.ENABLE | GuestDebug.USE_HW_BP
            dr7 = DR7_FIXED
            addrs = [0, 0, 0, 0]
            for slot, hw in enumerate(self._hw):
                if hw is None or c.step_over == ("hw", slot):
                    continue
                addrs[slot] = hw.addr
                dr7 |= (2 << (slot * 2)) | (_HW_TYPE_BITS[hw.ztype] << (16 + slot * 4))
                dr7 |= _HW_LEN_BITS[hw.length] << (18 + slot * 4)
            dregs = (*addrs, 0, 0, 0, dr7)
        if c.stepping or c.step_over is not None:
            ctl |= GuestDebug.ENABLE | self._step_flags
        return int(ctl), dregs

    def _apply(self, c: _Cpu, extra: int = 0) -> None:
        """Load this vCPU's debug controls (from its own thread, outside KVM_RUN)."""
        with self._cond:
            ctl, dregs = self._control(c)
        want = (ctl | extra, dregs)
        if want == c.applied and not extra:
            return
        c.vcpu.set_guest_debug(want[0], dregs or None)
        c.applied = (ctl, dregs)

    def _filtered_out(self, cr3: int) -> bool:
        flt = self.cr3_filter
        return flt is not None and (cr3 & CR3_ROOT_MASK) != (flt & CR3_ROOT_MASK)

    def _classify(self, c: _Cpu, exc: int, pc: int, dr6: int, cr3: int) -> StopEvent | None:
        """What a KVM_EXIT_DEBUG means; None when the vCPU just runs on."""
        if c.step_over is not None:
            kind, key = c.step_over
            c.step_over = None
            planted = self._sw.get(key) if kind == "sw" else None
            if planted is not None:
                with contextlib.suppress(GuestMemoryError):
                    self.mem.write_u8(planted.phys, 0xCC)
            return None
        if exc == 3:
            bp = self._sw.get(pc)
            if bp is None or self._read_phys_u8(bp.phys) != 0xCC:
                log.debug("vcpu%d: guest-owned int3 at %#x", c.index, pc)
                self._reinject(c, GuestDebug.INJECT_BP)
                return None
            if self._filtered_out(cr3):
                self.skipped += 1
                c.step_over = ("sw", pc)
                self.mem.write_u8(bp.phys, bp.orig)
                return None
            return StopEvent(SIGTRAP, "swbreak", pc)
        if exc == 1:
            for slot, hw in enumerate(self._hw):
                if hw is None or not dr6 & (1 << slot):
                    continue
                if self._filtered_out(cr3):
                    self.skipped += 1
                    if hw.ztype == 1:
                        c.step_over = ("hw", slot)
                    return None
                if hw.ztype == 1:
                    c.stepping = False
                    return StopEvent(SIGTRAP, "hwbreak", pc)
                c.stepping = False
                return StopEvent(SIGTRAP, _WATCH_NAMES[hw.ztype], hw.addr)
            if c.stepping:
                c.stepping = False
                return StopEvent(SIGTRAP, "step", pc)
            self._reinject(c, GuestDebug.INJECT_DB)
            return None
        return StopEvent(SIGTRAP, "trap", pc)

    def _read_phys_u8(self, phys: int) -> int:
        try:
            return self.mem.read_u8(phys)
        except GuestMemoryError:
            return -1

    def _reinject(self, c: _Cpu, flag: GuestDebug) -> None:
        """Give a debug exception the stub did not cause back to the guest."""
        ctl, dregs = self._control(c)
        try:
            c.vcpu.set_guest_debug(ctl | GuestDebug.ENABLE | flag, dregs or None)
        except KvmError as err:
            log.warning("vcpu%d: could not re-inject %s: %s", c.index, flag.name, err)
        c.applied = None

    # ------------------------------------------------------------------ stopping / resuming
    def _gone(self, c: _Cpu) -> bool:
        return self.exited is not None or not self._alive(c.index)

    def _stop_all(self) -> None:
        """DEBUG_STOP every vCPU and wait until all are held (or gone). A vCPU in the middle
        of a step-over finishes it first and stops itself at its debug exit
        (on_debug_exit), so that the breakpoint it stepped over is planted again."""
        with self._cond:
            self._stop_wanted = True
        while not self._closed:
            waiting = [c for c in self._cpus if not c.control.held and not self._gone(c)]
            if not waiting:
                break
            for c in waiting:
                if c.step_over is None:
                    c.control.try_request(Event.DEBUG_STOP)
            waiting[0].control.wait_held(0.05)
        # Where each vCPU stopped (stop replies carry it); one stopped at a breakpoint has it.
        for c in self._cpus:
            if c.pending is None and not self._gone(c):
                with contextlib.suppress(KvmError):
                    c.stop_cr3 = self._read_cr3(c.vcpu)

    def _take_stop(self, default_signal: int = SIGINT) -> tuple[_Cpu, StopEvent]:
        with self._cond:
            for c in self._cpus:
                if c.pending is not None:
                    event, c.pending = c.pending, None
                    self._g = c
                    self._last_stop = (c, event)
                    self.stops += 1
                    return c, event
            c = self._g
            event = StopEvent(default_signal, "interrupt", 0)
            self._last_stop = (c, event)
            self.stops += 1
            return c, event

    def _resume(self, actions: dict[int, str]) -> bool:
        """Resume: `actions` maps a vCPU index to "c" or "s" (missing: stays stopped).
        False when a stop is already pending (report it at once instead of running)."""
        go = []
        with self._cond:
            if any(c.pending is not None for c in self._cpus):
                return False
            self._stop_wanted = False
            for c in self._cpus:
                act = actions.get(c.index)
                if act is None:
                    continue
                c.stepping = act == "s"
                go.append(c)
        for c in go:
            c.control.try_request(Event.DEBUG_RESUME)  # stays held if the VMM paused it
        return True

    def _kill(self) -> None:
        """`k`/`vKill`: end the VM (the owner's on_kill), every vCPU FINISHED."""
        self.killed = True
        if self._on_kill is not None:
            self._on_kill()
        self.vm_exited(0)

    def _cleanup_debug_locked(self) -> None:
        for bp in self._sw.values():
            with contextlib.suppress(GuestMemoryError):
                if self.mem.read_u8(bp.phys) == 0xCC:
                    self.mem.write_u8(bp.phys, bp.orig)
        self._sw.clear()
        self._hw = [None, None, None, None]
        for c in self._cpus:
            c.stepping = False
            if c.step_over is not None:
                c.step_over = None

    # ------------------------------------------------------------------ server
    def _serve(self) -> None:
        assert self._listener is not None
        while not self._closed:
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.5)
                if not ready:
                    continue
                conn, _ = self._listener.accept()
            except OSError:
                return
            try:
                _Session(self, conn).run()
            except Exception:
                log.exception("gdb session failed")
            finally:
                with contextlib.suppress(OSError):
                    conn.close()
                self._detach()
            if self.killed:
                return

    def _detach(self) -> None:
        with self._cond:
            was = self._client
            self._client = False
            self._cleanup_debug_locked()
            self._stop_wanted = False
            for c in self._cpus:
                c.pending = None
            self._cond.notify_all()
        for c in self._cpus:
            c.control.try_request(Event.DEBUG_RESUME)
        if was:
            log.info("gdb detached")

    def _attach(self) -> None:
        with self._cond:
            self._client = True
            self._cond.notify_all()
        self._stop_all()

    # -- state of a parked vCPU
    def regs_of(self, c: _Cpu) -> target.RegisterState:
        if c.regcache is None:
            v = c.vcpu
            c.regcache = target.RegisterState(v.get_regs(), v.get_sregs(), v.get_fpu())
        return c.regcache

    def store(self, c: _Cpu, parts: set[target.Part]) -> None:
        st = self.regs_of(c)
        if "regs" in parts:
            c.vcpu.set_regs(st.regs)
        if "sregs" in parts:
            c.vcpu.set_sregs(st.sregs)
        if "fpu" in parts:
            c.vcpu.set_fpu(st.fpu)

    def paging_of(self, c: _Cpu) -> PagingState:
        s = self.regs_of(c).sregs
        return PagingState(int(s.cr0), int(s.cr3), int(s.cr4), int(s.efer))


class _Session:
    """One GDB connection."""

    def __init__(self, stub: GdbStub, conn: socket.socket) -> None:
        self.stub = stub
        self.conn = conn
        self.reader = rsp.PacketReader(MAX_PAYLOAD)
        self.noack = False
        self.running = False
        self.last_sent = b""
        self.features: set[str] = set()
        self.exited_reported = False
        self.interrupting = False

    # -- I/O
    def send_raw(self, data: bytes) -> None:
        try:
            self.conn.sendall(data)
        except OSError:
            raise _Disconnect() from None

    def send(self, payload: bytes) -> None:
        self.last_sent = rsp.encode_packet(payload)
        self.send_raw(self.last_sent)

    def run(self) -> None:
        stub = self.stub
        stub._attach()
        log.info("gdb attached")
        try:
            while not stub._closed:
                ready, _, _ = select.select([self.conn, stub._wake_r], [], [], 0.5)
                if stub._wake_r in ready:
                    with contextlib.suppress(OSError):
                        stub._wake_r.recv(4096)
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
        except _Disconnect:
            return

    def check_stopped(self) -> None:
        stub = self.stub
        if stub.exited is not None:
            self.running = False
            self.exited_reported = True
            self.send(b"W%02x" % stub.exited)
            return
        with stub._cond:
            wanted = stub._stop_wanted
        if wanted:
            stub._stop_all()
            if stub.exited is not None:
                self.check_stopped()
                return
            self.running = False
            self.interrupting = False
            c, event = stub._take_stop()
            self.send(self.stop_reply(c, event))

    def on_event(self, event: rsp.Event) -> None:
        if isinstance(event, rsp.Packet):
            if not self.noack:
                self.send_raw(b"+")
            self.dispatch(event.payload)
        elif isinstance(event, rsp.Interrupt):
            if self.running and not self.interrupting:
                self.interrupting = True
                with self.stub._cond:
                    self.stub._stop_wanted = True
                self.stub._wake()
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

    # -- replies
    def stop_reply(self, c: _Cpu, event: StopEvent) -> bytes:
        parts = [b"T%02xthread:%x;" % (event.signal, c.tid), b"cr3:%x;" % c.stop_cr3]
        if event.kind in ("swbreak", "hwbreak") and event.kind + "+" in self.features:
            parts.append(event.kind.encode() + b":;")
        elif event.kind in ("watch", "rwatch", "awatch"):
            parts.append(b"%s:%x;" % (event.kind.encode(), event.addr))
        return b"".join(parts)

    def cpu(self, tid_text: bytes) -> _Cpu | None:
        """A thread id from GDB: hex, or -1 / 0 for all / any."""
        if tid_text in (b"-1", b"0"):
            return self.stub._g
        try:
            tid = rsp.parse_hex_int(tid_text, max_bits=32)
        except rsp.RspError:
            return None
        if 1 <= tid <= len(self.stub._cpus):
            return self.stub._cpus[tid - 1]
        return None

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
        stub = self.stub
        if not p:
            return b""
        cmd = p[:1]
        if self.running and cmd not in (b"q", b"Q", b"v", b"k", b"D", b"?", b"H"):
            return b"E10"  # the VM is running
        if cmd == b"?":
            if stub.exited is not None:
                return b"W%02x" % stub.exited
            if stub._last_stop is None:
                c, event = stub._take_stop(SIGTRAP)
            else:
                c, event = stub._last_stop
            return self.stop_reply(c, event)
        if cmd == b"q" or cmd == b"Q":
            return self.query(p)
        if cmd == b"H":
            if len(p) < 3 or p[1:2] not in (b"g", b"c"):
                return b"E16"
            chosen = self.cpu(p[2:])
            if chosen is None:
                return b"E16"
            if p[1:2] == b"g":
                stub._g = chosen
            return b"OK"
        if cmd == b"T":
            return b"OK" if self.cpu(p[1:]) is not None else b"E16"
        if cmd == b"g":
            return rsp.hex_encode(target.read_all(stub.regs_of(stub._g)))
        if cmd == b"G":
            st = stub.regs_of(stub._g)
            stub.store(stub._g, target.write_all(st, rsp.hex_decode(p[1:])))
            return b"OK"
        if cmd == b"p":
            num = rsp.parse_hex_int(p[1:], max_bits=16)
            if num >= target.NUM_REGISTERS:
                return b"E16"
            return rsp.hex_encode(target.read_register(stub.regs_of(stub._g), num))
        if cmd == b"P":
            num_text, eq, value = p[1:].partition(b"=")
            num = rsp.parse_hex_int(num_text, max_bits=16)
            if not eq or num >= target.NUM_REGISTERS:
                return b"E16"
            st = stub.regs_of(stub._g)
            part = target.write_register(st, num, rsp.hex_decode(value))
            stub.store(stub._g, {part})
            return b"OK"
        if cmd == b"m":
            addr, length = self.addr_len(p[1:])
            data = read_virtual(stub.mem, stub.paging_of(stub._g), addr, min(length, MAX_MEM_XFER))
            return rsp.hex_encode(data)
        if cmd == b"M":
            head, colon, data = p[1:].partition(b":")
            addr, length = self.addr_len(head)
            raw = rsp.hex_decode(data)
            if not colon or len(raw) != length:
                return b"E16"
            self.write_memory(addr, raw)
            return b"OK"
        if cmd == b"X":
            head, colon, data = p[1:].partition(b":")
            addr, length = self.addr_len(head)
            raw = rsp.unescape(data)
            if not colon or len(raw) != length:
                return b"E16"
            if length:
                self.write_memory(addr, raw)
            return b"OK"
        if cmd in (b"c", b"s", b"C", b"S"):
            if stub.exited is not None:
                return b"W%02x" % stub.exited
            step = cmd in (b"s", b"S")
            arg = p[1:]
            if cmd in (b"C", b"S"):
                arg = arg.partition(b";")[2]
            if arg:
                self.set_pc(stub._g, rsp.parse_hex_int(arg))
            actions = {c.index: "c" for c in stub._cpus}
            if step:
                actions[stub._g.index] = "s"
            return self.resume(actions)
        if cmd == b"v":
            return self.vpacket(p)
        if cmd in (b"Z", b"z"):
            return self.breakpoint(p)
        if cmd == b"D":
            self.send(b"OK")
            raise _Disconnect()
        if cmd == b"k":
            stub._kill()
            raise _Disconnect()
        return b""

    def resume(self, actions: dict[int, str]) -> bytes | None:
        if not self.stub._resume(actions):
            c, event = self.stub._take_stop()
            return self.stop_reply(c, event)
        self.running = True
        return None

    def set_pc(self, c: _Cpu, pc: int) -> None:
        st = self.stub.regs_of(c)
        st.regs.rip = pc
        self.stub.store(c, {"regs"})

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

    def write_memory(self, addr: int, data: bytes) -> None:
        stub = self.stub
        with stub._cond:
            write_virtual(stub.mem, stub.paging_of(stub._g), addr, data)
            # A planted breakpoint inside the range keeps its 0xCC; the new byte becomes
            # the one restored when it is removed.
            for va, bp in stub._sw.items():
                if addr <= va < addr + len(data):
                    bp.orig = data[va - addr]
                    stub.mem.write_u8(bp.phys, 0xCC)

    def query(self, p: bytes) -> bytes | None:
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
            return b"QC%x" % stub._g.tid
        if name == b"qfThreadInfo":
            return b"m" + b",".join(b"%x" % c.tid for c in stub._cpus)
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
            c = stub._g
            if self.running:
                return f"vCPU {c.index} is running (cr3 at its last stop: {c.stop_cr3:#x})\n"
            cr3 = int(stub.regs_of(c).sregs.cr3)
            return f"cr3 = {cr3:#x} (vCPU {c.index}, thread {c.tid})\n"
        if words[0] == "cr3-filter":
            if len(words) == 2:
                if words[1] == "off":
                    stub.cr3_filter = None
                else:
                    try:
                        text = words[1].lower().removeprefix("0x")
                        stub.cr3_filter = rsp.parse_hex_int(text.encode())
                    except rsp.RspError:
                        return f"bad CR3 value {words[1]!r}\n"
                    stub.skipped = 0
            elif len(words) > 2:
                return None
            flt = "off" if stub.cr3_filter is None else f"{stub.cr3_filter:#x}"
            return f"cr3-filter: {flt}, skipped {stub.skipped} hits\n"
        return f"unknown monitor command {command!r} (try: monitor help)\n"

    def vpacket(self, p: bytes) -> bytes | None:
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
                    for each in stub._cpus:
                        actions.setdefault(each.index, kind)
            for item_cpu in stub._cpus:  # all-stop: a thread with no action keeps going
                actions.setdefault(item_cpu.index, "c")
            return self.resume(actions)
        if p.startswith(b"vKill"):
            stub._kill()
            self.send(b"OK")
            raise _Disconnect()
        return b""

    def breakpoint(self, p: bytes) -> bytes:
        stub = self.stub
        fields = p[1:].split(b";", 1)[0].split(b",")
        if len(fields) != 3 or fields[0] not in (b"0", b"1", b"2", b"3", b"4"):
            return b""
        ztype = int(fields[0])
        addr = rsp.parse_hex_int(fields[1])
        kind = rsp.parse_hex_int(fields[2], max_bits=16)
        insert = p[:1] == b"Z"
        with stub._cond:
            if ztype == 0:
                return self.sw_breakpoint(addr, insert)
            if ztype == 1:
                length = 1
            else:
                length = kind
                if length not in _HW_LEN_BITS or addr % length:
                    return b"E16"
            wanted = HwSlot(ztype, addr, length)
            if insert:
                if wanted in stub._hw:
                    return b"OK"
                if None not in stub._hw:
                    return b"E1c"  # ENOSPC: four debug registers
                stub._hw[stub._hw.index(None)] = wanted
            elif wanted in stub._hw:
                stub._hw[stub._hw.index(wanted)] = None
            return b"OK"

    def sw_breakpoint(self, addr: int, insert: bool) -> bytes:
        stub = self.stub
        if insert:
            if addr in stub._sw:
                return b"OK"
            phys = translate(stub.mem, stub.paging_of(stub._g), addr).phys
            orig = stub.mem.read_u8(phys)
            stub._sw[addr] = SwBreakpoint(addr, phys, orig)
            stub.mem.write_u8(phys, 0xCC)
            return b"OK"
        removed = stub._sw.pop(addr, None)
        if removed is not None and stub._read_phys_u8(removed.phys) == 0xCC:
            stub.mem.write_u8(removed.phys, removed.orig)
        return b"OK"


# ---------------------------------------------------------------------- tiny guests
def run_tiny_guest(guest: TinyGuest, stub: GdbStub, *, timeout: float | None = 60.0) -> GuestOutput:
    """Run vCPU 0 of `guest` with `TinyGuest.run`, on the run state the stub stops and
    resumes it with: debug exits go to the stub, and each kick reaches the hold point.
    Returns the guest's output when it reports DONE; tells GDB the VM exited."""
    from kvmkit.testing.ucall import GuestError

    cpu = guest.vcpu
    control = stub.control_of(cpu)

    def hold(exit_: VmExit) -> bool:
        if not control.hold_point():
            raise GuestError("the debugger killed the VM")
        return True

    def debug(exit_: VmExit) -> bool:
        return isinstance(exit_, DebugExit) and stub.on_debug_exit(cpu, exit_) and hold(exit_)

    status = 0
    try:
        if stub.killed:
            raise GuestError("the debugger killed the VM")
        output = guest.run(vcpu=cpu, timeout=timeout, on_intr=hold, on_exit=debug)
        status = output.status or 0
        return output
    finally:
        stub.vm_exited(status)
