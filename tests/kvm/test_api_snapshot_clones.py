"""Cloning one snapshot into several VMs through the Firecracker API, as its users do
(snapshot-support.md, network-for-clones.md): `PUT /snapshot/load` with `network_overrides`,
`vsock_override`, a `File` memory backend shared by the clones (MAP_PRIVATE: nobody writes
through to it), `track_dirty_pages` for diff snapshots after the load, and the MMDS
configuration kept in the snapshot. Real `kvmkit-firecracker` processes in a network
namespace the test makes, real taps, a tiny PVH guest that keeps rewriting its memory
(`kvmkit.testing.pvh.DIRTY_LOOP`: a pass counter at 0x7000)."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from api_proc import VmmProcess, grows

from kvmkit.snapshot.memory import merge_diff
from kvmkit.testing import pvh
from kvmkit.testing.netns import temp_netns
from kvmkit.vmm.snapshot import read_snapshot

MACHINE = {"vcpu_count": 1, "mem_size_mib": 32}
PAGES = 64  # pages the guest rewrites each pass, from 16 MiB


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def counter(mem: Path) -> int:
    """The guest's pass counter in a full memory file (region 0 is guest-physical 0)."""
    with mem.open("rb") as f:
        f.seek(pvh.DIRTY_COUNTER)
        return int.from_bytes(f.read(4), "little")


