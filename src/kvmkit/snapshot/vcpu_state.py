"""Per-vCPU state as plain data: save, fix up the timers, restore in the proven order.

Restore order (Firecracker's, KVM-BEHAVIOURS.md section 2), and why:
  CPUID        first: it decides which other state is valid (XSAVE features, LAPIC timer
               modes: without it periodic and TSC-deadline LVT modes are dropped)
  vCPU caps    the Hyper-V ones the VM was built with (KVM_CAP_HYPERV_ENFORCE_CPUID,
               KVM_CAP_HYPERV_SYNIC2), before any MSR: KVM refuses a non-zero SynIC or
               synthetic-timer MSR from the VMM while the SynIC is not active
               (arch/x86/kvm/hyperv.c synic_set_msr, stimer_set_config)
  MP state     before registers (setting INIT/SIPI state may reset them)
  regs, sregs  sregs after regs; EFER/CR0/CR4 decide which MSRs and XSAVE parts apply
  nested state KVM_SET_NESTED_STATE right after sregs (docs/nested.md; KVM-BEHAVIOURS.md
               section 5): KVM refuses guest mode unless EFER.SVME (AMD) or CR4.VMXE and
               VMXON (Intel) are set already (arch/x86/kvm/svm/nested.c
               svm_set_nested_state: "GIF=1 and no guest mode are required if SVME=0";
               vmx/nested.c vmx_set_nested_state), and on Intel IA32_FEATURE_CONTROL must
               allow VMXON, so that MSR is written just before (QEMU's
               kvm_arch_put_registers does the same: feature control, then sregs "so that
               EFER.SVME is set", then nested state). In guest mode the registers KVM
               reports are the nested guest's (L2's): KVM_SET_NESTED_STATE moves the sregs
               set before into L2's VMCB/VMCS, and what is set after applies to L2 too
  xsave, xcrs  XCR0 is checked against CPUID
  debug regs
  LAPIC        before MSRs: IA32_TSC_DEADLINE is dropped unless the LVT timer is already
               in TSC-deadline mode
  MSRs         IA32_TSC first, IA32_TSC_DEADLINE last (the deadline is an absolute TSC value)
  vCPU events  last: pending exceptions/NMIs/interrupts go on top of the restored state
`KVM_KVMCLOCK_CTRL` is issued separately, just before the vCPU runs again (`resume_vcpu`).
The TSC frequency is set right after CPUID (`KVM_SET_TSC_KHZ`, before the TSC MSR is
written): a guest keeps the TSC rate it calibrated at boot, or the restore is refused.

Fields added after format version 1 are optional (`tsc_khz`, `tsc_offset`): a state without
them restores as before, and readers ignore keys they do not know. New vCPU state (nested
state, more MSR groups) goes the same way: an optional key, saved where KVM has it, checked
in `from_dict`, restored at its place in the order above.

The LAPIC timer rules (KVM-BEHAVIOURS.md section 1), applied when saving:
  - KVM_GET_LAPIC gives the live current count (TMCCT) and KVM_SET_LAPIC restarts from it,
    so an armed timer continues with its remaining time;
  - an expired one-shot timer keeps its initial count (TMICT) and TMCCT is 0, which a restore
    would turn into an immediate (spurious) interrupt: kvmkit saves TMICT = 0 for it;
  - the TSC deadline is saved as 0 unless the LVT timer is in TSC-deadline mode, so a stale
    value can never become a deadline that fires.
"""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass, field
from typing import Any

from kvmkit.abi import structs
from kvmkit.abi.constants import (
    KVM_STATE_NESTED_EVMCS,
    KVM_STATE_NESTED_FORMAT_SVM,
    KVM_STATE_NESTED_FORMAT_VMX,
    KVM_STATE_NESTED_GIF_SET,
    KVM_STATE_NESTED_GUEST_MODE,
    KVM_STATE_NESTED_MTF_PENDING,
    KVM_STATE_NESTED_RUN_PENDING,
    Cap,
)
from kvmkit.arch.x86_64 import msr
from kvmkit.arch.x86_64 import regs as x86
from kvmkit.kvm import Kvm, KvmError, Vcpu
from kvmkit.kvm.cpuid import CpuidEntry
from kvmkit.snapshot.format import Fields, SnapshotError, b64

