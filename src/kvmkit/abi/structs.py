"""ctypes mirrors of the KVM userspace structures kvmkit uses (x86-64).

Sources: `include/uapi/linux/kvm.h` and `arch/x86/include/uapi/asm/kvm.h`. Field names are
the C names, so `tests/unit/test_abi_layout.py` can compile a C program against the system
headers and compare `sizeof`/`offsetof` of every structure and field with these definitions.

Each class names its C type in `_c_name_`. Anonymous C unions are ctypes fields listed in
`_anonymous_`. Structures ending in a flexible array (`kvm_msrs`, `kvm_msr_list`,
`kvm_cpuid2`, `kvm_irq_routing`) are the fixed header only; `sized()` helpers below build a
type with room for N entries.
"""

from __future__ import annotations

import ctypes
from ctypes import (
    c_char,
    c_int32,
    c_int64,
    c_uint8,
    c_uint16,
    c_uint32,
    c_uint64,
)
from typing import Any, ClassVar, TypeVar

KVM_NR_INTERRUPTS = 256
KVM_IOAPIC_NUM_PINS = 24
KVM_APIC_REG_SIZE = 0x400
KVM_MAX_XCRS = 16
SYNC_REGS_SIZE_BYTES = 2048
KVM_XSAVE_REGION_BYTES = 4096


class KvmStruct(ctypes.Structure):
    """Base of the KVM structures: adds the C name and a readable repr."""

    _c_name_: ClassVar[str] = ""

    def __repr__(self) -> str:
        parts = []
        for name, *_ in self._fields_:
            value = getattr(self, name)
            if isinstance(value, int):
                parts.append(f"{name}={value:#x}")
        return f"{type(self).__name__}({', '.join(parts)})"

    def to_bytes(self) -> bytes:
        return bytes(self)

    @classmethod
    def from_bytes(cls: type[_S], data: bytes | bytearray | memoryview) -> _S:
        if len(data) != ctypes.sizeof(cls):
            raise ValueError(
                f"{cls._c_name_ or cls.__name__}: expected {ctypes.sizeof(cls)} bytes, "
                f"got {len(data)}"
            )
        return cls.from_buffer_copy(data)


_S = TypeVar("_S", bound=KvmStruct)


class KvmUnion(ctypes.Union):
    _c_name_: ClassVar[str] = ""


# --- registers (asm/kvm.h) -------------------------------------------------------------


class kvm_regs(KvmStruct):
    _c_name_ = "struct kvm_regs"
    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
            "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
            "rip", "rflags",
        )
    ]  # fmt: skip


class kvm_segment(KvmStruct):
    _c_name_ = "struct kvm_segment"
    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class kvm_dtable(KvmStruct):
    _c_name_ = "struct kvm_dtable"
    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


class kvm_sregs(KvmStruct):
    _c_name_ = "struct kvm_sregs"
    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", c_uint64),
        ("cr2", c_uint64),
        ("cr3", c_uint64),
        ("cr4", c_uint64),
        ("cr8", c_uint64),
        ("efer", c_uint64),
        ("apic_base", c_uint64),
        ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(KvmStruct):
    _c_name_ = "struct kvm_fpu"
    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


