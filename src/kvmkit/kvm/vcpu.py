"""`Vcpu`: the handle on one virtual CPU (vCPU ioctls and its shared `kvm_run` page)."""

from __future__ import annotations

import ctypes
import errno
import mmap
import signal
import threading
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from kvmkit.abi import ioctls, structs
from kvmkit.abi.constants import (
    KVM_COALESCED_MMIO_PAGE_OFFSET,
    KVM_SIGSET_BYTES,
    KVM_VCPU_TSC_CTRL,
    KVM_VCPU_TSC_OFFSET,
    Cap,
    GuestDebug,
    MpState,
    SyncRegs,
)
from kvmkit.kvm._ioctl import _ioctl, close_fd, ioctl_int, ioctl_ptr
from kvmkit.kvm.cpuid import CpuidEntry, from_kvm_cpuid2, to_kvm_cpuid2
from kvmkit.kvm.errors import KvmError
from kvmkit.kvm.exits import ExitTable, VmExit
from kvmkit.kvm.kick import KICK_SIGNAL, kick_handler_installed, kick_thread

if TYPE_CHECKING:
    from kvmkit.kvm.vm import Vm

_NESTED_STATE_MAX = 1 << 20
# KVM_SET_CPUID2 refuses more entries (KVM_MAX_CPUID_ENTRIES, arch/x86/include/asm/kvm_host.h)
KVM_MAX_CPUID_ENTRIES = 256


