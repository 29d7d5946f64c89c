"""VFIO passthrough on a host without an IOMMU (this one): the refusals a user sees, the
API's kvmkit extension, the firmware tables a passthrough machine gets, and the pure rules
the passthrough function follows (BARs, capabilities, mmap segments). The device itself is
tested in the lane with QEMU's edu device: tests/hwvirt/test_vfio_linux.py."""

from __future__ import annotations

import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kvmkit.api import ApiError, Vmm
from kvmkit.arch.x86_64 import acpi, layout
from kvmkit.devices.pci.config import BAR0, CAPABILITIES_POINTER, STATUS, STATUS_CAP_LIST
from kvmkit.devices.vfio.layout import (
    IO,
    MEM32,
    MEM64,
    decode_bars,
    find_capabilities,
    mmap_segments,
)
from kvmkit.errors import UserError
from kvmkit.lane import runner
from kvmkit.vfio.sysfs import parse_bdf
from kvmkit.vmm.config import MachineConfig
from kvmkit.vmm.machine import Machine

SYSFS = Path("/sys/bus/pci/devices")


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmkit", "run", *args], capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip


def _one_line_refusal(*args: str) -> str:
    proc = _run(*args, "--", "true")
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# -- refusals a user sees on this host
def test_bad_address_is_refused() -> None:
    line = _one_line_refusal("--vfio", "0000:00:20.0")
    assert "device number 20 is above 1f" in line
    assert "not a PCI address" in _one_line_refusal("--vfio", "eth0")


def test_missing_device_is_refused() -> None:
    line = _one_line_refusal("--vfio", "00ff:ff:1f.7")
    assert line == (
        "kvmkit run: --vfio 00ff:ff:1f.7: no such PCI device on this host "
        "(/sys/bus/pci/devices/00ff:ff:1f.7)"
    )


def test_no_iommu_is_refused() -> None:
    """A device without an IOMMU group: what every device of an IOMMU-less host is."""
    bare = sorted(d.name for d in SYSFS.iterdir() if not (d / "iommu_group").exists()) \
        if SYSFS.is_dir() else []  # fmt: skip
    if not bare:
        pytest.skip("every PCI device of this host has an IOMMU group")
    line = _one_line_refusal("--vfio", bare[0])
    assert f"--vfio {bare[0]}: the device has no IOMMU group" in line
    assert "intel_iommu=on" in line


def test_snapshot_of_a_passthrough_machine_is_refused(tmp_path: Path) -> None:
    line = _one_line_refusal("--snapshot-after", "1", "--vfio", "0000:00:00.0")
    assert "cannot be snapshotted or migrated" in line
    with Machine(MachineConfig(vfio=["0000:00:00.0"])) as machine:
        with pytest.raises(UserError, match="cannot be snapshotted or migrated"):
            machine.capture_state()


def test_migration_of_a_passthrough_machine_is_refused_before_connecting(
    tmp_path: Path,
) -> None:
    """Machine.migrate (behind kvmkit migrate and PUT /migration) refuses at once: the
    destination listening at the address never sees a connection."""
    path = tmp_path / "incoming.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)
        listener.setblocking(False)
        with Machine(MachineConfig(vfio=["0000:00:00.0"])) as machine:
            with pytest.raises(UserError, match="cannot be snapshotted or migrated"):
                machine.migrate(f"unix:{path}")
        with pytest.raises(BlockingIOError):
            listener.accept()


def test_config_validation_runs_the_host_checks() -> None:
    with pytest.raises(UserError, match="no such PCI device"):
        MachineConfig(vfio=["0000:ff:1f.7"]).validate()


def test_parse_bdf_normalizes_and_refuses() -> None:
    assert parse_bdf("01:00.0") == "0000:01:00.0"
    assert parse_bdf(" 0000:0A:1F.7 ") == "0000:0a:1f.7"
    for bad in ("0000:00:01.8", "1:2:3.4.5", "0000:100:00.0", "", "00:00"):
        with pytest.raises(ValueError):
            parse_bdf(bad)


# -- the API's extension
def test_api_vfio_devices_are_kept_checked_and_reported() -> None:
    vmm = Vmm()
    vmm.put_vfio_device("nic0", {"device_id": "nic0", "bdf": "01:00.0"})
    vmm.put_vfio_device("nic0", {"device_id": "nic0", "bdf": "0000:01:00.1"})  # replaced
    assert vmm.vm_config()["vfio-devices"] == [{"device_id": "nic0", "bdf": "0000:01:00.1"}]
    with pytest.raises(ApiError, match="does not match"):
        vmm.put_vfio_device("a", {"device_id": "b", "bdf": "01:00.0"})
    with pytest.raises(ApiError, match="already in use"):
        vmm.put_vfio_device("gpu", {"device_id": "gpu", "bdf": "01:00.1"})
    with pytest.raises(ApiError, match="bdf"):
        vmm.put_vfio_device("x", {"device_id": "x", "bdf": "01:00.9"})
    with pytest.raises(ApiError, match="unknown field"):
        vmm.put_vfio_device("x", {"device_id": "x", "bdf": "01:00.0", "rom": True})
    assert "vfio-devices" not in Vmm().vm_config()
    # InstanceStart runs the host's checks: one line naming the device.
    vmm.set_command(["true"])
    with pytest.raises(ApiError, match=r"--vfio 0000:01:00\.1: no such PCI device"):
        vmm.instance_start()


