"""The 16550A UART driven the way Linux's 8250 driver drives it."""

from __future__ import annotations

import json
import threading

import pytest

from kvmkit.devices.irq import NoIrq
from kvmkit.devices.legacy.serial import Serial8250, SerialState
from kvmkit.snapshot.format import SnapshotError

THR = RBR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR, MCR, LSR, MSR, SCR = 3, 4, 5, 6, 7


class Uart:
    def __init__(self, **kw: int) -> None:
        self.irq = NoIrq()
        self.out: list[bytes] = []
        self.dev = Serial8250(self.irq, self.out.append, **kw)

    def inb(self, off: int) -> int:
        buf = bytearray(1)
        self.dev.read(off, memoryview(buf))
        return buf[0]

    def outb(self, off: int, value: int) -> None:
        self.dev.write(off, memoryview(bytearray([value])))

    @property
    def output(self) -> bytes:
        return b"".join(self.out)


def test_idle_registers() -> None:
    u = Uart()
    assert u.inb(LSR) == 0x60
    assert u.inb(IIR) == 0x01
    assert u.inb(IER) == 0
    assert u.inb(MSR) & 0xF0 == 0xB0
    assert u.irq.count == 0


def autoconfig(u: Uart) -> str:
    """The probe sequence of autoconfig() and autoconfig_16550a() in Linux 6.1's
    drivers/tty/serial/8250/8250_port.c; returns the port type it settles on."""
    # Existence test on IER.
    scratch = u.inb(IER)
    u.outb(IER, 0)
    assert u.inb(IER) & 0x0F == 0
    u.outb(IER, 0x0F)
    assert u.inb(IER) & 0x0F == 0x0F
    u.outb(IER, scratch)
    # Loopback test: MCR = LOOP | OUT2 | RTS -> MSR upper nibble 0x90.
    save_mcr = u.inb(MCR)
    u.outb(MCR, 0x10 | 0x0A)
    assert u.inb(MSR) & 0xF0 == 0x90
    u.outb(MCR, save_mcr)
    # FIFO probe.
    u.outb(LCR, 0xBF)
    u.outb(2, 0)  # EFR on 16650s, FCR here
    u.outb(LCR, 0)
    u.outb(FCR, 0x01)
    if u.inb(IIR) >> 6 != 3:
        return "not a 16550A"
    # autoconfig_16550a: EFR with LCR=0x80 or 0xBF would read 0.
    u.outb(LCR, 0x80)
    if u.inb(2) == 0:
        return "ST16650"
    u.outb(LCR, 0xBF)
    if u.inb(2) == 0:
        return "EFRv2"
    # NS16550A: MCR bit 4 visible at offset 2 with LCR=0xE0.
    u.outb(LCR, 0)
    status1 = u.inb(MCR)
    u.outb(LCR, 0xE0)
    if not (u.inb(2) ^ status1) & 0x10:
        u.outb(LCR, 0)
        u.outb(MCR, status1 ^ 0x10)
        u.outb(LCR, 0xE0)
        status2 = u.inb(2)
        u.outb(LCR, 0)
        u.outb(MCR, status1)
        if (status2 ^ status1) & 0x10:
            return "NS16550A"
    # TI16750: IIR bit 5 follows FCR bit 5 only when it was written with DLAB set.
    u.outb(LCR, 0)
    u.outb(FCR, 0x01 | 0x20)
    status1 = u.inb(IIR) >> 5
    u.outb(FCR, 0x01)
    u.outb(LCR, 0x80)
    u.outb(FCR, 0x01 | 0x20)
    status2 = u.inb(IIR) >> 5
    u.outb(FCR, 0x01)
    u.outb(LCR, 0)
    if status1 == 6 and status2 == 7:
        return "TI16750"
    # Not an XScale: IER bit 6 does not stick.
    u.outb(IER, 0x40)
    if u.inb(IER) & 0x40:
        return "XScale"
    return "16550A"


