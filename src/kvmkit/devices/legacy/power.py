"""ACPI fixed-hardware power management registers: PM1a event and control blocks, reset.

kvmkit describes a classic (not hardware-reduced) ACPI PC: with HW_REDUCED_ACPI, Linux
installs no legacy PIC and maps no ISA IRQs, so the 8250 at IRQ 4 (and the RTC) could not get
their interrupts unless every legacy device were described in AML. With PM1 blocks in the
FADT, Linux keeps the PC's identity mapping of ISA IRQs 0-15 to IOAPIC pins, as on QEMU's pc.

Registers (ACPI 6.5 section 4.8.3):

    PM_BASE + 0  PM1a_STS  16 bit  (4.8.3.1.1) write 1 to clear; WAK_STS bit 15
    PM_BASE + 2  PM1a_EN   16 bit  (4.8.3.1.2) enables; kvmkit raises no SCI, values kept
    PM_BASE + 4  PM1a_CNT  16 bit  (4.8.3.2.1) SCI_EN bit 0 (reads 1: the platform is always
                                   in ACPI mode, so the OS needs no SMI_CMD), SLP_TYPx bits
                                   12:10, SLP_EN bit 13: Linux's poweroff writes
                                   (S5 type << 10) | SLP_EN
    PM_BASE + 8  RESET_REG  8 bit  (4.8.3.6) the FADT's reset register; RESET_VALUE resets

The callbacks run on the vCPU thread that made the access and must not wait for vCPUs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from kvmkit.guestlog import GuestLog

log = logging.getLogger(__name__)
# Lines a guest can cause, rate-limited (kvmkit.guestlog).
glog = GuestLog(log)

PM_BASE = 0x600
PM_LEN = 9
PM1_STS_OFFSET = 0
PM1_EN_OFFSET = 2
PM1_CNT_OFFSET = 4
RESET_OFFSET = 8
PM1_EVT_PORT = PM_BASE + PM1_STS_OFFSET
PM1_CNT_PORT = PM_BASE + PM1_CNT_OFFSET
RESET_PORT = PM_BASE + RESET_OFFSET
PM1_EVT_LEN = 4
PM1_CNT_LEN = 2

# The \_S5_ package of kvmkit's DSDT says sleep type 5, so poweroff writes 0x3400 (plus
# SCI_EN, which Linux preserves) to PM1a_CNT.
S5_SLEEP_TYPE = 5
RESET_VALUE = 0x01

SCI_EN = 1 << 0
SLP_TYP_SHIFT = 10  # table 4-16 (PM1 Control Registers Fixed Hardware Feature Control Bits)
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 13
WAK_STS = 1 << 15  # table 4-12 (PM1 Status Registers)


class AcpiPower:
    """The PM1a event/control blocks and the reset register, one `LENGTH`-port range."""

    BASE = PM_BASE
    LENGTH = PM_LEN
    PM1_EVT_PORT = PM1_EVT_PORT
    PM1_CNT_PORT = PM1_CNT_PORT
    RESET_PORT = RESET_PORT

    def __init__(
        self,
        on_poweroff: Callable[[], None],
        on_reset: Callable[[], None],
        *,
        s5_sleep_type: int = S5_SLEEP_TYPE,
        reset_value: int = RESET_VALUE,
    ) -> None:
        self._on_poweroff = on_poweroff
        self._on_reset = on_reset
        self.s5_sleep_type = s5_sleep_type & 0x7
        self.reset_value = reset_value & 0xFF
        self._lock = threading.Lock()
        # Register file as bytes, so 8- and 16-bit accesses at any offset behave alike.
        self._regs = bytearray(RESET_OFFSET)
        self._regs[PM1_CNT_OFFSET] = SCI_EN

    def read(self, offset: int, data: memoryview) -> None:
        n = len(data)
        data[:] = bytes(n)
        if n not in (1, 2, 4) or offset < 0 or offset + n > PM_LEN:
            glog.debug("acpi pm: ignored %d-byte read at offset %d", n, offset)
            return
        with self._lock:
            for i in range(n):
                at = offset + i
                data[i] = self._regs[at] if at < RESET_OFFSET else 0

    def write(self, offset: int, data: memoryview) -> None:
        n = len(data)
        if n not in (1, 2, 4) or offset < 0 or offset + n > PM_LEN:
            glog.debug("acpi pm: ignored %d-byte write at offset %d", n, offset)
            return
        if offset == RESET_OFFSET:
            if data[0] == self.reset_value:
                self._on_reset()
            return
        poweroff = False
        with self._lock:
            for i in range(n):
                at = offset + i
                if at >= RESET_OFFSET:
                    continue
                if at < PM1_EN_OFFSET:
                    self._regs[at] &= ~data[i] & 0xFF  # status bits: write 1 to clear
                else:
                    self._regs[at] = data[i]
            self._regs[PM1_CNT_OFFSET] |= SCI_EN  # always in ACPI mode
            cnt = int.from_bytes(self._regs[PM1_CNT_OFFSET : PM1_CNT_OFFSET + 2], "little")
            if offset <= PM1_CNT_OFFSET + 1 and offset + n > PM1_CNT_OFFSET and cnt & SLP_EN:
                self._regs[PM1_CNT_OFFSET + 1] &= ~(SLP_EN >> 8) & 0xFF  # SLP_EN reads 0
                sleep_type = (cnt & SLP_TYP_MASK) >> SLP_TYP_SHIFT
                if sleep_type == self.s5_sleep_type:
                    poweroff = True
                else:
                    glog.info("acpi pm: guest asked for unsupported sleep type %d", sleep_type)
        if poweroff:
            self._on_poweroff()
