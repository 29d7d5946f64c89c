"""What a VM exit means for the vCPU loop: `handle_exit(exit, peripherals)`, a free function.

Firecracker's `handle_kvm_exit`: it serves the exit (port I/O and MMIO go to the buses, an
unclaimed read returns all ones as on a PC bus) and returns what the loop does next:

    HANDLED       run the vCPU again
    INTERRUPTED   KVM_RUN returned early (a kick) or the debugger took a debug exit: go to the
                  run-state hold point (kvmkit.vmm.runstate), then run again unless finished
    Stopped(...)  the vCPU is done: the guest shut down, reset, crashed, or an error

It keeps no state of its own (what it touches is in `Peripherals`), so tests drive it with
synthetic exits and no KVM (tests/unit/test_vcpu_dispatch.py). Dispatch is a table by exit
type (one object per exit kind and vCPU, `kvmkit.kvm.exits`), and the port-I/O and MMIO paths
build no objects of their own: no outcome object (HANDLED is a constant), no slice for a
single access (string I/O, `rep ins/outs`, is sliced per element).
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from kvmkit.abi import structs
from kvmkit.abi.constants import KVM_EXIT_HYPERV_HCALL, SystemEvent
from kvmkit.devices.bus import Bus
from kvmkit.kvm import (
    DebugExit,
    FailEntryExit,
    HltExit,
    HypervExit,
    InternalErrorExit,
    IntrExit,
    IoExit,
    MmioExit,
    ShutdownExit,
    SystemEventExit,
    VmExit,
)
from kvmkit.kvm.errors import KvmError

log = logging.getLogger(__name__)


class Flow(enum.Enum):
    HANDLED = "handled"
    INTERRUPTED = "interrupted"


HANDLED = Flow.HANDLED
INTERRUPTED = Flow.INTERRUPTED


class StopKind(enum.Enum):
    """Why a vCPU stopped for good (the machine maps these to its end reasons)."""

    SHUTDOWN = "shutdown"  # KVM_EXIT_SHUTDOWN: triple fault
    SYSTEM_RESET = "reset"  # KVM_SYSTEM_EVENT_RESET
    SYSTEM_SHUTDOWN = "poweroff"  # KVM_SYSTEM_EVENT_SHUTDOWN
    SYSTEM_CRASH = "crash"  # KVM_SYSTEM_EVENT_CRASH
    ERROR = "error"  # internal error, failed entry, unexpected exit, KVM_RUN failure
    STOPPED = "stopped"  # asked to stop (Event.STOP)


@dataclass(frozen=True, slots=True)
class Stopped:
    kind: StopKind
    detail: str = ""


Outcome = Flow | Stopped


class VcpuRegisters(Protocol):
    """The register reads an exit report needs (`kvmkit.kvm.Vcpu`)."""

    def get_regs(self) -> structs.kvm_regs: ...

    def get_sregs(self) -> structs.kvm_sregs: ...

    def get_vcpu_events(self) -> structs.kvm_vcpu_events: ...


# A debugger's hook for one vCPU (kvmkit.gdb.GdbStub.debug_hook): takes KVM_EXIT_DEBUG on the
# vCPU thread; True when the exit was the debugger's (it may have debug-stopped the vCPU).
DebugHook = Callable[[DebugExit], bool]


@dataclass
class ExitStats:
    """Firecracker's vcpu metrics: exits by kind."""

    exit_io_in: int = 0
    exit_io_out: int = 0
    exit_mmio_read: int = 0
    exit_mmio_write: int = 0


@dataclass
class Peripherals:
    """Everything `handle_exit` touches."""

    vcpu: VcpuRegisters
    pio: Bus
    mmio: Bus
    debug: DebugHook | None = None
    stats: ExitStats = field(default_factory=ExitStats)


def shutdown_detail(vcpu: VcpuRegisters) -> str:
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


def _at_rip(vcpu: VcpuRegisters, text: str) -> Stopped:
    return Stopped(StopKind.ERROR, f"{text} at rip={vcpu.get_regs().rip:#x}")


# -- one handler per exit type


