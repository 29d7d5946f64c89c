"""The kernel command line kvmkit builds (docs/api.md "The kernel command line"): the base
(`--cmdline`/`boot_args` replacing kvmkit's defaults for a user's kernel, added to them for
the default image), then the devices (root drive, virtio-mmio entries), then kvmkit's
console protocol. No VM is built: only `Machine.kernel_and_initrd`."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmkit.devices.virtio.blk import DriveConfig
from kvmkit.vmm.config import MachineConfig
from kvmkit.vmm.machine import BASE_CMDLINE, Machine


def cmdline(cfg: MachineConfig) -> str:
    with Machine(cfg) as m:
        return m.kernel_and_initrd()[2]


@pytest.fixture
def kernel(tmp_path: Path) -> Path:
    k = tmp_path / "vmlinux"
    k.write_bytes(b"\0")
    return k


def drives(tmp_path: Path, n: int) -> list[DriveConfig]:
    out = []
    for i in range(n):
        p = tmp_path / f"d{i}.img"
        p.write_bytes(bytes(4096))
        out.append(DriveConfig(p))
    return out


def test_defaults_without_boot_args(kernel: Path) -> None:
    assert cmdline(MachineConfig(kernel=kernel)) == BASE_CMDLINE


def test_boot_args_replace_the_defaults_and_devices_follow(kernel: Path, tmp_path: Path) -> None:
    ds = drives(tmp_path, 2)
    ds[0].root = True
    line = cmdline(MachineConfig(kernel=kernel, cmdline="reboot=k panic=1", drives=ds, rng=True))
    # Firecracker: boot_args as given, then the root device and the virtio-mmio devices.
    assert line == ("reboot=k panic=1 root=/dev/vda rw "
                    "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 "
                    "virtio_mmio.device=4K@0xd0002000:7")  # fmt: skip
    assert "console=ttyS0" not in line  # replaced, as Firecracker's default is


def test_root_letter_read_only_and_partuuid(kernel: Path, tmp_path: Path) -> None:
    ds = drives(tmp_path, 3)
    ds[2].root, ds[2].read_only = True, True
    assert "root=/dev/vdc ro" in cmdline(MachineConfig(kernel=kernel, cmdline="", drives=ds))
    ds[2].partuuid = "cafe0123-01"
    line = cmdline(MachineConfig(kernel=kernel, cmdline="x", drives=ds, virtio_transport="pci"))
    assert line == "x root=PARTUUID=cafe0123-01 ro"  # no virtio-mmio entries over PCI


def test_command_parameters_come_last(kernel: Path) -> None:
    with Machine(MachineConfig(kernel=kernel, cmdline="quiet", command=["true"])) as m:
        line = m.kernel_and_initrd()[2]
        assert line.startswith(f"quiet kvmkit.nonce={m.nonce} kvmkit.cmd=")


def test_default_image_keeps_its_parameters_and_adds_cmdline(tmp_path: Path) -> None:
    ds = drives(tmp_path, 1)
    ds[0].root = True
    with Machine(MachineConfig(cmdline="nokaslr", drives=ds)) as m:
        line = m.kernel_and_initrd()[2]
        assert line.startswith(f"{BASE_CMDLINE} quiet nokaslr root=/dev/vda rw ")
        assert line.endswith(f"kvmkit.nonce={m.nonce}")


def test_boot_timer_moves_the_virtio_devices(kernel: Path) -> None:
    line = cmdline(MachineConfig(kernel=kernel, cmdline="", rng=True, boot_timer=True))
    assert line == "virtio_mmio.device=4K@0xd0001000:5"


def test_two_root_drives_and_a_stray_partuuid_are_refused(tmp_path: Path) -> None:
    from kvmkit.errors import UserError

    ds = drives(tmp_path, 2)
    ds[0].root = ds[1].root = True
    with pytest.raises(UserError, match="only one drive"):
        MachineConfig(drives=ds).validate()
    ds[1].root, ds[1].partuuid = False, "x"
    with pytest.raises(UserError, match="partuuid"):
        MachineConfig(drives=ds).validate()