def test_linux_autoconfig_finds_a_ti16750_by_default() -> None:
    u = Uart()
    assert autoconfig(u) == "TI16750"
    # serial8250_do_set_termios for a 16750: FCR (64-byte mode) written with DLAB set.
    u.outb(LCR, 0x83)
    u.outb(FCR, 0xA1)
    u.outb(LCR, 0x03)
    assert u.inb(IIR) == 0xE1  # FIFOs on, 64-byte mode, no interrupt
    # Written without DLAB, bit 5 cannot change (TL16C750 datasheet, FCR bit 5).
    u.outb(FCR, 0x01)
    assert u.inb(IIR) == 0xE1
    u.outb(FCR, 0x00)  # FIFOs off: no FIFO bits at all
    assert u.inb(IIR) == 0x01
    for v in (0x55, 0xAA):
        u.outb(SCR, v)
        assert u.inb(SCR) == v
    assert u.output == b""


def test_linux_autoconfig_finds_a_16550a_without_fifo64() -> None:
    u = Uart(fifo64=False)
    assert autoconfig(u) == "16550A"
    u.outb(LCR, 0x83)
    u.outb(FCR, 0xA1)
    u.outb(LCR, 0x03)
    assert u.inb(IIR) == 0xC1
    assert u.output == b""


def test_write_burst_is_many_thr_writes_with_one_interrupt() -> None:
    u = Uart()
    u.outb(IER, 0x02)  # THRE interrupt on
    assert u.inb(IIR) & 0x0F == 0x02  # (raised by enabling it, cleared by this read)
    before = u.irq.count
    u.dev.write_burst(THR, bytes(range(200)))
    assert u.output == bytes(range(200))
    assert u.irq.count == before + 1
    assert u.inb(IIR) & 0x0F == 0x02  # THR empty again, reported once
    assert u.inb(IIR) & 0x0F == 0x01


def test_write_burst_with_dlab_sets_the_divisor_and_prints_nothing() -> None:
    u = Uart()
    u.outb(LCR, 0x83)
    u.dev.write_burst(DLL, b"\x05\x01")  # the last write wins, as byte by byte
    assert u.inb(DLL) == 0x01
    u.outb(LCR, 0x03)
    assert u.output == b""
    u.outb(MCR, 0x10)  # loopback: the bytes come back in RBR, not out
    u.dev.write_burst(THR, b"ab")
    assert u.output == b""
    assert (u.inb(RBR), u.inb(RBR)) == (ord("a"), ord("b"))


def test_divisor_latch() -> None:
    u = Uart()
    u.outb(LCR, 0x83)
    u.outb(DLL, 0x01)
    u.outb(DLM, 0x00)
    assert (u.inb(DLL), u.inb(DLM)) == (1, 0)
    u.outb(LCR, 0x03)
    assert u.inb(IER) == 0
    assert u.inb(LCR) == 0x03
    assert u.output == b""


def test_thre_interrupt_on_enable_and_reassert() -> None:
    """serial8250_do_startup's THRE test: IIR must report THRE after enabling ETBEI, and again
    after disabling and re-enabling it."""
    u = Uart()
    u.outb(FCR, 0x07)
    u.outb(IER, 0x02)
    assert u.irq.count == 1
    assert u.inb(IIR) == 0xC2
    assert u.inb(IIR) == 0xC1  # reading IIR cleared the THRE interrupt
    u.outb(IER, 0)
    u.outb(IER, 0x02)
    assert u.irq.count == 2
    assert u.inb(IIR) & 0x0F == 0x02
    u.outb(IER, 0)


def test_thre_interrupt_after_each_write() -> None:
    u = Uart()
    u.outb(IER, 0x02)
    u.inb(IIR)
    n = u.irq.count
    for c in b"ok\n":
        assert u.inb(LSR) & 0x20
        u.outb(THR, c)
        assert u.inb(LSR) == 0x60
    assert u.output == b"ok\n" and u.out == [b"o", b"k", b"\n"]
    assert u.irq.count == n + 3
    assert u.inb(IIR) & 0x0F == 0x02


