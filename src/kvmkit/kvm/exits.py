"""VM exits as small typed objects.

Each vCPU owns one object per exit kind; `Vcpu.run()` returns the one matching the exit and
reuses it on the next exit (Firecracker's `VcpuExit` does the same with borrowed slices). The
objects read their fields straight from the vCPU's shared `kvm_run` page: they are valid
until the next `run()`, and an IO-in or MMIO-read handler answers in place with
`set_value()` / `data[...] = ...`.

The port-I/O and MMIO exits are the hot path, so they build no ctypes objects and no
memoryview slices per exit: their fields are read through typed views of the page made once
(`memoryview.cast`, at offsets taken from the ctypes layout, which tests/unit/test_abi_layout.py
checks against the kernel headers), and `data` is a view cached per length. What an exit
still creates is Python's own: int objects for values above 256 (a port number, an address).
The rarer exits read their fields through the ctypes structure.
"""

from __future__ import annotations

import mmap

from kvmkit.abi import structs
from kvmkit.abi.constants import (
    KVM_EXIT_HYPERV_HCALL,
    KVM_EXIT_HYPERV_SYNDBG,
    KVM_EXIT_HYPERV_SYNIC,
    KVM_EXIT_IO_IN,
    KVM_EXIT_IO_OUT,
    ExitReason,
    InternalError,
    SystemEvent,
)

_IO = structs.kvm_run.io.offset
_IO_DIRECTION = _IO + structs.kvm_run_io.direction.offset  # u8
_IO_SIZE = _IO + structs.kvm_run_io.size.offset  # u8
_IO_PORT = (_IO + structs.kvm_run_io.port.offset) // 2  # u16 index
_IO_COUNT = (_IO + structs.kvm_run_io.count.offset) // 4  # u32 index
_IO_DATA_OFFSET = (_IO + structs.kvm_run_io.data_offset.offset) // 8  # u64 index
_MMIO = structs.kvm_run.mmio.offset
_MMIO_PHYS_ADDR = (_MMIO + structs.kvm_run_mmio.phys_addr.offset) // 8  # u64 index
_MMIO_DATA = _MMIO + structs.kvm_run_mmio.data.offset  # 8 bytes
_MMIO_LEN = (_MMIO + structs.kvm_run_mmio.len.offset) // 4  # u32 index
_MMIO_IS_WRITE = _MMIO + structs.kvm_run_mmio.is_write.offset  # u8
# Data views cached per length: single accesses are 1, 2, 4 or 8 bytes; longer ones are
# string I/O (rep ins/outs), rarer, sliced on demand.
_CACHED_VIEW = 8


class _Views:
    """Typed views of one kvm_run mapping, made once per vCPU."""

    __slots__ = ("b", "h", "i", "q")

    def __init__(self, mem: memoryview) -> None:
        self.b = mem
        self.h = mem.cast("H")
        self.i = mem.cast("I")
        self.q = mem.cast("Q")

    def release(self) -> None:
        for view in (self.h, self.i, self.q):
            view.release()


class VmExit:
    """Base of all exits. `reason` is the `KVM_EXIT_*` value."""

    reason: ExitReason = ExitReason.UNKNOWN

    __slots__ = ("_mem", "_run")

    def __init__(self, run: structs.kvm_run, mem: memoryview) -> None:
        self._run = run
        self._mem = mem

    def describe(self) -> str:
        return self.reason.name

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe()}>"


