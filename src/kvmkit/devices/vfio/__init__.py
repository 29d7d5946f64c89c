"""PCI passthrough: a host device behind VFIO as a function of kvmkit's PCI bus
(`VfioPci`), its MSI/MSI-X emulation (`msi`), and the pure rules it follows (`layout`)."""

from kvmkit.devices.vfio.pci import VfioPci
from kvmkit.devices.vfio.platform import VfioPlatform

__all__ = ["VfioPci", "VfioPlatform"]
