"""What a guest is told about the PCI bus: the DSDT's host bridge (Linux with ACPI finds PCI
root buses only there) and the kernel command line (no `pci=off` when devices are on PCI)."""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from kvmkit.arch.x86_64 import acpi, layout
from kvmkit.devices.virtio.blk import DriveConfig
from kvmkit.devices.virtio.vsock import VsockConfig
from kvmkit.errors import UserError
from kvmkit.vmm.config import MachineConfig
from kvmkit.vmm.machine import Machine

WINDOW = (layout.PCI_MMIO_BASE, layout.PCI_MMIO_SIZE)


def test_host_bridge_aml_bytes() -> None:
    aml = acpi.dsdt_aml(pci_window=WINDOW)
    assert b"PCI0" in aml
    # _HID EisaId("PNP0A03") as a DWord constant.
    assert b"_HID\x0c" + struct.pack("<I", 0x030AD041) in aml
    # _CRS: bus 0 only (Word address space, resource type 2) and the memory window
    # (DWord address space, type 0) from PCI_MMIO_BASE to its last byte.
    bus = struct.pack("<BHBBBHHHHH", 0x88, 13, 2, 0x0C, 0, 0, 0, 0, 0, 1)
    base, size = WINDOW
    mem = struct.pack("<BHBBBIIIII", 0x87, 23, 0, 0x0C, 1, 0, base, base + size - 1, 0, size)
    assert bus + mem + b"\x79\x00" in aml
    assert b"PCI0" not in acpi.dsdt_aml()


@pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl not installed (acpica-tools)")
def test_iasl_reads_the_host_bridge(tmp_path: Path) -> None:
    dsdt = acpi.sdt(b"DSDT", 2, acpi.dsdt_aml(pci_window=WINDOW))
    (tmp_path / "dsdt.dat").write_bytes(dsdt)
    proc = subprocess.run(["iasl", "-d", "dsdt.dat"], capture_output=True, text=True,
                          cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dsl = (tmp_path / "dsdt.dsl").read_text()
    assert 'Name (_HID, EisaId ("PNP0A03")' in dsl
    assert "WordBusNumber (ResourceProducer, MinFixed, MaxFixed, PosDecode," in dsl
    assert "0xE0000000,         // Range Minimum" in dsl
    assert "0xEEFFFFFF,         // Range Maximum" in dsl


def _cmdline(tmp_path: Path, transport: str, *, rng: bool = True, vsock: bool = False) -> str:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\0")
    cfg = MachineConfig(kernel=kernel, rng=rng, virtio_transport=transport,
                        vsock=VsockConfig(3, tmp_path / "v.sock") if vsock else None)  # fmt: skip
    with Machine(cfg) as m:
        return m.kernel_and_initrd()[2]


def test_cmdline_pci_transport_drops_pci_off(tmp_path: Path) -> None:
    pci = _cmdline(tmp_path, "pci")
    assert "pci=off" not in pci.split()
    assert "virtio_mmio.device" not in pci  # the devices are on PCI, not announced as mmio
    mmio = _cmdline(tmp_path, "mmio")
    assert "pci=off" in mmio.split()
    assert "virtio_mmio.device=4K@0xd0000000:5" in mmio
    # No virtio devices: nothing on PCI, so the guest need not scan it.
    assert "pci=off" in _cmdline(tmp_path, "pci", rng=False).split()
    # Any virtio device counts (a vsock alone, or nets alone, is on the bus too).
    assert "pci=off" not in _cmdline(tmp_path, "pci", rng=False, vsock=True).split()


def test_unknown_transport_is_refused(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(4096))
    cfg = MachineConfig(drives=[DriveConfig(image)], virtio_transport="ccw")
    with pytest.raises(UserError, match="--virtio-transport ccw"):
        cfg.validate()