def test_no_interrupt_without_ier() -> None:
    u = Uart()
    u.outb(THR, ord("x"))
    u.dev.enqueue_input(b"y")
    assert u.irq.count == 0
    assert u.inb(IIR) & 0x0F == 0x01


def test_input_raises_rda_and_reads_in_order() -> None:
    u = Uart()
    u.outb(IER, 0x01)
    assert u.irq.count == 0
    assert u.dev.enqueue_input(b"hi") == 2
    assert u.irq.count == 1
    assert u.inb(LSR) == 0x61
    assert u.inb(IIR) & 0x0F == 0x04
    assert u.inb(RBR) == ord("h")
    u.dev.enqueue_input(b"!")  # RDA still pending: no new edge
    assert u.irq.count == 1
    assert bytes([u.inb(RBR), u.inb(RBR)]) == b"i!"
    assert u.inb(LSR) == 0x60 and u.inb(IIR) & 0x0F == 0x01


def test_rda_priority_over_thre_and_enable_with_data_waiting() -> None:
    u = Uart()
    u.dev.enqueue_input(b"a")
    u.outb(IER, 0x03)
    assert u.irq.count == 1
    assert u.inb(IIR) & 0x0F == 0x04
    u.inb(RBR)
    assert u.inb(IIR) & 0x0F == 0x02


def test_input_fifo_is_bounded() -> None:
    u = Uart(fifo_size=4)
    assert u.dev.enqueue_input(b"abcdef") == 4
    assert u.dev.input_space() == 0
    assert u.dev.enqueue_input(b"g") == 0
    assert bytes(u.inb(RBR) for _ in range(4)) == b"abcd"
    assert u.dev.input_space() == 4


def test_fcr_clears_receive_fifo() -> None:
    u = Uart()
    u.dev.enqueue_input(b"junk")
    u.outb(FCR, 0x01 | 0x02)
    assert not u.inb(LSR) & 0x01


def test_loopback_echoes_into_rbr_not_output() -> None:
    u = Uart()
    u.outb(MCR, 0x10)
    u.outb(IER, 0x01)
    u.outb(THR, 0x5A)
    assert u.output == b""
    assert u.irq.count == 1
    assert u.inb(LSR) & 0x01 and u.inb(RBR) == 0x5A
    assert u.dev.enqueue_input(b"x") == 0  # the line is disconnected in loopback


def test_modem_status_deltas_in_loopback() -> None:
    u = Uart()
    u.outb(MCR, 0x10)  # loopback, all outputs off: CTS/DSR/DCD drop
    msr = u.inb(MSR)
    assert msr & 0xF0 == 0 and msr & 0x0B == 0x0B
    assert u.inb(MSR) & 0x0F == 0  # deltas cleared by the read


def test_bad_accesses_are_ignored() -> None:
    u = Uart()
    buf = bytearray(4)
    u.dev.read(0, memoryview(buf))
    assert buf == b"\xff" * 4
    u.dev.write(0, memoryview(b"abcd"))
    u.dev.write(8, memoryview(b"a"))
    u.dev.read(-1, memoryview(bytearray(1)))
    u.dev.read(100, memoryview(bytearray(1)))
    assert u.output == b"" and u.inb(LSR) == 0x60


def test_output_callback_failure_does_not_raise() -> None:
    def broken(data: bytes) -> None:
        raise BrokenPipeError

    dev = Serial8250(NoIrq(), broken)
    dev.write(0, memoryview(b"x"))


