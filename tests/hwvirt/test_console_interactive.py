"""`kvmkit run` without a command: the serial console in a raw terminal, Ctrl-A x quits."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import termios
import time

import pytest

pytestmark = pytest.mark.hwvirt


def read_until(fd: int, needle: bytes, timeout: float, seen: bytearray) -> bool:
    deadline = time.monotonic() + timeout
    while needle not in seen and time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                seen += os.read(fd, 4096)
            except OSError:
                break
    return needle in seen


def test_interactive_console_types_into_the_guest_and_ctrl_a_x_quits() -> None:
    controller, terminal = pty.openpty()
    saved = termios.tcgetattr(terminal)
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmkit", "run", "--timeout", "500"],
        stdin=terminal, stdout=terminal, stderr=terminal, close_fds=True,
    )  # fmt: skip
    seen = bytearray()
    try:
        assert read_until(controller, b"Ctrl-A x quits", 120, seen), seen.decode(errors="replace")
        # The shell prompt of the default image's init ("root@kvmkit:~# " or "# ").
        assert read_until(controller, b"# ", 400, seen), seen[-2000:].decode(errors="replace")
        os.write(controller, b"echo $((6 * 7))\r")
        assert read_until(controller, b"42", 60, seen), seen[-2000:].decode(errors="replace")
        os.write(controller, b"\x01x")  # Ctrl-A x
        assert proc.wait(60) == 130
        # The terminal is restored to the mode it had before kvmkit put it in raw mode.
        assert termios.tcgetattr(terminal) == saved
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
        os.close(terminal)
