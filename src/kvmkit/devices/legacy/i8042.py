"""The i8042 keyboard controller, reduced to what a microVM needs: the CPU reset line.

Mapping (Firecracker's): ONE device at base 0x60, length 5, so

    offset 0  (port 0x60)  data: read output buffer / write command parameter or keyboard byte
    offset 4  (port 0x64)  read status register / write controller command
    offsets 1-3 (0x61-0x63) not the controller: reads return 0xFF, writes are ignored. Port
        0x61 (PC speaker / NMI status) belongs to KVM's in-kernel PIT (KVM_CREATE_PIT2),
        which answers it inside the kernel before any exit reaches this bus.

Controller commands (IBM PS/2 technical reference; Linux drivers/input/serio/i8042.h):

    0x20        read the controller configuration byte (CTR)  -> CTR
    0x21-0x3F   read controller RAM                           -> 0x00
    0x60        write CTR (next data byte)
    0x61-0x7F   write controller RAM (next data byte, dropped)
    0xA7/0xA8   disable/enable the AUX port (CTR bit 5)
    0xA9        AUX interface test -> 0x01 ("clock line stuck low"): kvmkit has no mouse;
                Linux's i8042_check_aux gives up on the AUX port at once instead of waiting
                250 ms for an AUX IRQ 12 that never comes
    0xAA        controller self test -> 0x55
    0xAB        keyboard interface test -> 0x00
    0xAD/0xAE   disable/enable the keyboard port (CTR bit 4)
    0xD0        read the output port -> 0x03 (reset line high = not in reset, A20 on)
    0xD1        write the output port (next byte): bit 0 = 0 pulls the reset line
    0xD2        next data byte appears as keyboard data
    0xD3        AUX loopback: answered as *keyboard* data, so Linux sees no AUX port
    0xD4        next data byte goes to the AUX device (none: dropped)
    0xF0-0xFF   pulse output lines for 6 us; bit 0 clear pulses the reset line: 0xFE is how
                Linux's `reboot=k` (and BIOSes) reset a PC -> on_reset()

Status (port 0x64): OBF (bit 0) only while a response is queued, so Linux never waits for
data that will not come; IBF (bit 1) always 0 (commands complete at once); SYS (bit 2) set;
CMD/DATA (bit 3) whether the last write went to 0x64; bit 4 "keyboard not inhibited" set;
AUXDATA (bit 5) never (no AUX device).

There is no keyboard behind the controller and no IRQ 1: bytes written to port 0x60 outside a
command are dropped. A kernel that probes the controller (FADT IAPC_BOOT_ARCH 8042 flag set,
or no ACPI) should get `i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd` on its command
line (Firecracker's options) so that atkbd does not wait for keyboard replies. kvmkit's FADT
leaves the 8042 flag clear by default, and then Linux does not probe the i8042 at all; the
reset line (0xFE to port 0x64, reboot=k) works either way.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable

from kvmkit.guestlog import GuestLog

log = logging.getLogger(__name__)
# Lines a guest can cause, rate-limited (kvmkit.guestlog).
glog = GuestLog(log)

BASE = 0x60
LENGTH = 5
DATA_OFFSET = 0
COMMAND_OFFSET = 4

# Status register bits
STR_OBF = 0x01
STR_IBF = 0x02
STR_SYS = 0x04
STR_CMDDAT = 0x08
STR_KEYLOCK = 0x10  # 1 = keyboard not inhibited
STR_AUXDATA = 0x20

# Controller configuration byte (CTR) bits
CTR_KBDINT = 0x01
CTR_AUXINT = 0x02
CTR_SYS = 0x04
CTR_KBDDIS = 0x10
CTR_AUXDIS = 0x20
CTR_XLATE = 0x40
CTR_DEFAULT = CTR_KBDINT | CTR_SYS | CTR_AUXDIS | CTR_XLATE

CMD_READ_CTR = 0x20
CMD_WRITE_CTR = 0x60
CMD_AUX_DISABLE = 0xA7
CMD_AUX_ENABLE = 0xA8
CMD_AUX_TEST = 0xA9
CMD_SELF_TEST = 0xAA
CMD_KBD_TEST = 0xAB
CMD_KBD_DISABLE = 0xAD
CMD_KBD_ENABLE = 0xAE
CMD_READ_OUTPUT_PORT = 0xD0
CMD_WRITE_OUTPUT_PORT = 0xD1
CMD_WRITE_KBD_OUTBUF = 0xD2
CMD_WRITE_AUX_OUTBUF = 0xD3
CMD_WRITE_AUX = 0xD4
CMD_RESET_CPU = 0xFE

SELF_TEST_OK = 0x55
KBD_TEST_OK = 0x00
AUX_TEST_CLOCK_LOW = 0x01
OUTPUT_PORT_DEFAULT = 0x03  # bit 0: reset line inactive, bit 1: A20 gate on
OUTBUF_SIZE = 16
# Ctrl, Alt, Delete down, then up (set 1: E0-prefixed Delete, release = code | 0x80).
CTRL_ALT_DEL = (0x1D, 0x38, 0xE0, 0x53, 0xE0, 0xD3, 0xB8, 0x9D)


class I8042:
    """See the module docstring. `on_reset` runs on the vCPU thread that pulsed the line and
    must not wait for vCPUs."""

    BASE = BASE
    LENGTH = LENGTH

    def __init__(
        self, on_reset: Callable[[], None], irq: Callable[[], None] | None = None
    ) -> None:
        self._on_reset = on_reset
        self._irq = irq  # raises the keyboard interrupt (IRQ 1), when the machine wires it
        self._lock = threading.Lock()
        self._ctr = CTR_DEFAULT
        self._outbuf: deque[int] = deque()
        self._pending: int | None = None  # a command waiting for its data byte
        self._last_was_command = False

    def _status(self) -> int:
        status = STR_SYS | STR_KEYLOCK
        if self._outbuf:
            status |= STR_OBF
        if self._last_was_command:
            status |= STR_CMDDAT
        return status

    def _respond(self, value: int) -> None:
        if len(self._outbuf) < OUTBUF_SIZE:
            self._outbuf.append(value & 0xFF)

    def read(self, offset: int, data: memoryview) -> None:
        if len(data) != 1 or offset not in (DATA_OFFSET, COMMAND_OFFSET):
            glog.debug("i8042: ignored %d-byte read at offset %d", len(data), offset)
            data[:] = b"\xff" * len(data)
            return
        more = False
        with self._lock:
            if offset == COMMAND_OFFSET:
                data[0] = self._status()
            else:
                # An empty output buffer reads as the last value on real hardware; 0 here.
                data[0] = self._outbuf.popleft() if self._outbuf else 0
                more = bool(self._outbuf)
        if offset == DATA_OFFSET and more:
            self._data_read_done()

    def write(self, offset: int, data: memoryview) -> None:
        if len(data) != 1 or offset not in (DATA_OFFSET, COMMAND_OFFSET):
            glog.debug("i8042: ignored %d-byte write at offset %d", len(data), offset)
            return
        value = data[0]
        reset = False
        with self._lock:
            if offset == COMMAND_OFFSET:
                self._last_was_command = True
                reset = self._command(value)
            else:
                self._last_was_command = False
                reset = self._data(value)
        if reset:
            self._on_reset()

    def _command(self, cmd: int) -> bool:
        """Run a controller command; True when it pulses the reset line."""
        self._pending = None
        if cmd == CMD_READ_CTR:
            self._respond(self._ctr)
        elif 0x21 <= cmd <= 0x3F:
            self._respond(0)
        elif cmd == CMD_WRITE_CTR or 0x61 <= cmd <= 0x7F or cmd in (
            CMD_WRITE_OUTPUT_PORT, CMD_WRITE_KBD_OUTBUF, CMD_WRITE_AUX_OUTBUF, CMD_WRITE_AUX,
        ):  # fmt: skip
            self._pending = cmd
        elif cmd == CMD_AUX_DISABLE:
            self._ctr |= CTR_AUXDIS
        elif cmd == CMD_AUX_ENABLE:
            self._ctr &= ~CTR_AUXDIS
        elif cmd == CMD_AUX_TEST:
            self._respond(AUX_TEST_CLOCK_LOW)
        elif cmd == CMD_SELF_TEST:
            self._outbuf.clear()
            self._respond(SELF_TEST_OK)
        elif cmd == CMD_KBD_TEST:
            self._respond(KBD_TEST_OK)
        elif cmd == CMD_KBD_DISABLE:
            self._ctr |= CTR_KBDDIS
        elif cmd == CMD_KBD_ENABLE:
            self._ctr &= ~CTR_KBDDIS
        elif cmd == CMD_READ_OUTPUT_PORT:
            self._respond(OUTPUT_PORT_DEFAULT)
        elif cmd >= 0xF0:
            # Pulse output port lines whose bit is 0 in the low nibble; bit 0 is RESET.
            return not cmd & 0x01
        else:
            glog.debug("i8042: unknown command %#x ignored", cmd)
        return False

    def _data(self, value: int) -> bool:
        cmd, self._pending = self._pending, None
        if cmd is None:
            glog.debug("i8042: keyboard byte %#x dropped (no keyboard)", value)
        elif cmd == CMD_WRITE_CTR:
            self._ctr = value
        elif cmd in (CMD_WRITE_KBD_OUTBUF, CMD_WRITE_AUX_OUTBUF):
            self._respond(value)
        elif cmd == CMD_WRITE_OUTPUT_PORT:
            return not value & 0x01  # RESET line driven low
        return False

    def send_ctrl_alt_del(self) -> bool:
        """Press and release Ctrl+Alt+Del on the keyboard (Firecracker's SendCtrlAltDel).
        The codes are scan code set 1, what the guest reads with translation on (CTR_XLATE,
        the default). False when the guest has not enabled the keyboard interrupt."""
        with self._lock:
            if self._irq is None or not self._ctr & CTR_KBDINT or self._ctr & CTR_KBDDIS:
                return False
            for code in CTRL_ALT_DEL:
                self._outbuf.append(code)
        self._irq()
        return True

    def _data_read_done(self) -> None:
        # More keyboard bytes wait: raise the interrupt again for the next one.
        if self._irq is not None and self._outbuf and self._ctr & CTR_KBDINT:
            self._irq()

    @property
    def ctr(self) -> int:
        with self._lock:
            return self._ctr
