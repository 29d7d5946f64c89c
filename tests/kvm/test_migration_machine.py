"""Live migration of a `Machine` through the command line, on real /dev/kvm: `kvmkit run
--api-sock` as the source, `kvmkit restore --incoming` as the destination, `kvmkit migrate`
between them. The guest is a tiny PVH kernel (it runs on this PVM host, as the API tests'
does) that keeps rewriting a counter into 2048 pages and prints a '.' per pass, so its
console shows whether it runs; the machine has two vCPUs (the second waits for INIT, as an
AP does before Linux starts it), so every vCPU's state is taken and rebuilt.
KVMKIT_FORCE_RUN lets the VMMs start on a PVM host.

- over TCP, then on from that destination over a Unix socket (a migrated VM migrates
  again), every VMM under its seccomp filters (`--seccomp`): `kvmkit migrate` shows rounds
  and ends with `downtime N ms`; each source exits 0 saying the guest migrated; each
  destination's console goes on;
- the destination killed mid-stream, and the destination refusing the state after the pause
  (the drive image changed size meanwhile): `kvmkit migrate` exits 1 with the reason, the
  source's guest runs on (API state Running, console growing) and migrates fine afterwards;
- a vsock socket and a tap change hands on one host (the source lets go at the hand-over);
- a 195-vCPU machine with APIC IDs past 254, guest RAM on huge pages and a guest NUMA node
  bound to a host node arrives with the same topology, memory backing and binding.
The Linux-guest cases run in the lane (tests/hwvirt/test_migration_linux.py).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from test_huge_pages_kvm import (  # `reserved` is a fixture
    HUGE,
    MACHINE_MIB,
    kernel_page_size,
    numa_line,
    reserved,  # noqa: F401
)

from kvmkit.api.client import request
from kvmkit.devices.virtio.net import NetConfig
from kvmkit.devices.virtio.vsock import VsockConfig
from kvmkit.kvm.kick import install_kick_handler
from kvmkit.migration import Incoming
from kvmkit.testing import pvh
from kvmkit.testing.netns import in_netns, temp_netns
from kvmkit.vmm.config import MachineConfig
from kvmkit.vmm.machine import EndReason, Machine

SRC = Path(__file__).resolve().parents[2] / "src"
ENV = {**os.environ, "KVMKIT_FORCE_RUN": "1", "PYTHONPATH": str(SRC)}
KVMKIT = [sys.executable, "-m", "kvmkit"]


class Proc:
    """A kvmkit process with its stdout and stderr in files (read at any time)."""

    def __init__(self, tmp: Path, name: str, *args: str) -> None:
        self.out, self.err = tmp / f"{name}.out", tmp / f"{name}.err"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen([*KVMKIT, *args], stdout=out, stderr=err, env=ENV)

    def stdout(self) -> bytes:
        return self.out.read_bytes()

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def wait_stderr(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(pattern, self.stderr())
            if found:
                return found
            assert self.proc.poll() is None, f"exited {self.proc.returncode}: {self.stderr()}"
            assert time.monotonic() < deadline, self.stderr()
            time.sleep(0.05)

    def grows(self, within: float = 10.0) -> bool:
        """Its stdout (the guest's console) gets longer."""
        before = len(self.stdout())
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            time.sleep(0.1)
            if len(self.stdout()) > before + 2:
                return True
        return False

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for p in started:
        p.stop()


def kernel(tmp: Path) -> Path:
    return pvh.dirty_loop_kernel(tmp / "dirty.elf")


def source(tmp: Path, procs: list[Proc], *extra: str, name: str = "src") -> Proc:
    sock = str(tmp / f"{name}.sock")
    p = Proc(tmp, name, "run", "--api-sock", sock, "--kernel", str(kernel(tmp)),
             "--cmdline", "x", "--mem-mib", "64", "--vcpus", "2", *extra)  # fmt: skip
    procs.append(p)
    p.wait_stderr("API on")
    assert p.grows(), p.stderr()
    return p


def destination(tmp: Path, procs: list[Proc], url: str, name: str, *extra: str) -> tuple[Proc, str]:
    p = Proc(tmp, name, "restore", "--incoming", url, *extra)
    procs.append(p)
    listening = p.wait_stderr(r"waiting for a migration on (\S+)")
    return p, listening.group(1)


def migrate(tmp: Path, api: str, to: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KVMKIT, "migrate", "--api-sock", api, "--to", to, *extra],
                          capture_output=True, text=True, timeout=300, env=ENV)  # fmt: skip


