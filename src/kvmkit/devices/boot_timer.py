"""Firecracker's boot timer (`--boot-timer`): a pseudo device whose first MMIO byte the guest
writes 123 to when it has booted (Firecracker's MAGIC_VALUE_SIGNAL_GUEST_BOOT_COMPLETE,
src/vmm/src/devices/pseudo/boot_timer.rs); the VMM then logs the time since InstanceStart
with Firecracker's words: "Guest-boot-time = N us M ms, C CPU us D CPU ms" (CPU: this
process's). Reads return zeros; other writes are ignored."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("kvmkit.boot_timer")

MAGIC_BOOT_COMPLETE = 123
LENGTH = 0x1000  # one page of the MMIO window, as Firecracker's device slot


class BootTimer:
    def __init__(self) -> None:
        self.start_ns = time.monotonic_ns()
        self.start_cpu_ns = time.process_time_ns()
        self.boot_time_us: int | None = None  # the last one reported

    def read(self, offset: int, data: memoryview) -> None:
        data[:] = bytes(len(data))

    def write(self, offset: int, data: memoryview) -> None:
        # Only a one-byte write of the magic value at offset 0 counts (as in Firecracker).
        if offset != 0 or len(data) != 1 or data[0] != MAGIC_BOOT_COMPLETE:
            return
        us = (time.monotonic_ns() - self.start_ns) // 1000
        cpu_us = (time.process_time_ns() - self.start_cpu_ns) // 1000
        self.boot_time_us = us
        log.info("Guest-boot-time = %6d us %d ms, %6d CPU us %d CPU ms", us, us // 1000,
                 cpu_us, cpu_us // 1000)  # fmt: skip
