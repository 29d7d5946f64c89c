"""What a user asks for: one `MachineConfig`, the same whether it comes from the CLI, the
Python API or (later) the REST API and config file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from kvmkit.devices.virtio.blk import CACHE_TYPES, DriveConfig
from kvmkit.devices.virtio.net import NetConfig
from kvmkit.devices.virtio.ratelimit import RateLimiterConfig
from kvmkit.devices.virtio.vsock import VsockConfig
from kvmkit.errors import UserError

MIN_MEM_MIB = 32
MAX_MEM_MIB = 1 << 20  # 1 TiB: anything above is a typo, not a microVM
MAX_VIRTIO_DEVICES = 9  # one ISA IRQ each (arch/x86_64/layout.py VIRTIO_MMIO_IRQS)
VIRTIO_TRANSPORTS = ("mmio", "pci")
MAX_VCPUS = 255  # APIC IDs must fit the 8-bit xAPIC ID and the MP table


@dataclass
class MachineConfig:
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None  # None: kvmkit's default for the kernel it boots
    vcpus: int = 1
    mem_mib: int = 256
    command: list[str] = field(default_factory=list)  # run in the default guest image
    extra_cmdline: str = ""
    # The serial port's fast paths (on by default; off gives a plain 16550A whose every
    # byte is an exit, to compare): THR writes through KVM's coalesced PIO ring, and the
    # TL16C750's 64-byte FIFO so that Linux writes 64 bytes per interrupt, not 16.
    coalesce_serial: bool = True
    serial_fifo64: bool = True
    # virtio devices (virtio-mmio): block drives in order (/dev/vda, vdb, ...) and the
    # entropy device (/dev/hwrng). Snapshots carry their state (docs/snapshot.md).
    drives: list[DriveConfig] = field(default_factory=list)
    rng: bool = False
    rng_rate_limiter: RateLimiterConfig | None = None  # Firecracker's /entropy rate_limiter
    # How the guest finds them (docs/virtio.md): "mmio" (virtio-mmio, from the DSDT or the
    # command line) or "pci" (the modern virtio-pci transport on a PCI bus with MSI-X).
    virtio_transport: str = "mmio"
    # virtio-net over host taps (eth0, eth1, ... in order) and one virtio-vsock device whose
    # host side is Unix sockets (docs/virtio.md).
    nets: list[NetConfig] = field(default_factory=list)
    vsock: VsockConfig | None = None
    # Firecracker's boot timer (`--boot-timer`): a write of 123 to its MMIO byte at
    # layout.BOOT_TIMER_ADDR logs the guest's boot time; the virtio-mmio devices move up a
    # slot to make room, as in Firecracker.
    boot_timer: bool = False

    @property
    def virtio_count(self) -> int:
        """How many virtio devices: drives, the rng, nets, vsock (Machine's order)."""
        return len(self.drives) + int(self.rng) + len(self.nets) + int(self.vsock is not None)

    def validate(self, host_max_vcpus: int | None = None) -> None:
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise UserError(f"--vcpus {self.vcpus}: must be between 1 and {MAX_VCPUS}")
        if host_max_vcpus is not None and self.vcpus > host_max_vcpus:
            raise UserError(f"--vcpus {self.vcpus}: this host's KVM allows {host_max_vcpus}")
        if not MIN_MEM_MIB <= self.mem_mib <= MAX_MEM_MIB:
            raise UserError(
                f"--mem-mib {self.mem_mib}: must be between {MIN_MEM_MIB} and {MAX_MEM_MIB}"
            )
        total = _host_memory_mib()
        if total is not None and self.mem_mib > total:
            raise UserError(f"--mem-mib {self.mem_mib}: the host has only {total} MiB of memory")
        for what, path in (("kernel", self.kernel), ("initrd", self.initrd)):
            if path is None:
                continue
            if not path.exists():
                raise UserError(f"{what} {path}: no such file")
            if not path.is_file():
                raise UserError(f"{what} {path}: not a regular file")
            if not os.access(path, os.R_OK):
                raise UserError(f"{what} {path}: not readable")
        if sum(d.root for d in self.drives) > 1:
            raise UserError("only one drive can be the root device")
        for drive in self.drives:
            if drive.cache_type not in CACHE_TYPES:
                raise UserError(f"--drive {drive.path}: cache type {drive.cache_type!r}")
            if drive.partuuid is not None and not drive.root:
                raise UserError(f"--drive {drive.path}: a partuuid only applies to the root drive")
            if not drive.path.is_file():
                raise UserError(f"--drive {drive.path}: not a regular file")
            if not os.access(drive.path, os.R_OK if drive.read_only else os.R_OK | os.W_OK):
                raise UserError(f"--drive {drive.path}: not readable/writable")
        if self.virtio_transport not in VIRTIO_TRANSPORTS:
            raise UserError(
                f"--virtio-transport {self.virtio_transport}: must be one of "
                + ", ".join(VIRTIO_TRANSPORTS)
            )
        for what, dev in [*(("--net", n) for n in self.nets), ("--vsock", self.vsock)]:
            try:
                if dev is not None:
                    dev.check()
            except ValueError as err:
                raise UserError(f"{what}: {err}") from None
        taps = [n.tap for n in self.nets]
        if len(set(taps)) != len(taps):
            raise UserError("--net: the same tap twice")
        if self.virtio_count > MAX_VIRTIO_DEVICES:
            raise UserError(f"at most {MAX_VIRTIO_DEVICES} virtio devices")
        if self.initrd is not None and self.kernel is None:
            raise UserError("--initrd needs --kernel (the default image brings its own)")


def _host_memory_mib() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        return None
    return None
