"""What this host's KVM can do: `kvmkit probe`.

Reports the API version, the capabilities kvmkit uses, which KVM implementation is behind
`/dev/kvm` (and so whether unmodified Linux guests can run), whether guests can have nested
virtualization (kvmkit.vmm.nested) and which Hyper-V enlightenments the host offers
(kvmkit.vmm.hyperv), measured guest speed at CPL0 and CPL3, and two behaviours of the host
kernel's LAPIC timer save/restore
(Documentation/virt/kvm/api.rst, KVM_GET_LAPIC; ../shared/KVM-BEHAVIOURS.md section 1).
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kvmkit.abi.constants import Cap
from kvmkit.arch.x86_64 import regs as x86
from kvmkit.kvm import IoExit, Kvm, VmExit
from kvmkit.kvm.errors import KvmError
from kvmkit.testing.tinyguest import TinyGuest

# The capabilities kvmkit relies on or reports, in the order probe prints them.
CAPABILITIES: tuple[Cap, ...] = (
    Cap.IRQCHIP, Cap.USER_MEMORY, Cap.SET_TSS_ADDR, Cap.SET_IDENTITY_MAP_ADDR, Cap.PIT2,
    Cap.PIT_STATE2, Cap.IRQFD, Cap.IOEVENTFD, Cap.IRQ_ROUTING, Cap.SIGNAL_MSI,
    Cap.ADJUST_CLOCK, Cap.KVMCLOCK_CTRL, Cap.VCPU_EVENTS, Cap.DEBUGREGS, Cap.XSAVE,
    Cap.XSAVE2, Cap.XCRS, Cap.MP_STATE, Cap.SET_GUEST_DEBUG, Cap.SET_GUEST_DEBUG2,
    Cap.GUEST_DEBUG_HW_BPS, Cap.SYNC_REGS, Cap.IMMEDIATE_EXIT, Cap.TSC_DEADLINE_TIMER,
    Cap.TSC_CONTROL, Cap.GET_TSC_KHZ, Cap.X2APIC_API, Cap.NR_VCPUS, Cap.MAX_VCPUS,
    Cap.MAX_VCPU_ID, Cap.NR_MEMSLOTS, Cap.READONLY_MEM, Cap.MANUAL_DIRTY_LOG_PROTECT2,
    Cap.SPLIT_IRQCHIP, Cap.X86_USER_SPACE_MSR, Cap.EXIT_HYPERCALL, Cap.SYSTEM_EVENT_DATA,
    Cap.INTERNAL_ERROR_DATA, Cap.SREGS2, Cap.HYPERV, Cap.HYPERV_TIME, Cap.HYPERV_SYNIC2,
    Cap.HYPERV_VP_INDEX, Cap.HYPERV_TLBFLUSH, Cap.HYPERV_SEND_IPI, Cap.HYPERV_CPUID,
    Cap.SYS_HYPERV_CPUID, Cap.HYPERV_ENLIGHTENED_VMCS, Cap.NESTED_STATE,
)  # fmt: skip

MARK_PORT = 0x1003  # the speed loops OUT here at start and end


@dataclass
class ProbeResult:
    device: str
    kernel: str
    api_version: int
    implementation: str
    linux_guests: bool
    implementation_reason: str
    capabilities: dict[str, int] = field(default_factory=dict)
    cpl0_ips: float | None = None
    cpl3_ips: float | None = None
    lapic_tmcct_live: bool | None = None
    lapic_expired_oneshot_keeps_tmict: bool | None = None
    nested: bool = False
    nested_reason: str = ""  # why not, when `nested` is False
    hyperv_features: list[str] = field(default_factory=list)  # what `--hyperv` gives
    hyperv_reason: str = ""  # why none, when the host has no Hyper-V emulation
    errors: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, object]:
        return asdict(self)


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


# Set by kvmkit-jailer for the VMM it starts: "IMPLEMENTATION: why", its probe of the host.
JAILED_KVM_ENV = "KVMKIT_JAILED_KVM"


def detect_implementation(
    modules_dir: Path = Path("/sys/module"), flags: set[str] | None = None
) -> tuple[str, str]:
    """('hardware-vmx' | 'hardware-svm' | 'pvm' | 'unknown', why)."""
    told = os.environ.get(JAILED_KVM_ENV)
    if told and flags is None and modules_dir == Path("/sys/module") and not modules_dir.exists():
        # Inside kvmkit-jailer's jail, which has no /sys or /proc: the jailer probed the
        # host before the chroot and passed its answer on (docs/security.md, "The jailer").
        implementation, _, why = told.partition(":")
        return implementation, f"{why.strip()} (probed by kvmkit-jailer before the chroot)"
    flags = _cpu_flags() if flags is None else flags
    loaded = {m for m in ("kvm_pvm", "kvm_intel", "kvm_amd") if (modules_dir / m).exists()}
    if "kvm_pvm" in loaded:
        return "pvm", "module kvm_pvm is loaded: guests run without hardware virtualization"
    if "kvm_intel" in loaded and "vmx" in flags:
        return "hardware-vmx", "module kvm_intel is loaded and the CPU has VMX"
    if "kvm_amd" in loaded and "svm" in flags:
        return "hardware-svm", "module kvm_amd is loaded and the CPU has SVM"
    return "unknown", f"loaded KVM modules: {sorted(loaded) or 'none'}, CPU flags lack vmx/svm"


def _measure_loop(cpl: int, iterations: int) -> float:
    """Instructions per second of a `dec %ecx; jnz` loop (2 instructions per iteration)."""
    marks: list[float] = []

    def on_exit(exit_: VmExit) -> bool:
        if isinstance(exit_, IoExit) and exit_.port == MARK_PORT:
            marks.append(time.perf_counter())
            return True
        return False

    with TinyGuest("long64", cpl=cpl) as guest:
        guest.load_asm(
            f"""
            mov ${MARK_PORT}, %dx
            out %eax, %dx
            mov ${iterations}, %ecx
        1:  dec %ecx
            jnz 1b
            out %eax, %dx
            mov $0x1000, %dx
            xor %eax, %eax
            out %eax, %dx
            """
        )
        guest.run(on_exit=on_exit, timeout=120)
    if len(marks) != 2 or marks[1] <= marks[0]:
        raise RuntimeError("speed loop did not report its start and end")
    return 2 * iterations / (marks[1] - marks[0])


def _lapic_checks(kvm: Kvm) -> tuple[bool, bool]:
    """(TMCCT is live in KVM_GET_LAPIC, an expired one-shot keeps its TMICT)."""
    vm = kvm.create_vm()
    try:
        vm.create_irqchip()
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid2(kvm.supported_cpuid())  # timer modes need CPUID (ENVIRONMENT.md)

        def arm(initial: int) -> None:
            lapic = vcpu.get_lapic()
            lapic.set_reg(x86.APIC_SPIV, x86.APIC_SPIV_ENABLE | 0xFF)
            lapic.set_reg(x86.APIC_LVTT, x86.APIC_LVT_MASKED | x86.APIC_LVT_TIMER_ONESHOT | 0x40)
            lapic.set_reg(x86.APIC_TDCR, x86.APIC_TDCR_DIV_1)
            lapic.set_reg(x86.APIC_TMICT, initial)
            lapic.set_reg(x86.APIC_TMCCT, initial)
            vcpu.set_lapic(lapic)

        arm(1_000_000_000)
        time.sleep(0.3)
        current = vcpu.get_lapic().get_reg(x86.APIC_TMCCT)
        live = 0 < current < 1_000_000_000

        arm(1000)  # ~1 us at KVM's 1 GHz APIC bus
        time.sleep(0.05)
        state = vcpu.get_lapic()
        keeps = state.get_reg(x86.APIC_TMICT) == 1000 and state.get_reg(x86.APIC_TMCCT) == 0
        return live, keeps
    finally:
        vm.close()


def probe(device: str = "/dev/kvm", *, measure: bool = True) -> ProbeResult:
    """Probe the host. Raises KvmUnavailable if the device cannot be opened and KvmError if
    KVM_CREATE_VM is refused; individual measurements that fail are reported in `errors`."""
    implementation, why = detect_implementation()
    with Kvm(device) as kvm:
        vm = kvm.create_vm()  # fails early (EBUSY, ENOMEM...) before anything is measured
        vm.close()
        result = ProbeResult(
            device=device,
            kernel=platform.release(),
            api_version=kvm.api_version(),
            implementation=implementation,
            linux_guests=implementation.startswith("hardware-"),
            implementation_reason=why,
            capabilities={cap.name: kvm.check_extension(cap) for cap in CAPABILITIES},
        )
        from kvmkit.vmm.hyperv import host_hyperv
        from kvmkit.vmm.nested import nesting_problem

        problem = nesting_problem(kvm)
        result.nested, result.nested_reason = problem is None, problem or ""
        hyperv = host_hyperv(kvm)
        result.hyperv_features, result.hyperv_reason = list(hyperv.offered), hyperv.problem
        try:
            result.lapic_tmcct_live, result.lapic_expired_oneshot_keeps_tmict = _lapic_checks(kvm)
        except (KvmError, OSError) as err:
            result.errors["lapic"] = str(err)
    if measure:
        # CPL0 is emulated on PVM (~1.5 M instr/s): keep its loop short. CPL3 runs natively.
        for name, cpl, iterations in (("cpl0", 0, 100_000), ("cpl3", 3, 200_000_000)):
            try:
                setattr(result, f"{name}_ips", _measure_loop(cpl, iterations))
            except Exception as err:  # reported, not fatal: the other figures stay useful
                result.errors[name] = f"{type(err).__name__}: {err}"
    return result


def device_from_env() -> str:
    return os.environ.get("KVMKIT_DEVICE", "/dev/kvm")
