"""Typed handles on KVM file descriptors (rust-vmm kvm-ioctls style): `Kvm`, `Vm`, `Vcpu`."""

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