def test_config_file_takes_vfio_devices() -> None:
    vmm = Vmm()
    vmm.apply_config({"vfio-devices": [{"device_id": "d0", "bdf": "02:00.0"}]})
    assert vmm.vm_config()["vfio-devices"] == [{"device_id": "d0", "bdf": "02:00.0"}]
    with pytest.raises(ApiError, match="vfio-devices"):
        Vmm().apply_config({"vfio-devices": [{"device_id": "d0"}]})


# -- what the firmware tables say on a passthrough machine
def test_dsdt_routes_intx_and_announces_an_io_window() -> None:
    window = (layout.PCI_MMIO_BASE, layout.PCI_MMIO_SIZE)
    aml = acpi.dsdt_aml(pci_window=window, pci_io_window=(0xC000, 0x4000), pci_intx=True)
    # Word I/O range 0xC000-0xFFFF (6.4.3.5.3: resource type 1).
    io = struct.pack("<BHBBBHHHHH", 0x88, 13, 1, 0x0C, 0x03, 0, 0xC000, 0xFFFF, 0, 0x4000)
    assert io in aml
    # _PRT: 128 entries; slot 1 INTA is GSI 17, slot 0x1f INTD GSI 16 + (31 + 3) % 8 = 18.
    assert b"_PRT\x12" in aml
    entry = acpi.aml_package(
        [acpi.aml_integer(0x1FFFF), acpi.aml_integer(0), acpi.aml_integer(0),
         acpi.aml_integer(17)]
    )  # fmt: skip
    assert entry in aml
    assert layout.pci_intx_gsi(31, 4) == 18
    assert b"_PRT" not in acpi.dsdt_aml(pci_window=window)
    with pytest.raises(ValueError):
        layout.pci_intx_gsi(1, 5)


def test_kernel_keeps_pci_on_with_passthrough(tmp_path: Path) -> None:
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"\0")
    with Machine(MachineConfig(kernel=kernel, vfio=["0000:01:00.0"])) as m:
        assert m.uses_pci() and "pci=off" not in m.kernel_and_initrd()[2]


# -- the rules of the passthrough function (devices/vfio/layout.py)
def _config(bars: list[int], caps: tuple[tuple[int, bytes], ...] = ()) -> bytes:
    raw = bytearray(256)
    struct.pack_into("<6I", raw, BAR0, *bars)
    at = 0x40
    prev = CAPABILITIES_POINTER
    for cap_id, body in caps:
        raw[prev] = at
        raw[at] = cap_id
        raw[at + 2 : at + 2 + len(body)] = body
        prev = at + 1
        at += (2 + len(body) + 3) & ~3
    if caps:
        struct.pack_into("<H", raw, STATUS, STATUS_CAP_LIST)
    return bytes(raw)


def test_bars_are_decoded_from_the_registers_and_vfio_sizes() -> None:
    # BAR0 mem32, BAR1 I/O, BAR2+3 mem64 prefetchable, BAR4 unimplemented, BAR5 64-bit type
    # with no upper half (treated as 32-bit).
    raw = _config([0x0, 0x1, 0xC, 0x0, 0x0, 0x4])
    sizes = [1 << 20, 32, 8 << 30, 0, 0, 4096]
    bars = decode_bars(raw, sizes)
    assert [(b.index, b.kind, b.prefetchable, b.size) for b in bars] == [
        (0, MEM32, False, 1 << 20), (1, IO, False, 32), (2, MEM64, True, 8 << 30),
        (5, MEM32, False, 4096),
    ]  # fmt: skip
    mem32, io, mem64, _ = bars
    # What an all-ones sizing write reads back as (PCI 3.0 §6.2.5.1): the size mask, the
    # type bits read-only.
    assert mem32.size_mask | mem32.flags == 0xFFF00000
    assert io.size_mask | io.flags == 0xFFFFFFE1
    assert mem64.size_mask | mem64.flags == 0xFFFFFFFE_0000000C


def test_capability_walk_is_bounded() -> None:
    raw = bytearray(_config([0] * 6, ((0x05, bytes(12)), (0x11, bytes(10)), (0x10, bytes(8)))))
    assert find_capabilities(bytes(raw)) == {0x05: 0x40, 0x11: 0x50, 0x10: 0x5C}
    raw[0x5D] = 0x40  # the last one points back at the first: a loop
    assert find_capabilities(bytes(raw)) == {0x05: 0x40, 0x11: 0x50, 0x10: 0x5C}
    raw[0x41] = 0x30  # a pointer into the header: the list ends there
    assert find_capabilities(bytes(raw)) == {0x05: 0x40}
    raw[STATUS] = 0  # no capability list at all
    assert find_capabilities(bytes(raw)) == {}


