"""MSR values a Linux guest expects at reset (what firmware would leave), for KVM_SET_MSRS.

The list is Firecracker's `create_boot_msr_entries` (arch/src/x86_64/msr.rs), in its order:

- IA32_SYSENTER_CS/ESP/EIP = 0 (SDM vol. 3A 5.8.7): no SYSENTER until the kernel sets them;
- the SYSCALL MSRs STAR, CSTAR, KERNEL_GS_BASE, FMASK (SFMASK), LSTAR = 0 (SDM vol. 3A 5.8.8,
  AMD APM vol. 2 6.1.1): the kernel programs them in syscall_init();
- IA32_TSC = 0 (SDM vol. 3B 18.17): every vCPU starts its TSC at 0. KVM treats TSC writes that
  arrive within a second of each other as one synchronized TSC, so all vCPUs agree;
- IA32_MISC_ENABLE with fast strings (bit 0, SDM vol. 4 table 2-2), as the BIOS leaves it;
  Linux warns when fast string operations are off;
- IA32_MTRR_DEF_TYPE = 0x806 (SDM vol. 3A 12.11.2.1): MTRRs enabled (E, bit 11), default type
  write-back (6). With MTRRs disabled Linux treats all memory as uncached and disables PAT.

`IA32_TSC` comes before anything derived from it (a VMM that later restores TSC_DEADLINE must
write IA32_TSC first: the deadline is compared against the TSC).
"""

from __future__ import annotations

from kvmkit.arch.x86_64 import msr


def boot_msrs(*, tsc: bool = True) -> list[tuple[int, int]]:
    """(index, value) pairs to write with one KVM_SET_MSRS on every vCPU before it first runs.
    `tsc=False` leaves the TSC alone (restoring a snapshot, where it comes from the saved
    state)."""
    entries = [
        (msr.IA32_SYSENTER_CS, 0),
        (msr.IA32_SYSENTER_ESP, 0),
        (msr.IA32_SYSENTER_EIP, 0),
        (msr.IA32_STAR, 0),
        (msr.IA32_CSTAR, 0),
        (msr.IA32_KERNEL_GS_BASE, 0),
        (msr.IA32_FMASK, 0),
        (msr.IA32_LSTAR, 0),
    ]
    if tsc:
        entries.append((msr.IA32_TSC, 0))
    entries += [
        (msr.IA32_MISC_ENABLE, msr.MISC_ENABLE_FAST_STRING),
        (msr.IA32_MTRR_DEF_TYPE, msr.MTRR_DEF_TYPE_E | msr.MTRR_TYPE_WB),
    ]
    return entries