def _io(exit_: VmExit, p: Peripherals) -> Outcome:
    assert isinstance(exit_, IoExit)
    port, size, data = exit_.port, exit_.size, exit_.data
    pio = p.pio
    if exit_.is_in:
        p.stats.exit_io_in += 1
        if exit_.count == 1:
            if not pio.read(port, data):
                data[:] = b"\xff" * size
            return HANDLED
    else:
        p.stats.exit_io_out += 1
        if exit_.count == 1:
            pio.write(port, data)
            return HANDLED
    # String I/O (rep ins/outs) carries `count` elements; each is one access, in order.
    for i in range(0, len(data), size):
        element = data[i : i + size]
        if exit_.is_in:
            if not pio.read(port, element):
                element[:] = b"\xff" * size
        else:
            pio.write(port, element)
    return HANDLED


def _mmio(exit_: VmExit, p: Peripherals) -> Outcome:
    assert isinstance(exit_, MmioExit)
    data = exit_.data
    if exit_.is_write:
        p.stats.exit_mmio_write += 1
        p.mmio.write(exit_.phys_addr, data)
    else:
        p.stats.exit_mmio_read += 1
        if not p.mmio.read(exit_.phys_addr, data):
            data[:] = b"\xff" * len(data)
    return HANDLED


def _intr(exit_: VmExit, p: Peripherals) -> Outcome:
    return INTERRUPTED


def _debug(exit_: VmExit, p: Peripherals) -> Outcome:
    assert isinstance(exit_, DebugExit)
    if p.debug is not None and p.debug(exit_):
        return INTERRUPTED  # the debugger may have stopped this vCPU: the hold point decides
    return _at_rip(p.vcpu, f"unexpected {exit_.describe()}")


def _hlt(exit_: VmExit, p: Peripherals) -> Outcome:
    # Only without the in-kernel irqchip; kvmkit always has one, so a HLT exit means the
    # guest stopped for good.
    return Stopped(StopKind.ERROR, "guest halted with no irqchip")


def _shutdown(exit_: VmExit, p: Peripherals) -> Outcome:
    return Stopped(StopKind.SHUTDOWN, shutdown_detail(p.vcpu))


_SYSTEM_EVENTS = {
    SystemEvent.SHUTDOWN: StopKind.SYSTEM_SHUTDOWN,
    SystemEvent.RESET: StopKind.SYSTEM_RESET,
    SystemEvent.CRASH: StopKind.SYSTEM_CRASH,
}


def _system_event(exit_: VmExit, p: Peripherals) -> Outcome:
    assert isinstance(exit_, SystemEventExit)
    kind = _SYSTEM_EVENTS.get(exit_.type)  # type: ignore[call-overload]
    if kind is not None:
        return Stopped(kind, exit_.describe())
    log.warning("ignoring %s", exit_.describe())
    return HANDLED


# Hyper-V TLFS, "Hypercall Status Codes": HV_STATUS_INVALID_HYPERCALL_CODE
HV_STATUS_INVALID_HYPERCALL_CODE = 2


def _hyperv(exit_: VmExit, p: Peripherals) -> Outcome:
    """--hyperv (docs/hyperv.md). A SynIC MSR write: KVM has applied it; kvmkit has no VMBus
    to route messages for, so there is nothing to do. A hypercall KVM leaves to userspace
    (HvPostMessage, HvSignalEvent without an eventfd): kvmkit implements none, so the guest
    gets HV_STATUS_INVALID_HYPERCALL_CODE, what a hypervisor answers for an unknown call."""
    assert isinstance(exit_, HypervExit)
    if exit_.type == KVM_EXIT_HYPERV_HCALL:
        exit_.set_result(HV_STATUS_INVALID_HYPERCALL_CODE)
    log.debug("%s", exit_.describe())
    return HANDLED


def _failed(exit_: VmExit, p: Peripherals) -> Outcome:
    return _at_rip(p.vcpu, exit_.describe())


def _unexpected(exit_: VmExit, p: Peripherals) -> Outcome:
    return _at_rip(p.vcpu, f"unexpected {exit_.describe()}")


Handler = Callable[[VmExit, Peripherals], Outcome]
HANDLERS: dict[type[VmExit], Handler] = {
    IoExit: _io,
    MmioExit: _mmio,
    IntrExit: _intr,
    DebugExit: _debug,
    HltExit: _hlt,
    ShutdownExit: _shutdown,
    SystemEventExit: _system_event,
    HypervExit: _hyperv,
    InternalErrorExit: _failed,
    FailEntryExit: _failed,
}


def handle_exit(exit_: VmExit, p: Peripherals) -> Outcome:
    """Serve one exit; see the module docstring for the outcomes."""
    return HANDLERS.get(type(exit_), _unexpected)(exit_, p)
