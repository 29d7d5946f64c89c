"""x86-64 architectural constants (Intel SDM vol. 3A ch. 2, AMD APM vol. 2)."""

from __future__ import annotations

# CR0 (SDM 2.5)
CR0_PE = 1 << 0
CR0_MP = 1 << 1
CR0_EM = 1 << 2
CR0_TS = 1 << 3
CR0_ET = 1 << 4
CR0_NE = 1 << 5
CR0_WP = 1 << 16
CR0_AM = 1 << 18
CR0_NW = 1 << 29
CR0_CD = 1 << 30
CR0_PG = 1 << 31

# CR4
CR4_PSE = 1 << 4
CR4_PAE = 1 << 5
CR4_PGE = 1 << 7
CR4_OSFXSR = 1 << 9
CR4_OSXMMEXCPT = 1 << 10
CR4_LA57 = 1 << 12
CR4_VMXE = 1 << 13
CR4_FSGSBASE = 1 << 16
CR4_OSXSAVE = 1 << 18
CR4_SMEP = 1 << 20
CR4_SMAP = 1 << 21

# EFER (MSR 0xC0000080)
EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11
EFER_SVME = 1 << 12

# RFLAGS
RFLAGS_CF = 1 << 0
RFLAGS_RESERVED1 = 1 << 1  # always 1
RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_IOPL3 = 3 << 12

# Page-table entry bits (SDM 4.5)
PTE_PRESENT = 1 << 0
PTE_WRITE = 1 << 1
PTE_USER = 1 << 2
PTE_ACCESSED = 1 << 5
PTE_DIRTY = 1 << 6
PTE_PS = 1 << 7  # 2 MiB / 1 GiB page in a PD / PDPT entry
PTE_NX = 1 << 63
PTE_ADDR_MASK = 0x000F_FFFF_FFFF_F000

# Local APIC (SDM 11.4)
APIC_DEFAULT_BASE = 0xFEE0_0000
APIC_BASE_ENABLE = 1 << 11
APIC_BASE_BSP = 1 << 8
APIC_ID = 0x20
APIC_TPR = 0x80
APIC_EOI = 0xB0
APIC_SPIV = 0xF0
APIC_ISR = 0x100  # in-service register, 8 x 32 bits at 16-byte strides (SDM vol. 3A 11.8.4)
APIC_IRR = 0x200  # interrupt request register, the same shape
APIC_ICR_LOW = 0x300
APIC_ICR_HIGH = 0x310
APIC_LVTT = 0x320
APIC_LVT0 = 0x350
APIC_LVT1 = 0x360
APIC_TMICT = 0x380
APIC_TMCCT = 0x390
APIC_TDCR = 0x3E0
APIC_SPIV_ENABLE = 1 << 8
APIC_LVT_MASKED = 1 << 16
APIC_LVT_TIMER_ONESHOT = 0 << 17
APIC_LVT_TIMER_PERIODIC = 1 << 17
APIC_LVT_TIMER_TSCDEADLINE = 2 << 17
APIC_TDCR_DIV_1 = 0xB
