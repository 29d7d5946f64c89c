"""Typed handles on KVM file descriptors (rust-vmm kvm-ioctls style): `Kvm`, `Vm`, `Vcpu`."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvmkit.kvm.cpuid import CpuidEntry
    from kvmkit.kvm.errors import KvmError
    from kvmkit.kvm.exits import (
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
    from kvmkit.kvm.system import Kvm, KvmUnavailable
    from kvmkit.kvm.vcpu import Vcpu
    from kvmkit.kvm.vm import Vm

# Each name is imported from its module on first use (PEP 562 module __getattr__), so that a
# light submodule (`kvmkit.kvm.kick`, which the API's action layer needs at start-up) does
# not bring in every ioctl structure with the package (~25 ms of kvmkit-firecracker's
# start-up, bench/startup.py).
_LAZY = {
    "CpuidEntry": "kvmkit.kvm.cpuid",
    "KvmError": "kvmkit.kvm.errors",
    "DebugExit": "kvmkit.kvm.exits",
    "FailEntryExit": "kvmkit.kvm.exits",
    "HltExit": "kvmkit.kvm.exits",
    "HypervExit": "kvmkit.kvm.exits",
    "InternalErrorExit": "kvmkit.kvm.exits",
    "IntrExit": "kvmkit.kvm.exits",
    "IoExit": "kvmkit.kvm.exits",
    "MmioExit": "kvmkit.kvm.exits",
    "ShutdownExit": "kvmkit.kvm.exits",
    "SystemEventExit": "kvmkit.kvm.exits",
    "VmExit": "kvmkit.kvm.exits",
    "Kvm": "kvmkit.kvm.system",
    "KvmUnavailable": "kvmkit.kvm.system",
    "Vcpu": "kvmkit.kvm.vcpu",
    "Vm": "kvmkit.kvm.vm",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(__import__(module, fromlist=[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "CpuidEntry",
    "DebugExit",
    "FailEntryExit",
    "HltExit",
    "HypervExit",
    "InternalErrorExit",
    "IntrExit",
    "IoExit",
    "Kvm",
    "KvmError",
    "KvmUnavailable",
    "MmioExit",
    "ShutdownExit",
    "SystemEventExit",
    "Vcpu",
    "Vm",
    "VmExit",
]
