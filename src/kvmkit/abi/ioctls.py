"""KVM ioctl request numbers, computed from the structure sizes as `linux/kvm.h` does.

Names drop the `KVM_` prefix. A few SET requests are `_IOR` in the kernel header (a historical
mistake the ABI keeps); they are kept as they are.
"""

from __future__ import annotations

from ctypes import c_uint32, c_uint64

from kvmkit.abi import structs as s
from kvmkit.abi.constants import KVMIO
from kvmkit.abi.ioctl import IO, IOR, IOW, IOWR

# /dev/kvm (system) ioctls
GET_API_VERSION = IO(KVMIO, 0x00)
CREATE_VM = IO(KVMIO, 0x01)
GET_MSR_INDEX_LIST = IOWR(KVMIO, 0x02, s.kvm_msr_list)
CHECK_EXTENSION = IO(KVMIO, 0x03)
GET_VCPU_MMAP_SIZE = IO(KVMIO, 0x04)
GET_SUPPORTED_CPUID = IOWR(KVMIO, 0x05, s.kvm_cpuid2)
GET_EMULATED_CPUID = IOWR(KVMIO, 0x09, s.kvm_cpuid2)
GET_MSR_FEATURE_INDEX_LIST = IOWR(KVMIO, 0x0A, s.kvm_msr_list)

# VM ioctls
CREATE_VCPU = IO(KVMIO, 0x41)
GET_DIRTY_LOG = IOW(KVMIO, 0x42, s.kvm_dirty_log)
CLEAR_DIRTY_LOG = IOWR(KVMIO, 0xC0, s.kvm_clear_dirty_log)
SET_USER_MEMORY_REGION = IOW(KVMIO, 0x46, s.kvm_userspace_memory_region)
SET_TSS_ADDR = IO(KVMIO, 0x47)
SET_IDENTITY_MAP_ADDR = IOW(KVMIO, 0x48, c_uint64)
CREATE_IRQCHIP = IO(KVMIO, 0x60)
IRQ_LINE = IOW(KVMIO, 0x61, s.kvm_irq_level)
GET_IRQCHIP = IOWR(KVMIO, 0x62, s.kvm_irqchip)
SET_IRQCHIP = IOR(KVMIO, 0x63, s.kvm_irqchip)
IRQ_LINE_STATUS = IOWR(KVMIO, 0x67, s.kvm_irq_level)
REGISTER_COALESCED_MMIO = IOW(KVMIO, 0x67, s.kvm_coalesced_mmio_zone)
UNREGISTER_COALESCED_MMIO = IOW(KVMIO, 0x68, s.kvm_coalesced_mmio_zone)
SET_GSI_ROUTING = IOW(KVMIO, 0x6A, s.kvm_irq_routing)
IRQFD = IOW(KVMIO, 0x76, s.kvm_irqfd)
CREATE_PIT2 = IOW(KVMIO, 0x77, s.kvm_pit_config)
SET_BOOT_CPU_ID = IO(KVMIO, 0x78)
IOEVENTFD = IOW(KVMIO, 0x79, s.kvm_ioeventfd)
CREATE_DEVICE = IOWR(KVMIO, 0xE0, s.kvm_create_device)
SET_CLOCK = IOW(KVMIO, 0x7B, s.kvm_clock_data)
GET_CLOCK = IOR(KVMIO, 0x7C, s.kvm_clock_data)
GET_PIT2 = IOR(KVMIO, 0x9F, s.kvm_pit_state2)
SET_PIT2 = IOW(KVMIO, 0xA0, s.kvm_pit_state2)
SIGNAL_MSI = IOW(KVMIO, 0xA5, s.kvm_msi)
ENABLE_CAP = IOW(KVMIO, 0xA3, s.kvm_enable_cap)  # VM and vCPU
SET_TSC_KHZ = IO(KVMIO, 0xA2)  # VM (KVM_CAP_VM_TSC_CONTROL) and vCPU
GET_TSC_KHZ = IO(KVMIO, 0xA3)  # VM and vCPU

# vCPU ioctls
RUN = IO(KVMIO, 0x80)
GET_REGS = IOR(KVMIO, 0x81, s.kvm_regs)
SET_REGS = IOW(KVMIO, 0x82, s.kvm_regs)
GET_SREGS = IOR(KVMIO, 0x83, s.kvm_sregs)
SET_SREGS = IOW(KVMIO, 0x84, s.kvm_sregs)
TRANSLATE = IOWR(KVMIO, 0x85, s.kvm_translation)
GET_MSRS = IOWR(KVMIO, 0x88, s.kvm_msrs)
SET_MSRS = IOW(KVMIO, 0x89, s.kvm_msrs)
GET_FPU = IOR(KVMIO, 0x8C, s.kvm_fpu)
SET_FPU = IOW(KVMIO, 0x8D, s.kvm_fpu)
GET_LAPIC = IOR(KVMIO, 0x8E, s.kvm_lapic_state)
SET_LAPIC = IOW(KVMIO, 0x8F, s.kvm_lapic_state)
SET_CPUID2 = IOW(KVMIO, 0x90, s.kvm_cpuid2)
GET_CPUID2 = IOWR(KVMIO, 0x91, s.kvm_cpuid2)
GET_MP_STATE = IOR(KVMIO, 0x98, s.kvm_mp_state)
SET_MP_STATE = IOW(KVMIO, 0x99, s.kvm_mp_state)
NMI = IO(KVMIO, 0x9A)
SET_GUEST_DEBUG = IOW(KVMIO, 0x9B, s.kvm_guest_debug)
GET_VCPU_EVENTS = IOR(KVMIO, 0x9F, s.kvm_vcpu_events)
SET_VCPU_EVENTS = IOW(KVMIO, 0xA0, s.kvm_vcpu_events)
GET_DEBUGREGS = IOR(KVMIO, 0xA1, s.kvm_debugregs)
SET_DEBUGREGS = IOW(KVMIO, 0xA2, s.kvm_debugregs)
GET_XSAVE = IOR(KVMIO, 0xA4, s.kvm_xsave)
SET_XSAVE = IOW(KVMIO, 0xA5, s.kvm_xsave)
GET_XCRS = IOR(KVMIO, 0xA6, s.kvm_xcrs)
SET_XCRS = IOW(KVMIO, 0xA7, s.kvm_xcrs)
KVMCLOCK_CTRL = IO(KVMIO, 0xAD)
SET_SIGNAL_MASK = IOW(KVMIO, 0x8B, c_uint32)  # struct kvm_signal_mask: u32 len + the sigset
HAS_DEVICE_ATTR = IOW(KVMIO, 0xE3, s.kvm_device_attr)  # devices, and vCPUs (VCPU_ATTRIBUTES)
GET_DEVICE_ATTR = IOW(KVMIO, 0xE2, s.kvm_device_attr)
SET_DEVICE_ATTR = IOW(KVMIO, 0xE1, s.kvm_device_attr)
GET_NESTED_STATE = IOWR(KVMIO, 0xBE, s.kvm_nested_state)
SET_NESTED_STATE = IOW(KVMIO, 0xBF, s.kvm_nested_state)
GET_SUPPORTED_HV_CPUID = IOWR(KVMIO, 0xC1, s.kvm_cpuid2)
GET_XSAVE2 = IOR(KVMIO, 0xCF, s.kvm_xsave)

# Every request above, by its C name, for the layout test.
ALL_IOCTLS: dict[str, int] = {
    f"KVM_{name}": value
    for name, value in list(globals().items())
    if name.isupper() and isinstance(value, int) and name != "KVMIO"
}