def test_save_restore_round_trip_as_json() -> None:
    u = Uart()
    u.outb(LCR, 0x83)
    u.outb(DLL, 3)
    u.outb(LCR, 0x1B)
    u.outb(IER, 0x03)
    u.outb(FCR, 0xC1)
    u.outb(SCR, 0x42)
    u.outb(MCR, 0x0B)
    u.dev.enqueue_input(b"xyz")
    state = SerialState.from_dict(json.loads(json.dumps(u.dev.save().to_dict())))
    v = Uart()
    v.dev.restore(state)
    assert v.dev.save() == u.dev.save()
    assert v.inb(LCR) == 0x1B and v.inb(SCR) == 0x42 and v.inb(IER) == 0x03
    assert v.inb(IIR) == 0xC4
    assert bytes(v.inb(RBR) for _ in range(3)) == b"xyz"


@pytest.mark.parametrize(
    "patch",
    [{"version": 99}, {"ier": 256}, {"rx": [1, 2, 300]}, {"rx": "abc"}, {"fifo_enabled": 1},
     {"lcr": True}],
)  # fmt: skip
def test_bad_state_is_refused_before_any_device(patch: dict[str, object]) -> None:
    # The typed state checks data read from a file by itself (a restore does so before a
    # VM exists); a version-1 state (no 64-byte FIFO mode) still loads.
    u = Uart()
    state = {**u.dev.save().to_dict(), **patch}
    with pytest.raises(SnapshotError, match=r"snapshot state: serial"):
        SerialState.from_dict(state)
    old = {k: v for k, v in u.dev.save().to_dict().items() if k != "fifo64_mode"}
    assert not SerialState.from_dict({**old, "version": 1}).fifo64_mode


def test_restore_refuses_more_input_than_the_fifo_holds() -> None:
    small = Serial8250(NoIrq(), lambda data: None, fifo_size=2)
    before = small.save()
    state = SerialState.from_dict({**before.to_dict(), "rx": [1, 2, 3]})
    with pytest.raises(SnapshotError, match="FIFO 2"):
        small.restore(state)
    assert small.save() == before


def test_concurrent_writers_and_input() -> None:
    u = Uart()
    u.outb(IER, 0x03)

    def writer(ch: int) -> None:
        for _ in range(500):
            u.outb(THR, ch)

    def feeder() -> None:
        for _ in range(500):
            if u.dev.enqueue_input(b"i") == 0:
                u.inb(RBR)

    threads = [threading.Thread(target=writer, args=(c,)) for c in b"ab"]
    threads.append(threading.Thread(target=feeder))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(u.output) == sorted(b"a" * 500 + b"b" * 500)


def test_flow_control_holds_thre_until_the_line_is_free() -> None:
    """With the console full (tx_ready False) the transmitter reads busy: LSR THRE/TEMT
    clear, no THRE interrupt after a write or when ETBEI is enabled; tx_space() then raises
    THRE and its interrupt, which is what Linux's serial8250_tx_chars waits for."""
    ready = [True]
    u = Uart(tx_ready=lambda: ready[0])
    u.outb(IER, 0x02)
    u.inb(IIR)
    n = u.irq.count
    u.outb(THR, ord("a"))
    assert u.irq.count == n + 1 and u.inb(LSR) == 0x60
    u.inb(IIR)
    ready[0] = False
    u.outb(THR, ord("b"))  # the byte is taken (a FIFO load under way), then the line holds
    assert u.output == b"ab"
    assert u.inb(LSR) & 0x60 == 0 and u.inb(IIR) & 0x0F == 0x01
    assert u.irq.count == n + 1
    u.outb(IER, 0)
    u.outb(IER, 0x02)  # re-enabling ETBEI does not report an empty THR either
    assert u.irq.count == n + 1 and u.inb(IIR) & 0x0F == 0x01
    ready[0] = True
    u.dev.tx_space()
    assert u.irq.count == n + 2 and u.inb(LSR) == 0x60
    u.dev.tx_space()  # THRE already pending: no second interrupt
    assert u.irq.count == n + 2 and u.inb(IIR) & 0x0F == 0x02
