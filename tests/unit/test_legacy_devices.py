"""i8042 reset line and probe answers, ACPI power registers, CMOS RTC."""

from __future__ import annotations

import calendar
import time

import pytest

from kvmkit.devices.bus import Bus
from kvmkit.devices.legacy import i8042 as kbc
from kvmkit.devices.legacy.i8042 import I8042
from kvmkit.devices.legacy.power import (
    S5_SLEEP_TYPE,
    AcpiPower,
)
from kvmkit.devices.legacy.rtc import CmosRtc, from_bcd, to_bcd


class Ports:
    """Port I/O through a Bus, as the vCPU loop does it."""

    def __init__(self) -> None:
        self.bus = Bus("pio")

    def inb(self, port: int) -> int:
        buf = bytearray(1)
        assert self.bus.read(port, memoryview(buf))
        return buf[0]

    def outb(self, port: int, value: int) -> None:
        assert self.bus.write(port, memoryview(bytearray([value])))


class Counter:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> None:
        self.n += 1


# -- i8042
@pytest.fixture
def kbd() -> tuple[Ports, Counter]:
    p, resets = Ports(), Counter()
    p.bus.insert(I8042(on_reset=resets), I8042.BASE, I8042.LENGTH, "i8042")
    return p, resets


def command(p: Ports, cmd: int, *params: int) -> list[int]:
    assert not p.inb(0x64) & kbc.STR_IBF
    p.outb(0x64, cmd)
    for v in params:
        p.outb(0x60, v)
    out = []
    while p.inb(0x64) & kbc.STR_OBF:
        out.append(p.inb(0x60))
    return out


def test_i8042_idle_status_has_no_data(kbd: tuple[Ports, Counter]) -> None:
    p, _ = kbd
    status = p.inb(0x64)
    assert not status & (kbc.STR_OBF | kbc.STR_IBF | kbc.STR_AUXDATA)


def test_i8042_reset_command_pulses_reset(kbd: tuple[Ports, Counter]) -> None:
    p, resets = kbd
    p.outb(0x64, 0xFE)
    assert resets.n == 1
    p.outb(0x64, 0xFF)  # pulses no line
    assert resets.n == 1
    command(p, 0xD1, 0xFE)  # write output port with the reset line low
    assert resets.n == 2


def test_i8042_linux_probe_sequence(kbd: tuple[Ports, Counter]) -> None:
    p, resets = kbd
    assert command(p, 0xAA) == [0x55]  # self test
    ctr = command(p, 0x20)
    assert len(ctr) == 1 and ctr == command(p, 0x20)  # two matching CTR reads
    assert command(p, 0x60, 0x47) == []
    assert command(p, 0x20) == [0x47]
    assert command(p, 0xAB) == [0x00]  # keyboard interface test
    # AUX loop answered without AUXDATA, AUX test says clock stuck: no AUX port.
    p.outb(0x64, 0xD3)
    p.outb(0x60, 0x5A)
    status = p.inb(0x64)
    assert status & kbc.STR_OBF and not status & kbc.STR_AUXDATA
    assert p.inb(0x60) == 0x5A
    assert command(p, 0xA9) == [0x01]
    # Port enable/disable toggle CTR bits.
    command(p, 0xA7)
    assert command(p, 0x20)[0] & kbc.CTR_AUXDIS
    command(p, 0xA8)
    assert not command(p, 0x20)[0] & kbc.CTR_AUXDIS
    command(p, 0xAD)
    assert command(p, 0x20)[0] & kbc.CTR_KBDDIS
    command(p, 0xAE)
    assert not command(p, 0x20)[0] & kbc.CTR_KBDDIS
    assert command(p, 0xD0) == [0x03]
    assert command(p, 0xD2, 0x99) == [0x99]
    assert resets.n == 0


