"""Interrupt lines as devices see them.

A device raises its interrupt through an `IrqLine`; the VMM backs each line with an eventfd
registered as an irqfd, so raising it is one write(2) and the in-kernel irqchip delivers it
(no vCPU exit, no Python in the path).
"""

from __future__ import annotations

import os
from typing import Protocol


class IrqLine(Protocol):
    def trigger(self) -> None:
        """Raise an edge on the line."""


class EventFdIrq:
    """An eventfd whose writes raise a GSI (the VMM registers it with `Vm.irqfd`)."""

    def __init__(self, gsi: int) -> None:
        self.gsi = gsi
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def trigger(self) -> None:
        try:
            os.eventfd_write(self.fd, 1)
        except BlockingIOError:
            pass  # counter saturated: an interrupt is already pending

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class NoIrq:
    """A line that goes nowhere (a device used without interrupts, or in unit tests)."""

    def __init__(self) -> None:
        self.count = 0

    def trigger(self) -> None:
        self.count += 1