MAX_CPUID_ENTRIES = 4096
MAX_MSRS = 65536
MAX_XSAVE = 1 << 20
LVT_TIMER_MODE_MASK = 3 << 17
# struct kvm_nested_state: a 128-byte header then the format's data (asm/kvm.h). KVM's largest
# is VMX's, 128 + two 4 KiB VMCS12 copies; 64 KiB caps what a state file can make us hold.
NESTED_STATE_VERSION = 1
MAX_NESTED_STATE = 64 << 10
NESTED_HEADER = ctypes.sizeof(structs.kvm_nested_state)
NESTED_FORMATS = {KVM_STATE_NESTED_FORMAT_VMX: "vmx", KVM_STATE_NESTED_FORMAT_SVM: "svm"}
NESTED_FLAGS = (KVM_STATE_NESTED_GUEST_MODE | KVM_STATE_NESTED_RUN_PENDING
                | KVM_STATE_NESTED_EVMCS | KVM_STATE_NESTED_MTF_PENDING
                | KVM_STATE_NESTED_GIF_SET)  # fmt: skip
# The vCPU capabilities a state may ask to enable (kvmkit.vmm.hyperv.vcpu_caps)
VCPU_CAPS = (int(Cap.HYPERV_ENFORCE_CPUID), int(Cap.HYPERV_SYNIC2))
MAX_TSC_KHZ = 2**32 - 1  # KVM_SET_TSC_KHZ takes a u32
# The LAPIC registers an interrupt moves through: ISR 0x100-0x17F, TMR, IRR 0x200-0x27F
# (SDM vol. 3A 11.8.4); the span KVM changes when it delivers a pending timer interrupt.
_DELIVERY_SPAN = slice(x86.APIC_ISR, x86.APIC_IRR + 0x80)
_SIZES = {
    "regs": ctypes.sizeof(structs.kvm_regs),
    "sregs": ctypes.sizeof(structs.kvm_sregs),
    "xcrs": ctypes.sizeof(structs.kvm_xcrs),
    "debugregs": ctypes.sizeof(structs.kvm_debugregs),
    "lapic": ctypes.sizeof(structs.kvm_lapic_state),
    "events": ctypes.sizeof(structs.kvm_vcpu_events),
}


@dataclass
class VcpuState:
    id: int
    cpuid: list[CpuidEntry]
    mp_state: int
    regs: bytes
    sregs: bytes
    xsave: bytes
    xcrs: bytes
    debugregs: bytes
    lapic: bytes | None  # None without an in-kernel irqchip
    msrs: list[tuple[int, int]] = field(default_factory=list)  # in restore order
    events: bytes = b""
    nested: bytes | None = None  # KVM_GET_NESTED_STATE, with --nested (header + data)
    tsc_khz: int | None = None  # KVM_GET_TSC_KHZ: the rate the guest's TSC runs at
    tsc_offset: int | None = None  # KVM_VCPU_TSC_OFFSET, where KVM has the attribute

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "cpuid": [
                [e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx] for e in self.cpuid
            ],
            "mp_state": self.mp_state,
            "regs": b64(self.regs),
            "sregs": b64(self.sregs),
            "xsave": b64(self.xsave),
            "xcrs": b64(self.xcrs),
            "debugregs": b64(self.debugregs),
            "lapic": None if self.lapic is None else b64(self.lapic),
            "msrs": [[i, v] for i, v in self.msrs],
            "events": b64(self.events),
            **({"nested_state": {"version": NESTED_STATE_VERSION, "data": b64(self.nested)}}
               if self.nested is not None else {}),
            **({"tsc_khz": self.tsc_khz} if self.tsc_khz is not None else {}),
            **({"tsc_offset": self.tsc_offset} if self.tsc_offset is not None else {}),
        }

    @classmethod
    def from_dict(cls, obj: Any, path: str = "vcpu") -> VcpuState:
        """Validate every field (types, ranges, blob sizes); raises SnapshotError."""
        f = Fields(obj, path)
        cpuid = []
        for raw in f.get_list("cpuid", MAX_CPUID_ENTRIES):
            if (not isinstance(raw, list) or len(raw) != 7
                    or not all(type(v) is int and 0 <= v < 2**32 for v in raw)):  # fmt: skip
                raise SnapshotError(f"snapshot state: {path}.cpuid entries must be 7 u32 values")
            cpuid.append(CpuidEntry(*raw))
        msrs = []
        for raw in f.get_list("msrs", MAX_MSRS):
            if (not isinstance(raw, list) or len(raw) != 2 or type(raw[0]) is not int
                    or type(raw[1]) is not int or not 0 <= raw[0] < 2**32
                    or not 0 <= raw[1] < 2**64):  # fmt: skip
                raise SnapshotError(f"snapshot state: {path}.msrs entries must be [u32, u64]")
            msrs.append((raw[0], raw[1]))
        xsave = f.get_blob("xsave", max_size=MAX_XSAVE)
        if len(xsave) < structs.KVM_XSAVE_REGION_BYTES:
            raise SnapshotError(f"snapshot state: {path}.xsave shorter than 4096 bytes")
        lapic = None if f.obj.get("lapic") is None else f.get_blob("lapic", _SIZES["lapic"])
        return cls(
            id=f.get_int("id", 0, 4095),
            cpuid=cpuid,
            mp_state=f.get_int("mp_state", 0, 255),
            regs=f.get_blob("regs", _SIZES["regs"]),
            sregs=f.get_blob("sregs", _SIZES["sregs"]),
            xsave=xsave,
            xcrs=f.get_blob("xcrs", _SIZES["xcrs"]),
            debugregs=f.get_blob("debugregs", _SIZES["debugregs"]),
            lapic=lapic,
            msrs=msrs,
            events=f.get_blob("events", _SIZES["events"]),
            nested=_nested_from(f) if f.has("nested_state") else None,
            tsc_khz=f.get_int("tsc_khz", 1, MAX_TSC_KHZ) if f.has("tsc_khz") else None,
            tsc_offset=f.get_int("tsc_offset") if f.has("tsc_offset") else None,
        )


