"""`KvmDevice`: the handle on a device from KVM_CREATE_DEVICE (KVM API doc, 4.80)."""

from __future__ import annotations

import ctypes

from kvmkit.abi import ioctls, structs
from kvmkit.kvm._ioctl import close_fd, ioctl_ptr


class KvmDevice:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def set_attr(self, group: int, attr: int, value: ctypes.c_int32) -> None:
        """KVM_SET_DEVICE_ATTR: `value` is what the attribute's address points at (an s32
        for the attributes kvmkit sets: KVM-VFIO's group fds)."""
        req = structs.kvm_device_attr()
        req.group, req.attr, req.addr = group, attr, ctypes.addressof(value)
        ioctl_ptr(self.fd, "KVM_SET_DEVICE_ATTR", ioctls.SET_DEVICE_ATTR, req)

    def close(self) -> None:
        if self.fd >= 0:
            close_fd(self.fd)
            self.fd = -1
