"""Snapshots of a Machine with virtio devices on real /dev/kvm (a tiny PVH kernel that
halts; the Linux-guest cases run in the lane, tests/hwvirt/test_snapshot_virtio_linux.py):
the devices are saved and rebuilt at the same slots, and a restore whose disk image is
missing or resized, or whose virtio state is malformed, fails with one clear error before
any VM exists."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmkit.devices.virtio.blk import DriveConfig, VirtioBlk
from kvmkit.devices.virtio.rng import VirtioRng
from kvmkit.snapshot.format import SnapshotError, encode, read_state
from kvmkit.testing import pvh
from kvmkit.vmm.config import MachineConfig
from kvmkit.vmm.machine import Machine
from kvmkit.vmm.snapshot import restore_machine


def build_kernel(tmp_path: Path) -> Path:
    return pvh.build(pvh.HALT, tmp_path / "halt.elf")


@pytest.fixture
def snapshot(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    """A snapshot of a running machine with a drive and an rng: (state, mem, image)."""
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    cfg = MachineConfig(
        kernel=build_kernel(tmp_path), cmdline="", mem_mib=64,
        drives=[DriveConfig(img, serial="d0")], rng=True,
    )  # fmt: skip
    state, mem = tmp_path / "vm.state", tmp_path / "vm.mem"
    with Machine(cfg) as m:
        m.start()
        m.pause()
        m.snapshot(state, mem)
    yield state, mem, img


def test_virtio_devices_are_saved_and_rebuilt_at_their_slots(
    snapshot: tuple[Path, Path, Path],
) -> None:
    state, mem, img = snapshot
    saved = read_state(state)
    virtio = saved["devices"]["virtio"]
    assert [v["device"]["device_id"] for v in virtio] == [2, 4]
    assert virtio[0]["device"]["device"]["path"] == str(img.absolute())
    assert saved["meta"]["config"]["drives"][0]["size"] == 1 << 20
    m = restore_machine(state, mem)
    try:
        assert [(b, i, type(d)) for b, i, d in m.virtio] == [
            (virtio[0]["base"], virtio[0]["irq"], VirtioBlk),
            (virtio[1]["base"], virtio[1]["irq"], VirtioRng),
        ]
        assert m.config.drives == [DriveConfig(img.absolute(), False, "d0")] and m.config.rng
        assert [d.save() for _, _, d in m.virtio] == [v["device"] for v in virtio]
        m.start()
        m.pause()  # the restored machine pauses (vCPUs and worker) like any other
        m.resume()
    finally:
        m.close()


def test_restore_refuses_a_missing_or_resized_image_before_any_vm(
    snapshot: tuple[Path, Path, Path],
) -> None:
    state, mem, img = snapshot
    with img.open("ab") as f:
        f.write(bytes(4096))
    with pytest.raises(SnapshotError, match=r"is 1052672 bytes, it was 1048576"):
        restore_machine(state, mem, kvm_device="/nonexistent")  # no VM: never opened
    img.unlink()
    with pytest.raises(SnapshotError, match=r"disk.img: missing"):
        restore_machine(state, mem, kvm_device="/nonexistent")


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("size", 3, "not a power of 2"),
        ("last_avail", 1 << 16, "last_avail must be an integer"),
        ("next_used", 300, "chains in flight"),
    ],
)
def test_malformed_virtio_state_is_refused_before_any_vm(
    snapshot: tuple[Path, Path, Path], key: str, value: int, message: str
) -> None:
    state, mem, _ = snapshot
    data = read_state(state)
    data["devices"]["virtio"][1]["device"]["queues"][0][key] = value
    state.write_bytes(encode(data))
    with pytest.raises(SnapshotError, match=message):
        restore_machine(state, mem, kvm_device="/nonexistent")


def test_pci_functions_are_saved_and_restored(tmp_path: Path) -> None:
    # Over virtio-pci the transport state is each function's config space, BAR and MSI-X
    # table; a restored machine has the same functions at the same BAR addresses.
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    cfg = MachineConfig(
        kernel=build_kernel(tmp_path), cmdline="", mem_mib=64,
        drives=[DriveConfig(img, serial="d0")], rng=True, virtio_transport="pci",
    )  # fmt: skip
    state, mem = tmp_path / "vm.state", tmp_path / "vm.mem"
    with Machine(cfg) as m:
        m.start()
        m.pause()
        assert m.pci is not None
        # What a driver would have left: memory decoding and bus mastering on.
        m.pci.functions[0].config.write(4, 2, 6)
        m.snapshot(state, mem)
        before = [f.save() for f in m.pci.functions]
    saved = read_state(state)
    assert saved["meta"]["config"]["virtio_transport"] == "pci"
    assert [v["transport"] for v in saved["devices"]["virtio"]] == ["pci", "pci"]
    assert [v["irq"] for v in saved["devices"]["virtio"]] == [-1, -1]
    r = restore_machine(state, mem)
    try:
        assert r.config.virtio_transport == "pci" and r.pci is not None
        assert [f.save() for f in r.pci.functions] == before
        assert [(b, type(d)) for b, _, d in r.virtio] == [
            (v["base"], t) for v, t in zip(saved["devices"]["virtio"], (VirtioBlk, VirtioRng),
                                           strict=True)
        ]  # fmt: skip
        r.start()
        r.pause()
        r.resume()
    finally:
        r.close()
