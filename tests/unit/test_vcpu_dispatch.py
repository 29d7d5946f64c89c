"""`handle_exit` (kvmkit.vmm.dispatch) driven by synthetic exits: a buffer laid out as a vCPU's
`kvm_run` page, the exit objects of `kvmkit.kvm.exits` over it, real buses and devices. No
KVM: the fields are set as KVM would set them, then the outcome and the devices' view of
the access are checked."""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Iterator

import pytest

from kvmkit.abi import structs
from kvmkit.abi.constants import (
    KVM_EXIT_HYPERV_HCALL,
    KVM_EXIT_HYPERV_SYNIC,
    KVM_EXIT_IO_IN,
    KVM_EXIT_IO_OUT,
    ExitReason,
    InternalError,
    SystemEvent,
)
from kvmkit.devices.bus import Bus
from kvmkit.kvm.exits import DebugExit, ExitTable, IoExit, MmioExit, VmExit
from kvmkit.vmm.dispatch import (
    HANDLED,
    INTERRUPTED,
    Peripherals,
    StopKind,
    Stopped,
    handle_exit,
)

PIO_DATA = mmap.PAGESIZE  # KVM puts port-I/O data at KVM_PIO_PAGE_OFFSET (page 1)


class Registers:
    """The vCPU register reads an exit report makes (the state KVM would return)."""

    def __init__(self, rip: int = 0x1234) -> None:
        self.regs = structs.kvm_regs()
        self.regs.rip = rip
        self.sregs = structs.kvm_sregs()
        self.events = structs.kvm_vcpu_events()

    def get_regs(self) -> structs.kvm_regs:
        return self.regs

    def get_sregs(self) -> structs.kvm_sregs:
        return self.sregs

    def get_vcpu_events(self) -> structs.kvm_vcpu_events:
        return self.events


class Recorder:
    """A bus device remembering each access; reads answer with `value`."""

    def __init__(self, value: int = 0) -> None:
        self.value = value
        self.log: list[tuple[str, int, bytes]] = []

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = self.value.to_bytes(len(data), "little")
        self.log.append(("r", offset, bytes(data)))

    def write(self, offset: int, data: memoryview) -> None:
        self.log.append(("w", offset, bytes(data)))


class Run:
    """A kvm_run page (plus the port-I/O data page) and its exit objects."""

    def __init__(self) -> None:
        self.buf = bytearray(3 * mmap.PAGESIZE)
        self.run = structs.kvm_run.from_buffer(self.buf)
        self.exits = ExitTable(self.run, self.buf)

    def exit(self, reason: ExitReason) -> VmExit:
        self.run.exit_reason = reason
        return self.exits.lookup(reason)

    def io(
        self, port: int, *, out: bool, size: int = 1, count: int = 1, data: bytes = b""
    ) -> IoExit:
        io = self.run.io
        io.direction = KVM_EXIT_IO_OUT if out else KVM_EXIT_IO_IN
        io.size, io.port, io.count, io.data_offset = size, port, count, PIO_DATA
        self.buf[PIO_DATA : PIO_DATA + len(data)] = data
        exit_ = self.exit(ExitReason.IO)
        assert isinstance(exit_, IoExit)
        return exit_

    def mmio(self, addr: int, *, write: bool, length: int, data: bytes = b"") -> MmioExit:
        m = self.run.mmio
        m.phys_addr, m.len, m.is_write = addr, length, int(write)
        ctypes.memmove(ctypes.addressof(m.data), data.ljust(8, b"\0"), 8)
        exit_ = self.exit(ExitReason.MMIO)
        assert isinstance(exit_, MmioExit)
        return exit_

    def close(self) -> None:
        self.exits.release()


@pytest.fixture
def run() -> Iterator[Run]:
    r = Run()
    yield r
    r.close()


@pytest.fixture
def p() -> Peripherals:
    return Peripherals(Registers(), Bus("pio"), Bus("mmio"))