def test_i8042_keyboard_bytes_and_bad_accesses_are_dropped(kbd: tuple[Ports, Counter]) -> None:
    p, resets = kbd
    p.outb(0x60, 0xF2)  # keyboard GET ID: no keyboard
    assert not p.inb(0x64) & kbc.STR_OBF
    buf = bytearray(2)
    p.bus.read(0x60, memoryview(buf))
    assert buf == b"\xff\xff"
    p.bus.write(0x64, memoryview(b"\xfe\x00"))  # a 2-byte write is not the reset command
    p.outb(0x61, 0xFE)
    assert p.inb(0x62) == 0xFF
    assert resets.n == 0


def test_i8042_output_buffer_is_bounded(kbd: tuple[Ports, Counter]) -> None:
    p, _ = kbd
    for _ in range(100):
        p.outb(0x64, 0x20)
    assert len(command(p, 0x20)) == kbc.OUTBUF_SIZE


# -- ACPI power registers
@pytest.fixture
def power() -> tuple[Ports, Counter, Counter]:
    p, off, reset = Ports(), Counter(), Counter()
    p.bus.insert(AcpiPower(on_poweroff=off, on_reset=reset), AcpiPower.BASE, AcpiPower.LENGTH)
    return p, off, reset


def outw(p: Ports, port: int, value: int) -> None:
    p.bus.write(port, memoryview(value.to_bytes(2, "little")))


def inw(p: Ports, port: int) -> int:
    buf = bytearray(2)
    p.bus.read(port, memoryview(buf))
    return int.from_bytes(buf, "little")


def test_power_s5_write_powers_off_as_linux_does(power: tuple[Ports, Counter, Counter]) -> None:
    p, off, reset = power
    # The platform is always in ACPI mode: SCI_EN reads 1, so Linux needs no SMI_CMD.
    assert inw(p, AcpiPower.PM1_CNT_PORT) & 1 == 1
    outw(p, AcpiPower.PM1_EVT_PORT, 0x8000)  # acpi_hw_legacy_sleep clears WAK_STS first
    assert inw(p, AcpiPower.PM1_EVT_PORT) == 0
    # It writes SLP_TYP first, then SLP_TYP | SLP_EN (ACPI 6.5 7.4.2 / 16.1.6).
    outw(p, AcpiPower.PM1_CNT_PORT, (S5_SLEEP_TYPE << 10) | 1)
    assert off.n == 0
    outw(p, AcpiPower.PM1_CNT_PORT, (S5_SLEEP_TYPE << 10) | (1 << 13) | 1)
    assert (off.n, reset.n) == (1, 0)


def test_power_other_sleep_states_ignored(power: tuple[Ports, Counter, Counter]) -> None:
    p, off, reset = power
    for typ in range(8):
        if typ != S5_SLEEP_TYPE:
            outw(p, AcpiPower.PM1_CNT_PORT, (typ << 10) | (1 << 13))
    assert (off.n, reset.n) == (0, 0)


def test_power_byte_writes_of_the_control_register(power: tuple[Ports, Counter, Counter]) -> None:
    p, off, _ = power
    p.outb(AcpiPower.PM1_CNT_PORT, 0x01)
    p.outb(AcpiPower.PM1_CNT_PORT + 1, ((S5_SLEEP_TYPE << 10) | (1 << 13)) >> 8)
    assert off.n == 1


def test_power_reset_value(power: tuple[Ports, Counter, Counter]) -> None:
    p, off, reset = power
    p.outb(AcpiPower.RESET_PORT, 0x06)
    assert reset.n == 0
    p.outb(AcpiPower.RESET_PORT, 0x01)
    assert (off.n, reset.n) == (0, 1)


def test_power_bad_sizes_ignored(power: tuple[Ports, Counter, Counter]) -> None:
    p, off, reset = power
    p.bus.write(AcpiPower.PM1_CNT_PORT, memoryview(b"\x00\x34\x00"))
    buf = bytearray(b"\xaa\xaa\xaa")
    p.bus.read(AcpiPower.BASE, memoryview(buf))
    assert buf == b"\xaa\xaa\xaa" or buf == b"\0\0\0"
    assert (off.n, reset.n) == (0, 0)


