"""kvmkit's Firecracker-compatible API: real HTTP over a real Unix socket against real
`kvmkit run --api-sock` processes, with a tiny PVH kernel that loops writing '.' to the
serial port (so a running guest's progress is visible on the process's stdout)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_proc import VmmProcess, grows

from kvmkit.testing.pvh import serial_loop_kernel

MACHINE = {"vcpu_count": 1, "mem_size_mib": 64}


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return serial_loop_kernel(tmp_path_factory.mktemp("kernel") / "loop.elf")


@pytest.fixture
def vmm(tmp_path: Path) -> Iterator[VmmProcess]:
    proc = VmmProcess(tmp_path)
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmmProcess]:
    """One process that is never started: for the many pre-boot bad-input cases."""
    proc = VmmProcess(tmp_path_factory.mktemp("idle"))
    yield proc
    proc.close()


def boot(vmm: VmmProcess, kernel: Path) -> None:
    vmm.ok("PUT", "/machine-config", MACHINE)
    vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(kernel)})
    vmm.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    assert vmm.ok("GET", "/")["state"] == "Running"
    assert grows(vmm), vmm.stderr()


# -- bad input before boot: each a 400 with a fault message, the VMM keeps serving

BAD_REQUESTS: list[tuple[str, str, Any, str]] = [
    # malformed JSON
    ("PUT", "/machine-config", b"{", "not valid JSON"),
    ("PUT", "/machine-config", b"\xff\xfe", "not valid JSON"),
    ("PUT", "/actions", b"NaN", "not valid JSON"),
    ("PUT", "/boot-source", b"", "empty"),
    ("PATCH", "/vm", b"[" * 40000, "not valid JSON"),
    # wrong types
    ("PUT", "/machine-config", {"vcpu_count": "2", "mem_size_mib": 128}, "expected integer"),
    ("PUT", "/machine-config", {"vcpu_count": True, "mem_size_mib": 128}, "expected integer"),
    ("PUT", "/machine-config", {"vcpu_count": 1.5, "mem_size_mib": 128}, "expected integer"),
    ("PUT", "/boot-source", {"kernel_image_path": 7}, "expected string"),
    ("PUT", "/actions", [], "expected object"),
    ("PUT", "/actions", "InstanceStart", "expected object"),
    ("PATCH", "/vm", {"state": None}, "null"),
    # unknown fields
    ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "cpus": 2},
     "unknown field `cpus`"),
    ("PUT", "/actions", {"action_type": "FlushMetrics", "extra": 1}, "unknown field `extra`"),
    ("PUT", "/drives/root", {"drive_id": "root", "is_root_device": True, "path_on_host": "/x",
                             "rate_limiter": {"bandwidth": {"size": 1, "refill_time": 1,
                                                            "burst": 2}}},
     "unknown field `burst`"),
    ("PUT", "/entropy", {"rate_limiter": {"ops": {"size": 1, "refill_time": 1}}, "x": 1},
     "unknown field `x`"),
    # missing required fields
    ("PUT", "/machine-config", {"vcpu_count": 1}, "mem_size_mib"),
    ("PUT", "/boot-source", {"boot_args": "console=ttyS0"}, "kernel_image_path"),
    ("PUT", "/actions", {}, "action_type"),
    ("PUT", "/network-interfaces/eth0", {"iface_id": "eth0"}, "host_dev_name"),
    ("PUT", "/vsock", {"uds_path": "/tmp/v.sock"}, "guest_cid"),
    ("PUT", "/snapshot/create", {"snapshot_path": "s"}, "mem_file_path"),
    # Firecracker's shape for a rate limiter without refill_time, in each place one goes
    ("PUT", "/drives/root", {"drive_id": "root", "is_root_device": True, "path_on_host": "/x",
                             "rate_limiter": {"bandwidth": {"size": 1000}}},
     "An error occurred when deserializing the json body of a request: missing field "
     "`refill_time` at rate_limiter.bandwidth."),
    ("PUT", "/network-interfaces/eth0",
     {"iface_id": "eth0", "host_dev_name": "tap0", "tx_rate_limiter": {"ops": {"size": 5}}},
     "An error occurred when deserializing the json body of a request: missing field "
     "`refill_time` at tx_rate_limiter.ops."),
    ("PUT", "/entropy", {"rate_limiter": {"bandwidth": {"size": 1, "one_time_burst": 2}}},
     "An error occurred when deserializing the json body of a request: missing field "
     "`refill_time`"),
    ("PATCH", "/drives/d1", {"drive_id": "d1", "rate_limiter": {"ops": {"refill_time": 5}}},
     "missing field `size`"),
    # values out of range, or not one of the allowed ones
    ("PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 128}, "at least 1"),
    ("PUT", "/machine-config", {"vcpu_count": 33, "mem_size_mib": 128}, "at most 32"),
    ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": -1}, "at least"),
    ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 10**30}, "at most"),
    ("PUT", "/vsock", {"guest_cid": 2, "uds_path": "/tmp/v.sock"}, "at least 3"),
    ("PUT", "/network-interfaces/eth0",
     {"iface_id": "eth0", "host_dev_name": "tap0", "mtu": 67}, "at least 68"),
    ("PUT", "/network-interfaces/eth0",
     {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "zz"}, "guest_mac"),
    ("PUT", "/drives/d1", {"drive_id": "d1", "is_root_device": True, "path_on_host": "/x",
                           "cache_type": "Writethrough"}, "unknown variant `Writethrough`"),
    ("PUT", "/actions", {"action_type": "Reboot"}, "unknown variant `Reboot`"),
    ("PATCH", "/vm", {"state": "Stopped"}, "unknown variant"),
    ("PUT", "/logger", {"level": "Loud"}, "unknown variant"),
    # semantic checks
    ("PUT", "/boot-source", {"kernel_image_path": "/nonexistent/vmlinux"}, "No such file"),
    ("PUT", "/boot-source", {"kernel_image_path": "/"}, "not a regular file"),
    ("PUT", "/drives/root", {"drive_id": "other", "is_root_device": True,
                             "path_on_host": "/dev/null"}, "does not match"),
    ("PUT", "/drives/bad%20id", {"drive_id": "bad id", "is_root_device": True,
                                 "path_on_host": "/x"}, "Invalid drive_id"),
    ("PUT", "/drives/d1", {"drive_id": "d1", "is_root_device": False,
                           "path_on_host": "/nonexistent"}, "No such file"),
    ("PUT", "/logger", {"log_path": "/nonexistent/log"}, "No such file"),
    ("PUT", "/metrics", {"metrics_path": "/nonexistent/metrics"}, "No such file"),
    ("PUT", "/machine-config", {"vcpu_count": 3, "mem_size_mib": 128, "smt": True},
     "machine-config.smt: 3 vCPUs with SMT: the count must be 1 or an even number"),
    ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 127, "huge_pages": "2M"},
     "must be a multiple of 2"),
    ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 128, "huge_pages": "1G"},
     "unknown variant `1G`, expected one of `None`, `2M`"),
    # out of order (before boot)
    ("PATCH", "/vm", {"state": "Paused"}, "before starting"),
    ("PUT", "/snapshot/create", {"snapshot_path": "s", "mem_file_path": "m"}, "before starting"),
    ("PATCH", "/drives/d1", {"drive_id": "d1", "path_on_host": "/x"}, "before starting"),
    ("PATCH", "/drives/d1", {"drive_id": "d1"},
     "Please specify at least one property to patch: path_on_host, rate_limiter."),
    ("PATCH", "/network-interfaces/e", {"iface_id": "e", "rx_rate_limiter": {}},
     "before starting"),
    ("PUT", "/actions", {"action_type": "InstanceStart"}, "without kernel"),
    ("PUT", "/actions", {"action_type": "FlushMetrics"}, "metrics"),
    ("PUT", "/actions", {"action_type": "SendCtrlAltDel"}, "before starting"),
    ("PUT", "/snapshot/load", {"snapshot_path": "s"}, "mem_file_path"),
    # the snapshot-load option kvmkit does not implement (docs/api.md, differences)
    ("PUT", "/snapshot/load", {"snapshot_path": "s", "mem_backend": {
        "backend_type": "Uffd", "backend_path": "/tmp/uffd.sock"}}, "is not implemented"),
    ("PUT", "/snapshot/load", {"snapshot_path": "s", "mem_file_path": "m",
                               "network_overrides": [{"iface_id": "eth0"}]},
     "missing field `host_dev_name`"),
    # endpoints kvmkit does not implement, and unknown ones
    ("PATCH", "/balloon/hinting/start", {}, "does not implement PATCH /balloon/hinting/start"),
    ("GET", "/serial", None, "does not implement GET /serial"),
    ("PUT", "/cpu-config", {}, "does not implement PUT /cpu-config"),
    ("GET", "/no/such/path", None, "Invalid request method and/or path"),
    ("DELETE", "/vm", None, "Invalid request method and/or path"),
    ("POST", "/actions", {"action_type": "InstanceStart"}, "Invalid request method"),
    ("GET", "/actions", None, "Invalid request method"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "path", "body", "needle"), BAD_REQUESTS,
    ids=[f"{m} {p} {n}" for m, p, _, n in BAD_REQUESTS],
)  # fmt: skip
def test_bad_request_gets_400(
    idle: VmmProcess, method: str, path: str, body: Any, needle: str
) -> None:
    message = idle.fault(method, path, body)
    assert needle in message, message
    assert idle.ok("GET", "/")["state"] == "Not started"
    assert idle.alive()


def test_defaults_and_config_round_trip(vmm: VmmProcess, kernel: Path, tmp_path: Path) -> None:
    assert vmm.ok("GET", "/machine-config") == {
        "vcpu_count": 1, "mem_size_mib": 128, "smt": False, "track_dirty_pages": False,
        "huge_pages": "None",
    }  # fmt: skip
    assert vmm.ok("GET", "/version")["firecracker_version"]
    vmm.ok("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 64})
    vmm.ok("PATCH", "/machine-config", {"track_dirty_pages": True})
    mc = vmm.ok("GET", "/machine-config")
    assert (mc["vcpu_count"], mc["mem_size_mib"], mc["track_dirty_pages"]) == (2, 64, True)
    # a refused update changes nothing
    vmm.fault("PATCH", "/machine-config", {"vcpu_count": 99})
    assert vmm.ok("GET", "/machine-config") == mc
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    drive = {"drive_id": "rootfs", "path_on_host": str(disk), "is_root_device": True,
             "is_read_only": False}  # fmt: skip
    vmm.ok("PUT", "/drives/rootfs", drive)
    second = dict(drive, drive_id="second")
    assert "root block device" in vmm.fault("PUT", "/drives/second", second)
    # "lo" is no tap: InstanceStart will try to attach it and fail (a real tap is in
    # tests/hwvirt/test_net_vsock_linux.py)
    iface = {"iface_id": "eth0", "host_dev_name": "lo", "guest_mac": "06:00:00:00:00:01"}
    vmm.ok("PUT", "/network-interfaces/eth0", iface)
    clash = {"iface_id": "eth1", "host_dev_name": "lo"}
    assert "already in use" in vmm.fault("PUT", "/network-interfaces/eth1", clash)
    vsock = {"guest_cid": 3, "uds_path": str(tmp_path / "v.sock")}
    vmm.ok("PUT", "/vsock", vsock)
    source = {"kernel_image_path": str(kernel), "boot_args": "console=ttyS0"}
    vmm.ok("PUT", "/boot-source", source)
    config = vmm.ok("GET", "/vm/config")
    assert config["boot-source"] == source
    assert config["drives"] == [drive]
    assert config["network-interfaces"] == [iface]
    assert config["vsock"] == vsock
    assert config["machine-config"] == mc
    # the network interface becomes a virtio-net device on its tap: "lo" cannot be opened
    # as one, so InstanceStart fails and says which
    message = vmm.fault("PUT", "/actions", {"action_type": "InstanceStart"})
    assert "--net tap=lo" in message, message
    assert not (tmp_path / "v.sock").exists()
    assert vmm.ok("GET", "/")["state"] == "Not started"
    # a snapshot cannot be loaded into a configured VMM
    load = {"snapshot_path": "s", "mem_file_path": "m"}
    assert "boot-specific" in vmm.fault("PUT", "/snapshot/load", load)


def test_out_of_order_after_boot(vmm: VmmProcess, kernel: Path, tmp_path: Path) -> None:
    boot(vmm, kernel)
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"\0" * 4096)
    after = "not supported after starting"
    drive = {"drive_id": "d", "path_on_host": str(disk), "is_root_device": False}
    assert after in vmm.fault("PUT", "/drives/d", drive)
    assert after in vmm.fault("PUT", "/actions", {"action_type": "InstanceStart"})
    assert after in vmm.fault("PUT", "/machine-config", MACHINE)
    assert after in vmm.fault("PUT", "/boot-source", {"kernel_image_path": str(kernel)})
    snap = {"snapshot_path": str(tmp_path / "s"), "mem_file_path": str(tmp_path / "m")}
    assert "not paused" in vmm.fault("PUT", "/snapshot/create", snap)
    assert after in vmm.fault("PUT", "/snapshot/load", snap)
    assert "Invalid drive_id: no drive 'd'" in vmm.fault(
        "PATCH", "/drives/d", {"drive_id": "d", "rate_limiter": {}}
    )
    assert not (tmp_path / "s").exists()
    assert vmm.ok("GET", "/")["state"] == "Running"
    assert grows(vmm)


def test_pause_resume(vmm: VmmProcess, kernel: Path) -> None:
    boot(vmm, kernel)
    vmm.ok("PATCH", "/vm", {"state": "Paused"})
    assert vmm.ok("GET", "/")["state"] == "Paused"
    vmm.ok("PATCH", "/vm", {"state": "Paused"})  # pausing a paused VM is fine (Firecracker)
    time.sleep(0.3)  # bytes already in the console's delivery path
    assert not grows(vmm, 2.0), "the guest wrote to the console while paused"
    vmm.ok("PATCH", "/vm", {"state": "Resumed"})
    assert vmm.ok("GET", "/")["state"] == "Running"
    assert grows(vmm)


def test_snapshot_create_then_load_in_a_new_process(kernel: Path, tmp_path: Path) -> None:
    state, mem = tmp_path / "vm.state", tmp_path / "vm.mem"
    metrics = [tmp_path / "first.metrics", tmp_path / "second.metrics"]
    for path in metrics:
        path.touch()

    def latencies(vmm: VmmProcess, path: Path) -> dict[str, int]:
        vmm.ok("PUT", "/actions", {"action_type": "FlushMetrics"})
        line: dict[str, int] = json.loads(path.read_text().splitlines()[-1])["latencies_us"]
        return line

    first = VmmProcess(tmp_path, name="first")
    try:
        first.ok("PUT", "/metrics", {"metrics_path": str(metrics[0])})
        boot(first, kernel)
        first.ok("PATCH", "/vm", {"state": "Paused"})
        first.ok("PUT", "/snapshot/create", {"snapshot_path": str(state),
                                              "mem_file_path": str(mem)})  # fmt: skip
        assert state.stat().st_size > 0 and mem.stat().st_size == 64 << 20
        # Firecracker's latencies_us, in µs, the last of each
        took = latencies(first, metrics[0])
        assert took["pause_vm"] > 0 and took["full_create_snapshot"] > 0, took
        assert took["load_snapshot"] == took["resume_vm"] == 0, took
    finally:
        first.close()
    second = VmmProcess(tmp_path, name="second")
    try:
        second.ok("PUT", "/metrics", {"metrics_path": str(metrics[1])})
        second.ok("PUT", "/snapshot/load", {"snapshot_path": str(state),
                                             "mem_file_path": str(mem)})  # fmt: skip
        assert second.ok("GET", "/")["state"] == "Paused"
        assert second.ok("GET", "/machine-config")["mem_size_mib"] == 64
        assert not grows(second, 1.5)
        second.ok("PATCH", "/vm", {"state": "Resumed"})
        assert grows(second), second.stderr()
        took = latencies(second, metrics[1])
        assert took["load_snapshot"] > 0 and took["resume_vm"] > 0, took
        assert "not supported after starting" in second.fault(
            "PUT", "/snapshot/load", {"snapshot_path": str(state), "mem_file_path": str(mem)}
        )
    finally:
        second.close()
    third = VmmProcess(tmp_path, name="third")
    try:  # resume_vm: running at once; a bad file: 400, nothing started
        bad = tmp_path / "bad.state"
        bad.write_bytes(b"garbage" * 100)
        third.fault("PUT", "/snapshot/load", {"snapshot_path": str(bad),
                                               "mem_file_path": str(mem)})  # fmt: skip
        assert third.ok("GET", "/")["state"] == "Not started"
        third.ok("PUT", "/snapshot/load", {"snapshot_path": str(state), "resume_vm": True,
                                            "mem_backend": {"backend_type": "File",
                                                            "backend_path": str(mem)}})  # fmt: skip
        assert third.ok("GET", "/")["state"] == "Running"
        assert grows(third)
    finally:
        third.close()


def test_oversized_body_is_refused(idle: VmmProcess) -> None:
    body = json.dumps({"kernel_image_path": "x" * 60000}).encode()
    status, value = idle("PUT", "/boot-source", body)
    assert status == 413 and "larger than the limit" in value["fault_message"]
    # a huge Content-Length that is never sent: answered at once, connection closed
    reply = idle.raw(b"PUT /boot-source HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413"), reply
    assert idle.ok("GET", "/")["state"] == "Not started"


def test_malformed_http(idle: VmmProcess) -> None:
    for junk in (b"GARBAGE\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"\x00\x01\x02\r\n\r\n",
                 b"PUT /vm HTTP/1.1\r\nContent-Length: abc\r\n\r\n",
                 # str.isdigit() digits int() refuses, and more than int() parses (the
                 # handler raised ValueError and the client got no answer; tests/fuzz)
                 b"PUT /vm HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n",
                 b"PUT /vm HTTP/1.1\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
                 b"PUT /vm HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
                 b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"):  # fmt: skip
        reply = idle.raw(junk)
        assert reply.startswith(b"HTTP/1.") and b" 4" in reply[:13], (junk[:40], reply[:200])
    assert idle.ok("GET", "/")["state"] == "Not started"


def test_client_disconnecting_mid_request(vmm: VmmProcess, kernel: Path) -> None:
    boot(vmm, kernel)
    head = b"PUT /vm HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"
    for partial in (b"PUT /v", b"PUT /vm HTTP/1.1\r\nHost:", head, head + b'{"state": "Pa'):
        vmm.raw(partial, read=False)  # closes right after sending
    # a client that stalls mid-body blocks nobody and is dropped after the read timeout
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.connect(vmm.sock)
    stalled.sendall(head + b'{"sta')
    t0 = time.monotonic()
    assert vmm.ok("GET", "/")["state"] == "Running"
    assert time.monotonic() - t0 < 1.5
    stalled.settimeout(10)
    assert stalled.recv(100) == b""  # closed by the server (KVMKIT_API_READ_TIMEOUT=2)
    stalled.close()
    assert vmm.ok("GET", "/")["state"] == "Running"
    assert grows(vmm)


def test_many_concurrent_clients(vmm: VmmProcess, kernel: Path) -> None:
    boot(vmm, kernel)
    errors: list[str] = []

    def client(i: int) -> None:
        try:
            for j in range(10):
                if (i + j) % 3 == 0:
                    status, value = vmm("GET", "/")
                    ok = status == 200 and value["state"] in ("Running", "Paused")
                elif (i + j) % 3 == 1:
                    status, value = vmm("PUT", "/actions", {"action_type": "InstanceStart"})
                    ok = status == 400
                else:
                    state = "Paused" if j % 2 else "Resumed"
                    status, value = vmm("PATCH", "/vm", {"state": state})
                    ok = status == 204
                if not ok:
                    errors.append(f"{i}/{j}: {status} {value}")
        except Exception as err:
            errors.append(f"{i}: {type(err).__name__}: {err}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not errors, errors[:5]
    vmm.ok("PATCH", "/vm", {"state": "Resumed"})
    assert vmm.alive() and grows(vmm)


def test_metrics_and_logger(vmm: VmmProcess, kernel: Path, tmp_path: Path) -> None:
    log_file, metrics_file = tmp_path / "log.jsonl", tmp_path / "metrics.jsonl"
    log_file.touch()
    metrics_file.touch()
    vmm.ok("PUT", "/logger", {"log_path": str(log_file), "level": "Info",
                              "show_log_origin": True})  # fmt: skip
    vmm.ok("PUT", "/metrics", {"metrics_path": str(metrics_file)})
    assert "Reinitialization" in vmm.fault("PUT", "/metrics", {"metrics_path": str(metrics_file)})
    vmm.fault("PUT", "/machine-config", {"vcpu_count": 0, "mem_size_mib": 64})
    boot(vmm, kernel)
    time.sleep(1)
    vmm.ok("PUT", "/actions", {"action_type": "FlushMetrics"})
    vmm.ok("PUT", "/actions", {"action_type": "FlushMetrics"})
    lines = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert len(lines) == 2
    first = lines[0]
    assert first["put_api_requests"]["machine_cfg_count"] == 2
    assert first["put_api_requests"]["machine_cfg_fails"] == 1
    assert first["put_api_requests"]["metrics_fails"] == 1
    assert first["uart"]["write_count"] > 0  # THR writes, through the coalesced ring or not
    assert first["block"]["read_bytes"] == 0 and "net" in first
    assert lines[1]["put_api_requests"]["machine_cfg_count"] == 0  # deltas, as Firecracker
    entries = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert entries and all({"ts", "level", "msg", "instance"} <= set(e) for e in entries)
    assert any("InstanceStart" in e["msg"] for e in entries)
    assert any(e["level"] == "Info" and "origin" in e for e in entries)


def test_send_ctrl_alt_del(vmm: VmmProcess, kernel: Path) -> None:
    # The keys reach the i8042 (IRQ 1); the tiny kernel ignores them and keeps running.
    boot(vmm, kernel)
    vmm.ok("PUT", "/actions", {"action_type": "SendCtrlAltDel"})
    assert vmm.ok("GET", "/")["state"] == "Running"
    assert grows(vmm)
    vmm.ok("PATCH", "/vm", {"state": "Paused"})
    assert "paused" in vmm.fault("PUT", "/actions", {"action_type": "SendCtrlAltDel"})


def _config(kernel: Path, tmp_path: Path) -> Path:
    cfg = tmp_path / "vm.json"
    cfg.write_text(json.dumps({
        "boot-source": {"kernel_image_path": str(kernel), "boot_args": "console=ttyS0"},
        "machine-config": MACHINE, "drives": [], "network-interfaces": [],
    }))  # fmt: skip
    return cfg


def test_config_file_boots_and_ctl_controls(kernel: Path, tmp_path: Path) -> None:
    vmm = VmmProcess(tmp_path, "--config-file", str(_config(kernel, tmp_path)))
    try:
        assert grows(vmm), vmm.stderr()

        def ctl(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "kvmkit", "ctl", "--api-sock", vmm.sock, *args],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip

        info = ctl("info")
        assert info.returncode == 0 and json.loads(info.stdout)["state"] == "Running"
        assert ctl("pause").returncode == 0
        assert json.loads(ctl("info").stdout)["state"] == "Paused"
        snap = ctl("snapshot", "--state", str(tmp_path / "s"), "--mem", str(tmp_path / "m"))
        assert snap.returncode == 0, snap.stderr
        assert ctl("resume").returncode == 0
        again = ctl("start")
        assert again.returncode == 1 and "not supported after starting" in again.stderr
        config = json.loads(ctl("config").stdout)
        assert config["boot-source"]["kernel_image_path"] == str(kernel)
        raw = ctl("patch", "/vm", '{"state": "Paused"}')
        assert raw.returncode == 0, raw.stderr
        assert json.loads(ctl("get", "/").stdout)["state"] == "Paused"
    finally:
        vmm.close()
    gone = subprocess.run(
        [sys.executable, "-m", "kvmkit", "ctl", "--api-sock", vmm.sock, "info"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert gone.returncode == 2 and gone.stderr.count("\n") == 1


def test_firecracker_entry_point(kernel: Path, tmp_path: Path) -> None:
    vmm = VmmProcess(tmp_path, name="fc", entry="firecracker")
    try:
        assert vmm.ok("GET", "/")["state"] == "Not started"
        boot(vmm, kernel)
    finally:
        vmm.close()
    env = dict(os.environ, KVMKIT_FORCE_RUN="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmkit.cli.firecracker", "--no-api", "--config-file",
         str(_config(kernel, tmp_path))],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        assert proc.stdout.read(3) == b"..."
    finally:
        proc.terminate()
        proc.wait(20)


@pytest.mark.parametrize(
    ("content", "needle"),
    [("{", "not valid JSON"), ('{"boot-source": {}}', "kernel_image_path"),
     ('{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64}, "pmem": []}',
      "unknown field `pmem`"),
     ('{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64}, "balloon": {}}',
      "missing field `amount_mib` at balloon"),
     ('{"boot-source": {"kernel_image_path": "/nonexistent"}}', "No such file")],
)  # fmt: skip
def test_bad_config_file(tmp_path: Path, content: str, needle: str) -> None:
    cfg = tmp_path / "bad.json"
    cfg.write_text(content)
    proc = subprocess.run(
        [sys.executable, "-m", "kvmkit", "run", "--config-file", str(cfg)],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, KVMKIT_FORCE_RUN="1"),
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr


def test_socket_in_use_is_refused(idle: VmmProcess) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kvmkit", "run", "--api-sock", idle.sock],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "another process" in proc.stderr, proc.stderr
    assert idle.ok("GET", "/")["state"] == "Not started"