def _family(pid: int) -> list[int]:
    """The process and its descendants (`ip netns exec` execs the VMM; under the seccomp
    measurement it runs below strace)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def tun_ifaces(pid: int) -> list[str]:
    """The tap names the process's /dev/net/tun descriptors are attached to (the `iff:` line
    of their fdinfo, drivers/net/tun.c tun_chr_show_fdinfo)."""
    names = []
    for p in _family(pid):
        try:
            fds = os.listdir(f"/proc/{p}/fdinfo")
        except OSError:
            continue
        for fd in fds:
            try:
                text = Path(f"/proc/{p}/fdinfo/{fd}").read_text()
            except OSError:
                continue
            names += [line.split(":", 1)[1].strip() for line in text.splitlines()
                      if line.startswith("iff:")]  # fmt: skip
    return names


def is_listening_socket(path: Path) -> bool:
    if not path.exists() or not stat.S_ISSOCK(path.stat().st_mode):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()


@pytest.fixture(scope="module")
def netns() -> Iterator[str]:
    with temp_netns("kvmkit-clones") as name:
        yield name


@pytest.fixture(scope="module")
def golden(netns: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A snapshot of a running guest with a network interface (eth0 on tap `kcg0`, serving
    the MMDS, V2) and a vsock device, from a process that is gone afterwards, and so is the
    directory its vsock socket was in (a clone's `vsock_override` must not need it)."""
    work = tmp_path_factory.mktemp("golden")
    kernel = pvh.dirty_loop_kernel(work / "dirty.elf", pages=PAGES)
    state, mem = work / "golden.state", work / "golden.mem"
    vmm = VmmProcess(work, name="golden", entry="firecracker", netns=netns)
    try:
        vmm.ok("PUT", "/machine-config", MACHINE)
        vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(kernel)})
        vmm.ok("PUT", "/network-interfaces/eth0", {"iface_id": "eth0",
                                                    "host_dev_name": "kcg0"})  # fmt: skip
        (work / "gone").mkdir()
        vmm.ok("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(work / "gone" / "g.vsock")})
        vmm.ok("PUT", "/mmds/config", {"version": "V2", "network_interfaces": ["eth0"],
                                        "ipv4_address": "169.254.170.2"})  # fmt: skip
        vmm.ok("PUT", "/mmds", {"k": "v"})
        vmm.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        assert grows(vmm), vmm.stderr()
        vmm.ok("PATCH", "/vm", {"state": "Paused"})
        vmm.ok("PUT", "/snapshot/create", {"snapshot_path": str(state),
                                            "mem_file_path": str(mem)})  # fmt: skip
    finally:
        vmm.close()
    shutil.rmtree(work / "gone")
    assert counter(mem) > 0
    yield state, mem


def load(vmm: VmmProcess, state: Path, mem: Path, tap: str, uds: Path, **extra: object) -> None:
    vmm.ok("PUT", "/snapshot/load", {
        "snapshot_path": str(state),
        "mem_backend": {"backend_type": "File", "backend_path": str(mem)},
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": tap}],
        "vsock_override": {"uds_path": str(uds)}, **extra,
    })  # fmt: skip


def test_two_clones_share_one_memory_file_and_each_keeps_its_own_writes(
    golden: tuple[Path, Path], netns: str, tmp_path: Path
) -> None:
    state, mem = golden
    before = sha256(mem)
    # Clone A runs under kvmkit-firecracker's default seccomp filters (the load path's mmap
    # of the memory file, the tap and the socket must all be allowed); clone B without them.
    a = VmmProcess(tmp_path, name="a", entry="firecracker", netns=netns)
    b = VmmProcess(tmp_path, "--no-seccomp", name="b", entry="firecracker", netns=netns)
    try:
        load(a, state, mem, "kca0", tmp_path / "a.vsock", resume_vm=True)
        load(b, state, mem, "kcb0", tmp_path / "b.vsock")
        assert a.ok("GET", "/")["state"] == "Running"
        assert b.ok("GET", "/")["state"] == "Paused"
        assert "Seccomp:\t2" in Path(f"/proc/{a.proc.pid}/status").read_text()
        assert "Seccomp:\t0" in Path(f"/proc/{b.proc.pid}/status").read_text()
        # Each clone on its own tap and socket; the snapshot's tap and socket are not used.
        assert tun_ifaces(a.proc.pid) == ["kca0"], tun_ifaces(a.proc.pid)
        assert tun_ifaces(b.proc.pid) == ["kcb0"], tun_ifaces(b.proc.pid)
        assert is_listening_socket(tmp_path / "a.vsock")
        assert is_listening_socket(tmp_path / "b.vsock")
        assert not (state.parent / "gone").exists()
        # The MMDS configuration came back with the snapshot, the data store did not.
        config = a.ok("GET", "/vm/config")
        assert config["mmds-config"]["version"] == "V2", config
        assert config["mmds-config"]["ipv4_address"] == "169.254.170.2", config
        assert a.ok("GET", "/mmds") == {}
        a.ok("PUT", "/mmds", {"clone": "a"})
        assert a.ok("GET", "/mmds") == {"clone": "a"} and b.ok("GET", "/mmds") == {}

        assert grows(a), a.stderr()  # A rewrites its pages while B is paused
        a.ok("PATCH", "/vm", {"state": "Paused"})
        a.ok("PUT", "/snapshot/create", {"snapshot_path": str(tmp_path / "a.state"),
                                          "mem_file_path": str(tmp_path / "a.mem")})  # fmt: skip
        b.ok("PUT", "/snapshot/create", {"snapshot_path": str(tmp_path / "b0.state"),
                                          "mem_file_path": str(tmp_path / "b0.mem")})  # fmt: skip
        b.ok("PATCH", "/vm", {"state": "Resumed"})
        assert grows(b), b.stderr()
        b.ok("PATCH", "/vm", {"state": "Paused"})
        b.ok("PUT", "/snapshot/create", {"snapshot_path": str(tmp_path / "b.state"),
                                          "mem_file_path": str(tmp_path / "b.mem")})  # fmt: skip
        assert a.alive() and b.alive(), (a.stderr(), b.stderr())
    finally:
        a.close()
        b.close()
    # Nobody wrote through to the shared file.
    assert sha256(mem) == before
    # B, paused while A ran, saw none of A's writes: its memory is the snapshot's.
    assert (tmp_path / "b0.mem").read_bytes() == mem.read_bytes()
    # Each clone's own writes: both counted on from the snapshot's pass.
    start = counter(mem)
    assert counter(tmp_path / "a.mem") > start and counter(tmp_path / "b.mem") > start


def test_diff_snapshot_after_a_load_holds_the_pages_written_since(
    golden: tuple[Path, Path], netns: str, tmp_path: Path
) -> None:
    state, mem = golden
    before = sha256(mem)
    c = VmmProcess(tmp_path, name="c", entry="firecracker", netns=netns)
    try:
        # Without dirty tracking at the load, no diff (Firecracker's message).
        load(c, state, mem, "kcc0", tmp_path / "c.vsock", resume_vm=True)
        assert grows(c)
        c.ok("PATCH", "/vm", {"state": "Paused"})
        diff = {"snapshot_type": "Diff", "snapshot_path": str(tmp_path / "c.state"),
                "mem_file_path": str(tmp_path / "c.mem")}  # fmt: skip
        assert "dirty page tracking disabled" in c.fault("PUT", "/snapshot/create", diff)
    finally:
        c.close()
    d = VmmProcess(tmp_path, name="d", entry="firecracker", netns=netns)
    try:
        load(d, state, mem, "kcd0", tmp_path / "d.vsock", resume_vm=True,
             track_dirty_pages=True)  # fmt: skip
        assert grows(d)
        d.ok("PATCH", "/vm", {"state": "Paused"})
        d.ok("PUT", "/snapshot/create", {**diff, "snapshot_path": str(tmp_path / "d.state"),
                                          "mem_file_path": str(tmp_path / "d.mem")})  # fmt: skip
    finally:
        d.close()
    assert sha256(mem) == before
    # The diff holds the pages written since the load: the guest's PAGES pages, its counter
    # page and a few more (stack, device rings), not the whole 32 MiB.
    _, layout = read_snapshot(tmp_path / "d.state")
    assert layout.diff
    dirty = sum(int.from_bytes(r.dirty or b"", "little").bit_count() for r in layout.regions)
    assert PAGES <= dirty < 4 * PAGES, dirty
    # Firecracker's rebase: fold the diff into a copy of the base; the diff's state file
    # loads with it and the guest runs on from its counter.
    merged = tmp_path / "merged.mem"
    shutil.copyfile(mem, merged)
    merge_diff(layout, tmp_path / "d.mem", merged)
    assert counter(merged) > counter(mem)
    e = VmmProcess(tmp_path, name="e", entry="firecracker", netns=netns)
    try:
        e.ok("PUT", "/snapshot/load", {"snapshot_path": str(tmp_path / "d.state"),
                                        "mem_file_path": str(merged), "resume_vm": True,
                                        "network_overrides": [{"iface_id": "eth0",
                                                               "host_dev_name": "kce0"}],
                                        "vsock_override": {"uds_path": str(tmp_path / "e.v")}})
        assert grows(e), e.stderr()
    finally:
        e.close()


def test_bad_load_bodies_get_firecracker_errors(
    golden: tuple[Path, Path], netns: str, tmp_path: Path
) -> None:
    state, mem = golden
    vmm = VmmProcess(tmp_path, name="bad", entry="firecracker", netns=netns)
    try:
        base = {"snapshot_path": str(state), "mem_file_path": str(mem)}
        msg = vmm.fault("PUT", "/snapshot/load", {
            **base, "network_overrides": [{"iface_id": "eth9", "host_dev_name": "kcx0"}]})
        assert "Unknown Network Device" in msg and "'eth0'" in msg, msg
        msg = vmm.fault("PUT", "/snapshot/load", {
            **base, "network_overrides": [{"iface_id": "eth0"}]})
        assert "missing field `host_dev_name`" in msg, msg
        msg = vmm.fault("PUT", "/snapshot/load", {**base, "vsock_override": {"path": "x"}})
        assert "missing field `uds_path` at vsock_override" in msg, msg
        msg = vmm.fault("PUT", "/snapshot/load", {**base, "vsock_override": {
            "uds_path": "x", "cid": 5}})
        assert "unknown field `cid`" in msg, msg
        msg = vmm.fault("PUT", "/snapshot/load", {"snapshot_path": str(state), "mem_backend": {
            "backend_type": "Uffd", "backend_path": str(tmp_path / "uffd.sock")}})
        assert "Uffd memory backend" in msg and "not implemented" in msg, msg
        msg = vmm.fault("PUT", "/snapshot/load", {**base, "mem_backend": {
            "backend_type": "File", "backend_path": str(mem)}})
        assert "exactly one of mem_file_path and mem_backend" in msg, msg
        msg = vmm.fault("PUT", "/snapshot/load", {**base, "network_overrides": [
            {"iface_id": "eth0", "host_dev_name": "kcx0"},
            {"iface_id": "eth0", "host_dev_name": "kcx1"}]})
        assert "twice" in msg, msg
        # Nothing was built by any of them; a good body loads afterwards.
        assert vmm.ok("GET", "/")["state"] == "Not started"
        assert tun_ifaces(vmm.proc.pid) == []
        load(vmm, state, mem, "kcx0", tmp_path / "x.vsock")
        assert vmm.ok("GET", "/")["state"] == "Paused"
    finally:
        vmm.close()