# -- CMOS RTC
FIXED = calendar.timegm((2026, 11, 22, 21, 45, 7, 0, 0, 0))  # a Sunday


def rtc_ports(clock: float = FIXED) -> Ports:
    p = Ports()
    p.bus.insert(CmosRtc(clock=lambda: clock), CmosRtc.BASE, CmosRtc.LENGTH, "rtc")
    return p


def cmos(p: Ports, reg: int) -> int:
    p.outb(0x70, reg | 0x80)  # with the NMI-disable bit, as Linux does
    return p.inb(0x71)


def cmos_write(p: Ports, reg: int, value: int) -> None:
    p.outb(0x70, reg)
    p.outb(0x71, value)


def test_bcd() -> None:
    assert to_bcd(59) == 0x59 and from_bcd(0x59) == 59


def test_rtc_reads_host_time_in_bcd() -> None:
    p = rtc_ports()
    assert [cmos(p, r) for r in (0, 2, 4, 6, 7, 8, 9, 0x32)] == [
        0x07, 0x45, 0x21, 0x01, 0x22, 0x11, 0x26, 0x20,
    ]  # fmt: skip
    assert cmos(p, 0x0A) == 0x26  # UIP clear
    assert cmos(p, 0x0B) == 0x02
    assert cmos(p, 0x0C) == 0
    assert cmos(p, 0x0D) == 0x80


def test_rtc_uip_never_set_even_if_written() -> None:
    p = rtc_ports()
    cmos_write(p, 0x0A, 0xA6)
    assert cmos(p, 0x0A) == 0x26


def test_rtc_binary_and_12_hour_modes() -> None:
    p = rtc_ports()
    cmos_write(p, 0x0B, 0x04)  # binary, 12-hour
    assert cmos(p, 0) == 7 and cmos(p, 2) == 45
    assert cmos(p, 4) == 0x80 | 9  # 9 PM


def test_rtc_guest_sets_time_with_set_bit() -> None:
    p = rtc_ports()
    cmos_write(p, 0x0B, 0x82)  # SET: updates stop
    for reg, value in ((0, 0x30), (2, 0x15), (4, 0x08), (7, 0x01), (8, 0x02), (9, 0x27)):
        cmos_write(p, reg, value)
    assert cmos(p, 0) == 0x30  # frozen values read back
    cmos_write(p, 0x0B, 0x02)
    assert [cmos(p, r) for r in (0, 2, 4, 7, 8, 9, 0x32)] == [
        0x30, 0x15, 0x08, 0x01, 0x02, 0x27, 0x20,
    ]  # fmt: skip


def test_rtc_invalid_time_ignored_and_ram_kept() -> None:
    p = rtc_ports()
    cmos_write(p, 8, 0x13)  # month 13
    assert cmos(p, 8) == 0x11
    cmos_write(p, 0x40, 0x5A)
    assert cmos(p, 0x40) == 0x5A
    cmos_write(p, 0x0D, 0)
    assert cmos(p, 0x0D) == 0x80


def test_rtc_follows_the_clock() -> None:
    p = Ports()
    now = [float(FIXED)]
    p.bus.insert(CmosRtc(clock=lambda: now[0]), 0x70, 2)
    now[0] += 61
    assert (cmos(p, 0), cmos(p, 2)) == (0x08, 0x46)


def test_rtc_real_clock_is_close_to_host_time() -> None:
    p = Ports()
    p.bus.insert(CmosRtc(), 0x70, 2)
    t = time.gmtime()
    assert from_bcd(cmos(p, 9)) == t.tm_year % 100


def test_rtc_bad_accesses() -> None:
    p = rtc_ports()
    buf = bytearray(2)
    p.bus.read(0x70, memoryview(buf))
    assert buf == b"\xff\xff"
    p.bus.write(0x70, memoryview(b"\x00\x00"))
    assert cmos(p, 0) == 0x07
