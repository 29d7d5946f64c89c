"""`kvmkit serve` (src/kvmkit/cli/serve.py, docs/api.md): VMM processes forked on request from
a pre-started one, each a whole kvmkit-firecracker with its own API socket, id and stdio,
that boots a guest on /dev/kvm and outlives the serve process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmkit.api.client import request
from kvmkit.cli.serve import spawn
from kvmkit.errors import UserError
from kvmkit.testing.pvh import serial_loop_kernel


@pytest.fixture
def control(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "serve.sock")
    env = dict(os.environ, KVMKIT_FORCE_RUN="1")
    proc = subprocess.Popen([sys.executable, "-m", "kvmkit", "serve", "--control", path],
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)  # fmt: skip
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr
        time.sleep(0.02)
    yield path
    proc.terminate()
    proc.wait(10)


def wait_api(sock: str, within: float = 15) -> dict[str, object]:
    deadline = time.monotonic() + within
    while True:
        try:
            status, value = request(sock, "GET", "/", None, timeout=10)
            assert status == 200
            assert isinstance(value, dict)
            return value
        except OSError:
            assert time.monotonic() < deadline, f"{sock} never answered"
            time.sleep(0.01)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_forked_vmms_serve_boot_and_outlive_serve(control: str, tmp_path: Path) -> None:
    kernel = serial_loop_kernel(tmp_path / "loop.elf")
    out = (tmp_path / "vm1.out").open("wb")
    err = (tmp_path / "vm1.err").open("wb")
    null = os.open(os.devnull, os.O_RDONLY)
    pids = []
    try:
        pids.append(spawn(control, ["--api-sock", str(tmp_path / "vm1.sock"), "--id", "vm1"],
                          stdio=(null, out.fileno(), err.fileno())))  # fmt: skip
        pids.append(spawn(control, ["--api-sock", str(tmp_path / "vm2.sock"), "--id", "vm2"]))
        assert len(set(pids)) == 2 and os.getpid() not in pids
        assert wait_api(str(tmp_path / "vm1.sock"))["id"] == "vm1"
        assert wait_api(str(tmp_path / "vm2.sock"))["id"] == "vm2"
        assert all(os.getsid(pid) == pid for pid in pids)  # each its own session

        vm1 = str(tmp_path / "vm1.sock")
        for method, path, body in (
            ("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 32}),
            ("PUT", "/boot-source", {"kernel_image_path": str(kernel)}),
            ("PUT", "/actions", {"action_type": "InstanceStart"}),
        ):
            status, value = request(vm1, method, path, body, timeout=30)
            assert status == 204, (path, value)
        deadline = time.monotonic() + 30
        while (tmp_path / "vm1.out").stat().st_size < 10:  # the guest's '.' on the console
            assert time.monotonic() < deadline, (tmp_path / "vm1.err").read_text()
            time.sleep(0.05)
        assert set((tmp_path / "vm1.out").read_bytes()) == {ord(".")}

        os.kill(_serve_pid(pids[0]), signal.SIGTERM)
        time.sleep(0.5)
        assert wait_api(vm1)["state"] == "Running"  # the VMM did not go with serve
    finally:
        os.close(null)
        out.close()
        err.close()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def _serve_pid(child: int) -> int:
    """The serve process: the parent of a VMM it forked."""
    return int(Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[1])


def test_bad_requests_are_refused(control: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="args"):
        spawn(control, "not a list")  # type: ignore[arg-type]
    # Arguments kvmkit-firecracker refuses: the VMM says so on its stderr and ends (2).
    err = (tmp_path / "bad.err").open("wb")
    null = os.open(os.devnull, os.O_RDWR)
    try:
        pid = spawn(control, ["--no-such-option"], stdio=(null, null, err.fileno()))
        deadline = time.monotonic() + 15
        while alive(pid):
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        os.close(null)
        err.close()
    assert "unrecognized arguments: --no-such-option" in (tmp_path / "bad.err").read_text()
    # The serve process still serves.
    pid = spawn(control, ["--api-sock", str(tmp_path / "ok.sock")])
    try:
        assert wait_api(str(tmp_path / "ok.sock"))["state"] == "Not started"
    finally:
        os.kill(pid, signal.SIGKILL)