def downtime(out: str) -> float:
    """The downtime on kvmkit migrate's last line (which ends its output)."""
    last = out.splitlines()[-1]
    found = re.fullmatch(r"kvmkit migrate: migrated to \S+: downtime (\d+) ms, total ([\d.]+) s "
                         r"\(\d+ rounds, \d+ pages, [\d.]+ MiB sent.*\)", last)  # fmt: skip
    assert found, out
    assert re.search(r"where the downtime went: pause \d+ ms, last pages \d+ ms", out), out
    return float(found.group(1))


def filtered(p: Proc) -> bool:
    """Every thread of the process runs under a seccomp filter (docs/security.md)."""
    tasks = Path(f"/proc/{p.proc.pid}/task")
    modes = [line for t in tasks.iterdir() for line in (t / "status").read_text().splitlines()
             if line.startswith("Seccomp:")]  # fmt: skip
    return bool(modes) and all(line.split()[1] == "2" for line in modes)


def test_migrate_over_tcp_then_on_over_a_unix_socket(tmp_path: Path, procs: list[Proc]) -> None:
    # Every VMM under kvmkit's seccomp filters (--seccomp; off by default for kvmkit run and
    # restore): the migration's source and destination paths are in the measured lists.
    src = source(tmp_path, procs, "--seccomp")
    assert filtered(src)
    d1, url1 = destination(tmp_path, procs, "tcp:127.0.0.1:0", "d1", "--seccomp",
                           "--api-sock", str(tmp_path / "d1.sock"))  # fmt: skip
    assert filtered(d1)
    assert re.fullmatch(r"tcp:127\.0\.0\.1:\d+", url1) and not url1.endswith(":0")
    hop1 = migrate(tmp_path, str(tmp_path / "src.sock"), url1, "--bandwidth-mib-s", "8")
    print(hop1.stdout, hop1.stderr)
    assert hop1.returncode == 0, hop1.stderr
    # A line per round (round 0 is the full copy: 16 MiB at 8 MiB/s, about 2 s), then
    # the one with the downtime.
    rounds = re.findall(r"round (\d+): (\d+) pages sent .* dirty rate [\d.]+ MiB/s, "
                        r"expected downtime \d+ ms", hop1.stdout)  # fmt: skip
    assert rounds and rounds[0][0] == "0", hop1.stdout
    # The source ends once the destination took the guest; the destination's console goes on.
    assert src.proc.wait(30) == 0
    assert "the guest migrated away: to " + url1 in src.stderr()
    d1.wait_stderr("migration received")
    assert d1.grows(), d1.stderr()
    info = request(str(tmp_path / "d1.sock"), "GET", "/")[1]
    assert info["state"] == "Running"

    d2, url2 = destination(tmp_path, procs, f"unix:{tmp_path}/in2.sock", "d2", "--seccomp")
    hop2 = migrate(tmp_path, str(tmp_path / "d1.sock"), url2)
    print(hop2.stdout, hop2.stderr)
    assert hop2.returncode == 0, hop2.stderr
    assert d1.proc.wait(30) == 0
    assert d2.grows(), d2.stderr()
    assert filtered(d2)
    assert all("seccomp" not in p.stderr() for p in (src, d1, d2))
    print(f"downtime over tcp {downtime(hop1.stdout)} ms, over unix {downtime(hop2.stdout)} ms")
    assert not (tmp_path / "in2.sock").exists()  # the listener's socket file is gone
    assert d2.stop() == 130