def _nested_from(f: Fields) -> bytes:
    """The `nested_state` of a vCPU state, checked: version, size cap, and a header that says
    what the blob is (format VMX or SVM, known flags, its own size = the blob's)."""
    n = f.get_obj("nested_state")
    version = n.get_int("version", 0, 2**31)
    if version != NESTED_STATE_VERSION:
        raise SnapshotError(f"snapshot state: {n.path}: version {version}, this kvmkit reads "
                            f"version {NESTED_STATE_VERSION}")  # fmt: skip
    data = n.get_blob("data", max_size=MAX_NESTED_STATE)
    if len(data) < NESTED_HEADER:
        raise SnapshotError(f"snapshot state: {n.path}.data shorter than its header")
    flags, fmt, size = (int.from_bytes(data[a:b], "little") for a, b in ((0, 2), (2, 4), (4, 8)))
    if fmt not in NESTED_FORMATS or flags & ~NESTED_FLAGS or size != len(data):
        raise SnapshotError(f"snapshot state: {n.path}.data: not a nested state KVM wrote "
                            f"(format {fmt}, flags {flags:#x}, size {size} of {len(data)})")
    return data


def nested_flags(data: bytes) -> int:
    """The `flags` of a KVM_GET_NESTED_STATE header (GUEST_MODE: the vCPU was running its
    nested guest)."""
    return int.from_bytes(data[0:2], "little")


def check_nested_host(kvm: Kvm, states: list[VcpuState]) -> None:
    """A state with nested state restores only where KVM takes it: KVM_CAP_NESTED_STATE at
    least as large as every blob, and the same format (an SVM state cannot go to a VMX host).
    SnapshotError (one line) before any VM is built."""
    blobs = [s.nested for s in states if s.nested is not None]
    if not blobs:
        return
    cap = kvm.check_extension(Cap.NESTED_STATE)
    if cap <= 0:
        raise SnapshotError("snapshot state: the guest ran with nested virtualization and this "
                            "host's KVM cannot restore nested state (KVM_CAP_NESTED_STATE is 0)")
    for blob in blobs:
        if len(blob) > cap:
            raise SnapshotError(f"snapshot state: nested state of {len(blob)} bytes, this "
                                f"host's KVM takes at most {cap} (KVM_CAP_NESTED_STATE)")
    probe = kvm.create_vm()
    try:
        host_format = int.from_bytes(probe.create_vcpu(0).get_nested_state()[2:4], "little")
    finally:
        probe.close()
    for blob in blobs:
        fmt = int.from_bytes(blob[2:4], "little")
        if fmt != host_format:
            raise SnapshotError(
                f"snapshot state: the nested state is {NESTED_FORMATS[fmt].upper()}, this "
                f"host's KVM is {NESTED_FORMATS.get(host_format, '?').upper()}")


# -- MSRs


