"""Whether this host can give a guest nested virtualization (`--nested`, docs/nested.md).

Three things must hold, and `nesting_problem` names the first that does not:

1. the host's KVM is the hardware one, kvm_amd or kvm_intel (PVM and other implementations
   have no VMX/SVM to expose);
2. that module's `nested` parameter is on (/sys/module/kvm_amd/parameters/nested is "1",
   kvm_intel's is "Y"): otherwise KVM emulates no VMRUN/VMLAUNCH for guests, and
   KVM_GET_SUPPORTED_CPUID leaves the extension's bit out (arch/x86/kvm/svm/svm.c and
   vmx/vmx.c set X86_FEATURE_SVM / X86_FEATURE_VMX only `if (nested)`);
3. KVM_CHECK_EXTENSION(KVM_CAP_NESTED_STATE) is not 0: it is the size of the buffer
   KVM_GET_NESTED_STATE fills, without which a snapshot or migration could not carry a
   guest's own guests (KVM API doc, KVM_GET_NESTED_STATE).
"""

from __future__ import annotations

from pathlib import Path

from kvmkit.abi.constants import Cap
from kvmkit.arch.x86_64.cpuid import EXT1_ECX_SVM, LEAF1_ECX_VMX
from kvmkit.kvm import Kvm
from kvmkit.kvm.cpuid import CpuidEntry, find

MODULES = {"kvm_amd": "SVM", "kvm_intel": "VMX"}


def module_nested(module: str, modules_dir: Path = Path("/sys/module")) -> bool | None:
    """The `nested` parameter of a loaded KVM vendor module (None when not loaded)."""
    try:
        value = (modules_dir / module / "parameters" / "nested").read_text().strip()
    except OSError:
        return None
    return value in ("1", "Y", "y")


def extension_in_cpuid(supported: list[CpuidEntry]) -> bool:
    leaf1, ext1 = find(supported, 1), find(supported, 0x80000001)
    return bool((leaf1 is not None and leaf1.ecx & LEAF1_ECX_VMX)
                or (ext1 is not None and ext1.ecx & EXT1_ECX_SVM))  # fmt: skip


def nesting_problem(
    kvm: Kvm, supported: list[CpuidEntry] | None = None,
    modules_dir: Path = Path("/sys/module"),
) -> str | None:  # fmt: skip
    """Why guests of this host cannot run their own VMs, or None when they can."""
    state = {m: module_nested(m, modules_dir) for m in MODULES}
    loaded = [m for m, on in state.items() if on is not None]
    if not loaded:
        return ("the host's KVM is neither kvm_amd nor kvm_intel, so it has no VMX/SVM to "
                f"expose (KVM_CAP_NESTED_STATE is {kvm.check_extension(Cap.NESTED_STATE)})")
    module = loaded[0]
    if not state[module]:
        return (f"{module}'s nested parameter is off (/sys/module/{module}/parameters/nested; "
                f"reload it with nested=1)")  # fmt: skip
    if kvm.check_extension(Cap.NESTED_STATE) <= 0:
        return "KVM_CAP_NESTED_STATE is 0: this kernel cannot save a nested guest's state"
    if not extension_in_cpuid(kvm.supported_cpuid() if supported is None else supported):
        return f"KVM_GET_SUPPORTED_CPUID does not offer {MODULES[module]}"
    return None