def test_source_runs_on_when_the_destination_dies_mid_stream(
    tmp_path: Path, procs: list[Proc]
) -> None:
    src = source(tmp_path, procs)
    d1, url = destination(tmp_path, procs, f"unix:{tmp_path}/in.sock", "d1")
    api = str(tmp_path / "src.sock")
    # 1 MiB/s: the 8 MiB the guest keeps rewriting take seconds to go out.
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(p=migrate(tmp_path, api, url,
                              "--bandwidth-mib-s", "1")))  # fmt: skip
    thread.start()
    d1.wait_stderr("waiting")
    deadline = time.monotonic() + 60
    while request(api, "GET", "/migration")[1].get("pages_sent", 0) < 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    d1.proc.kill()
    thread.join(120)
    proc = result["p"]
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 1
    assert "migration failed, the guest runs on here" in proc.stderr
    assert request(api, "GET", "/")[1]["state"] == "Running"
    assert request(api, "GET", "/migration")[1]["state"] == "failed"
    assert src.grows(), src.stderr()
    # And it migrates fine to another destination afterwards.
    d2, url2 = destination(tmp_path, procs, f"unix:{tmp_path}/in2.sock", "d2")
    again = migrate(tmp_path, api, url2)
    assert again.returncode == 0, again.stderr
    assert src.proc.wait(30) == 0 and d2.grows()


def test_source_runs_on_when_the_destination_refuses_the_state(
    tmp_path: Path, procs: list[Proc]
) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    src = source(tmp_path, procs, "--drive", str(img))
    d1, url = destination(tmp_path, procs, f"unix:{tmp_path}/in.sock", "d1")
    api = str(tmp_path / "src.sock")
    result: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: result.update(p=migrate(tmp_path, api, url,
                              "--bandwidth-mib-s", "2")))  # fmt: skip
    thread.start()
    deadline = time.monotonic() + 60
    while request(api, "GET", "/migration")[1].get("state") != "precopy":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with img.open("ab") as f:  # the image changes size while the memory goes over
        f.write(bytes(4096))
    thread.join(120)
    proc = result["p"]
    print(proc.stdout, proc.stderr)
    assert proc.returncode == 1
    assert "refused" in proc.stderr and "the guest runs on here" in proc.stderr
    assert "disk.img: the image is 1052672 bytes now, it was 1048576" in proc.stderr
    # The destination refused after the source had paused: it said why, ran nothing.
    assert d1.proc.wait(30) == 2
    assert "migration refused" in d1.stderr() or "refused" in d1.stderr()
    assert d1.stdout() == b""
    assert request(api, "GET", "/")[1]["state"] == "Running"
    assert src.grows(), src.stderr()


# -- a tap and a vsock socket change hands on one host

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
    reason="needs root and /dev/net/tun (a tap in a network namespace)",
)
TAP = "kvmkmig0"


@needs_root
def test_tap_and_vsock_socket_change_hands(tmp_path: Path) -> None:
    install_kick_handler()
    uds = tmp_path / "v.sock"
    cfg = MachineConfig(
        kernel=kernel(tmp_path), cmdline="x", mem_mib=64, nets=[NetConfig(TAP)],
        vsock=VsockConfig(5, uds),
    )  # fmt: skip
    with temp_netns("kvmkit-mig") as ns:
        incoming = Incoming(f"unix:{tmp_path}/in.sock")
        got: dict[str, Any] = {}

        def receive() -> None:
            try:
                got["m"] = in_netns(ns, incoming.receive, timeout=120)
            except BaseException as err:
                got["e"] = err

        receiver = threading.Thread(target=receive)
        receiver.start()
        m = in_netns(ns, lambda: Machine(cfg))
        try:
            m.start()
            assert uds.exists()
            result = m.migrate(f"unix:{tmp_path}/in.sock")
            receiver.join(60)
            assert "e" not in got, got.get("e")
            print(result.summary())
            assert m.wait(10) is not None and m.wait(0).reason is EndReason.MIGRATED  # type: ignore[union-attr]
        finally:
            m.close()
            incoming.close()
        dest = got["m"]
        try:
            dest.start()
            # The source is closed: whoever answers at the vsock path now is the destination,
            # which bound it anew; and the tap is the destination's.
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.connect(str(uds))
            probe.close()
            net = dest.virtio[0][2]
            assert getattr(net, "tap_fd", -1) >= 0
            link = subprocess.run(["ip", "-n", ns, "link", "show", TAP], capture_output=True)
            assert link.returncode == 0
        finally:
            dest.close()