def saveable_msrs(kvm: Kvm, vcpu: Vcpu, extra: tuple[int, ...] = ()) -> list[int]:
    """The MSRs of KVM_GET_MSR_INDEX_LIST, and `extra` ones the list leaves out (the Hyper-V
    SynIC and timer MSRs, kvmkit.arch.x86_64.hyperv.extra_msrs), that KVM_GET_MSRS accepts for
    this vCPU (the list can name MSRs the vCPU's CPUID does not enable); KVM stops at the
    first refused one."""
    listed = kvm.msr_index_list()
    remaining = listed + [m for m in extra if m not in set(listed)]
    readable: list[int] = []
    while remaining:
        done = len(vcpu.get_msrs_partial(remaining))
        readable.extend(remaining[:done])
        remaining = remaining[done + 1 :]  # skip the refused one
    return readable


def order_msrs(values: dict[int, int]) -> list[tuple[int, int]]:
    """IA32_TSC first, IA32_TSC_DEADLINE last, the rest in index order."""
    first = [(msr.IA32_TSC, values[msr.IA32_TSC])] if msr.IA32_TSC in values else []
    last = (
        [(msr.IA32_TSC_DEADLINE, values[msr.IA32_TSC_DEADLINE])]
        if msr.IA32_TSC_DEADLINE in values
        else []
    )
    rest = sorted(
        (i, v) for i, v in values.items() if i not in (msr.IA32_TSC, msr.IA32_TSC_DEADLINE)
    )
    return first + rest + last


# -- LAPIC timer


def lapic_reg(page: bytes, offset: int) -> int:
    return int.from_bytes(page[offset : offset + 4], "little")


def timer_mode(page: bytes) -> int:
    """LVT timer mode bits 18:17: 0 one-shot, 1 periodic, 2 TSC-deadline."""
    return (lapic_reg(page, x86.APIC_LVTT) & LVT_TIMER_MODE_MASK) >> 17


def neutralize_expired_oneshot(page: bytes) -> bytes:
    """An expired one-shot timer (TMCCT 0, TMICT kept by KVM) is saved with TMICT = 0, so
    KVM_SET_LAPIC does not re-arm it (KVM-BEHAVIOURS.md section 1)."""
    if timer_mode(page) != 0:
        return page
    if lapic_reg(page, x86.APIC_TMICT) != 0 and lapic_reg(page, x86.APIC_TMCCT) == 0:
        fixed = bytearray(page)
        fixed[x86.APIC_TMICT : x86.APIC_TMICT + 4] = bytes(4)
        return bytes(fixed)
    return page


# -- save / restore


def interrupts_unchanged(vcpu: Vcpu, saved: VcpuState) -> bool:
    """Nothing was delivered to the vCPU since `saved` was read: its LAPIC's IRR and ISR and
    its pending-event record are as saved (see kvmkit.snapshot.core.capture_kvm_state)."""
    if saved.lapic is not None:
        if bytes(vcpu.get_lapic())[_DELIVERY_SPAN] != saved.lapic[_DELIVERY_SPAN]:
            return False
    return bytes(vcpu.get_vcpu_events()) == saved.events


def _tsc_khz(vcpu: Vcpu) -> int | None:
    try:
        khz = vcpu.get_tsc_khz()
    except KvmError:
        return None  # no KVM_CAP_GET_TSC_KHZ
    return khz if 0 < khz <= MAX_TSC_KHZ else None


def save_vcpu(vcpu: Vcpu, msr_indices: list[int], *, irqchip: bool = True,
              nested: bool = False) -> VcpuState:  # fmt: skip
    """Read the state of a vCPU that is outside KVM_RUN (paused after an EINTR exit, so any
    pending I/O completion is done). `nested`: the VM exposes VMX/SVM, so its nested state
    (KVM_GET_NESTED_STATE, sized from KVM_CAP_NESTED_STATE) is saved too."""
    lapic: bytes | None = None
    if irqchip:
        lapic = neutralize_expired_oneshot(bytes(vcpu.get_lapic()))
    values = vcpu.get_msrs(msr_indices)
    if msr.IA32_TSC_DEADLINE in values and (lapic is None or timer_mode(lapic) != 2):
        values[msr.IA32_TSC_DEADLINE] = 0
    return VcpuState(
        id=vcpu.id,
        cpuid=vcpu.get_cpuid(),
        mp_state=int(vcpu.get_mp_state()),
        regs=bytes(vcpu.get_regs()),
        sregs=bytes(vcpu.get_sregs()),
        xsave=vcpu.get_xsave(),
        xcrs=bytes(vcpu.get_xcrs()),
        debugregs=bytes(vcpu.get_debugregs()),
        lapic=lapic,
        msrs=order_msrs(values),
        events=bytes(vcpu.get_vcpu_events()),
        tsc_khz=_tsc_khz(vcpu),
        tsc_offset=vcpu.get_tsc_offset() if vcpu.has_tsc_offset() else None,
        nested=vcpu.get_nested_state() if nested else None,
    )


