"""`Kvm`: the handle on `/dev/kvm` (system ioctls)."""

from __future__ import annotations

import errno
import os
from types import TracebackType

from kvmkit.abi import ioctls, structs
from kvmkit.abi.constants import KVM_API_VERSION, Cap
from kvmkit.kvm._ioctl import close_fd, ioctl_int, ioctl_ptr
from kvmkit.kvm.cpuid import CpuidEntry, from_kvm_cpuid2
from kvmkit.kvm.errors import KvmError
from kvmkit.kvm.vm import Vm

DEFAULT_DEVICE = "/dev/kvm"
# Upper bounds for the growing buffers below, so a confused kernel cannot make us loop forever.
_MAX_CPUID_ENTRIES = 4096
_MAX_MSR_INDICES = 65536


class KvmUnavailable(OSError):
    """`/dev/kvm` cannot be used; the message says what to do about it."""


def _explain_open_error(path: str, err: OSError) -> str:
    if err.errno == errno.ENOENT:
        return (
            f"{path} does not exist: load the KVM module (modprobe kvm_intel or kvm_amd) "
            "or run on a machine with KVM"
        )
    if err.errno in (errno.EACCES, errno.EPERM):
        return (
            f"no permission to open {path}: add your user to the 'kvm' group "
            "(sudo usermod -aG kvm $USER, then log in again) or run as root"
        )
    return f"cannot open {path}: {err.strerror}"


class Kvm:
    """One open `/dev/kvm` file descriptor. Each method is one ioctl."""

    def __init__(self, path: str = DEFAULT_DEVICE) -> None:
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as err:
            raise KvmUnavailable(err.errno, _explain_open_error(path, err)) from err
        self.path = path
        try:
            version = self.api_version()
        except KvmError as err:
            self.close()
            raise KvmUnavailable(err.errno, f"{path} is not a KVM device ({err})") from err
        if version != KVM_API_VERSION:
            self.close()
            raise KvmUnavailable(
                errno.EINVAL, f"{path} speaks KVM API version {version}, kvmkit needs 12"
            )

    # -- life cycle
    def close(self) -> None:
        if self.fd >= 0:
            close_fd(self.fd)
            self.fd = -1

    def __enter__(self) -> Kvm:
        return self

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- ioctls
    def api_version(self) -> int:
        return ioctl_int(self.fd, "KVM_GET_API_VERSION", ioctls.GET_API_VERSION)

    def check_extension(self, cap: Cap | int) -> int:
        """0 when absent; otherwise 1 or a capability-specific value (a count, a size...)."""
        return ioctl_int(self.fd, "KVM_CHECK_EXTENSION", ioctls.CHECK_EXTENSION, int(cap))

    def vcpu_mmap_size(self) -> int:
        return ioctl_int(self.fd, "KVM_GET_VCPU_MMAP_SIZE", ioctls.GET_VCPU_MMAP_SIZE)

    def _cpuid(self, op: str, request: int) -> list[CpuidEntry]:
        n = 128
        while True:
            buf = structs.cpuid2_type(n)()
            buf.nent = n
            try:
                ioctl_ptr(self.fd, op, request, buf)
            except KvmError as err:
                # E2BIG: the buffer is too small; grow it (KVM API doc, KVM_GET_SUPPORTED_CPUID).
                if err.errno == errno.E2BIG and n < _MAX_CPUID_ENTRIES:
                    n *= 2
                    continue
                raise
            return from_kvm_cpuid2(buf)

    def supported_cpuid(self) -> list[CpuidEntry]:
        return self._cpuid("KVM_GET_SUPPORTED_CPUID", ioctls.GET_SUPPORTED_CPUID)

    def emulated_cpuid(self) -> list[CpuidEntry]:
        return self._cpuid("KVM_GET_EMULATED_CPUID", ioctls.GET_EMULATED_CPUID)

    def supported_hv_cpuid(self) -> list[CpuidEntry]:
        """System-wide Hyper-V leaves (needs KVM_CAP_SYS_HYPERV_CPUID)."""
        return self._cpuid("KVM_GET_SUPPORTED_HV_CPUID", ioctls.GET_SUPPORTED_HV_CPUID)

    def _msr_list(self, op: str, request: int) -> list[int]:
        # The first call with nmsrs=0 fails with E2BIG and reports the needed count.
        probe = structs.kvm_msr_list()
        try:
            ioctl_ptr(self.fd, op, request, probe)
        except KvmError as err:
            if err.errno != errno.E2BIG:
                raise
        n = int(probe.nmsrs)
        if not 0 <= n <= _MAX_MSR_INDICES:
            raise KvmError(op, errno.EOVERFLOW, f"kernel reported {n} MSRs")
        buf = structs.msr_list_type(n)()
        buf.nmsrs = n
        ioctl_ptr(self.fd, op, request, buf)
        return [int(buf.indices[i]) for i in range(int(buf.nmsrs))]

    def msr_index_list(self) -> list[int]:
        """MSRs that KVM_GET/SET_MSRS can save and restore for a vCPU."""
        return self._msr_list("KVM_GET_MSR_INDEX_LIST", ioctls.GET_MSR_INDEX_LIST)

    def msr_feature_index_list(self) -> list[int]:
        return self._msr_list("KVM_GET_MSR_FEATURE_INDEX_LIST", ioctls.GET_MSR_FEATURE_INDEX_LIST)

    def create_vm(self, machine_type: int = 0) -> Vm:
        fd = ioctl_int(self.fd, "KVM_CREATE_VM", ioctls.CREATE_VM, machine_type)
        return Vm(self, fd)