def test_a_truncated_stream_is_refused_with_status_2_and_nothing_run(
    tmp_path: Path, procs: list[Proc]
) -> None:
    from kvmkit.arch.x86_64 import layout
    from kvmkit.migration.stream import Channel, Kind, PageBatch, connect, parse_address
    from kvmkit.vmm.machine import SETUP
    from kvmkit.vmm.persist import config_to_dict

    dest, url = destination(tmp_path, procs, f"unix:{tmp_path}/in.sock", "d")
    ch = Channel(connect(parse_address(url), 10), "the destination")
    ch.send_preamble()
    ch.read_preamble()
    config = MachineConfig(kernel=kernel(tmp_path), cmdline="x", mem_mib=64)
    ch.send_json(Kind.SETUP, {
        "kind": "kvmkit-machine", "config": config_to_dict(config, ()),
        "memory": [[s, n] for s, n in layout.ram_ranges(64 << 20)], "handover": False,
        "vm_setup": SETUP.to_dict(),
    })  # fmt: skip
    ch.recv_json(Kind.READY)
    batch = PageBatch()
    batch.add(0x100000, b"\x90" * 4096)
    whole = b"".join(batch.parts())
    ch.sock.sendall(b"\x03\x00\x00\x00" + len(whole).to_bytes(4, "little") + b"\0\0\0\0")
    ch.sock.sendall(whole[:1000])  # and the connection ends mid-frame
    ch.close()
    assert dest.proc.wait(30) == 2
    err = dest.stderr()
    assert "closed the connection in the middle of a frame" in err, err
    assert "Traceback" not in err
    assert dest.stdout() == b""  # no guest ran: no console output


@pytest.mark.usefixtures("reserved")
def test_huge_pages_numa_and_a_large_topology_migrate(tmp_path: Path) -> None:
    # Guest RAM on 2 MiB huge pages with a guest NUMA node bound to host node 0, and APIC
    # IDs past 254 (KVM_CAP_X2APIC_API): the destination builds the same memory and VM.
    # (`reserved`: tests/kvm/test_huge_pages_kvm.py's fixture, huge pages for two machines.)
    from kvmkit.arch.x86_64.numa import NumaNode
    from kvmkit.arch.x86_64.topology import Topology

    install_kick_handler()
    topology = Topology(sockets=3, cores=65)
    config = MachineConfig(
        kernel=pvh.build(pvh.HALT, tmp_path / "halt.elf"), vcpus=195, mem_mib=MACHINE_MIB,
        topology=topology, huge_pages="2M",
        numa=[NumaNode(frozenset(range(130)), 32, 0), NumaNode(frozenset(range(130, 195)), 32)],
    )  # fmt: skip
    with Incoming(f"unix:{tmp_path}/in.sock") as incoming:
        got: dict[str, Any] = {}
        receiver = threading.Thread(target=lambda: got.update(m=incoming.receive()))
        receiver.start()
        with Machine(config) as vm:
            vm.start()
            result = vm.migrate(f"unix:{tmp_path}/in.sock")
            receiver.join(120)
        print(result.summary())
        dest = got["m"]
        with dest:
            assert dest.config.cpu_topology == topology and dest.x2apic_api
            assert [t.vcpu.id for t in dest.threads] == topology.apic_ids()
            (region,) = dest.mem.regions
            assert region.huge_page_size == HUGE and kernel_page_size(region) == HUGE
            assert "bind:0" in numa_line(dest.mem, 0) and "huge" in numa_line(dest.mem, 0)
            dest.start()
            dest.pause()  # the 195 vCPUs run, and stop, at the destination
