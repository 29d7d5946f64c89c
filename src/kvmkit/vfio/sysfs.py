"""What the host says about a PCI device before kvmkit opens anything: its address, driver
and IOMMU group, from sysfs (Documentation/ABI/testing/sysfs-bus-pci,
sysfs-kernel-iommu_groups).

`check_assignable(bdf)` is what `kvmkit run --vfio BDF` asks first: it refuses, in one line
that says what to do, a malformed address, a device that does not exist, a host without an
IOMMU (no group), a device not bound to vfio-pci, a missing /dev/vfio/N, and a group that
VFIO would call not viable because another of its devices is bound to a host driver.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from kvmkit.errors import UserError

SYSFS = Path("/sys")
DEV_VFIO = Path("/dev/vfio")
VFIO_PCI = "vfio-pci"
# Drivers a viable group may hold besides VFIO's (the kernel's vfio_dev_driver_allowed):
# pci-stub binds without touching the device. Bridges (header type != 0) are allowed too.
ALLOWED_DRIVERS = frozenset({"pci-stub"})
HEADER_TYPE = 0x0E  # PCI Local Bus 3.0 §6.2.1: bits 6:0 layout (0: endpoint), bit 7 multi-fn

_BDF = re.compile(r"(?:([0-9a-fA-F]{1,4}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])")


class VfioHostError(UserError):
    """The host cannot give this device to a guest; the message says why and what to do."""


def parse_bdf(text: str) -> str:
    """A PCI address as sysfs names it, DDDD:BB:DD.F (lower case); the domain defaults to
    0000 (lspci's short form BB:DD.F)."""
    m = _BDF.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a PCI address (DDDD:BB:DD.F, e.g. 0000:01:00.0)")
    domain, bus, dev, fn = m.groups()
    if int(dev, 16) > 0x1F:
        raise ValueError(f"{text!r}: device number {dev} is above 1f")
    return f"{int(domain or '0', 16):04x}:{int(bus, 16):02x}:{int(dev, 16):02x}.{fn}"


@dataclass(frozen=True)
class HostPciDevice:
    bdf: str
    path: Path  # /sys/bus/pci/devices/BDF (a symlink into the device tree)
    vendor: int
    device: int
    driver: str | None
    group: int | None  # the IOMMU group, None without an IOMMU
    is_bridge: bool

    @property
    def ids(self) -> str:
        return f"{self.vendor:04x}:{self.device:04x}"


def _read_hex(path: Path) -> int:
    try:
        return int(path.read_text().strip(), 16)
    except (OSError, ValueError):
        return 0


def host_device(bdf: str, sysfs: Path = SYSFS) -> HostPciDevice:
    path = sysfs / "bus" / "pci" / "devices" / bdf
    if not path.exists():
        raise VfioHostError(f"--vfio {bdf}: no such PCI device on this host ({path})")
    driver_link = path / "driver"
    driver = os.path.basename(os.readlink(driver_link)) if driver_link.is_symlink() else None
    group_link = path / "iommu_group"
    group = int(os.path.basename(os.readlink(group_link))) if group_link.is_symlink() else None
    try:
        with open(path / "config", "rb") as f:
            header = f.read(HEADER_TYPE + 1)
        is_bridge = len(header) > HEADER_TYPE and header[HEADER_TYPE] & 0x7F != 0
    except OSError:
        is_bridge = False
    return HostPciDevice(
        bdf, path, _read_hex(path / "vendor"), _read_hex(path / "device"), driver, group,
        is_bridge,
    )  # fmt: skip


def group_devices(group: int, sysfs: Path = SYSFS) -> list[HostPciDevice]:
    """Every PCI device of IOMMU group `group` (sysfs-kernel-iommu_groups)."""
    base = sysfs / "kernel" / "iommu_groups" / str(group) / "devices"
    try:
        names = sorted(os.listdir(base))
    except OSError:
        return []
    return [host_device(name, sysfs) for name in names if _BDF.fullmatch(name)]


def blocks_viability(dev: HostPciDevice) -> bool:
    """True when `dev`, in a group being opened, makes VFIO refuse the group: bound to a
    host driver that is neither VFIO's nor allowed beside it."""
    if dev.driver is None or dev.driver.startswith("vfio") or dev.is_bridge:
        return False
    return dev.driver not in ALLOWED_DRIVERS


def not_viable_message(group: int, members: list[HostPciDevice]) -> str:
    """The one line naming what keeps IOMMU group `group` from being viable."""
    blocking = [d for d in members if blocks_viability(d)]
    named = ", ".join(f"{d.bdf} ({d.ids}) is bound to {d.driver}" for d in blocking)
    return (
        f"IOMMU group {group} is not viable: {named or 'a device is bound to a host driver'}; "
        f"bind every device of the group to {VFIO_PCI} or unbind it (docs/vfio.md)"
    )


def check_assignable(text: str, sysfs: Path = SYSFS, dev_vfio: Path = DEV_VFIO) -> HostPciDevice:
    """The device at `text` if the host can give it to a guest, else VfioHostError."""
    try:
        bdf = parse_bdf(text)
    except ValueError as err:
        raise VfioHostError(f"--vfio {err}") from None
    dev = host_device(bdf, sysfs)
    if dev.group is None:
        raise VfioHostError(
            f"--vfio {bdf}: the device has no IOMMU group: this host's IOMMU is off or absent "
            "(enable VT-d / AMD-Vi in the firmware and boot with intel_iommu=on or "
            "amd_iommu=on; docs/vfio.md)"
        )
    if dev.driver != VFIO_PCI:
        now = f"bound to {dev.driver}" if dev.driver else "not bound to a driver"
        raise VfioHostError(
            f"--vfio {bdf} ({dev.ids}) is {now}, not {VFIO_PCI}: bind it with "
            f"`echo {VFIO_PCI} > {dev.path}/driver_override` and "
            f"`echo {bdf} > /sys/bus/pci/drivers_probe` (after unbinding; docs/vfio.md)"
        )
    node = dev_vfio / str(dev.group)
    if not node.exists():
        raise VfioHostError(
            f"--vfio {bdf}: {node} does not exist although the device is bound to {VFIO_PCI}"
            " (is the vfio module loaded?)"
        )
    members = group_devices(dev.group, sysfs)
    if any(blocks_viability(m) for m in members):
        raise VfioHostError(f"--vfio {bdf}: {not_viable_message(dev.group, members)}")
    return dev
