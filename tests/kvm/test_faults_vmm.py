"""Fault injection on a whole `kvmkit-firecracker` process (issue 19; docs/security.md,
"When the host fails"): SIGTERM while a snapshot is being written, the API socket file
deleted under a running VMM, and the console's destination (stdout) gone."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from api_proc import VmmProcess, grows

from kvmkit.api.client import request
from kvmkit.testing import pvh

MACHINE = {"vcpu_count": 1, "mem_size_mib": 64}


def _metrics(vmm: VmmProcess, path: Path) -> dict[str, Any]:
    vmm.ok("PUT", "/actions", {"action_type": "FlushMetrics"})
    line: dict[str, Any] = json.loads(path.read_text().splitlines()[-1])
    return line


def test_sigterm_during_snapshot_create_leaves_no_partial_file(tmp_path: Path) -> None:
    """A guest whose RAM holds 384 MiB of data (a non-zero initrd) makes a snapshot that takes
    a while; SIGTERM in the middle: the process exits with 130, the client gets an answer,
    and neither final name nor any temporary file is left."""
    kernel = pvh.build(pvh.HALT, tmp_path / "halt.elf")
    initrd = tmp_path / "initrd"
    pattern = (bytes(range(1, 256)) * 4200)[: 1 << 20]
    with initrd.open("wb") as f:
        for _ in range(384):
            f.write(pattern)
    vmm = VmmProcess(tmp_path, "--no-seccomp", name="fc", entry="firecracker")
    try:
        vmm.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 512})
        vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(kernel),
                                       "initrd_path": str(initrd)})  # fmt: skip
        vmm.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        vmm.ok("PATCH", "/vm", {"state": "Paused"})
        snap = tmp_path / "snap"
        snap.mkdir()
        answer: list[tuple[int, Any]] = []
        body = {"snapshot_path": str(snap / "vm.state"), "mem_file_path": str(snap / "vm.mem")}

        def create() -> None:
            try:
                answer.append(vmm("PUT", "/snapshot/create", body))
            except OSError as err:  # the connection closed with the process
                answer.append((0, str(err)))

        t = threading.Thread(target=create)
        t.start()
        deadline = time.monotonic() + 20
        while not any(p.name.startswith("vm.mem.tmp") for p in snap.iterdir()):
            assert time.monotonic() < deadline, "the snapshot did not start"
            time.sleep(0.01)
        vmm.proc.send_signal(signal.SIGTERM)
        assert vmm.proc.wait(30) == 130, vmm.stderr()
        t.join(30)
        assert answer, "the client got no answer"
        left = sorted(p.name for p in snap.iterdir())
        if answer[0][0] == 204:  # the snapshot finished within the grace time: whole files
            assert left == ["vm.mem", "vm.state"]
        else:
            assert left == [], left
        assert "Traceback" not in vmm.stderr()
    finally:
        vmm.close()


def test_api_socket_deleted_while_running(tmp_path: Path) -> None:
    """Deleting the socket file does not stop the VMM: the listener stays open (as
    Firecracker's does), a connection opened before keeps working, new clients cannot find
    it; at exit the VMM does not remove a file somebody else put at that path since."""
    kernel = pvh.serial_loop_kernel(tmp_path / "loop.elf")
    vmm = VmmProcess(tmp_path, "--no-seccomp", name="fc", entry="firecracker")
    try:
        keep = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        keep.settimeout(10)
        keep.connect(vmm.sock)
        os.unlink(vmm.sock)
        with pytest.raises(FileNotFoundError):
            request(vmm.sock, "GET", "/", None, timeout=5)
        # the connection opened before: the whole configuration and boot go through it
        for method, path, body in (
            ("PUT", "/machine-config", MACHINE),
            ("PUT", "/boot-source", {"kernel_image_path": str(kernel)}),
            ("PUT", "/actions", {"action_type": "InstanceStart"}),
        ):
            data = json.dumps(body).encode()
            keep.sendall(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: "
                         f"application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                         + data)  # fmt: skip
            reply = keep.recv(65536)
            assert reply.startswith(b"HTTP/1.1 204"), reply
        start = vmm.output_size()
        deadline = time.monotonic() + 20
        while vmm.output_size() == start:
            assert time.monotonic() < deadline, vmm.stderr()
            time.sleep(0.1)
        keep.close()
        # somebody else's file at the path: left alone when the VMM ends
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(vmm.sock)
        try:
            assert vmm.close() in (0, 130, -signal.SIGTERM)
            assert os.path.exists(vmm.sock)
        finally:
            other.close()
    finally:
        vmm.close()


@pytest.mark.parametrize("how", ["pipe reader gone (EPIPE)", "fd 1 closed (EBADF)"])
def test_stdout_gone_does_not_stop_the_vmm(tmp_path: Path, how: str) -> None:
    """The console's destination vanishes: the guest keeps running (its vCPU is not stopped
    nor killed: the serial writes go on, counted in the uart metrics), the API answers,
    pause/resume work, and the VMM ends normally."""
    kernel = pvh.serial_loop_kernel(tmp_path / "loop.elf", delay=2000)
    metrics = tmp_path / "m.jsonl"
    metrics.touch()
    sock = str(tmp_path / "fc.sock")
    err = (tmp_path / "fc.err").open("wb")
    argv = [sys.executable, "-m", "kvmkit.cli.firecracker", "--api-sock", sock, "--no-seccomp"]
    env = dict(os.environ, KVMKIT_FORCE_RUN="1")
    if how.startswith("pipe"):
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err,
                                stdin=subprocess.DEVNULL, env=env)  # fmt: skip
    else:
        # the child starts with descriptor 1 closed (Python then has no sys.stdout)
        proc = subprocess.Popen(["/bin/sh", "-c", 'exec "$@" 1>&-', "sh", *argv], stderr=err,
                                stdin=subprocess.DEVNULL, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            assert proc.poll() is None, (tmp_path / "fc.err").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)

        def ok(method: str, path: str, body: Any = None) -> Any:
            status, value = request(sock, method, path, body, timeout=30)
            assert status in (200, 204), (path, status, value, (tmp_path / "fc.err").read_text())
            return value

        ok("PUT", "/metrics", {"metrics_path": str(metrics)})
        ok("PUT", "/machine-config", MACHINE)
        ok("PUT", "/boot-source", {"kernel_image_path": str(kernel)})
        ok("PUT", "/actions", {"action_type": "InstanceStart"})
        if proc.stdout is not None:
            assert proc.stdout.read(1) == b"."  # the console reaches the pipe ...
            proc.stdout.close()  # ... and then its reader is gone

        def writes() -> int:
            """The guest's serial writes since the previous flush (Firecracker's metrics
            counters are deltas per flush)."""
            ok("PUT", "/actions", {"action_type": "FlushMetrics"})
            return int(json.loads(metrics.read_text().splitlines()[-1])["uart"]["write_count"])

        writes()
        time.sleep(1.0)
        assert writes() > 0, "the guest's serial writes stopped"
        ok("PATCH", "/vm", {"state": "Paused"})
        writes()
        time.sleep(0.5)
        assert writes() == 0
        ok("PATCH", "/vm", {"state": "Resumed"})
        time.sleep(1.0)
        assert writes() > 0
        assert proc.poll() is None
        assert ok("GET", "/")["state"] == "Running"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 130
        assert "Traceback" not in (tmp_path / "fc.err").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        err.close()


def test_snapshot_of_a_restored_vm_onto_its_own_memory_file(tmp_path: Path) -> None:
    """A restored VM maps its memory file MAP_PRIVATE; a snapshot written to that same path
    goes to a new file renamed into place, so the pages the guest never wrote (its code) are
    still read from the old file and land in the new one. (Written in place, the truncation
    zeroed them and the next restore ran zeros.)"""
    kernel = pvh.serial_loop_kernel(tmp_path / "loop.elf")
    code = kernel.read_bytes()
    body = {"snapshot_path": str(tmp_path / "vm.state"), "mem_file_path": str(tmp_path / "vm.mem")}
    load = {"snapshot_path": body["snapshot_path"], "resume_vm": True,
            "mem_backend": {"backend_type": "File", "backend_path": body["mem_file_path"]}}
    vmm = VmmProcess(tmp_path, "--no-seccomp", name="a", entry="firecracker")
    try:
        vmm.ok("PUT", "/machine-config", MACHINE)
        vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(kernel)})
        vmm.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        assert grows(vmm), vmm.stderr()
        vmm.ok("PATCH", "/vm", {"state": "Paused"})
        vmm.ok("PUT", "/snapshot/create", body)
    finally:
        vmm.close()
    for name in ("b", "c"):
        vmm = VmmProcess(tmp_path, "--no-seccomp", name=name, entry="firecracker")
        try:
            vmm.ok("PUT", "/snapshot/load", load)
            assert grows(vmm), vmm.stderr()
            vmm.ok("PATCH", "/vm", {"state": "Paused"})
            vmm.ok("PUT", "/snapshot/create", body)  # onto the file this VM runs from
        finally:
            vmm.close()
        mem = (tmp_path / "vm.mem").read_bytes()
        # the guest's code (at 1 MiB, never written by the guest) is in the new file
        text = code[code.index(b"\x66\xba\xf8\x03") :][:16]  # movw $0x3f8, %dx ...
        assert text in mem[0x100000 : 0x100000 + 4096], name