class Vcpu:
    """One vCPU file descriptor. Each method is one ioctl; failures raise `KvmError`.

    `run()` enters the guest and returns the exit (see `kvmkit.kvm.exits`).
    """

    def __init__(self, vm: Vm, fd: int, vcpu_id: int, run_size: int) -> None:
        self.vm = vm
        self.fd = fd
        self.id = vcpu_id
        self._mapping = mmap.mmap(fd, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_page = structs.kvm_run.from_buffer(self._mapping)
        self._exits = ExitTable(self.run_page, self._mapping)
        self._run_request = ioctls.RUN
        self._thread: int | None = None  # thread inside run(), for kick()
        self._has_tsc_offset: bool | None = None

    def close(self) -> None:
        if self.fd < 0:
            return
        self._exits.release()
        del self.run_page
        try:
            self._mapping.close()
        except BufferError:
            pass  # an exit view is still referenced; the mapping goes with the last reference
        close_fd(self.fd)
        self.fd = -1

    # -- running
    def run(self) -> VmExit:
        """KVM_RUN. A signal or `immediate_exit` gives an `IntrExit` instead of an error."""
        self._thread = threading.get_ident()
        # Called through ctypes, which drops the GIL: other vCPU threads keep running.
        ret = _ioctl(self.fd, self._run_request, 0)
        self._thread = None
        if ret < 0:
            err = ctypes.get_errno()
            if err in (errno.EINTR, errno.EAGAIN):
                return self._exits.intr
            raise KvmError("KVM_RUN", err)
        return self._exits.lookup(self.run_page.exit_reason)

    def inject_pending_timers(self) -> VmExit:
        """A KVM_RUN that enters no guest code but lets KVM deliver the LAPIC timer
        interrupts that expired while the vCPU was outside KVM_RUN, so that KVM_GET_LAPIC
        shows them (in IRR) instead of holding them in its private pending count.

        KVM counts a timer that expires while the vCPU is out of KVM_RUN in
        `apic->lapic_timer.pending` (arch/x86/kvm/lapic.c, apic_timer_expired) and moves it
        into the IRR only in vcpu_run(), after vcpu_enter_guest()/vcpu_block() returned 1:
        `if (kvm_cpu_has_pending_timer(vcpu)) kvm_inject_pending_timer_irqs(vcpu)`
        (arch/x86/kvm/x86.c). With `immediate_exit` set KVM_RUN returns EINTR before
        vcpu_run(), so a kick alone never gets there. A signal that is pending and unblocked
        while KVM_RUN runs does: vcpu_enter_guest() sees the pending work
        (kvm_vcpu_exit_request) and returns 1 without entering the guest, vcpu_run()
        injects the timer interrupts, then handles the signal and returns EINTR. So: block
        the kick signal in this thread, send it to ourselves (it stays pending), give KVM a
        signal mask without it for the duration of KVM_RUN (KVM_SET_SIGNAL_MASK, which
        kvm_sigset_activate() installs), run, then restore both masks; the pending kick is
        delivered to kvmkit's no-op handler when this thread unblocks it.

        Call it on a vCPU that is held outside KVM_RUN (paused after an EINTR exit: no I/O
        completion is pending), from the thread that runs it. Returns KVM_RUN's exit: an
        IntrExit, or an exit KVM raised from a pending request before entry."""
        if not kick_handler_installed():
            raise RuntimeError("install_kick_handler() must run in the main thread first")
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {KICK_SIGNAL})
        saved_exit = self.immediate_exit
        try:
            signal.pthread_kill(threading.get_ident(), KICK_SIGNAL)  # pending while blocked
            self.set_signal_mask(set(old) - {KICK_SIGNAL})
            self.immediate_exit = False
            try:
                return self.run()
            finally:
                self.set_signal_mask(None)
                self.immediate_exit = saved_exit
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def set_signal_mask(self, blocked: Iterable[int] | None) -> None:
        """KVM_SET_SIGNAL_MASK: the signals blocked while this vCPU is in KVM_RUN (None: the
        thread's own mask again)."""
        if blocked is None:
            ioctl_int(self.fd, "KVM_SET_SIGNAL_MASK", ioctls.SET_SIGNAL_MASK, 0)
            return
        bits = 0
        for sig in blocked:
            bits |= 1 << (int(sig) - 1)  # the kernel's sigset_t: bit n-1 is signal n
        buf = bytearray(4 + KVM_SIGSET_BYTES)  # struct kvm_signal_mask {u32 len; u8 sigset[]}
        buf[0:4] = KVM_SIGSET_BYTES.to_bytes(4, "little")
        buf[4:] = bits.to_bytes(KVM_SIGSET_BYTES, "little")
        ioctl_ptr(self.fd, "KVM_SET_SIGNAL_MASK", ioctls.SET_SIGNAL_MASK, buf)

    def coalesced_ring_page(self) -> memoryview:
        """The coalesced MMIO/PIO ring page of this vCPU's mapping (shared by all vCPUs of
        the VM); see `kvmkit.kvm.coalesced`."""
        start = KVM_COALESCED_MMIO_PAGE_OFFSET * mmap.PAGESIZE
        if len(self._mapping) < start + mmap.PAGESIZE:
            raise KvmError("KVM_COALESCED_MMIO_PAGE_OFFSET", errno.ENODEV)
        return memoryview(self._mapping)[start : start + mmap.PAGESIZE]

    def kick(self) -> None:
        """Make the current or next run() return an IntrExit, from any thread. The caller
        clears `immediate_exit` before running the vCPU again."""
        self.run_page.immediate_exit = 1
        thread = self._thread
        if thread is not None:
            kick_thread(thread)

    @property
    def immediate_exit(self) -> bool:
        return bool(self.run_page.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        """Set from another thread (with a signal to kick KVM_RUN) to make run() return."""
        self.run_page.immediate_exit = 1 if value else 0

    # -- registers
    def get_regs(self) -> structs.kvm_regs:
        regs = structs.kvm_regs()
        ioctl_ptr(self.fd, "KVM_GET_REGS", ioctls.GET_REGS, regs)
        return regs

    def set_regs(self, regs: structs.kvm_regs) -> None:
        ioctl_ptr(self.fd, "KVM_SET_REGS", ioctls.SET_REGS, regs)

    def get_sregs(self) -> structs.kvm_sregs:
        sregs = structs.kvm_sregs()
        ioctl_ptr(self.fd, "KVM_GET_SREGS", ioctls.GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: structs.kvm_sregs) -> None:
        ioctl_ptr(self.fd, "KVM_SET_SREGS", ioctls.SET_SREGS, sregs)

    def get_fpu(self) -> structs.kvm_fpu:
        fpu = structs.kvm_fpu()
        ioctl_ptr(self.fd, "KVM_GET_FPU", ioctls.GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: structs.kvm_fpu) -> None:
        ioctl_ptr(self.fd, "KVM_SET_FPU", ioctls.SET_FPU, fpu)

    def get_xsave(self) -> bytes:
        """The XSAVE area: KVM_GET_XSAVE2 when the VM reports a larger area, else KVM_GET_XSAVE."""
        size = self.vm.xsave_size()
        buf = bytearray(size)
        if size > structs.KVM_XSAVE_REGION_BYTES:
            ioctl_ptr(self.fd, "KVM_GET_XSAVE2", ioctls.GET_XSAVE2, buf)
        else:
            ioctl_ptr(self.fd, "KVM_GET_XSAVE", ioctls.GET_XSAVE, buf)
        return bytes(buf)

    def set_xsave(self, data: bytes) -> None:
        if len(data) < structs.KVM_XSAVE_REGION_BYTES:
            raise ValueError(f"XSAVE area of {len(data)} bytes, need at least 4096")
        ioctl_ptr(self.fd, "KVM_SET_XSAVE", ioctls.SET_XSAVE, bytearray(data))

    def get_xcrs(self) -> structs.kvm_xcrs:
        xcrs = structs.kvm_xcrs()
        ioctl_ptr(self.fd, "KVM_GET_XCRS", ioctls.GET_XCRS, xcrs)
        return xcrs

    def set_xcrs(self, xcrs: structs.kvm_xcrs) -> None:
        ioctl_ptr(self.fd, "KVM_SET_XCRS", ioctls.SET_XCRS, xcrs)

    def get_debugregs(self) -> structs.kvm_debugregs:
        dregs = structs.kvm_debugregs()
        ioctl_ptr(self.fd, "KVM_GET_DEBUGREGS", ioctls.GET_DEBUGREGS, dregs)
        return dregs

    def set_debugregs(self, dregs: structs.kvm_debugregs) -> None:
        ioctl_ptr(self.fd, "KVM_SET_DEBUGREGS", ioctls.SET_DEBUGREGS, dregs)

    def get_lapic(self) -> structs.kvm_lapic_state:
        lapic = structs.kvm_lapic_state()
        ioctl_ptr(self.fd, "KVM_GET_LAPIC", ioctls.GET_LAPIC, lapic)
        return lapic

    def set_lapic(self, lapic: structs.kvm_lapic_state) -> None:
        ioctl_ptr(self.fd, "KVM_SET_LAPIC", ioctls.SET_LAPIC, lapic)

    def get_msrs_partial(self, indices: Iterable[int]) -> list[int]:
        """KVM_GET_MSRS as far as the kernel goes: the values of the first n of `indices`, in
        order. KVM stops at the first MSR it refuses (KVM API doc: the ioctl returns the
        number of MSRs read), so n < len(indices) names that one: indices[n]."""
        wanted = list(indices)
        buf = structs.msrs_type(len(wanted))()
        buf.nmsrs = len(wanted)
        for i, index in enumerate(wanted):
            buf.entries[i].index = index
        done = ioctl_ptr(self.fd, "KVM_GET_MSRS", ioctls.GET_MSRS, buf)
        return [int(buf.entries[i].data) for i in range(done)]

    def get_msrs(self, indices: Iterable[int]) -> dict[int, int]:
        """Read MSRs; raises if the kernel read fewer than asked, naming the first it refused."""
        wanted = list(indices)
        values = self.get_msrs_partial(wanted)
        if len(values) < len(wanted):
            raise KvmError(
                "KVM_GET_MSRS", errno.EINVAL, f"MSR {wanted[len(values)]:#x} not readable"
            )
        return dict(zip(wanted, values, strict=True))

    def set_msrs(self, values: Mapping[int, int] | Iterable[tuple[int, int]]) -> None:
        """Write MSRs in the given order (order matters: IA32_TSC before TSC_DEADLINE)."""
        items = list(values.items()) if isinstance(values, Mapping) else list(values)
        buf = structs.msrs_type(len(items))()
        buf.nmsrs = len(items)
        for i, (index, data) in enumerate(items):
            buf.entries[i].index = index
            buf.entries[i].data = data & (2**64 - 1)
        done = ioctl_ptr(self.fd, "KVM_SET_MSRS", ioctls.SET_MSRS, buf)
        if done < len(items):
            index, data = items[done]
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR {index:#x} refused value {data:#x}")

    def set_cpuid2(self, entries: list[CpuidEntry]) -> None:
        buf = to_kvm_cpuid2(entries)
        ioctl_ptr(self.fd, "KVM_SET_CPUID2", ioctls.SET_CPUID2, buf)

    def get_cpuid2(self, max_entries: int = KVM_MAX_CPUID_ENTRIES) -> list[CpuidEntry]:
        """KVM_GET_CPUID2 into a buffer of `max_entries`; see `get_cpuid` for the entry count."""
        buf = structs.cpuid2_type(max_entries)()
        buf.nent = max_entries
        ioctl_ptr(self.fd, "KVM_GET_CPUID2", ioctls.GET_CPUID2, buf)
        return from_kvm_cpuid2(buf)

    def get_cpuid(self) -> list[CpuidEntry]:
        """The vCPU's CPUID (what KVM_SET_CPUID2 gave it), with the right entry count on old
        and new kernels. Before Linux 6.2 KVM_GET_CPUID2 writes the count back only with E2BIG
        (a large buffer came back as that many entries, most of them zero); since, only on
        success. So it asks for 0 entries first."""
        probe = structs.cpuid2_type(1)()
        probe.nent = 0
        try:
            ioctl_ptr(self.fd, "KVM_GET_CPUID2", ioctls.GET_CPUID2, probe)
            return []
        except KvmError as err:
            if err.errno != errno.E2BIG:
                raise
        n = int(probe.nent)
        if n == 0:  # a newer kernel: it reports the count when the call succeeds
            return self.get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        if n > KVM_MAX_CPUID_ENTRIES:
            raise KvmError("KVM_GET_CPUID2", errno.EOVERFLOW, f"kernel reported {n} entries")
        return self.get_cpuid2(n)

    def supported_hv_cpuid(self, max_entries: int = 64) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_HV_CPUID on this vCPU (KVM_CAP_HYPERV_CPUID): the Hyper-V leaves
        KVM can offer. Kernels with KVM_CAP_SYS_HYPERV_CPUID also answer it on /dev/kvm
        (`Kvm.supported_hv_cpuid`), which needs no vCPU."""
        buf = structs.cpuid2_type(max_entries)()
        buf.nent = max_entries
        ioctl_ptr(self.fd, "KVM_GET_SUPPORTED_HV_CPUID", ioctls.GET_SUPPORTED_HV_CPUID, buf)
        return from_kvm_cpuid2(buf)

    def get_mp_state(self) -> MpState:
        state = structs.kvm_mp_state()
        ioctl_ptr(self.fd, "KVM_GET_MP_STATE", ioctls.GET_MP_STATE, state)
        return MpState(state.mp_state)

    def set_mp_state(self, mp_state: MpState | int) -> None:
        state = structs.kvm_mp_state()
        state.mp_state = int(mp_state)
        ioctl_ptr(self.fd, "KVM_SET_MP_STATE", ioctls.SET_MP_STATE, state)

    def get_vcpu_events(self) -> structs.kvm_vcpu_events:
        events = structs.kvm_vcpu_events()
        ioctl_ptr(self.fd, "KVM_GET_VCPU_EVENTS", ioctls.GET_VCPU_EVENTS, events)
        return events

    def set_vcpu_events(self, events: structs.kvm_vcpu_events) -> None:
        ioctl_ptr(self.fd, "KVM_SET_VCPU_EVENTS", ioctls.SET_VCPU_EVENTS, events)

    def translate(self, linear_address: int) -> structs.kvm_translation:
        tr = structs.kvm_translation()
        tr.linear_address = linear_address
        ioctl_ptr(self.fd, "KVM_TRANSLATE", ioctls.TRANSLATE, tr)
        return tr

    def nmi(self) -> None:
        ioctl_int(self.fd, "KVM_NMI", ioctls.NMI)

    def set_guest_debug(
        self, control: GuestDebug | int, debugreg: Iterable[int] | None = None
    ) -> None:
        """Enable single-step / breakpoints; `debugreg` gives DR0-DR7 for USE_HW_BP."""
        dbg = structs.kvm_guest_debug()
        dbg.control = int(control)
        if debugreg is not None:
            for i, value in enumerate(list(debugreg)[:8]):
                dbg.arch.debugreg[i] = value
        ioctl_ptr(self.fd, "KVM_SET_GUEST_DEBUG", ioctls.SET_GUEST_DEBUG, dbg)

    def enable_cap(self, cap: Cap | int, *args: int, flags: int = 0) -> None:
        ec = structs.kvm_enable_cap()
        ec.cap, ec.flags = int(cap), flags
        for i, a in enumerate(args[:4]):
            ec.args[i] = a
        ioctl_ptr(self.fd, "KVM_ENABLE_CAP(vcpu)", ioctls.ENABLE_CAP, ec)

    def get_tsc_khz(self) -> int:
        return ioctl_int(self.fd, "KVM_GET_TSC_KHZ", ioctls.GET_TSC_KHZ)

    def set_tsc_khz(self, khz: int) -> None:
        ioctl_int(self.fd, "KVM_SET_TSC_KHZ", ioctls.SET_TSC_KHZ, khz)

    def _tsc_attr(self, op: str, request: int, value: ctypes.c_uint64 | None) -> int:
        attr = structs.kvm_device_attr()
        attr.group, attr.attr = KVM_VCPU_TSC_CTRL, KVM_VCPU_TSC_OFFSET
        if value is not None:
            attr.addr = ctypes.addressof(value)
        return ioctl_ptr(self.fd, op, request, attr)

    def has_tsc_offset(self) -> bool:
        """The KVM_VCPU_TSC_OFFSET attribute exists (Linux 5.16, KVM_CAP_VCPU_ATTRIBUTES);
        asked once per vCPU."""
        if self._has_tsc_offset is None:
            self._has_tsc_offset = self.vm.kvm.check_extension(Cap.VCPU_ATTRIBUTES) > 0
            if self._has_tsc_offset:
                try:
                    self._tsc_attr("KVM_HAS_DEVICE_ATTR(TSC_OFFSET)", ioctls.HAS_DEVICE_ATTR,
                                   None)  # fmt: skip
                except KvmError:
                    self._has_tsc_offset = False
        return self._has_tsc_offset

    def get_tsc_offset(self) -> int:
        """The guest TSC's offset from the host TSC (guest TSC = host TSC + offset, modulo
        2^64, scaled first where KVM scales the TSC)."""
        value = ctypes.c_uint64()
        self._tsc_attr("KVM_GET_DEVICE_ATTR(TSC_OFFSET)", ioctls.GET_DEVICE_ATTR, value)
        return value.value

    def set_tsc_offset(self, offset: int) -> None:
        value = ctypes.c_uint64(offset & (2**64 - 1))
        self._tsc_attr("KVM_SET_DEVICE_ATTR(TSC_OFFSET)", ioctls.SET_DEVICE_ATTR, value)

    def kvmclock_ctrl(self) -> None:
        """Tell the guest's kvmclock it was paused (avoids soft-lockup warnings on resume)."""
        ioctl_int(self.fd, "KVM_KVMCLOCK_CTRL", ioctls.KVMCLOCK_CTRL)

    def get_nested_state(self) -> bytes:
        """Nested virtualization state: 128-byte header plus data (KVM_CAP_NESTED_STATE)."""
        max_size = self.vm.kvm.check_extension(Cap.NESTED_STATE)
        if max_size <= 0:
            raise KvmError("KVM_GET_NESTED_STATE", errno.ENOTSUP, "KVM_CAP_NESTED_STATE is 0")
        max_size = min(max_size, _NESTED_STATE_MAX)
        buf = bytearray(max_size)
        header = structs.kvm_nested_state.from_buffer(buf)
        header.size = max_size
        del header
        ioctl_ptr(self.fd, "KVM_GET_NESTED_STATE", ioctls.GET_NESTED_STATE, buf)
        size = int.from_bytes(buf[4:8], "little")
        if not ctypes.sizeof(structs.kvm_nested_state) <= size <= max_size:
            raise KvmError("KVM_GET_NESTED_STATE", errno.EOVERFLOW, f"size {size}")
        return bytes(buf[:size])

    def set_nested_state(self, data: bytes) -> None:
        if len(data) < ctypes.sizeof(structs.kvm_nested_state):
            raise ValueError("nested state shorter than its header")
        ioctl_ptr(self.fd, "KVM_SET_NESTED_STATE", ioctls.SET_NESTED_STATE, bytearray(data))

    # -- synchronized registers in kvm_run (KVM_CAP_SYNC_REGS)
    def set_sync_valid(self, which: SyncRegs | int) -> None:
        """Ask KVM to copy these register classes into kvm_run.s.regs at every exit."""
        self.run_page.kvm_valid_regs = int(which)

    def mark_sync_dirty(self, which: SyncRegs | int) -> None:
        """Tell KVM to load these classes from kvm_run.s.regs at the next KVM_RUN."""
        self.run_page.kvm_dirty_regs = int(which)

    @property
    def sync_regs(self) -> structs.kvm_sync_regs:
        """The register copies in kvm_run (valid after an exit for the classes requested)."""
        regs: structs.kvm_sync_regs = self.run_page.s.regs
        return regs