def test_port_out_reaches_the_device_at_its_offset(run: Run, p: Peripherals) -> None:
    dev = Recorder()
    p.pio.insert(dev, 0x3F8, 8)
    assert handle_exit(run.io(0x3F9, out=True, data=b"A"), p) is HANDLED
    assert dev.log == [("w", 1, b"A")] and p.stats.exit_io_out == 1


def test_port_in_is_answered_in_the_exit_data(run: Run, p: Peripherals) -> None:
    p.pio.insert(Recorder(0xBEEF), 0x70, 2)
    exit_ = run.io(0x70, out=False, size=2)
    assert handle_exit(exit_, p) is HANDLED
    assert bytes(run.buf[PIO_DATA : PIO_DATA + 2]) == b"\xef\xbe" and p.stats.exit_io_in == 1


def test_unclaimed_reads_return_all_ones(run: Run, p: Peripherals) -> None:
    assert handle_exit(run.io(0x80, out=False, size=4), p) is HANDLED
    assert bytes(run.buf[PIO_DATA : PIO_DATA + 4]) == b"\xff" * 4
    assert handle_exit(run.mmio(0xD000_0000, write=False, length=8), p) is HANDLED
    assert bytes(run.run.mmio.data) == b"\xff" * 8
    assert handle_exit(run.io(0x80, out=True, data=b"x"), p) is HANDLED  # dropped


def test_string_io_is_one_access_per_element_in_order(run: Run, p: Peripherals) -> None:
    dev = Recorder(0x41)
    p.pio.insert(dev, 0x60, 1)
    assert handle_exit(run.io(0x60, out=True, count=3, data=b"xyz"), p) is HANDLED
    assert handle_exit(run.io(0x60, out=False, count=2), p) is HANDLED
    assert dev.log == [("w", 0, b"x"), ("w", 0, b"y"), ("w", 0, b"z"), ("r", 0, b"A"),
                       ("r", 0, b"A")]  # fmt: skip
    assert bytes(run.buf[PIO_DATA : PIO_DATA + 2]) == b"AA"


def test_mmio_read_and_write(run: Run, p: Peripherals) -> None:
    dev = Recorder(0x11223344)
    p.mmio.insert(dev, 0xD000_0000, 0x1000)
    assert handle_exit(run.mmio(0xD000_0010, write=True, length=4, data=b"\1\2\3\4"), p) is HANDLED
    assert handle_exit(run.mmio(0xD000_0020, write=False, length=4), p) is HANDLED
    assert dev.log == [("w", 0x10, b"\1\2\3\4"), ("r", 0x20, b"\x44\x33\x22\x11")]
    assert bytes(run.run.mmio.data)[:4] == b"\x44\x33\x22\x11"
    assert (p.stats.exit_mmio_write, p.stats.exit_mmio_read) == (1, 1)


def test_the_hot_path_reuses_its_exit_objects_and_data_views(run: Run) -> None:
    # One exit object per kind, and one data view per length: nothing is built per exit.
    a = run.io(0x3F8, out=True, data=b"a")
    view = a.data
    b = run.io(0x3F8, out=True, data=b"b")
    assert b is a and b.data is view and bytes(view) == b"b"
    m = run.mmio(0xD000_0000, write=True, length=4, data=b"abcd")
    mview = m.data
    assert run.mmio(0xD000_0004, write=True, length=4, data=b"efgh").data is mview
    assert bytes(mview) == b"efgh" and m.phys_addr == 0xD000_0004 and m.len == 4


def test_a_kick_is_interrupted(run: Run, p: Peripherals) -> None:
    assert handle_exit(run.exits.intr, p) is INTERRUPTED


def test_debug_exit_goes_to_the_debugger_or_ends_the_vcpu(run: Run, p: Peripherals) -> None:
    exit_ = run.exit(ExitReason.DEBUG)
    assert isinstance(exit_, DebugExit)
    out = handle_exit(exit_, p)
    detail = "unexpected DEBUG exception=0 pc=0x0 dr6=0x0 at rip=0x1234"
    assert out == Stopped(StopKind.ERROR, detail)
    seen: list[DebugExit] = []
    p.debug = lambda e: seen.append(e) or True
    assert handle_exit(exit_, p) is INTERRUPTED and seen == [exit_]
    p.debug = lambda e: False  # not the debugger's vCPU
    assert isinstance(handle_exit(exit_, p), Stopped)


