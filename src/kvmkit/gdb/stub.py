"""`GdbStub`: a GDB remote-protocol server for a running VM, in all-stop mode.

Threads are vCPUs (thread id = vCPU index + 1). The vCPU threads belong to whoever runs the
VM (kvmkit.vmm's `VcpuThread`, or `run_tiny_guest` here); the stub controls them through
their run state (kvmkit.vmm.runstate), as pausing does: it sends DEBUG_STOP and
DEBUG_RESUME events, and a vCPU hands it each KVM_EXIT_DEBUG (`debug_hook`). A debug-stopped
vCPU is held outside KVM_RUN, and the server thread reads and writes its registers.
Stopping the VM (a breakpoint on one vCPU, Ctrl-C from GDB, a new client) sends DEBUG_STOP to
every vCPU, and the stop is reported once all are held.

The parts: this module (vCPU control, debug exits, the server), `breakpoints` (software and
hardware breakpoints, the debug registers), `session` (one connection: the RSP packets,
a handler per packet letter, on this module's public API), `rsp` (framing), `target`
(registers), `paging` (guest-virtual addresses).

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
import enum
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
from kvmkit.gdb import target
from kvmkit.gdb.breakpoints import WATCH_NAMES, Breakpoints, HwSlot
from kvmkit.gdb.paging import PagingState, read_virtual, translate, write_virtual
from kvmkit.kvm import DebugExit, Vcpu, VmExit
from kvmkit.kvm.errors import KvmError
from kvmkit.memory.guest import GuestMemory
from kvmkit.vmm.runstate import Event, VcpuControl

if TYPE_CHECKING:
    from kvmkit.testing.tinyguest import TinyGuest
    from kvmkit.testing.ucall import GuestOutput
    from kvmkit.vmm.machine import Machine

log = logging.getLogger(__name__)

SIGINT, SIGTRAP = 2, 5
CR3_ROOT_MASK = 0x000F_FFFF_FFFF_F000  # the page-table root, without PCID/flags bits


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
class DebugCpu:
    """One vCPU as the debugger sees it."""

    vcpu: Vcpu
    index: int
    control: VcpuControl  # the vCPU's run state (kvmkit.vmm.runstate), shared with its owner
    stepping: bool = False
    step_over: tuple[str, int] | None = None  # ("sw", va) or ("hw", slot) being stepped over
    pending: StopEvent | None = None  # a stop to report
    stop_cr3: int = 0
    applied: tuple[int, tuple[int, ...]] | None = None
    regcache: target.RegisterState | None = None
    extra: dict[str, int] = field(default_factory=dict)

    @property
    def tid(self) -> int:
        return self.index + 1


class BreakpointResult(enum.Enum):
    OK = "ok"
    INVALID = "invalid"  # a length or alignment the debug registers cannot watch
    NO_SLOT = "no-slot"  # the four debug registers are taken


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
        self.cpus = [DebugCpu(v, i, ctl) for i, (v, ctl) in enumerate(pairs)]
        self._by_vcpu = {id(c.vcpu): c for c in self.cpus}
        self._alive = alive or (lambda i: True)
        self._on_kill = on_kill
        self._cond = threading.Condition()
        self._stop_wanted = False
        self._client = False
        self._closed = False
        self.killed = False
        self.exited: int | None = None  # exit status once the VM ended
        self.breakpoints = Breakpoints(mem)
        self.cr3_filter: int | None = None
        self.skipped = 0
        self.stops = 0
        self.selected = self.cpus[0]  # the thread of g/G/p/P/m/M (GDB's Hg)
        self.last_stop: tuple[DebugCpu, StopEvent] | None = None
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
            for c in self.cpus:
                c.vcpu.set_sync_valid(SyncRegs.SREGS)
        for c in self.cpus:
            c.control.on_release = functools.partial(self._released, c)

    # ------------------------------------------------------------------ set-up
    @classmethod
    def for_tiny_guest(cls, guest: TinyGuest) -> GdbStub:
        """A stub for vCPU 0 of a tiny guest; run the guest with `run_tiny_guest`."""
        return cls([guest.vcpu], guest.mem)

    @classmethod
    def for_machine(cls, machine: Machine, *, wait: bool = True) -> GdbStub:
        """Hook a built (not yet started) Machine: every VcpuThread hands the stub its debug
        exits, and the stub stops and resumes them through their run state. With `wait` the
        vCPUs stop before their first instruction until GDB resumes them."""
        if machine.vm is None:
            machine.build()
        threads = machine.threads
        stub = cls([t.vcpu for t in threads], machine.mem,
                   controls=[t.control for t in threads], alive=lambda i: threads[i].alive,
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
        for c in self.cpus:
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
        for c in self.cpus:
            c.control.request(Event.STOP)
        self._wake()

    def close(self) -> None:
        """Stop serving: breakpoints are lifted and every debug-stopped vCPU runs on."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._clear_debug_locked()
            self._stop_wanted = False
            self._cond.notify_all()
        for c in self.cpus:
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

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def wake_socket(self) -> socket.socket:
        """Readable when a vCPU stopped or the VM ended (the session waits on it)."""
        return self._wake_r

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

    def _released(self, c: DebugCpu) -> None:
        """The vCPU's thread leaves a hold (VcpuControl.on_release): its registers may have
        been written and breakpoints changed meanwhile; load its debug controls."""
        c.regcache = None
        self._apply(c)

    def _control(self, c: DebugCpu) -> tuple[int, tuple[int, ...]]:
        if self._closed or not self._client:
            return 0, ()
        skip = c.step_over[1] if c.step_over is not None and c.step_over[0] == "hw" else None
        ctl, dregs = self.breakpoints.control(skip_hw=skip)
        if c.stepping or c.step_over is not None:
            ctl |= GuestDebug.ENABLE | self._step_flags
        return int(ctl), dregs

    def _apply(self, c: DebugCpu) -> None:
        """Load this vCPU's debug controls (from its own thread, outside KVM_RUN)."""
        with self._cond:
            want = self._control(c)
        if want == c.applied:
            return
        c.vcpu.set_guest_debug(want[0], want[1] or None)
        c.applied = want

    def _filtered_out(self, cr3: int) -> bool:
        flt = self.cr3_filter
        return flt is not None and (cr3 & CR3_ROOT_MASK) != (flt & CR3_ROOT_MASK)

    def _classify(self, c: DebugCpu, exc: int, pc: int, dr6: int, cr3: int) -> StopEvent | None:
        """What a KVM_EXIT_DEBUG means; None when the vCPU just runs on."""
        bps = self.breakpoints
        if c.step_over is not None:
            kind, key = c.step_over
            c.step_over = None
            if kind == "sw":
                bps.replant(key)
            return None
        if exc == 3:  # #BP
            if bps.planted(pc) is None:
                log.debug("vcpu%d: guest-owned int3 at %#x", c.index, pc)
                self._reinject(c, GuestDebug.INJECT_BP)
                return None
            if self._filtered_out(cr3):
                self.skipped += 1
                c.step_over = ("sw", pc)
                bps.lift(pc)
                return None
            return StopEvent(SIGTRAP, "swbreak", pc)
        if exc == 1:  # #DB
            hit = bps.hit(dr6)
            if hit is not None:
                slot, hw = hit
                if self._filtered_out(cr3):
                    self.skipped += 1
                    if hw.ztype == 1:
                        c.step_over = ("hw", slot)
                    return None
                c.stepping = False
                if hw.ztype == 1:
                    return StopEvent(SIGTRAP, "hwbreak", pc)
                return StopEvent(SIGTRAP, WATCH_NAMES[hw.ztype], hw.addr)
            if c.stepping:
                c.stepping = False
                return StopEvent(SIGTRAP, "step", pc)
            self._reinject(c, GuestDebug.INJECT_DB)
            return None
        return StopEvent(SIGTRAP, "trap", pc)

    def _reinject(self, c: DebugCpu, flag: GuestDebug) -> None:
        """Give a debug exception the stub did not cause back to the guest."""
        ctl, dregs = self._control(c)
        try:
            c.vcpu.set_guest_debug(ctl | GuestDebug.ENABLE | flag, dregs or None)
        except KvmError as err:
            log.warning("vcpu%d: could not re-inject %s: %s", c.index, flag.name, err)
        c.applied = None

    # ------------------------------------------------------------------ stop / resume API
    def gone(self, c: DebugCpu) -> bool:
        return self.exited is not None or not self._alive(c.index)

    @property
    def stop_requested(self) -> bool:
        """A vCPU stopped (or GDB interrupted) and the rest are to be stopped and reported."""
        return self._stop_wanted

    def interrupt(self) -> None:
        """Ctrl-C from GDB: stop the VM at the next chance (the session calls `stop_all`)."""
        with self._cond:
            self._stop_wanted = True
        self._wake()

    def stop_all(self) -> None:
        """DEBUG_STOP every vCPU and wait until all are held (or gone). A vCPU in the middle
        of a step-over finishes it first and stops itself at its debug exit
        (on_debug_exit), so that the breakpoint it stepped over is planted again."""
        with self._cond:
            self._stop_wanted = True
        while not self._closed:
            waiting = [c for c in self.cpus if not c.control.held and not self.gone(c)]
            if not waiting:
                break
            for c in waiting:
                if c.step_over is None:
                    c.control.try_request(Event.DEBUG_STOP)
            waiting[0].control.wait_held(0.05)
        # Where each vCPU stopped (stop replies carry it); one stopped at a breakpoint has it.
        for c in self.cpus:
            if c.pending is None and not self.gone(c):
                with contextlib.suppress(KvmError):
                    c.stop_cr3 = self._read_cr3(c.vcpu)

    def take_stop(self, default_signal: int = SIGINT) -> tuple[DebugCpu, StopEvent]:
        """The stop to report: a vCPU's pending one (it becomes the selected thread), else an
        interruption of the selected thread."""
        with self._cond:
            for c in self.cpus:
                if c.pending is not None:
                    event, c.pending = c.pending, None
                    self.selected = c
                    self.last_stop = (c, event)
                    self.stops += 1
                    return c, event
            c = self.selected
            event = StopEvent(default_signal, "interrupt", 0)
            self.last_stop = (c, event)
            self.stops += 1
            return c, event

    def resume(self, actions: dict[int, str]) -> bool:
        """Resume: `actions` maps a vCPU index to "c" or "s" (missing: stays stopped).
        False when a stop is already pending (report it at once instead of running)."""
        go = []
        with self._cond:
            if any(c.pending is not None for c in self.cpus):
                return False
            self._stop_wanted = False
            for c in self.cpus:
                act = actions.get(c.index)
                if act is None:
                    continue
                c.stepping = act == "s"
                go.append(c)
        for c in go:
            c.control.try_request(Event.DEBUG_RESUME)  # stays held if the VMM paused it
        return True

    def kill(self) -> None:
        """`k`/`vKill`: end the VM (the owner's on_kill), every vCPU FINISHED."""
        self.killed = True
        if self._on_kill is not None:
            self._on_kill()
        self.vm_exited(0)

    def set_cr3_filter(self, value: int | None) -> None:
        self.cr3_filter = value
        if value is not None:
            self.skipped = 0

    def _clear_debug_locked(self) -> None:
        self.breakpoints.clear()
        for c in self.cpus:
            c.stepping = False
            c.step_over = None

    # ------------------------------------------------------------------ held vCPUs
    def registers(self, c: DebugCpu) -> target.RegisterState:
        """The registers of a held vCPU (read once per stop)."""
        if c.regcache is None:
            v = c.vcpu
            c.regcache = target.RegisterState(v.get_regs(), v.get_sregs(), v.get_fpu())
        return c.regcache

    def store(self, c: DebugCpu, parts: set[target.Part]) -> None:
        """Write back the changed parts of `registers(c)`."""
        st = self.registers(c)
        if "regs" in parts:
            c.vcpu.set_regs(st.regs)
        if "sregs" in parts:
            c.vcpu.set_sregs(st.sregs)
        if "fpu" in parts:
            c.vcpu.set_fpu(st.fpu)

    def paging(self, c: DebugCpu) -> PagingState:
        s = self.registers(c).sregs
        return PagingState(int(s.cr0), int(s.cr3), int(s.cr4), int(s.efer))

    def read_memory(self, addr: int, length: int) -> bytes:
        """Guest-virtual memory of the selected vCPU (stops at an unmapped page)."""
        return read_virtual(self.mem, self.paging(self.selected), addr, length)

    def write_memory(self, addr: int, data: bytes) -> None:
        with self._cond:
            write_virtual(self.mem, self.paging(self.selected), addr, data)
            self.breakpoints.memory_written(addr, data)

    def set_breakpoint(self, ztype: int, addr: int, kind: int, insert: bool) -> BreakpointResult:
        """Z/z packets: type 0 software, 1 hardware, 2-4 write/read/access watchpoints.
        The vCPUs load the new debug controls when they run again."""
        with self._cond:
            bps = self.breakpoints
            if ztype == 0:
                if insert:
                    phys = translate(self.mem, self.paging(self.selected), addr).phys
                    bps.insert_sw(addr, phys)
                else:
                    bps.remove_sw(addr)
                return BreakpointResult.OK
            length = bps.hw_length(ztype, addr, kind)
            if length is None:
                return BreakpointResult.INVALID
            slot = HwSlot(ztype, addr, length)
            if not insert:
                bps.remove_hw(slot)
            elif not bps.insert_hw(slot):
                return BreakpointResult.NO_SLOT
            return BreakpointResult.OK

    # ------------------------------------------------------------------ server
    def _serve(self) -> None:
        from kvmkit.gdb.session import Disconnect, Session

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
                self._attach()
                log.info("gdb attached")
                Session(self, conn).run()
            except Disconnect:
                pass
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
            self._clear_debug_locked()
            self._stop_wanted = False
            for c in self.cpus:
                c.pending = None
            self._cond.notify_all()
        for c in self.cpus:
            c.control.try_request(Event.DEBUG_RESUME)
        if was:
            log.info("gdb detached")

    def _attach(self) -> None:
        with self._cond:
            self._client = True
            self._cond.notify_all()
        self.stop_all()


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