class kvm_xsave(KvmStruct):
    """The legacy 4 KiB XSAVE area; `KVM_GET_XSAVE2` may need more (see `Vm.xsave_size`)."""

    _c_name_ = "struct kvm_xsave"
    _fields_ = [("region", c_uint32 * (KVM_XSAVE_REGION_BYTES // 4))]


class kvm_xcr(KvmStruct):
    _c_name_ = "struct kvm_xcr"
    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class kvm_xcrs(KvmStruct):
    _c_name_ = "struct kvm_xcrs"
    _fields_ = [
        ("nr_xcrs", c_uint32),
        ("flags", c_uint32),
        ("xcrs", kvm_xcr * KVM_MAX_XCRS),
        ("padding", c_uint64 * 16),
    ]


class kvm_debugregs(KvmStruct):
    _c_name_ = "struct kvm_debugregs"
    _fields_ = [
        ("db", c_uint64 * 4),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
        ("flags", c_uint64),
        ("reserved", c_uint64 * 9),
    ]


class kvm_lapic_state(KvmStruct):
    """The 1 KiB local APIC register page; registers at 16-byte strides (SDM vol. 3, 11.4.1)."""

    _c_name_ = "struct kvm_lapic_state"
    _fields_ = [("regs", c_char * KVM_APIC_REG_SIZE)]

    def get_reg(self, offset: int) -> int:
        if offset % 16 or not 0 <= offset < KVM_APIC_REG_SIZE:
            raise ValueError(f"bad APIC register offset {offset:#x}")
        return int.from_bytes(bytes(self)[offset : offset + 4], "little")

    def set_reg(self, offset: int, value: int) -> None:
        if offset % 16 or not 0 <= offset < KVM_APIC_REG_SIZE:
            raise ValueError(f"bad APIC register offset {offset:#x}")
        raw = (value & 0xFFFFFFFF).to_bytes(4, "little")
        ctypes.memmove(ctypes.addressof(self) + offset, raw, 4)


class kvm_msr_entry(KvmStruct):
    _c_name_ = "struct kvm_msr_entry"
    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(KvmStruct):
    """Header of `struct kvm_msrs`; `msrs_type(n)` adds room for n entries."""

    _c_name_ = "struct kvm_msrs"
    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


class kvm_msr_list(KvmStruct):
    _c_name_ = "struct kvm_msr_list"
    _fields_ = [("nmsrs", c_uint32)]


class kvm_cpuid_entry2(KvmStruct):
    _c_name_ = "struct kvm_cpuid_entry2"
    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


class kvm_cpuid2(KvmStruct):
    _c_name_ = "struct kvm_cpuid2"
    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


# --- interrupt controllers and timers -------------------------------------------------------


class kvm_pic_state(KvmStruct):
    _c_name_ = "struct kvm_pic_state"
    _fields_ = [
        (name, c_uint8)
        for name in (
            "last_irr", "irr", "imr", "isr", "priority_add", "irq_base", "read_reg_select",
            "poll", "special_mask", "init_state", "auto_eoi", "rotate_on_auto_eoi",
            "special_fully_nested_mode", "init4", "elcr", "elcr_mask",
        )
    ]  # fmt: skip


class _ioapic_redir_fields(KvmStruct):
    # Bit-fields; the layout test compares only the whole union's size and offset.
    _fields_ = [
        ("vector", c_uint8),
        ("delivery_mode", c_uint8, 3),
        ("dest_mode", c_uint8, 1),
        ("delivery_status", c_uint8, 1),
        ("polarity", c_uint8, 1),
        ("remote_irr", c_uint8, 1),
        ("trig_mode", c_uint8, 1),
        ("mask", c_uint8, 1),
        ("reserve", c_uint8, 7),
        ("reserved", c_uint8 * 4),
        ("dest_id", c_uint8),
    ]


class _ioapic_redir(KvmUnion):
    _fields_ = [("bits", c_uint64), ("fields", _ioapic_redir_fields)]


class kvm_ioapic_state(KvmStruct):
    _c_name_ = "struct kvm_ioapic_state"
    _fields_ = [
        ("base_address", c_uint64),
        ("ioregsel", c_uint32),
        ("id", c_uint32),
        ("irr", c_uint32),
        ("pad", c_uint32),
        ("redirtbl", _ioapic_redir * KVM_IOAPIC_NUM_PINS),
    ]


class _irqchip_union(KvmUnion):
    _fields_ = [
        ("dummy", c_char * 512),
        ("pic", kvm_pic_state),
        ("ioapic", kvm_ioapic_state),
    ]


class kvm_irqchip(KvmStruct):
    _c_name_ = "struct kvm_irqchip"
    _fields_ = [("chip_id", c_uint32), ("pad", c_uint32), ("chip", _irqchip_union)]


class kvm_pit_channel_state(KvmStruct):
    _c_name_ = "struct kvm_pit_channel_state"
    _fields_ = [
        ("count", c_uint32),
        ("latched_count", c_uint16),
        ("count_latched", c_uint8),
        ("status_latched", c_uint8),
        ("status", c_uint8),
        ("read_state", c_uint8),
        ("write_state", c_uint8),
        ("write_latch", c_uint8),
        ("rw_mode", c_uint8),
        ("mode", c_uint8),
        ("bcd", c_uint8),
        ("gate", c_uint8),
        ("count_load_time", c_int64),
    ]


class kvm_pit_state2(KvmStruct):
    _c_name_ = "struct kvm_pit_state2"
    _fields_ = [
        ("channels", kvm_pit_channel_state * 3),
        ("flags", c_uint32),
        ("reserved", c_uint32 * 9),
    ]


class kvm_pit_config(KvmStruct):
    _c_name_ = "struct kvm_pit_config"
    _fields_ = [("flags", c_uint32), ("pad", c_uint32 * 15)]


class kvm_clock_data(KvmStruct):
    _c_name_ = "struct kvm_clock_data"
    _fields_ = [
        ("clock", c_uint64),
        ("flags", c_uint32),
        ("pad0", c_uint32),
        ("realtime", c_uint64),
        ("host_tsc", c_uint64),
        ("pad", c_uint32 * 4),
    ]


class _irq_level_union(KvmUnion):
    _fields_ = [("irq", c_uint32), ("status", c_int32)]


class kvm_irq_level(KvmStruct):
    _c_name_ = "struct kvm_irq_level"
    _anonymous_ = ("u",)
    _fields_ = [("u", _irq_level_union), ("level", c_uint32)]


class kvm_irq_routing_irqchip(KvmStruct):
    _c_name_ = "struct kvm_irq_routing_irqchip"
    _fields_ = [("irqchip", c_uint32), ("pin", c_uint32)]


class _routing_msi_union(KvmUnion):
    _fields_ = [("pad", c_uint32), ("devid", c_uint32)]


class kvm_irq_routing_msi(KvmStruct):
    _c_name_ = "struct kvm_irq_routing_msi"
    _anonymous_ = ("u",)
    _fields_ = [
        ("address_lo", c_uint32),
        ("address_hi", c_uint32),
        ("data", c_uint32),
        ("u", _routing_msi_union),
    ]


class _routing_entry_union(KvmUnion):
    _fields_ = [
        ("irqchip", kvm_irq_routing_irqchip),
        ("msi", kvm_irq_routing_msi),
        ("pad", c_uint32 * 8),
    ]


class kvm_irq_routing_entry(KvmStruct):
    _c_name_ = "struct kvm_irq_routing_entry"
    _fields_ = [
        ("gsi", c_uint32),
        ("type", c_uint32),
        ("flags", c_uint32),
        ("pad", c_uint32),
        ("u", _routing_entry_union),
    ]


class kvm_irq_routing(KvmStruct):
    _c_name_ = "struct kvm_irq_routing"
    _fields_ = [("nr", c_uint32), ("flags", c_uint32)]


class kvm_coalesced_mmio_zone(KvmStruct):
    """A guest range whose writes KVM queues in the coalesced ring instead of exiting
    (KVM_REGISTER_COALESCED_MMIO; `pio` = 1 for port I/O, KVM_CAP_COALESCED_PIO)."""

    _c_name_ = "struct kvm_coalesced_mmio_zone"
    _fields_ = [
        ("addr", c_uint64),
        ("size", c_uint32),
        ("pio", c_uint32),  # union { pad; pio; }
    ]


class kvm_coalesced_mmio(KvmStruct):
    """One queued write in the coalesced ring."""

    _c_name_ = "struct kvm_coalesced_mmio"
    _fields_ = [
        ("phys_addr", c_uint64),
        ("len", c_uint32),
        ("pio", c_uint32),  # union { pad; pio; }
        ("data", c_uint8 * 8),
    ]


class kvm_coalesced_mmio_ring(KvmStruct):
    """The ring's header; the entries follow it to the end of the page
    (KVM_COALESCED_MMIO_PAGE_OFFSET pages into the vCPU mapping: 2 on x86)."""

    _c_name_ = "struct kvm_coalesced_mmio_ring"
    _fields_ = [
        ("first", c_uint32),  # next entry for userspace to take
        ("last", c_uint32),  # next entry KVM fills
    ]


class kvm_msi(KvmStruct):
    _c_name_ = "struct kvm_msi"
    _fields_ = [
        ("address_lo", c_uint32),
        ("address_hi", c_uint32),
        ("data", c_uint32),
        ("flags", c_uint32),
        ("devid", c_uint32),
        ("pad", c_uint8 * 12),
    ]


class kvm_create_device(KvmStruct):
    _c_name_ = "struct kvm_create_device"
    _fields_ = [("type", c_uint32), ("fd", c_uint32), ("flags", c_uint32)]


class kvm_irqfd(KvmStruct):
    _c_name_ = "struct kvm_irqfd"
    _fields_ = [
        ("fd", c_uint32),
        ("gsi", c_uint32),
        ("flags", c_uint32),
        ("resamplefd", c_uint32),
        ("pad", c_uint8 * 16),
    ]


class kvm_ioeventfd(KvmStruct):
    _c_name_ = "struct kvm_ioeventfd"
    _fields_ = [
        ("datamatch", c_uint64),
        ("addr", c_uint64),
        ("len", c_uint32),
        ("fd", c_int32),
        ("flags", c_uint32),
        ("pad", c_uint8 * 36),
    ]


# --- VM and vCPU control ---------------------------------------------------------------------


class kvm_userspace_memory_region(KvmStruct):
    _c_name_ = "struct kvm_userspace_memory_region"
    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class _dirty_log_union(KvmUnion):
    _fields_ = [("dirty_bitmap", ctypes.c_void_p), ("padding2", c_uint64)]


class kvm_dirty_log(KvmStruct):
    _c_name_ = "struct kvm_dirty_log"
    _anonymous_ = ("u",)
    _fields_ = [("slot", c_uint32), ("padding1", c_uint32), ("u", _dirty_log_union)]


class kvm_clear_dirty_log(KvmStruct):
    """KVM_CLEAR_DIRTY_LOG (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): re-protect the pages whose
    bits are set in `dirty_bitmap`, `num_pages` from `first_page` of the slot."""

    _c_name_ = "struct kvm_clear_dirty_log"
    _anonymous_ = ("u",)
    _fields_ = [
        ("slot", c_uint32),
        ("num_pages", c_uint32),
        ("first_page", c_uint64),
        ("u", _dirty_log_union),
    ]


class kvm_device_attr(KvmStruct):
    """KVM_{HAS,GET,SET}_DEVICE_ATTR, on a device or (KVM_CAP_VCPU_ATTRIBUTES) a vCPU."""

    _c_name_ = "struct kvm_device_attr"
    _fields_ = [
        ("flags", c_uint32),
        ("group", c_uint32),
        ("attr", c_uint64),
        ("addr", c_uint64),
    ]


class kvm_enable_cap(KvmStruct):
    _c_name_ = "struct kvm_enable_cap"
    _fields_ = [
        ("cap", c_uint32),
        ("flags", c_uint32),
        ("args", c_uint64 * 4),
        ("pad", c_uint8 * 64),
    ]


class kvm_mp_state(KvmStruct):
    _c_name_ = "struct kvm_mp_state"
    _fields_ = [("mp_state", c_uint32)]


class kvm_translation(KvmStruct):
    _c_name_ = "struct kvm_translation"
    _fields_ = [
        ("linear_address", c_uint64),
        ("physical_address", c_uint64),
        ("valid", c_uint8),
        ("writeable", c_uint8),
        ("usermode", c_uint8),
        ("pad", c_uint8 * 5),
    ]


class kvm_guest_debug_arch(KvmStruct):
    _c_name_ = "struct kvm_guest_debug_arch"
    _fields_ = [("debugreg", c_uint64 * 8)]


class kvm_guest_debug(KvmStruct):
    _c_name_ = "struct kvm_guest_debug"
    _fields_ = [("control", c_uint32), ("pad", c_uint32), ("arch", kvm_guest_debug_arch)]


class kvm_debug_exit_arch(KvmStruct):
    _c_name_ = "struct kvm_debug_exit_arch"
    _fields_ = [
        ("exception", c_uint32),
        ("pad", c_uint32),
        ("pc", c_uint64),
        ("dr6", c_uint64),
        ("dr7", c_uint64),
    ]


class _events_exception(KvmStruct):
    _fields_ = [
        ("injected", c_uint8),
        ("nr", c_uint8),
        ("has_error_code", c_uint8),
        ("pending", c_uint8),
        ("error_code", c_uint32),
    ]


class _events_interrupt(KvmStruct):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class _events_nmi(KvmStruct):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class _events_smi(KvmStruct):
    _fields_ = [
        ("smm", c_uint8),
        ("pending", c_uint8),
        ("smm_inside_nmi", c_uint8),
        ("latched_init", c_uint8),
    ]


class _events_triple_fault(KvmStruct):
    _fields_ = [("pending", c_uint8)]


class kvm_vcpu_events(KvmStruct):
    _c_name_ = "struct kvm_vcpu_events"
    _fields_ = [
        ("exception", _events_exception),
        ("interrupt", _events_interrupt),
        ("nmi", _events_nmi),
        ("sipi_vector", c_uint32),
        ("flags", c_uint32),
        ("smi", _events_smi),
        ("triple_fault", _events_triple_fault),
        ("reserved", c_uint8 * 26),
        ("exception_has_payload", c_uint8),
        ("exception_payload", c_uint64),
    ]


class kvm_sync_regs(KvmStruct):
    _c_name_ = "struct kvm_sync_regs"
    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


class kvm_vmx_nested_state_hdr(KvmStruct):
    _c_name_ = "struct kvm_vmx_nested_state_hdr"

    class _smm(KvmStruct):
        _fields_ = [("flags", c_uint16)]

    _fields_ = [
        ("vmxon_pa", c_uint64),
        ("vmcs12_pa", c_uint64),
        ("smm", _smm),
        ("pad", c_uint16),
        ("flags", c_uint32),
        ("preemption_timer_deadline", c_uint64),
    ]


class kvm_svm_nested_state_hdr(KvmStruct):
    _c_name_ = "struct kvm_svm_nested_state_hdr"
    _fields_ = [("vmcb_pa", c_uint64)]


class _nested_hdr_union(KvmUnion):
    _fields_ = [
        ("vmx", kvm_vmx_nested_state_hdr),
        ("svm", kvm_svm_nested_state_hdr),
        ("pad", c_uint8 * 120),
    ]


class kvm_nested_state(KvmStruct):
    """The 128-byte header of `struct kvm_nested_state`; the data area follows it."""

    _c_name_ = "struct kvm_nested_state"
    _fields_ = [
        ("flags", c_uint16),
        ("format", c_uint16),
        ("size", c_uint32),
        ("hdr", _nested_hdr_union),
    ]


# --- struct kvm_run: the page shared with the kernel for each vCPU --------------------------


class _run_hw(KvmStruct):
    _fields_ = [("hardware_exit_reason", c_uint64)]


class _run_fail_entry(KvmStruct):
    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class _run_ex(KvmStruct):
    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


class kvm_run_io(KvmStruct):
    """`kvm_run.io` (KVM_EXIT_IO); public: kvm/exits.py reads its fields by offset."""

    _fields_ = [
        ("direction", c_uint8),
        ("size", c_uint8),
        ("port", c_uint16),
        ("count", c_uint32),
        ("data_offset", c_uint64),
    ]


class _run_debug(KvmStruct):
    _fields_ = [("arch", kvm_debug_exit_arch)]


class kvm_run_mmio(KvmStruct):
    """`kvm_run.mmio` (KVM_EXIT_MMIO); public: kvm/exits.py reads its fields by offset."""

    _fields_ = [
        ("phys_addr", c_uint64),
        ("data", c_uint8 * 8),
        ("len", c_uint32),
        ("is_write", c_uint8),
    ]


class _run_hypercall(KvmStruct):
    _fields_ = [
        ("nr", c_uint64),
        ("args", c_uint64 * 6),
        ("ret", c_uint64),
        ("longmode", c_uint32),
        ("pad", c_uint32),
    ]


class _run_tpr_access(KvmStruct):
    _fields_ = [("rip", c_uint64), ("is_write", c_uint32), ("pad", c_uint32)]


class _run_internal(KvmStruct):
    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class _system_event_union(KvmUnion):
    _fields_ = [("flags", c_uint64), ("data", c_uint64 * 16)]


class _run_system_event(KvmStruct):
    _anonymous_ = ("u",)
    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("u", _system_event_union)]


class _run_eoi(KvmStruct):
    _fields_ = [("vector", c_uint8)]


class _run_msr(KvmStruct):
    _fields_ = [
        ("error", c_uint8),
        ("pad", c_uint8 * 7),
        ("reason", c_uint32),
        ("index", c_uint32),
        ("data", c_uint64),
    ]


class _run_notify(KvmStruct):
    _fields_ = [("flags", c_uint32)]


class _hyperv_synic(KvmStruct):
    _fields_ = [
        ("msr", c_uint32),
        ("pad2", c_uint32),
        ("control", c_uint64),
        ("evt_page", c_uint64),
        ("msg_page", c_uint64),
    ]


class _hyperv_hcall(KvmStruct):
    _fields_ = [("input", c_uint64), ("result", c_uint64), ("params", c_uint64 * 2)]


class _hyperv_syndbg(KvmStruct):
    _fields_ = [
        ("msr", c_uint32),
        ("pad2", c_uint32),
        ("control", c_uint64),
        ("status", c_uint64),
        ("send_page", c_uint64),
        ("recv_page", c_uint64),
        ("pending_page", c_uint64),
    ]


class _hyperv_exit_union(KvmUnion):
    _fields_ = [("synic", _hyperv_synic), ("hcall", _hyperv_hcall), ("syndbg", _hyperv_syndbg)]


class kvm_hyperv_exit(KvmStruct):
    """`kvm_run.hyperv` (KVM_EXIT_HYPERV): a SynIC MSR write or a hypercall KVM left to
    userspace (KVM API doc, KVM_EXIT_HYPERV)."""

    _c_name_ = "struct kvm_hyperv_exit"
    _fields_ = [("type", c_uint32), ("pad1", c_uint32), ("u", _hyperv_exit_union)]


class _run_exit_union(KvmUnion):
    _fields_ = [
        ("hw", _run_hw),
        ("fail_entry", _run_fail_entry),
        ("ex", _run_ex),
        ("io", kvm_run_io),
        ("debug", _run_debug),
        ("mmio", kvm_run_mmio),
        ("hypercall", _run_hypercall),
        ("tpr_access", _run_tpr_access),
        ("internal", _run_internal),
        ("system_event", _run_system_event),
        ("eoi", _run_eoi),
        ("msr", _run_msr),
        ("notify", _run_notify),
        ("hyperv", kvm_hyperv_exit),
        ("padding", c_char * 256),
    ]


class _run_sync_union(KvmUnion):
    _fields_ = [("regs", kvm_sync_regs), ("padding", c_char * SYNC_REGS_SIZE_BYTES)]


class kvm_run(KvmStruct):
    _c_name_ = "struct kvm_run"
    _anonymous_ = ("u",)
    _fields_ = [
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("u", _run_exit_union),
        ("kvm_valid_regs", c_uint64),
        ("kvm_dirty_regs", c_uint64),
        ("s", _run_sync_union),
    ]


# --- variable-length structures ------------------------------------------------------------

_sized_cache: dict[tuple[type[Any], int], type[Any]] = {}


def _sized(base: type[KvmStruct], entry: Any, field: str, n: int) -> type[KvmStruct]:
    """A subclass of `base` whose flexible array `field` has room for `n` entries."""
    if n < 0:
        raise ValueError(f"negative entry count {n}")
    key = (base, n)
    cached = _sized_cache.get(key)
    if cached is None:
        cached = type(
            f"{base.__name__}_{n}",
            (base,),
            {"_fields_": [(field, entry * n)], "_c_name_": base._c_name_},
        )
        _sized_cache[key] = cached
    return cached


def msrs_type(n: int) -> type[KvmStruct]:
    return _sized(kvm_msrs, kvm_msr_entry, "entries", n)


def msr_list_type(n: int) -> type[KvmStruct]:
    return _sized(kvm_msr_list, c_uint32, "indices", n)


def cpuid2_type(n: int) -> type[KvmStruct]:
    return _sized(kvm_cpuid2, kvm_cpuid_entry2, "entries", n)


def irq_routing_type(n: int) -> type[KvmStruct]:
    return _sized(kvm_irq_routing, kvm_irq_routing_entry, "entries", n)


# Every structure with a C name, for the layout test and for documentation.
ALL_STRUCTS: tuple[type[KvmStruct], ...] = tuple(
    obj
    for obj in list(globals().values())
    if isinstance(obj, type) and issubclass(obj, KvmStruct) and obj._c_name_
)