def test_mmap_segments_leave_out_the_msix_pages() -> None:
    # A 16 KiB BAR with the MSI-X table in its third page: three pages mapped, in two parts.
    assert mmap_segments([(0, 0x4000)], [(0x2000, 0x100)]) == [(0, 0x2000), (0x3000, 0x1000)]
    # Table and PBA sharing the first page; the rest in one piece.
    assert mmap_segments([(0, 0x4000)], [(0, 0x40), (0x800, 8)]) == [(0x1000, 0x3000)]
    # A BAR of one page holding the table: nothing to map.
    assert mmap_segments([(0, 0x1000)], [(0, 0x40)]) == []
    # Sparse areas (VFIO's), a hole across an area boundary, areas not page-aligned.
    areas = [(0, 0x3000), (0x5000, 0x2000)]
    assert mmap_segments(areas, [(0x2F00, 0x2200)]) == [(0, 0x2000), (0x6000, 0x1000)]
    assert mmap_segments([(0x800, 0x2000)], []) == [(0x1000, 0x1000)]


# -- the lane's passthrough devices (kvmkit lane --device), without booting
def test_lane_devices_get_slots_and_addresses() -> None:
    got = runner.lane_devices(["edu", "edu,addr=0x10.1", "virtio-rng-pci,iommu_platform=on"])
    assert got == [
        runner.LaneDevice(("edu,addr=0x11.0",), "0000:00:11.0"),
        runner.LaneDevice(("edu,addr=0x10.1",), "0000:00:10.1"),
        runner.LaneDevice(("virtio-rng-pci,iommu_platform=on,addr=0x12.0",), "0000:00:12.0"),
    ]
    # root-port=on: a pcie-root-port of its own in the slot, the device on its secondary bus
    # (bound by the port's address and the function's); each port a distinct chassis.
    got = runner.lane_devices(["virtio-rng-pci,root-port=on", "edu,root-port=on,addr=0x1c"])
    assert got == [
        runner.LaneDevice(
            ("pcie-root-port,id=kvmkit_rp1,chassis=1,addr=0x10.0",
             "virtio-rng-pci,bus=kvmkit_rp1,addr=0x0.0"), "0000:00:10.0/00.0",
        ),
        runner.LaneDevice(
            ("pcie-root-port,id=kvmkit_rp2,chassis=2,addr=0x1c.0",
             "edu,bus=kvmkit_rp2,addr=0x0.0"), "0000:00:1c.0/00.0",
        ),
    ]  # fmt: skip
    for bad in ("edu,bus=pcie.1", "edu,addr=0x20", "edu,noequals", ",x=y", "edu,root-port=yes",
                "edu,root-port=on,addr=0x10.1"):  # fmt: skip
        with pytest.raises(UserError):
            runner.lane_devices([bad])


def test_lane_qemu_argv_puts_devices_behind_the_iommu(tmp_path: Path) -> None:
    from kvmkit.lane import assets

    kernel = assets.LaneKernel(tmp_path, "pkg", "1", "6.1")
    fds = {"console": 3, "stdout": 4, "stderr": 5, "control": 6}
    opts = runner.LaneOptions(command=["true"], devices=["edu"])
    argv = runner.qemu_argv("qemu", opts, kernel, tmp_path / "initrd", [], fds)
    assert argv[argv.index("-M") + 1] == "q35,accel=tcg,kernel-irqchip=split"
    assert "intel_iommu=on" in argv[argv.index("-append") + 1]
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devices[0] == "intel-iommu,intremap=on" and devices[-1] == "edu,addr=0x10.0"
    plain = runner.qemu_argv("qemu", runner.LaneOptions(command=["true"]), kernel,
                             tmp_path / "initrd", [], fds)  # fmt: skip
    assert "intel-iommu,intremap=on" not in plain and "q35,accel=tcg" in plain
    script = runner.run_script(["true"], tmp_path, {}, [], ["0000:00:10.0", "0000:00:11.0/00.0"])
    assert "bind_vfio 0000:00:10.0\n" in script and "bind_vfio 0000:00:11.0/00.0\n" in script
    port = runner.LaneOptions(command=["true"], devices=["virtio-rng-pci,root-port=on"])
    argv = runner.qemu_argv("qemu", port, kernel, tmp_path / "initrd", [], fds)
    devices = [argv[i + 1] for i, a in enumerate(argv) if a == "-device"]
    assert devices[-2:] == ["pcie-root-port,id=kvmkit_rp1,chassis=1,addr=0x10.0",
                            "virtio-rng-pci,bus=kvmkit_rp1,addr=0x0.0"]  # fmt: skip