class IoExit(VmExit):
    """KVM_EXIT_IO: a port I/O instruction. `data` is the kvm_run slice holding the bytes."""

    reason = ExitReason.IO
    __slots__ = ("_start", "_v", "_views")

    def __init__(self, run: structs.kvm_run, mem: memoryview, views: _Views) -> None:
        super().__init__(run, mem)
        self._v = views
        self._start = -1
        self._views: list[memoryview | None] = [None] * (_CACHED_VIEW + 1)

    @property
    def port(self) -> int:
        return self._v.h[_IO_PORT]

    @property
    def size(self) -> int:
        return self._v.b[_IO_SIZE]

    @property
    def count(self) -> int:
        return self._v.i[_IO_COUNT]

    @property
    def is_in(self) -> bool:
        return self._v.b[_IO_DIRECTION] == KVM_EXIT_IO_IN

    @property
    def is_out(self) -> bool:
        return self._v.b[_IO_DIRECTION] == KVM_EXIT_IO_OUT

    @property
    def data(self) -> memoryview:
        v = self._v
        start = v.q[_IO_DATA_OFFSET]
        n = v.b[_IO_SIZE] * v.i[_IO_COUNT]
        if start == self._start and n <= _CACHED_VIEW:
            view = self._views[n]
            if view is not None:
                return view
        # The kernel places data inside the mmap'ed kvm_run area; check anyway so a broken
        # kernel value cannot turn into an out-of-bounds slice silently.
        end = start + n
        if end > len(self._mem):
            raise ValueError(f"KVM_EXIT_IO data {start:#x}..{end:#x} outside kvm_run mapping")
        view = self._mem[start:end]
        if n <= _CACHED_VIEW:
            if start != self._start:  # (KVM uses one data page: this happens once)
                self._release_views()
                self._start = start
            self._views[n] = view
        return view

    def _release_views(self) -> None:
        for i, view in enumerate(self._views):
            if view is not None:
                view.release()
                self._views[i] = None

    @property
    def value(self) -> int:
        """The first (usually only) element written by an OUT."""
        data, size = self.data, self.size
        return int.from_bytes(data if len(data) == size else data[:size], "little")

    def set_value(self, value: int) -> None:
        """Answer an IN: every element of a string IN gets `value`."""
        size = self.size
        raw = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        data = self.data
        for i in range(0, len(data), size):
            data[i : i + size] = raw

    def describe(self) -> str:
        kind = "in" if self.is_in else "out"
        return f"IO {kind} port={self.port:#x} size={self.size} count={self.count}"


class MmioExit(VmExit):
    """KVM_EXIT_MMIO: an access to guest-physical memory no slot backs."""

    reason = ExitReason.MMIO
    __slots__ = ("_data", "_v")

    def __init__(self, run: structs.kvm_run, mem: memoryview, views: _Views) -> None:
        super().__init__(run, mem)
        self._v = views
        # One view per possible length (kvm_run.mmio.data holds at most 8 bytes).
        self._data = [mem[_MMIO_DATA : _MMIO_DATA + n] for n in range(9)]

    @property
    def phys_addr(self) -> int:
        return self._v.q[_MMIO_PHYS_ADDR]

    @property
    def len(self) -> int:
        return self._v.i[_MMIO_LEN]

    @property
    def is_write(self) -> bool:
        return bool(self._v.b[_MMIO_IS_WRITE])

    @property
    def data(self) -> memoryview:
        n = self._v.i[_MMIO_LEN]
        return self._data[n if n < 8 else 8]

    @property
    def value(self) -> int:
        return int.from_bytes(self.data, "little")

    def set_value(self, value: int) -> None:
        data = self.data
        n = len(data)
        data[:] = (value & ((1 << (8 * n)) - 1)).to_bytes(n, "little")

    def describe(self) -> str:
        kind = "write" if self.is_write else "read"
        return f"MMIO {kind} addr={self.phys_addr:#x} len={self.len}"

    def _release_views(self) -> None:
        for view in self._data:
            view.release()


class HltExit(VmExit):
    reason = ExitReason.HLT
    __slots__ = ()


class ShutdownExit(VmExit):
    """KVM_EXIT_SHUTDOWN: the guest triple-faulted (or PVM reported a fatal fault)."""

    reason = ExitReason.SHUTDOWN
    __slots__ = ()


class IntrExit(VmExit):
    """KVM_RUN returned early: a signal (EINTR) or `immediate_exit` was set."""

    reason = ExitReason.INTR
    __slots__ = ()


