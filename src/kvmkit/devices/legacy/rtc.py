"""A minimal MC146818 CMOS real-time clock at ports 0x70 (index) and 0x71 (data).

Registers (Motorola MC146818A datasheet, "Address Map" and "Registers"):

    0x00 seconds   0x02 minutes   0x04 hours   0x06 day of week (1 = Sunday)
    0x07 day of month   0x08 month   0x09 year (two digits)   0x32 century (IBM PC/AT,
        named by the FADT CENTURY field)
    0x01/0x03/0x05 alarm seconds/minutes/hours (stored, never fire)
    0x0A status A: UIP (bit 7) is always 0 -- the time is read from the host clock at once,
        so there is never an update in progress and Linux's mc146818_avoid_UIP() never waits;
        DV2-0 = 010 (32.768 kHz time base), RS3-0 = 0110 (1.024 kHz) -> 0x26
    0x0B status B: SET (7), PIE (6), AIE (5), UIE (4), SQWE (3), DM (2: 1 = binary, 0 = BCD),
        24/12 (1: 1 = 24-hour), DSE (0); default 0x02 (BCD, 24-hour)
    0x0C status C: interrupt flags, read-to-clear; always 0 (no RTC interrupts are raised)
    0x0D status D: VRT (bit 7) = 1, the time and RAM are valid
    0x0E-0x7F battery-backed RAM (0 except the century byte)

The time is the host's UTC time plus an offset the guest sets by writing the time registers
(with SET held, as Linux's mc146818_set_time does; writes without SET take effect at once).
Port 0x70 bit 7 is the NMI mask on a PC; it is accepted and ignored.
"""

from __future__ import annotations

import calendar
import logging
import threading
import time
from collections.abc import Callable

from kvmkit.guestlog import GuestLog

log = logging.getLogger(__name__)
# Lines a guest can cause, rate-limited (kvmkit.guestlog).
glog = GuestLog(log)

BASE = 0x70
LENGTH = 2
INDEX_OFFSET = 0
DATA_OFFSET = 1

REG_SECONDS = 0x00
REG_SECONDS_ALARM = 0x01
REG_MINUTES = 0x02
REG_MINUTES_ALARM = 0x03
REG_HOURS = 0x04
REG_HOURS_ALARM = 0x05
REG_DAY_OF_WEEK = 0x06
REG_DAY_OF_MONTH = 0x07
REG_MONTH = 0x08
REG_YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
REG_CENTURY = 0x32
CMOS_SIZE = 128

A_UIP = 0x80
A_DEFAULT = 0x26
B_SET = 0x80
B_DM_BINARY = 0x04
B_24H = 0x02
B_DEFAULT = B_24H
D_VRT = 0x80
HOUR_PM = 0x80  # 12-hour mode: bit 7 of the hours byte

_TIME_REGS = (
    REG_SECONDS,
    REG_MINUTES,
    REG_HOURS,
    REG_DAY_OF_WEEK,
    REG_DAY_OF_MONTH,
    REG_MONTH,
    REG_YEAR,
    REG_CENTURY,
)


