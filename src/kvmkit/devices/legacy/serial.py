"""A 16550A UART (8250 family), the guest's serial console.

Register map (offsets from the base port, the VMM maps COM1 at 0x3F8 with 8 ports, IRQ 4;
register descriptions from the TI/National PC16550D datasheet, "Register Description", and
Linux's include/uapi/linux/serial_reg.h):

    offset  DLAB=0 read   DLAB=0 write   DLAB=1
    0       RBR           THR            DLL (divisor latch low)
    1       IER           IER            DLM (divisor latch high)
    2       IIR           FCR            (IIR / FCR as with DLAB=0)
    3       LCR           LCR
    4       MCR           MCR
    5       LSR           (ignored)
    6       MSR           (ignored)
    7       SCR           SCR

Behaviour that Linux's 8250 driver depends on (drivers/tty/serial/8250/8250_port.c):
- autoconfig: IER keeps only its low 4 bits; loopback (MCR bit 4) feeds MCR's RTS/DTR/OUT1/
  OUT2 back as CTS/DSR/RI/DCD in MSR; IIR bits 7:6 read 11 once FCR enabled the FIFOs; reads
  of offset 2 with LCR=0xBF are IIR (no EFR).
- 64-byte FIFO mode (TI TL16C750): FCR bit 5 takes effect only while LCR.DLAB is set and IIR
  bit 5 reports it, which is how autoconfig_16550a tells a 16750 (status1 6, status2 7). Linux
  then loads 64 bytes per THRE interrupt instead of 16 (uart_config[PORT_16750].tx_loadsz),
  a quarter of the IIR/LSR/MSR reads per byte of output. Linux probes for it only when built
  with CONFIG_SERIAL_8250_16550A_VARIANTS (Debian's 6.1 kernel is not: it reports a 16550A
  and loads 16 bytes). With `fifo64=False` the device is a plain 16550A.
- LSR reads 0x60 (THRE | TEMT) when idle: characters leave at once, the transmitter is never
  busy; DR (bit 0) while received data waits.
- THRE interrupt: raised when ETBEI (IER bit 1) is turned on while THR is empty and after each
  character written with ETBEI on; cleared by reading IIR (when it is the reported source) or
  writing THR. serial8250_do_startup checks the re-assertion (UART_BUG_THRE otherwise).
- RDA interrupt while the receive FIFO holds data and ERBFI (IER bit 0) is on. Input arrives
  whole from the host, so there is no trigger-level or character-timeout distinction: any
  waiting data reports IIR 0x04 (receive data available).

Interrupts are edges on an `IrqLine` (an irqfd on an edge-triggered IOAPIC pin): the device
triggers when a new interrupt condition appears. The MCR OUT2 gate of PC boards is not modelled
(QEMU and Firecracker do not model it either).

Output: each THR write (outside loopback) calls `out(bytes([c]))` under the device lock, so
bytes from several vCPUs keep their order; `out` must not block (queue it: ConsoleStream).
Flow control: with `tx_ready` given, the transmitter is busy while it returns False (LSR
THRE and TEMT clear, no THRE interrupt), as a UART whose line is held by the other end; the
guest's driver then waits for the THRE interrupt that `tx_space()` raises when output can
flow again (Linux's serial8250_tx_chars runs only on THRE; its console_write polls LSR).
`write_burst` takes many writes to one register at once (the coalesced PIO ring hands THR
writes over that way, `kvmkit.kvm.coalesced`): same effect as writing them one by one, one
`out` call and at most one interrupt edge.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from kvmkit.devices.irq import IrqLine
from kvmkit.guestlog import GuestLog
from kvmkit.snapshot.format import Fields, SnapshotError

log = logging.getLogger(__name__)
# Lines a guest can cause, rate-limited (kvmkit.guestlog).
glog = GuestLog(log)

COM1_PORT = 0x3F8
COM1_IRQ = 4
PORT_COUNT = 8
FIFO_SIZE = 64  # receive FIFO bound (16 on a real 16550A; input is host-paced here)

# Offsets
RBR_THR_DLL = 0
IER_DLM = 1
IIR_FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7

# IER
IER_RDA = 0x01
IER_THRE = 0x02
IER_RLS = 0x04
IER_MS = 0x08
IER_MASK = 0x0F
# IIR
IIR_NO_INT = 0x01
IIR_MSI = 0x00
IIR_THRI = 0x02
IIR_RDI = 0x04
IIR_RLSI = 0x06
IIR_FIFO_ENABLED = 0xC0
IIR_64BYTE_FIFO = 0x20
# FCR
FCR_ENABLE_FIFO = 0x01
FCR_CLEAR_RCVR = 0x02
FCR_CLEAR_XMIT = 0x04
FCR_64BYTE = 0x20  # TL16C750: 64-byte FIFO mode, writable only while LCR.DLAB is set
FCR_TRIGGER_MASK = 0xC0
# LCR
LCR_DLAB = 0x80
# MCR
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08
MCR_LOOP = 0x10
MCR_MASK = 0x1F
# LSR
LSR_DR = 0x01
LSR_OE = 0x02
LSR_BI = 0x10
LSR_THRE = 0x20
LSR_TEMT = 0x40
# MSR
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80
MSR_DELTA_MASK = 0x0F

DEFAULT_DIVISOR = 12  # 9600 baud from the 1.8432 MHz clock
DEFAULT_LCR = 0x03  # 8N1
DEFAULT_MCR = MCR_OUT2
DEFAULT_MSR = MSR_DCD | MSR_DSR | MSR_CTS  # a terminal is attached and ready
SAVE_VERSION = 2  # 2 added fifo64_mode; version 1 states load with it off


@dataclass(frozen=True)
class SerialState:
    """The 8250's registers and receive FIFO in a snapshot; `from_dict` checks data read
    from a file (Firecracker's Persist: the constructor validates)."""

    ier: int
    lcr: int
    mcr: int
    lsr_errors: int
    msr: int
    scr: int
    dll: int
    dlm: int
    fcr_trigger: int
    fifo_enabled: bool
    thre_pending: bool
    fifo64_mode: bool
    rx: bytes

    _BYTES: ClassVar[tuple[str, ...]] = (
        "ier", "lcr", "mcr", "lsr_errors", "msr", "scr", "dll", "dlm", "fcr_trigger",
    )  # fmt: skip
    _FLAGS: ClassVar[tuple[str, ...]] = ("fifo_enabled", "thre_pending", "fifo64_mode")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": SAVE_VERSION, "rx": list(self.rx)}
        for key in (*self._BYTES, *self._FLAGS):
            out[key] = getattr(self, key)
        return out

    @classmethod
    def from_dict(cls, obj: Any, path: str = "serial") -> SerialState:
        f = Fields(obj, path)
        version = f.get_int("version", 0, 2**32 - 1)
        if version not in (1, SAVE_VERSION):
            raise SnapshotError(f"snapshot state: {path}: serial state version {version}")
        b = {k: f.get_int(k, 0, 0xFF) for k in cls._BYTES}
        return cls(
            ier=b["ier"], lcr=b["lcr"], mcr=b["mcr"], lsr_errors=b["lsr_errors"],
            msr=b["msr"], scr=b["scr"], dll=b["dll"], dlm=b["dlm"],
            fcr_trigger=b["fcr_trigger"], fifo_enabled=f.get_bool("fifo_enabled"),
            thre_pending=f.get_bool("thre_pending"),
            # Version 1 had no 64-byte FIFO mode: it loads with the mode off.
            fifo64_mode=f.get_bool("fifo64_mode") if version > 1 else False,
            rx=bytes(f.get_ints("rx", FIFO_SIZE, width=8)),
        )  # fmt: skip


class Serial8250:
    """A 16550A at some base port (offsets 0..7), see the module docstring."""

    def __init__(
        self, irq: IrqLine, out: Callable[[bytes], None], *, fifo_size: int = FIFO_SIZE,
        fifo64: bool = True, tx_ready: Callable[[], bool] | None = None,
    ) -> None:  # fmt: skip
        if fifo_size < 1:
            raise ValueError("fifo_size must be at least 1")
        self.fifo64 = fifo64  # a TL16C750 with its 64-byte mode; False: a 16550A
        self._irq = irq
        self._out = out
        self._tx_ready = tx_ready
        self._lock = threading.Lock()
        self.fifo_size = fifo_size
        self._rx: deque[int] = deque()
        self._ier = 0
        self._lcr = DEFAULT_LCR
        self._mcr = DEFAULT_MCR
        self._lsr_errors = 0  # OE/BI bits, cleared by an LSR read
        self._msr = DEFAULT_MSR
        self._scr = 0
        self._dll = DEFAULT_DIVISOR & 0xFF
        self._dlm = DEFAULT_DIVISOR >> 8
        self._fifo_enabled = False
        self._fcr_trigger = 0
        self._fifo64_mode = False  # FCR bit 5 as last set with DLAB on (TL16C750)
        self._thre_pending = False  # THR-empty interrupt latched, until IIR read or THR write
        # Firecracker's uart metrics: bytes the guest read and wrote, and writes whose
        # output callback failed.
        self.read_count = 0
        self.write_count = 0
        self.missed_write_count = 0

    # -- state helpers (called with the lock held)
    def _tx_ok(self) -> bool:
        """The transmitter takes a character (module docstring: flow control); loopback
        output goes to the receiver, not the line."""
        return self._tx_ready is None or bool(self._mcr & MCR_LOOP) or self._tx_ready()

    def _lsr(self) -> int:
        lsr = (LSR_THRE | LSR_TEMT if self._tx_ok() else 0) | self._lsr_errors
        if self._rx:
            lsr |= LSR_DR
        return lsr

    def _iir_id(self) -> int:
        """The highest-priority pending, enabled interrupt (16550D table "Interrupt Control
        Functions"): line status > received data > THR empty > modem status."""
        if self._ier & IER_RLS and self._lsr_errors:
            return IIR_RLSI
        if self._ier & IER_RDA and self._rx:
            return IIR_RDI
        if self._ier & IER_THRE and self._thre_pending:
            return IIR_THRI
        if self._ier & IER_MS and self._msr & MSR_DELTA_MASK:
            return IIR_MSI
        return IIR_NO_INT

    def _fifo_bits(self) -> int:
        if not self._fifo_enabled:
            return 0
        return IIR_FIFO_ENABLED | (IIR_64BYTE_FIFO if self._fifo64_mode else 0)

    def _loopback_msr(self) -> int:
        """MSR status bits in loopback mode: CTS=RTS, DSR=DTR, RI=OUT1, DCD=OUT2."""
        m = self._mcr
        return (
            (MSR_CTS if m & MCR_RTS else 0)
            | (MSR_DSR if m & MCR_DTR else 0)
            | (MSR_RI if m & MCR_OUT1 else 0)
            | (MSR_DCD if m & MCR_OUT2 else 0)
        )

    def _set_msr_status(self, status: int) -> None:
        """Change MSR bits 7:4, recording the deltas (DCTS, DDSR, TERI on RI falling, DDCD)."""
        old = self._msr
        changed = (old ^ status) & 0xF0
        delta = 0
        if changed & MSR_CTS:
            delta |= MSR_DCTS
        if changed & MSR_DSR:
            delta |= MSR_DDSR
        if changed & MSR_RI and old & MSR_RI:
            delta |= MSR_TERI
        if changed & MSR_DCD:
            delta |= MSR_DDCD
        self._msr = status | (old & MSR_DELTA_MASK) | delta

    # -- BusDevice
    def read(self, offset: int, data: memoryview) -> None:
        if len(data) != 1 or not 0 <= offset < PORT_COUNT:
            glog.debug("serial: ignored %d-byte read at offset %d", len(data), offset)
            data[:] = b"\xff" * len(data)
            return
        with self._lock:
            if offset == RBR_THR_DLL:
                if self._lcr & LCR_DLAB:
                    value = self._dll
                else:
                    # No new edge while more data waits: Linux's handler reads on while
                    # LSR.DR is set (serial8250_rx_chars).
                    value = self._rx.popleft() if self._rx else 0
                    self.read_count += 1
            elif offset == IER_DLM:
                value = self._dlm if self._lcr & LCR_DLAB else self._ier
            elif offset == IIR_FCR:
                ident = self._iir_id()
                value = ident | self._fifo_bits()
                if ident == IIR_THRI:
                    self._thre_pending = False  # reading IIR clears a reported THRE
            elif offset == LCR:
                value = self._lcr
            elif offset == MCR:
                value = self._mcr
            elif offset == LSR:
                value = self._lsr()
                self._lsr_errors = 0
            elif offset == MSR:
                value = self._msr
                self._msr &= ~MSR_DELTA_MASK
            else:
                value = self._scr
        data[0] = value

    def write(self, offset: int, data: memoryview) -> None:
        if len(data) != 1 or not 0 <= offset < PORT_COUNT:
            glog.debug("serial: ignored %d-byte write at offset %d", len(data), offset)
            return
        value = data[0]
        fire = False
        with self._lock:
            before = self._iir_id()
            if offset == RBR_THR_DLL:
                if self._lcr & LCR_DLAB:
                    self._dll = value
                else:
                    self._transmit(value)
                    # The character left at once: THR is empty again (THRE re-asserted),
                    # unless the line is held (flow control: tx_space() raises it later).
                    self._thre_pending = self._tx_ok()
                    # In loopback the byte arrived in RBR: RDA may have become pending too.
                    fire = bool(self._ier & IER_THRE and self._thre_pending) or (
                        before != IIR_RDI and self._iir_id() == IIR_RDI
                    )
            elif offset == IER_DLM:
                if self._lcr & LCR_DLAB:
                    self._dlm = value
                else:
                    old = self._ier
                    self._ier = value & IER_MASK
                    # Turning ETBEI on with THR empty raises THRE (16550D; Linux's THRE test).
                    if self._ier & IER_THRE and not old & IER_THRE and self._tx_ok():
                        self._thre_pending = True
                    fire = self._iir_id() != IIR_NO_INT and (
                        before == IIR_NO_INT or self._ier & ~old != 0
                    )
            elif offset == IIR_FCR:
                enable = bool(value & FCR_ENABLE_FIFO)
                if enable != self._fifo_enabled:
                    self._rx.clear()  # changing the FIFO mode clears both FIFOs
                self._fifo_enabled = enable
                if value & FCR_CLEAR_RCVR:
                    self._rx.clear()
                self._fcr_trigger = value & FCR_TRIGGER_MASK
                if self.fifo64 and self._lcr & LCR_DLAB:
                    self._fifo64_mode = bool(value & FCR_64BYTE)
                if not enable:
                    self._fifo64_mode = False
            elif offset == LCR:
                self._lcr = value
            elif offset == MCR:
                self._mcr = value & MCR_MASK
                status = self._loopback_msr() if self._mcr & MCR_LOOP else DEFAULT_MSR
                self._set_msr_status(status)
                fire = before == IIR_NO_INT and self._iir_id() != IIR_NO_INT
            elif offset == SCR:
                self._scr = value
            # LSR and MSR writes (factory test) are ignored.
        if fire:
            self._irq.trigger()

    def write_burst(self, offset: int, data: bytes) -> None:
        """`len(data)` one-byte writes to `offset`, in order (see the module docstring)."""
        if offset != RBR_THR_DLL or len(data) <= 1:
            for i in range(len(data)):
                self.write(offset, memoryview(data)[i : i + 1])
            return
        fire = False
        with self._lock:
            transmit = not self._lcr & LCR_DLAB and not self._mcr & MCR_LOOP
            if transmit:
                self.write_count += len(data)
                try:
                    self._out(data)
                except Exception:  # a broken console must not take the vCPU thread down
                    self.missed_write_count += len(data)
                    glog.exception("serial: output callback failed")
                self._thre_pending = self._tx_ok()
                fire = bool(self._ier & IER_THRE and self._thre_pending)
        if not transmit:
            for i in range(len(data)):
                self.write(offset, memoryview(data)[i : i + 1])
            return
        if fire:
            self._irq.trigger()

    def _transmit(self, byte: int) -> None:
        if self._mcr & MCR_LOOP:
            self._receive_locked(bytes([byte]))
            return
        self.write_count += 1
        try:
            self._out(bytes([byte]))
        except Exception:  # a broken console must not take the vCPU thread down
            self.missed_write_count += 1
            glog.exception("serial: output callback failed")

    def _receive_locked(self, data: bytes) -> int:
        room = self.fifo_size - len(self._rx)
        taken = data[: max(room, 0)]
        self._rx.extend(taken)
        if len(taken) < len(data):
            self._lsr_errors |= LSR_OE
        return len(taken)

    # -- host side
    def tx_space(self) -> None:
        """The line can take output again (flow control): THR reads empty, and the THRE
        interrupt is raised if the driver enabled it."""
        with self._lock:
            if self._thre_pending or not self._tx_ok():
                return
            self._thre_pending = True
            fire = bool(self._ier & IER_THRE)
        if fire:
            self._irq.trigger()

    def enqueue_input(self, data: bytes) -> int:
        """Queue bytes from the host for the guest to read; returns how many fitted in the
        receive FIFO (the caller keeps the rest and retries when `input_space()` allows).
        Raises the RDA interrupt when enabled. Ignored (returns 0) in loopback mode."""
        if not data:
            return 0
        with self._lock:
            if self._mcr & MCR_LOOP:
                return 0
            before = self._iir_id()
            room = self.fifo_size - len(self._rx)
            taken = data[: max(room, 0)]
            self._rx.extend(taken)
            fire = bool(taken) and before != IIR_RDI and self._iir_id() == IIR_RDI
        if fire:
            self._irq.trigger()
        return len(taken)

    def input_space(self) -> int:
        with self._lock:
            return self.fifo_size - len(self._rx)

    # -- snapshots
    def save(self) -> SerialState:
        """Register state as typed plain data."""
        with self._lock:
            return SerialState(
                ier=self._ier, lcr=self._lcr, mcr=self._mcr, lsr_errors=self._lsr_errors,
                msr=self._msr, scr=self._scr, dll=self._dll, dlm=self._dlm,
                fcr_trigger=self._fcr_trigger, fifo_enabled=self._fifo_enabled,
                thre_pending=self._thre_pending, fifo64_mode=self._fifo64_mode,
                rx=bytes(self._rx),
            )  # fmt: skip

    def restore(self, state: SerialState) -> None:
        """Take over a checked state; SnapshotError (nothing changed) if its receive FIFO
        holds more than this device's."""
        if len(state.rx) > self.fifo_size:
            raise SnapshotError(
                f"snapshot state: serial rx holds {len(state.rx)} bytes, the FIFO {self.fifo_size}"
            )
        with self._lock:
            self._ier = state.ier & IER_MASK
            self._lcr = state.lcr
            self._mcr = state.mcr & MCR_MASK
            self._lsr_errors = state.lsr_errors & (LSR_OE | LSR_BI)
            self._msr = state.msr
            self._scr = state.scr
            self._dll = state.dll
            self._dlm = state.dlm
            self._fcr_trigger = state.fcr_trigger & FCR_TRIGGER_MASK
            self._fifo_enabled = state.fifo_enabled
            self._thre_pending = state.thre_pending
            self._fifo64_mode = state.fifo64_mode and self.fifo64
            self._rx = deque(state.rx)