class DebugExit(VmExit):
    reason = ExitReason.DEBUG
    __slots__ = ()

    @property
    def exception(self) -> int:
        return int(self._run.debug.arch.exception)

    @property
    def pc(self) -> int:
        return int(self._run.debug.arch.pc)

    @property
    def dr6(self) -> int:
        return int(self._run.debug.arch.dr6)

    @property
    def dr7(self) -> int:
        return int(self._run.debug.arch.dr7)

    def describe(self) -> str:
        return f"DEBUG exception={self.exception} pc={self.pc:#x} dr6={self.dr6:#x}"


class SystemEventExit(VmExit):
    reason = ExitReason.SYSTEM_EVENT
    __slots__ = ()

    @property
    def type(self) -> int:
        return int(self._run.system_event.type)

    @property
    def data(self) -> list[int]:
        ev = self._run.system_event
        return [int(ev.data[i]) for i in range(min(int(ev.ndata), 16))]

    def describe(self) -> str:
        try:
            name = SystemEvent(self.type).name
        except ValueError:
            name = str(self.type)
        return f"SYSTEM_EVENT {name}"


class InternalErrorExit(VmExit):
    reason = ExitReason.INTERNAL_ERROR
    __slots__ = ()

    @property
    def suberror(self) -> int:
        return int(self._run.internal.suberror)

    @property
    def data(self) -> list[int]:
        internal = self._run.internal
        return [int(internal.data[i]) for i in range(min(int(internal.ndata), 16))]

    def describe(self) -> str:
        try:
            name = InternalError(self.suberror).name
        except ValueError:
            name = str(self.suberror)
        words = " ".join(f"{d:#x}" for d in self.data)
        return f"INTERNAL_ERROR {name} data=[{words}]"


class FailEntryExit(VmExit):
    reason = ExitReason.FAIL_ENTRY
    __slots__ = ()

    @property
    def hardware_entry_failure_reason(self) -> int:
        return int(self._run.fail_entry.hardware_entry_failure_reason)

    @property
    def cpu(self) -> int:
        return int(self._run.fail_entry.cpu)

    def describe(self) -> str:
        return f"FAIL_ENTRY reason={self.hardware_entry_failure_reason:#x} cpu={self.cpu}"


class HypercallExit(VmExit):
    reason = ExitReason.HYPERCALL
    __slots__ = ()

    @property
    def nr(self) -> int:
        return int(self._run.hypercall.nr)

    @property
    def args(self) -> list[int]:
        return [int(a) for a in self._run.hypercall.args]

    def set_ret(self, value: int) -> None:
        self._run.hypercall.ret = value & (2**64 - 1)


class HypervExit(VmExit):
    """KVM_EXIT_HYPERV (KVM API doc, "KVM_EXIT_HYPERV"): with an active SynIC, KVM reports a
    guest write of the SynIC control MSRs (`type` SYNIC: the MSR and the new control, event
    and message page values; KVM has applied it already, the VMM only learns of it) and hands
    over the hypercalls it does not implement itself (`type` HCALL: the input value and two
    parameters; the VMM answers with `set_result`, which the guest sees in RAX)."""

    reason = ExitReason.HYPERV
    __slots__ = ()

    @property
    def type(self) -> int:
        return int(self._run.hyperv.type)

    @property
    def msr(self) -> int:
        return int(self._run.hyperv.u.synic.msr)

    @property
    def hcall_input(self) -> int:
        return int(self._run.hyperv.u.hcall.input)

    def set_result(self, value: int) -> None:
        self._run.hyperv.u.hcall.result = value & (2**64 - 1)

    def describe(self) -> str:
        h = self._run.hyperv
        if self.type == KVM_EXIT_HYPERV_SYNIC:
            return (f"HYPERV SYNIC msr={self.msr:#x} control={int(h.u.synic.control):#x} "
                    f"evt_page={int(h.u.synic.evt_page):#x} msg_page={int(h.u.synic.msg_page):#x}")
        if self.type == KVM_EXIT_HYPERV_HCALL:
            # Hypercall input value: call code in bits 15:0 (Hyper-V TLFS, "Hypercall Inputs")
            return f"HYPERV HCALL input={self.hcall_input:#x} code={self.hcall_input & 0xFFFF:#x}"
        if self.type == KVM_EXIT_HYPERV_SYNDBG:
            return f"HYPERV SYNDBG msr={int(h.u.syndbg.msr):#x}"
        return f"HYPERV type={self.type}"