def to_bcd(value: int) -> int:
    return ((value // 10) << 4) | (value % 10)


def from_bcd(value: int) -> int:
    return (value >> 4) * 10 + (value & 0x0F)


class CmosRtc:
    """See the module docstring. `clock` returns seconds since the epoch (UTC)."""

    BASE = BASE
    LENGTH = LENGTH

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._index = 0
        self._ram = bytearray(CMOS_SIZE)
        self._ram[REG_A] = A_DEFAULT
        self._ram[REG_B] = B_DEFAULT
        self._ram[REG_D] = D_VRT
        self._offset = 0  # guest time - host time, in seconds
        self._frozen: dict[int, int] | None = None  # time registers while SET is held

    # -- time <-> registers
    def _encode(self, value: int) -> int:
        return value if self._ram[REG_B] & B_DM_BINARY else to_bcd(value)

    def _decode(self, value: int) -> int:
        return value if self._ram[REG_B] & B_DM_BINARY else from_bcd(value)

    def _time_registers(self) -> dict[int, int]:
        t = time.gmtime(int(self._clock()) + self._offset)
        hour = t.tm_hour
        if self._ram[REG_B] & B_24H:
            hours = self._encode(hour)
        else:
            hours = self._encode(hour % 12 or 12) | (HOUR_PM if hour >= 12 else 0)
        return {
            REG_SECONDS: self._encode(t.tm_sec % 60),
            REG_MINUTES: self._encode(t.tm_min),
            REG_HOURS: hours,
            REG_DAY_OF_WEEK: self._encode((t.tm_wday + 1) % 7 + 1),  # tm_wday 0 = Monday
            REG_DAY_OF_MONTH: self._encode(t.tm_mday),
            REG_MONTH: self._encode(t.tm_mon),
            REG_YEAR: self._encode(t.tm_year % 100),
            REG_CENTURY: self._encode(t.tm_year // 100),
        }

    def _apply_time(self, regs: dict[int, int]) -> None:
        """Set the offset so the clock reads `regs` now; nonsense values are ignored."""
        try:
            hours_raw = regs[REG_HOURS]
            if self._ram[REG_B] & B_24H:
                hour = self._decode(hours_raw)
            else:
                hour = self._decode(hours_raw & ~HOUR_PM) % 12 + (12 if hours_raw & HOUR_PM else 0)
            year = self._decode(regs[REG_CENTURY]) * 100 + self._decode(regs[REG_YEAR])
            when = (
                year,
                self._decode(regs[REG_MONTH]),
                self._decode(regs[REG_DAY_OF_MONTH]),
                hour,
                self._decode(regs[REG_MINUTES]),
                self._decode(regs[REG_SECONDS]),
            )
            if not (1 <= when[1] <= 12 and 1 <= when[2] <= 31 and when[3] < 24):
                raise ValueError(when)
            if not (when[4] < 60 and when[5] < 60):
                raise ValueError(when)
            guest = calendar.timegm((*when, 0, 0, 0))
        except (ValueError, OverflowError) as err:
            glog.debug("rtc: guest set an invalid time %s", err)
            return
        self._offset = guest - int(self._clock())

    # -- BusDevice
    def read(self, offset: int, data: memoryview) -> None:
        if len(data) != 1 or offset not in (INDEX_OFFSET, DATA_OFFSET):
            glog.debug("rtc: ignored %d-byte read at offset %d", len(data), offset)
            data[:] = b"\xff" * len(data)
            return
        with self._lock:
            if offset == INDEX_OFFSET:
                data[0] = self._index  # write-only on real hardware; harmless
                return
            reg = self._index
            if reg in _TIME_REGS:
                regs = self._frozen if self._frozen is not None else self._time_registers()
                value = regs[reg]
            elif reg == REG_A:
                value = self._ram[REG_A] & ~A_UIP
            elif reg == REG_C:
                value = 0  # no interrupt flags; reading clears them anyway
            elif reg == REG_D:
                value = D_VRT
            else:
                value = self._ram[reg]
        data[0] = value

    def write(self, offset: int, data: memoryview) -> None:
        if len(data) != 1 or offset not in (INDEX_OFFSET, DATA_OFFSET):
            glog.debug("rtc: ignored %d-byte write at offset %d", len(data), offset)
            return
        value = data[0]
        with self._lock:
            if offset == INDEX_OFFSET:
                self._index = value & 0x7F  # bit 7: NMI disable on a PC, ignored
                return
            reg = self._index
            if reg in _TIME_REGS:
                if self._frozen is not None:
                    self._frozen[reg] = value
                else:
                    regs = self._time_registers()
                    regs[reg] = value
                    self._apply_time(regs)
            elif reg == REG_A:
                self._ram[REG_A] = value & ~A_UIP  # UIP is read-only
            elif reg == REG_B:
                self._write_b(value)
            elif reg in (REG_C, REG_D):
                pass  # read-only
            else:
                self._ram[reg] = value

    def _write_b(self, value: int) -> None:
        old = self._ram[REG_B]
        if value & B_SET and not old & B_SET:
            self._frozen = self._time_registers()  # updates stop while SET is held
            self._ram[REG_B] = value
        elif not value & B_SET and old & B_SET:
            self._ram[REG_B] = value
            if self._frozen is not None:
                self._apply_time(self._frozen)
            self._frozen = None
        else:
            self._ram[REG_B] = value