def enable_vcpu_caps(vcpu: Vcpu, caps: tuple[int, ...]) -> None:
    """KVM_ENABLE_CAP of each capability on the vCPU (KVM API doc section 6):
    HYPERV_ENFORCE_CPUID takes args[0] = 1 (enforce), HYPERV_SYNIC2 no argument."""
    for cap in caps:
        if cap not in VCPU_CAPS:
            raise ValueError(f"capability {cap} is not one kvmkit enables on vCPUs")
        if cap == Cap.HYPERV_ENFORCE_CPUID:
            vcpu.enable_cap(cap, 1)
        else:
            vcpu.enable_cap(cap)


def match_tsc_khz(vcpu: Vcpu, khz: int) -> None:
    """Run the vCPU's TSC at `khz`, the rate the guest calibrated against (KVM_SET_TSC_KHZ;
    KVM accepts rates within 250 ppm of the host's without scaling, others only with TSC
    scaling, KVM_CAP_TSC_CONTROL). SnapshotError where it cannot: a guest whose TSC changed
    rate would see its clocks and timers run fast or slow."""
    current = _tsc_khz(vcpu)
    if current == khz:
        return
    try:
        vcpu.set_tsc_khz(khz)
    except KvmError as err:
        raise SnapshotError(
            f"vcpu{vcpu.id}: the guest's TSC runs at {khz} kHz, this host's at {current} kHz, "
            f"and KVM cannot run it at {khz} kHz (KVM_SET_TSC_KHZ: {err.strerror}; TSC "
            "scaling needs KVM_CAP_TSC_CONTROL)"
        ) from None


def restore_vcpu(vcpu: Vcpu, state: VcpuState, caps: tuple[int, ...] = ()) -> None:
    """Load `state` into a freshly created vCPU, in the order of the module docstring; `caps`:
    the vCPU capabilities the VM was built with (VmSetup.vcpu_caps)."""
    vcpu.set_cpuid2(state.cpuid)
    enable_vcpu_caps(vcpu, caps)
    if state.tsc_khz is not None:
        match_tsc_khz(vcpu, state.tsc_khz)
    vcpu.set_mp_state(state.mp_state)
    vcpu.set_regs(structs.kvm_regs.from_bytes(state.regs))
    vcpu.set_sregs(structs.kvm_sregs.from_bytes(state.sregs))
    if state.nested is not None:
        feature_control = dict(state.msrs).get(msr.IA32_FEATURE_CONTROL)
        if feature_control is not None:
            vcpu.set_msrs([(msr.IA32_FEATURE_CONTROL, feature_control)])
        vcpu.set_nested_state(state.nested)
    xsave = state.xsave
    size = vcpu.vm.xsave_size()
    if len(xsave) < size:  # KVM_SET_XSAVE reads the kernel's full area size from our buffer
        xsave = xsave + bytes(size - len(xsave))
    vcpu.set_xsave(xsave)
    vcpu.set_xcrs(structs.kvm_xcrs.from_bytes(state.xcrs))
    vcpu.set_debugregs(structs.kvm_debugregs.from_bytes(state.debugregs))
    if state.lapic is not None:
        vcpu.set_lapic(structs.kvm_lapic_state.from_bytes(state.lapic))
    vcpu.set_msrs(order_msrs(dict(state.msrs)))
    events = structs.kvm_vcpu_events.from_bytes(state.events)
    vcpu.set_vcpu_events(events)


def resume_vcpu(vcpu: Vcpu) -> None:
    """KVM_KVMCLOCK_CTRL: tell a kvmclock guest it was paused (no soft-lockup warnings).
    EINVAL means the guest never enabled kvmclock, which is fine."""
    try:
        vcpu.kvmclock_ctrl()
    except KvmError as err:
        if err.errno not in (errno.EINVAL, errno.ENOTTY):
            raise