@pytest.mark.parametrize(
    ("event", "kind"),
    [
        (SystemEvent.SHUTDOWN, StopKind.SYSTEM_SHUTDOWN),
        (SystemEvent.RESET, StopKind.SYSTEM_RESET),
        (SystemEvent.CRASH, StopKind.SYSTEM_CRASH),
    ],
)
def test_system_events_end_the_vcpu(run: Run, p: Peripherals, event: int, kind: StopKind) -> None:
    run.run.system_event.type = event
    assert handle_exit(run.exit(ExitReason.SYSTEM_EVENT), p) == Stopped(
        kind, f"SYSTEM_EVENT {SystemEvent(event).name}"
    )


def test_other_system_events_are_ignored(run: Run, p: Peripherals) -> None:
    run.run.system_event.type = SystemEvent.WAKEUP
    assert handle_exit(run.exit(ExitReason.SYSTEM_EVENT), p) is HANDLED


def test_failures_and_unexpected_exits_say_where(run: Run, p: Peripherals) -> None:
    run.run.internal.suberror = InternalError.EMULATION
    assert handle_exit(run.exit(ExitReason.INTERNAL_ERROR), p) == Stopped(
        StopKind.ERROR, "INTERNAL_ERROR EMULATION data=[] at rip=0x1234"
    )
    run.run.fail_entry.hardware_entry_failure_reason = 0x21
    out = handle_exit(run.exit(ExitReason.FAIL_ENTRY), p)
    assert out == Stopped(StopKind.ERROR, "FAIL_ENTRY reason=0x21 cpu=0 at rip=0x1234")
    assert handle_exit(run.exit(ExitReason.HYPERCALL), p) == Stopped(
        StopKind.ERROR, "unexpected HYPERCALL at rip=0x1234"
    )
    assert handle_exit(run.exit(ExitReason.HLT), p) == Stopped(
        StopKind.ERROR, "guest halted with no irqchip"
    )
    assert handle_exit(run.exit(99), p) == Stopped(  # type: ignore[arg-type]
        StopKind.ERROR, "unexpected exit reason 99 at rip=0x1234"
    )


def test_a_triple_fault_reports_the_registers(run: Run, p: Peripherals) -> None:
    out = handle_exit(run.exit(ExitReason.SHUTDOWN), p)
    assert isinstance(out, Stopped) and out.kind is StopKind.SHUTDOWN
    assert out.detail.startswith("triple fault at rip=0x1234 ")


def test_hyperv_exits_keep_the_vcpu_running(run: Run, p: Peripherals) -> None:
    # A SynIC MSR write: KVM applied it, nothing for the VMM to do.
    hv = run.run.hyperv
    hv.type = KVM_EXIT_HYPERV_SYNIC
    hv.u.synic.msr, hv.u.synic.control = 0x40000080, 1
    exit_ = run.exit(ExitReason.HYPERV)
    assert exit_.describe().startswith("HYPERV SYNIC msr=0x40000080 control=0x1")
    assert handle_exit(exit_, p) is HANDLED
    # A hypercall KVM hands over (HvPostMessage, code 0x5c): answered "invalid hypercall
    # code" in the result the guest gets in RAX, the vCPU runs on.
    hv.type = KVM_EXIT_HYPERV_HCALL
    hv.u.hcall.input, hv.u.hcall.result = 0x5C, 0
    exit_ = run.exit(ExitReason.HYPERV)
    assert "code=0x5c" in exit_.describe()
    assert handle_exit(exit_, p) is HANDLED
    assert hv.u.hcall.result == 2  # HV_STATUS_INVALID_HYPERCALL_CODE (Hyper-V TLFS)
