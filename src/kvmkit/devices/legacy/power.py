"""ACPI hardware-reduced power management registers: sleep control, sleep status, reset.

A hardware-reduced ACPI platform (ACPI 6.5 section 4.1, FADT flag HW_REDUCED_ACPI) has no PM1
event/control blocks; the FADT points at two byte-wide registers instead (section 4.8.3.7):

- SLEEP_CONTROL_REG: the OS writes SLP_TYPx (bits 4:2, from the \\_Sx package of the DSDT)
  with SLP_EN (bit 5) to enter sleep state x. Linux's poweroff writes (S5 type << 2) | 0x20.
- SLEEP_STATUS_REG: WAK_STS (bit 7), write 1 to clear; Linux clears it before sleeping.
- RESET_REG (FADT, section 4.8.3.6): the OS writes RESET_VALUE to reset the machine.

kvmkit keeps the three in one 3-port device (Cloud Hypervisor uses a similar single
"AcpiShutdownDevice"):

    PM_BASE + 0  sleep control    (FADT SLEEP_CONTROL_REG, 8-bit I/O)
    PM_BASE + 1  sleep status     (FADT SLEEP_STATUS_REG,  8-bit I/O)
    PM_BASE + 2  reset            (FADT RESET_REG,         8-bit I/O, value RESET_VALUE)

The callbacks run on the vCPU thread that made the access and must not wait for vCPUs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

PM_BASE = 0x600
PM_LEN = 3
SLEEP_CONTROL_OFFSET = 0
SLEEP_STATUS_OFFSET = 1
RESET_OFFSET = 2
SLEEP_CONTROL_PORT = PM_BASE + SLEEP_CONTROL_OFFSET
SLEEP_STATUS_PORT = PM_BASE + SLEEP_STATUS_OFFSET
RESET_PORT = PM_BASE + RESET_OFFSET

# The \_S5_ package of kvmkit's DSDT says sleep type 5 (any 3-bit value would do; Cloud
# Hypervisor uses 5 too), so poweroff writes (5 << 2) | SLP_EN = 0x34.
S5_SLEEP_TYPE = 5
RESET_VALUE = 0x01

SLP_TYP_SHIFT = 2  # ACPI 6.5 table 4-19 (Sleep Control Register)
SLP_TYP_MASK = 0x7 << SLP_TYP_SHIFT
SLP_EN = 1 << 5
WAK_STS = 1 << 7  # table 4-20 (Sleep Status Register)


class AcpiPower:
    """The three registers above, at offsets 0, 1, 2 of a `LENGTH`-port range at `BASE`."""

    BASE = PM_BASE
    LENGTH = PM_LEN
    SLEEP_CONTROL_PORT = SLEEP_CONTROL_PORT
    SLEEP_STATUS_PORT = SLEEP_STATUS_PORT
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
        self._wak_sts = 0

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))
        if len(data) != 1 or not 0 <= offset < PM_LEN:
            log.debug("acpi pm: ignored %d-byte read at offset %d", len(data), offset)
        elif offset == SLEEP_STATUS_OFFSET:
            with self._lock:
                data[0] = self._wak_sts

    def write(self, offset: int, data: memoryview) -> None:
        if len(data) != 1 or not 0 <= offset < PM_LEN:
            log.debug("acpi pm: ignored %d-byte write at offset %d", len(data), offset)
            return
        value = data[0]
        if offset == SLEEP_CONTROL_OFFSET:
            if not value & SLP_EN:
                return
            sleep_type = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT
            if sleep_type == self.s5_sleep_type:
                self._on_poweroff()
            else:
                log.info("acpi pm: guest asked for unsupported sleep type %d", sleep_type)
        elif offset == SLEEP_STATUS_OFFSET:
            with self._lock:
                self._wak_sts &= ~(value & WAK_STS)  # write 1 to clear
        elif value == self.reset_value:
            self._on_reset()
        else:
            log.debug("acpi pm: reset register written with %#x (not %#x)", value, self.reset_value)
