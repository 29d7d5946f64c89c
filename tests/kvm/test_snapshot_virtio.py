"""Snapshots of a Machine with virtio devices on real /dev/kvm (a tiny PVH kernel that
halts; the Linux-guest cases run in the lane, tests/hwvirt/test_snapshot_virtio_linux.py and
test_snapshot_net_vsock_linux.py): the devices are saved and rebuilt at the same slots (a
tap reopened by name in a network namespace the test makes, a vsock socket bound anew), and
a restore whose disk image is missing or resized, whose virtio state is malformed, or whose
vsock socket path is taken, fails with one clear error before any VM exists."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmkit.devices.virtio.blk import DriveConfig, VirtioBlk
from kvmkit.devices.virtio.net import NetConfig, VirtioNet, format_mac
from kvmkit.devices.virtio.rng import VirtioRng
from kvmkit.devices.virtio.vsock import VirtioVsock, VsockConfig
from kvmkit.errors import UserError
from kvmkit.kvm.kick import install_kick_handler
from kvmkit.snapshot.format import SnapshotError, encode, read_state
from kvmkit.testing import pvh
from kvmkit.testing.netns import in_netns, temp_netns
from kvmkit.vmm.config import MachineConfig
from kvmkit.vmm.machine import Machine
from kvmkit.vmm.snapshot import restore_machine, snapshot_machine

SRC = Path(__file__).resolve().parents[2] / "src"


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
        snapshot_machine(m, state, mem)
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
        assert [d.save().to_dict() for _, _, d in m.virtio] == [v["device"] for v in virtio]
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
        snapshot_machine(m, state, mem)
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


@pytest.fixture
def pci_snapshot(tmp_path: Path) -> tuple[Path, Path]:
    """A snapshot of a running machine with a virtio-rng on PCI: (state, mem)."""
    cfg = MachineConfig(kernel=build_kernel(tmp_path), cmdline="", mem_mib=64, rng=True,
                        virtio_transport="pci")  # fmt: skip
    state, mem = tmp_path / "vm.state", tmp_path / "vm.mem"
    with Machine(cfg) as m:
        m.start()
        m.pause()
        snapshot_machine(m, state, mem)
    return state, mem


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        # issue 19: this one was a KeyError traceback from devices/pci/config.py, raised after
        # the VM had been built
        (lambda d: d["devices"]["virtio"][0]["transport_state"]["config"].pop("data"),
         r"devices\.virtio\[0\]\.transport_state\.config\.data is missing"),
        (lambda d: d["devices"]["virtio"][0]["transport_state"]["queue_vectors"].append(0),
         r"transport_state: 2 queue vectors for an MSI-X table of 2"),
        (lambda d: d["devices"]["virtio"][0]["transport_state"].update(version=2),
         r"virtio-pci state version 2"),
        (lambda d: d["devices"]["pci_root"].update(address="x"),
         r"devices\.pci_root\.address must be an integer"),
    ],
)  # fmt: skip
def test_kvmkit_restore_refuses_malformed_pci_state_in_one_line(
    pci_snapshot: tuple[Path, Path], damage: Any, message: str
) -> None:
    # docs/snapshot.md promises the whole payload is checked before a VM exists, the PCI
    # transport and root included: one line on stderr, exit status 2. KVMKIT_FORCE_RUN
    # takes `kvmkit restore` past its host check on this PVM host, to where the VM would be
    # built.
    state, mem = pci_snapshot
    data = read_state(state)
    damage(data)
    state.write_bytes(encode(data))
    proc = subprocess.run(
        [sys.executable, "-m", "kvmkit", "restore", "--state", str(state), "--mem", str(mem)],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "KVMKIT_FORCE_RUN": "1", "PYTHONPATH": str(SRC)},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("kvmkit restore: snapshot state: ")
    assert re.search(message, proc.stderr), proc.stderr
    with pytest.raises(SnapshotError, match=message):
        restore_machine(state, mem, kvm_device="/nonexistent")  # no VM: never opened


def test_snapshot_of_the_previous_pci_state_layout_still_loads(
    pci_snapshot: tuple[Path, Path],
) -> None:
    # Before the PCI transport and root states had a version (kvmkit up to 2026-12-03) they
    # held the same fields: such files load as version 1.
    state, mem = pci_snapshot
    data = read_state(state)
    del data["devices"]["virtio"][0]["transport_state"]["version"]
    del data["devices"]["pci_root"]["version"]
    state.write_bytes(encode(data))
    m = restore_machine(state, mem)
    try:
        assert m.pci is not None
        assert m.pci.functions[0].save().to_dict() == {
            **data["devices"]["virtio"][0]["transport_state"], "version": 1
        }
    finally:
        m.close()


# -- virtio-net and vsock (docs/snapshot.md "virtio-net and vsock")

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="needs root and /dev/net/tun (a tap in a network namespace)",
)
TAP = "kvmksnap0"


@pytest.fixture
def netns() -> Iterator[str]:
    with temp_netns("kvmkit-snap") as name:
        yield name


def tap_exists(netns: str) -> bool:
    return subprocess.run(["ip", "-n", netns, "link", "show", TAP], capture_output=True,
                          timeout=30).returncode == 0  # fmt: skip


@pytest.fixture
def net_vsock_snapshot(netns: str, tmp_path: Path) -> Iterator[tuple[Path, Path, str]]:
    """A snapshot of a machine with a virtio-net device on a tap kvmkit creates (no MAC
    given: a random one) and a vsock device: (state, mem, the MAC)."""
    uds = tmp_path / "v.sock"
    cfg = MachineConfig(
        kernel=build_kernel(tmp_path), cmdline="", mem_mib=64, nets=[NetConfig(TAP)],
        vsock=VsockConfig(5, uds),
    )  # fmt: skip
    state, mem = tmp_path / "vm.state", tmp_path / "vm.mem"
    install_kick_handler()  # from the main thread (signal.signal); build runs in another,
    with Machine(cfg) as m:
        in_netns(netns, m.build)  # which makes the tap in the namespace
        m.start()
        m.pause()
        snapshot_machine(m, state, mem)
        dev = m.virtio[0][2]
        assert isinstance(dev, VirtioNet) and dev.created_tap
        mac = format_mac(dev.mac)
    # The old process's host side is gone: the tap it created, its socket file.
    assert not tap_exists(netns) and not uds.exists()
    yield state, mem, mac


@needs_root
def test_net_and_vsock_are_saved_and_restored(
    net_vsock_snapshot: tuple[Path, Path, str], netns: str, tmp_path: Path
) -> None:
    state, mem, mac = net_vsock_snapshot
    uds = tmp_path / "v.sock"
    saved = read_state(state)
    config = saved["meta"]["config"]
    assert config["nets"] == [{"tap": TAP, "mac": mac, "mtu": None, "rx_rate_limiter": None,
                               "tx_rate_limiter": None, "iface_id": None,
                               "mmds": False}]  # fmt: skip
    assert config["mmds_config"] is None
    assert config["vsock"] == {"cid": 5, "uds_path": str(uds)}
    virtio = saved["devices"]["virtio"]
    assert [v["device"]["device_id"] for v in virtio] == [1, 19]
    assert virtio[0]["device"]["device"] == {"tap": TAP, "mac": mac}
    assert virtio[1]["device"]["device"] == {"cid": 5, "next_port": 1 << 30}

    m = in_netns(netns, lambda: restore_machine(state, mem))
    try:
        assert m.config.nets == [NetConfig(TAP, mac)]
        assert m.config.vsock == VsockConfig(5, uds)
        assert [(b, i, type(d)) for b, i, d in m.virtio] == [
            (virtio[0]["base"], virtio[0]["irq"], VirtioNet),
            (virtio[1]["base"], virtio[1]["irq"], VirtioVsock),
        ]
        assert [d.save().to_dict() for _, _, d in m.virtio] == [v["device"] for v in virtio]
        # The restoring process opened the tap by name (created again, as at boot) and
        # bound a new socket at the saved path.
        net = m.virtio[0][2]
        assert isinstance(net, VirtioNet) and net.created_tap and tap_exists(netns)
        assert stat.S_ISSOCK(uds.stat().st_mode)
        m.start()
        m.pause()
        m.resume()
    finally:
        m.close()
    assert not tap_exists(netns) and not uds.exists()


@pytest.mark.parametrize(
    ("where", "key", "value", "message"),
    [
        ("nets", "mac", "zz:00:00:00:00:01", "nets\\[0\\]: mac 'zz:00:00:00:00:01' is not six"),
        ("nets", "mac", None, "nets\\[0\\].mac must be a string"),
        ("nets", "tap", "a/b", "nets\\[0\\]: tap name 'a/b' is not a valid interface name"),
        ("vsock", "cid", 2, "vsock: vsock cid 2: must be between 3"),
        ("vsock", "uds_path", "/tmp/" + "x" * 120, "path too long for a Unix socket"),
        ("vsock", "uds_path", "/nonexistent/v.sock", "no such directory"),
        ("net", "mac", "01:00:00:00:00:01", "virtio\\[0\\].device.device: mac 01:00:00:00:00:01: "
         "a multicast"),
        ("net", "tap", 5, "virtio\\[0\\].device.device.tap must be a string"),
        ("vsock-device", "cid", 1 << 40, "virtio\\[1\\].device.device.cid must be an integer"),
        ("vsock-device", "next_port", 1023, "next_port must be an integer in"),
        ("count", "", None, "more than 9 virtio devices"),
    ],
)  # fmt: skip
@needs_root
def test_malformed_net_or_vsock_state_is_refused_before_any_vm(
    net_vsock_snapshot: tuple[Path, Path, str], where: str, key: str, value: object,
    message: str,
) -> None:  # fmt: skip
    state, mem, _ = net_vsock_snapshot
    data = read_state(state)
    config = data["meta"]["config"]
    if where == "nets":
        config["nets"][0][key] = value
    elif where == "vsock":
        config["vsock"][key] = value
    elif where == "net":
        data["devices"]["virtio"][0]["device"]["device"][key] = value
    elif where == "vsock-device":
        data["devices"]["virtio"][1]["device"]["device"][key] = value
    else:
        config["nets"] = [{"tap": f"t{i}", "mac": "02:00:00:00:00:01"} for i in range(9)]
    state.write_bytes(encode(data))
    with pytest.raises(SnapshotError, match=message):
        restore_machine(state, mem, kvm_device="/nonexistent")  # no VM: never opened


def test_restore_replaces_a_stale_vsock_socket_and_refuses_a_live_one(tmp_path: Path) -> None:
    """The process that took the snapshot removes its socket file when it exits; one that
    was killed leaves it behind. Restore removes such a leftover (nobody listens on it) but
    takes over neither a live socket (the VM it was taken from still running) nor a file
    that is not a socket."""
    uds = tmp_path / "v.sock"
    cfg = MachineConfig(kernel=build_kernel(tmp_path), cmdline="", mem_mib=64,
                        vsock=VsockConfig(3, uds))  # fmt: skip
    state, mem = tmp_path / "vm.state", tmp_path / "vm.mem"
    with Machine(cfg) as m:
        m.start()
        m.pause()
        snapshot_machine(m, state, mem)
        # Killed: its socket file stays (a process that exits removes it, as here below).
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(tmp_path / "stale.sock"))
        stale.close()
    assert not uds.exists()
    (tmp_path / "stale.sock").rename(uds)
    m2 = restore_machine(state, mem)
    try:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.connect(str(uds))  # the restored device listens there now
        probe.close()
        # While it runs, another restore of the same snapshot is refused before any VM.
        with pytest.raises(UserError, match="another process is serving this socket"):
            restore_machine(state, mem, kvm_device="/nonexistent")
    finally:
        m2.close()
    assert not uds.exists()
    uds.write_text("not a socket")
    with pytest.raises(UserError, match="exists and is not a socket"):
        restore_machine(state, mem, kvm_device="/nonexistent")
    assert uds.read_text() == "not a socket"


def test_cache_type_rate_limiters_and_boot_timer_come_back(tmp_path: Path) -> None:
    """Firecracker's drive options and limiters are part of the saved configuration: the
    restored devices offer the same features (Unsafe: no FLUSH), limit the same way, and the
    boot timer keeps the virtio-mmio devices where they were."""
    from kvmkit.devices.virtio.blk import CACHE_UNSAFE
    from kvmkit.devices.virtio.ratelimit import BucketConfig, RateLimiterConfig

    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    limit = RateLimiterConfig(BucketConfig(4096, 100), BucketConfig(10, 1000, 5))
    cfg = MachineConfig(
        kernel=build_kernel(tmp_path), cmdline="", mem_mib=64, boot_timer=True,
        drives=[DriveConfig(img, serial="d0", cache_type=CACHE_UNSAFE, rate_limiter=limit)],
        rng=True, rng_rate_limiter=RateLimiterConfig(BucketConfig(100, 10)),
    )  # fmt: skip
    state, mem = tmp_path / "vm.state", tmp_path / "vm.mem"
    with Machine(cfg) as m:
        assert m.virtio_slots()[0][0] == 0xD000_1000  # the boot timer has 0xd0000000
        m.start()
        m.pause()
        snapshot_machine(m, state, mem)
        bases = [b for b, _, _ in m.virtio]
    r = restore_machine(state, mem)
    try:
        assert r.config.boot_timer and [b for b, _, _ in r.virtio] == bases
        assert r.config.drives[0].cache_type == CACHE_UNSAFE
        blk, rng = r.virtio[0][2], r.virtio[1][2]
        assert isinstance(blk, VirtioBlk) and blk.limiter.config == limit
        assert isinstance(rng, VirtioRng)
        assert rng.limiter.config == RateLimiterConfig(BucketConfig(100, 10))
        r.start()
    finally:
        r.close()
