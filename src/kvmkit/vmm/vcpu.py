"""One thread per vCPU: run it, dispatch its exits, report how it ended.

The loop is the hot path: exits are the per-vCPU objects from `kvmkit.kvm.exits` (nothing is
allocated per exit), port I/O and MMIO go to the buses, and an unclaimed read returns all
ones as on a PC bus. Anything that ends the VM is reported to the machine through
`on_event(VcpuEvent)`; the machine then stops every vCPU (Firecracker's vCPU state machine,
reduced to Running -> Stopping -> Finished for now).
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from kvmkit.abi.constants import SystemEvent
from kvmkit.devices.bus import Bus
from kvmkit.kvm import (
    DebugExit,
    FailEntryExit,
    HltExit,
    InternalErrorExit,
    IntrExit,
    IoExit,
    MmioExit,
    ShutdownExit,
    SystemEventExit,
    Vcpu,
    VmExit,
)
from kvmkit.kvm.errors import KvmError
from kvmkit.snapshot.pause import PausePoint

log = logging.getLogger(__name__)


class VcpuEventKind(enum.Enum):
    SHUTDOWN = "shutdown"  # KVM_EXIT_SHUTDOWN: triple fault
    SYSTEM_RESET = "reset"  # KVM_SYSTEM_EVENT_RESET
    SYSTEM_SHUTDOWN = "poweroff"  # KVM_SYSTEM_EVENT_SHUTDOWN
    SYSTEM_CRASH = "crash"  # KVM_SYSTEM_EVENT_CRASH
    ERROR = "error"  # internal error, failed entry, unexpected exit, KVM_RUN failure
    STOPPED = "stopped"  # asked to stop


@dataclass
class VcpuEvent:
    kind: VcpuEventKind
    vcpu_id: int
    detail: str = ""


def shutdown_detail(vcpu: Vcpu) -> str:
    """What the vCPU looked like when it triple-faulted: the registers QEMU's `-d cpu_reset`
    would show first (where it was, its stack, the tables a fault is delivered through) and
    any exception KVM still had pending, so a report says more than "triple fault"."""
    try:
        regs, sregs, ev = vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_vcpu_events()
    except KvmError as err:
        return f"triple fault (state unreadable: {err})"
    if regs.rip == 0xFFF0 and sregs.cs.selector == 0xF000 and not sregs.efer & 0x400:
        # KVM on AMD SVM INITs the vCPU at a SHUTDOWN intercept (the VMCB is undefined
        # after it: arch/x86/kvm/svm/svm.c shutdown_interception), so the registers are
        # the reset state, not the guest's: say so instead of printing misleading values.
        return "triple fault (registers lost: KVM reset the vCPU at the shutdown, as on AMD)"
    exc = ev.exception
    pending = (
        f" exception={exc.nr}{f'/{exc.error_code:#x}' if exc.has_error_code else ''}"
        f"{' injected' if exc.injected else ''}{' pending' if exc.pending else ''}"
        if exc.injected or exc.pending
        else ""
    )
    return (
        f"triple fault at rip={regs.rip:#x} rsp={regs.rsp:#x} rflags={regs.rflags:#x} "
        f"cs={sregs.cs.selector:#x} cr0={sregs.cr0:#x} cr2={sregs.cr2:#x} cr3={sregs.cr3:#x} "
        f"cr4={sregs.cr4:#x} efer={sregs.efer:#x} idt={sregs.idt.base:#x}/{sregs.idt.limit:#x} "
        f"gdt={sregs.gdt.base:#x}/{sregs.gdt.limit:#x} tr={sregs.tr.base:#x}{pending}"
    )


class VcpuThread:
    def __init__(
        self,
        vcpu: Vcpu,
        pio: Bus,
        mmio: Bus,
        on_event: Callable[[VcpuEvent], None],
    ) -> None:
        self.vcpu = vcpu
        self.pio = pio
        self.mmio = mmio
        self.on_event = on_event
        # Debugger hook (kvmkit.gdb): consulted on DebugExit and IntrExit; True when it
        # consumed the exit (it may block while the debugger keeps the vCPU stopped).
        self.on_debug: Callable[[Vcpu, VmExit], bool] | None = None
        self.exits = 0
        # Drains the coalesced MMIO/PIO ring (kvmkit.kvm.coalesced) before each exit is
        # handled, so devices see queued writes in order with every other access.
        self.drain: Callable[[], None] | None = None
        # Firecracker's vcpu metrics (exits by kind)
        self.exit_io_in = 0
        self.exit_io_out = 0
        self.exit_mmio_read = 0
        self.exit_mmio_write = 0
        self._stop = threading.Event()
        self.pause_point = PausePoint()  # Running -> Paused -> Running (vmm/snapshot.py)
        self.thread = threading.Thread(target=self._main, name=f"vcpu{vcpu.id}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Ask the thread to leave its loop (kicks it out of KVM_RUN)."""
        self._stop.set()
        self.pause_point.release()
        if self.thread.is_alive():
            self.vcpu.kick()

    def join(self, timeout: float | None = None) -> None:
        if self.thread.ident is not None:  # a restored machine closed before it started
            self.thread.join(timeout)

    def _main(self) -> None:
        try:
            event = self._loop()
        except KvmError as err:
            event = VcpuEvent(VcpuEventKind.ERROR, self.vcpu.id, str(err))
        except Exception as err:  # a device bug must end the VM cleanly, not hang it
            log.exception("vcpu%d: unexpected error", self.vcpu.id)
            event = VcpuEvent(VcpuEventKind.ERROR, self.vcpu.id, f"{type(err).__name__}: {err}")
        self.on_event(event)

    def _loop(self) -> VcpuEvent:
        vcpu, pio, mmio, stop, drain = self.vcpu, self.pio, self.mmio, self._stop, self.drain
        vid = vcpu.id
        while True:
            if stop.is_set():
                return VcpuEvent(VcpuEventKind.STOPPED, vid)
            exit_ = vcpu.run()
            self.exits += 1
            if drain is not None:
                drain()
            if isinstance(exit_, IoExit):
                port, size, data = exit_.port, exit_.size, exit_.data
                if exit_.is_in:
                    self.exit_io_in += 1
                else:
                    self.exit_io_out += 1
                # String I/O (rep ins/outs) carries `count` elements; handle each in order.
                for i in range(0, len(data), size):
                    element = data[i : i + size]
                    if exit_.is_in:
                        if not pio.read(port, element):
                            element[:] = b"\xff" * size
                    else:
                        pio.write(port, element)
            elif isinstance(exit_, MmioExit):
                data = exit_.data
                if exit_.is_write:
                    self.exit_mmio_write += 1
                    mmio.write(exit_.phys_addr, data)
                else:
                    self.exit_mmio_read += 1
                    if not mmio.read(exit_.phys_addr, data):
                        data[:] = b"\xff" * len(data)
            elif isinstance(exit_, IntrExit):
                if self.on_debug is None or not self.on_debug(vcpu, exit_):
                    vcpu.immediate_exit = False
                self.pause_point.park_if_requested(vcpu)
            elif isinstance(exit_, DebugExit) and self.on_debug is not None:
                if not self.on_debug(vcpu, exit_):
                    return VcpuEvent(VcpuEventKind.ERROR, vid, f"unexpected {exit_.describe()}")
            elif isinstance(exit_, HltExit):
                # Only without the in-kernel irqchip; kvmkit always has one, so a HLT exit
                # means the guest stopped for good.
                return VcpuEvent(VcpuEventKind.ERROR, vid, "guest halted with no irqchip")
            elif isinstance(exit_, ShutdownExit):
                return VcpuEvent(VcpuEventKind.SHUTDOWN, vid, shutdown_detail(vcpu))
            elif isinstance(exit_, SystemEventExit):
                kinds = {
                    SystemEvent.SHUTDOWN: VcpuEventKind.SYSTEM_SHUTDOWN,
                    SystemEvent.RESET: VcpuEventKind.SYSTEM_RESET,
                    SystemEvent.CRASH: VcpuEventKind.SYSTEM_CRASH,
                }
                kind = kinds.get(exit_.type)  # type: ignore[call-overload]
                if kind is not None:
                    return VcpuEvent(kind, vid, exit_.describe())
                log.warning("vcpu%d: ignoring %s", vid, exit_.describe())
            elif isinstance(exit_, InternalErrorExit | FailEntryExit):
                regs = vcpu.get_regs()
                return VcpuEvent(
                    VcpuEventKind.ERROR, vid, f"{exit_.describe()} at rip={regs.rip:#x}"
                )
            else:
                regs = vcpu.get_regs()
                return VcpuEvent(
                    VcpuEventKind.ERROR, vid, f"unexpected {exit_.describe()} at rip={regs.rip:#x}"
                )