class MsrExit(VmExit):
    """KVM_EXIT_X86_RDMSR / WRMSR (with KVM_CAP_X86_USER_SPACE_MSR)."""

    __slots__ = ("_is_write",)

    def __init__(self, run: structs.kvm_run, mem: memoryview, is_write: bool) -> None:
        super().__init__(run, mem)
        self._is_write = is_write

    @property
    def reason(self) -> ExitReason:  # type: ignore[override]
        return ExitReason.X86_WRMSR if self._is_write else ExitReason.X86_RDMSR

    @property
    def is_write(self) -> bool:
        return self._is_write

    @property
    def index(self) -> int:
        return int(self._run.msr.index)

    @property
    def msr_reason(self) -> int:
        return int(self._run.msr.reason)

    @property
    def data(self) -> int:
        return int(self._run.msr.data)

    def set_data(self, value: int) -> None:
        self._run.msr.data = value & (2**64 - 1)

    def set_error(self, error: bool = True) -> None:
        """Make the guest's RDMSR/WRMSR raise #GP."""
        self._run.msr.error = 1 if error else 0

    def describe(self) -> str:
        op = "WRMSR" if self._is_write else "RDMSR"
        return f"{op} index={self.index:#x} data={self.data:#x}"


class ExceptionExit(VmExit):
    reason = ExitReason.EXCEPTION
    __slots__ = ()

    @property
    def exception(self) -> int:
        return int(self._run.ex.exception)

    @property
    def error_code(self) -> int:
        return int(self._run.ex.error_code)


class OtherExit(VmExit):
    """Any exit kvmkit has no dedicated type for; `reason` says which."""

    __slots__ = ("_reason",)

    def __init__(self, run: structs.kvm_run, mem: memoryview) -> None:
        super().__init__(run, mem)
        self._reason = 0

    @property
    def reason(self) -> ExitReason | int:  # type: ignore[override]
        try:
            return ExitReason(self._reason)
        except ValueError:
            return self._reason

    def describe(self) -> str:
        r = self.reason
        if isinstance(r, ExitReason):
            return r.name
        return f"exit reason {r}"


class ExitTable:
    """The per-vCPU exit objects, indexed by exit reason. `mapping` is the vCPU's kvm_run
    mapping (or, in tests, any writable buffer laid out like one)."""

    def __init__(self, run: structs.kvm_run, mapping: mmap.mmap | bytearray) -> None:
        mem = memoryview(mapping)
        self.mem = mem
        self._views = views = _Views(mem)
        self.intr = IntrExit(run, mem)
        self.other = OtherExit(run, mem)
        self.io = IoExit(run, mem, views)
        self.mmio = MmioExit(run, mem, views)
        table: dict[int, VmExit] = {
            ExitReason.IO: self.io,
            ExitReason.MMIO: self.mmio,
            ExitReason.HLT: HltExit(run, mem),
            ExitReason.SHUTDOWN: ShutdownExit(run, mem),
            ExitReason.INTR: self.intr,
            ExitReason.DEBUG: DebugExit(run, mem),
            ExitReason.SYSTEM_EVENT: SystemEventExit(run, mem),
            ExitReason.INTERNAL_ERROR: InternalErrorExit(run, mem),
            ExitReason.FAIL_ENTRY: FailEntryExit(run, mem),
            ExitReason.HYPERCALL: HypercallExit(run, mem),
            ExitReason.HYPERV: HypervExit(run, mem),
            ExitReason.X86_RDMSR: MsrExit(run, mem, is_write=False),
            ExitReason.X86_WRMSR: MsrExit(run, mem, is_write=True),
            ExitReason.EXCEPTION: ExceptionExit(run, mem),
        }
        self.table = table

    def lookup(self, reason: int) -> VmExit:
        found = self.table.get(reason)
        if found is None:
            self.other._reason = reason
            return self.other
        return found

    def release(self) -> None:
        self.io._release_views()
        self.mmio._release_views()
        self._views.release()
        self.mem.release()
