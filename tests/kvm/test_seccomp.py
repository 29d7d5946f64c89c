"""Seccomp filters on real `kvmkit-firecracker` processes (docs/security.md), on by default as
in Firecracker: every thread filtered from the moment it exists, a VM with a drive and a
vsock device that runs, pauses and snapshots under the filters, its snapshot loaded into a
new filtered process (and by `kvmkit restore --seccomp`), a forbidden call that ends the
process with one log line and exit status 148, --no-seccomp, and malformed --seccomp-filter
files refused in one line. A Linux guest's I/O under the default filters is the lane's
(tests/hwvirt/test_firecracker_dropin_linux.py)."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from api_proc import VmmProcess, grows

from kvmkit import seccomp
from kvmkit.testing.pvh import serial_loop_kernel

MACHINE = {"vcpu_count": 2, "mem_size_mib": 64}
DEFAULT = Path(seccomp.__file__).with_name("default.json")
# Under the measurement of docs/security.md (KVMKIT_SECCOMP_STRACE) the VMMs run unfiltered
# under strace: the tests then only drive them, for the calls they make.
MEASURING = bool(os.environ.get("KVMKIT_SECCOMP_STRACE"))


def check_threads(pid: int, kinds: set[str]) -> None:
    """Every thread of `pid` is filtered, threads of `kinds` among them, and a vCPU thread
    (a leaf) has more filters than the main thread: its creators' plus its own."""
    if MEASURING:
        return
    seen = threads(pid)
    assert kinds <= {name.split("-", 1)[0] for name in seen}, seen
    assert all(mode == 2 for mode, _ in seen.values()), seen
    main = next(v for k, v in seen.items() if k.endswith(f"/{pid}"))
    assert all(v[1] > main[1] for k, v in seen.items() if k.startswith("vcpu-")), seen


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return serial_loop_kernel(tmp_path_factory.mktemp("kernel") / "loop.elf")


def threads(pid: int) -> dict[str, tuple[int, int]]:
    """Each thread's kernel name (with its tid) -> (Seccomp mode, number of filters)."""
    out = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            comm = Path(f"/proc/{pid}/task/{task}/comm").read_text().strip()
            status = Path(f"/proc/{pid}/task/{task}/status").read_text()
        except FileNotFoundError:
            continue  # a thread that just ended
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        out[f"{comm}/{task}"] = (int(fields["Seccomp"]), int(fields["Seccomp_filters"]))
    return out


def configure(vmm: VmmProcess, kernel: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(1 << 20))
    vmm.ok("PUT", "/machine-config", MACHINE)
    vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(kernel)})
    vmm.ok("PUT", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": str(disk),
                                     "is_root_device": True, "is_read_only": False})  # fmt: skip
    vmm.ok("PUT", "/vsock", {"guest_cid": 3, "uds_path": str(tmp_path / "v.sock")})


def ended(vmm: VmmProcess, within: float = 30) -> int:
    try:
        return vmm.proc.wait(within)
    finally:
        vmm.close()


def test_every_thread_is_filtered_while_waiting_for_its_api(tmp_path: Path) -> None:
    vmm = VmmProcess(tmp_path, entry="firecracker")  # no option: filters are the default
    try:
        assert vmm.ok("GET", "/")["state"] == "Not started"
        check_threads(vmm.proc.pid, {"api"})
    finally:
        status = vmm.close()
    assert MEASURING or status in (0, 130), vmm.stderr()
    assert "seccomp" not in vmm.stderr()


def test_vm_with_drive_and_vsock_runs_pauses_snapshots_and_loads_under_the_filters(
    kernel: Path, tmp_path: Path
) -> None:
    state, mem = tmp_path / "vm.state", tmp_path / "vm.mem"
    vmm = VmmProcess(tmp_path, name="first", entry="firecracker")  # default filters
    try:
        configure(vmm, kernel, tmp_path)
        vmm.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        assert grows(vmm), vmm.stderr()
        check_threads(vmm.proc.pid, {"vcpu", "virtio", "api", "console"})
        # The vsock device's worker accepts a host connection and reads its CONNECT line.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as host:
            host.connect(str(tmp_path / "v.sock"))
            host.sendall(b"CONNECT 52\n")
            time.sleep(0.5)
        vmm.ok("PATCH", "/vm", {"state": "Paused"})
        vmm.ok("PUT", "/snapshot/create", {"snapshot_path": str(state),
                                            "mem_file_path": str(mem)})  # fmt: skip
        vmm.ok("PATCH", "/vm", {"state": "Resumed"})
        assert grows(vmm), vmm.stderr()
        assert vmm.ok("GET", "/vm/config")["drives"][0]["drive_id"] == "rootfs"
        assert vmm.alive(), vmm.stderr()
    finally:
        status = vmm.close()
    assert "seccomp" not in vmm.stderr(), vmm.stderr()
    assert MEASURING or status in (0, 130), vmm.stderr()
    assert state.stat().st_size > 0 and mem.stat().st_size == MACHINE["mem_size_mib"] << 20

    # The snapshot loaded into a new filtered process: the vCPU threads restore their state
    # (on their own threads) and run on, the drive and vsock device are rebuilt.
    second = VmmProcess(tmp_path, name="second", entry="firecracker")
    try:
        load = {"snapshot_path": str(state), "mem_file_path": str(mem), "resume_vm": True}
        second.ok("PUT", "/snapshot/load", load)
        assert grows(second), second.stderr()
        check_threads(second.proc.pid, {"vcpu", "virtio", "api"})
        second.ok("PATCH", "/vm", {"state": "Paused"})
        second.ok("PATCH", "/vm", {"state": "Resumed"})
        assert grows(second), second.stderr()
    finally:
        status = second.close()
    assert "seccomp" not in second.stderr(), second.stderr()
    assert MEASURING or status in (0, 130), second.stderr()

    # `kvmkit restore --seccomp` takes the same snapshot under the same filters
    # (KVMKIT_FORCE_RUN takes it past its host check on this PVM host).
    out = tmp_path / "restore.out"
    with out.open("wb") as stdout:
        restore = subprocess.Popen(
            [sys.executable, "-m", "kvmkit", "restore", "--seccomp", "--state", str(state),
             "--mem", str(mem)], stdout=stdout, stderr=subprocess.PIPE,
            env={**os.environ, "KVMKIT_FORCE_RUN": "1"}, cwd=tmp_path,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while out.stat().st_size == 0 and restore.poll() is None:
            assert time.monotonic() < deadline, "the restored guest printed nothing"
            time.sleep(0.1)
        assert restore.poll() is None
        check_threads(restore.pid, {"vcpu", "virtio"})
    finally:
        restore.terminate()
        _, err = restore.communicate(timeout=30)
    assert "seccomp" not in err.decode(), err
    assert MEASURING or restore.returncode == 130, err


def without(filters: dict[str, Any], category: str, request: int) -> dict[str, Any]:
    """`filters` with the ioctl rule for `request` taken out of `category`."""
    out = json.loads(json.dumps(filters))
    body = out[category]
    before = len(body["filter"])
    body["filter"] = [
        r for r in body["filter"]
        if not (r["syscall"] == "ioctl" and r["args"][0]["val"] == request)
    ]  # fmt: skip
    assert len(body["filter"]) == before - 1
    return out


@pytest.mark.skipif(MEASURING, reason="the measurement runs every VMM without filters")
def test_a_forbidden_call_ends_the_process_with_one_log_line(
    kernel: Path, tmp_path: Path
) -> None:
    # The default filters less KVM_RUN for the vCPU threads: the first vCPU to run is
    # stopped by the filter, the process ends with Firecracker's BadSyscall status.
    from kvmkit.abi.ioctls import RUN

    custom = tmp_path / "filters.json"
    custom.write_text(json.dumps(without(json.loads(DEFAULT.read_text()), "vcpu", RUN)))
    log = tmp_path / "vmm.log"
    log.touch()
    vmm = VmmProcess(tmp_path, "--seccomp-filter", str(custom), "--log-path", str(log),
                     entry="firecracker")  # fmt: skip
    try:
        vmm.ok("PUT", "/machine-config", MACHINE)
        vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(kernel)})
        try:
            vmm("PUT", "/actions", {"action_type": "InstanceStart"})
        except (OSError, http.client.HTTPException):
            pass  # the process may end before it answers, or while it does
    except BaseException:
        vmm.close()  # no VMM left behind by a failed step
        raise
    assert ended(vmm) == seccomp.EXIT_BAD_SYSCALL, vmm.stderr()
    lines = [line for line in vmm.stderr().splitlines() if "seccomp" in line]
    assert len(lines) == 1, vmm.stderr()
    assert "thread vcpu" in lines[0] and "(vcpu filter)" in lines[0], lines
    assert f"forbidden system call 16 (ioctl request {RUN:#x} KVM_RUN)" in lines[0], lines
    assert "forbidden system call 16 (ioctl" in log.read_text()  # the VMM's log too


def test_no_seccomp_leaves_every_thread_unfiltered(kernel: Path, tmp_path: Path) -> None:
    vmm = VmmProcess(tmp_path, "--no-seccomp", entry="firecracker")
    try:
        vmm.ok("PUT", "/machine-config", MACHINE)
        vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(kernel)})
        vmm.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        assert grows(vmm), vmm.stderr()
        seen = threads(vmm.proc.pid)
        assert any(name.startswith("vcpu-") for name in seen)
        assert all(v == (0, 0) for v in seen.values()), seen
    finally:
        vmm.close()


GOOD = {c: {"default_action": "trap", "filter_action": "allow", "filter": []}
        for c in seccomp.FIRECRACKER_CATEGORIES}  # fmt: skip


def bad(**changes: Any) -> str:
    data = json.loads(json.dumps(GOOD))
    for category, body in changes.items():
        if body is None:
            del data[category]
        else:
            data[category] = body
    return json.dumps(data)


@pytest.mark.parametrize(("content", "needle"), [
    ("{", "not valid JSON"),
    ("[]", "the top level must be an object"),
    (bad(api=None), "no filter for thread category api"),
    (bad(gpu=GOOD["vmm"]), "gpu: unknown thread category"),
    (bad(vmm={"default_action": "trap", "filter": []}), "vmm: filter_action is missing"),
    (bad(vmm={"default_action": "explode", "filter_action": "allow", "filter": []}),
     "unknown action \"explode\""),
    (bad(vmm={"default_action": "allow", "filter_action": "allow", "filter": []}),
     "default_action and filter_action are the same"),
    (bad(vcpu={"default_action": "trap", "filter_action": "allow",
               "filter": [{"syscall": "no_such_call"}]}), "unknown system call 'no_such_call'"),
    (bad(vcpu={"default_action": "trap", "filter_action": "allow", "filter": [
        {"syscall": "ioctl", "args": [{"index": 7, "type": "dword", "op": "eq", "val": 1}]}]}),
     "index 7"),
    (bad(vcpu={"default_action": "trap", "filter_action": "allow", "filter": [
        {"syscall": "ioctl", "args": [{"index": 1, "type": "dword", "op": "eq",
                                       "val": 1 << 32}]}]}), "does not fit a dword"),
    (bad(vcpu={"default_action": "trap", "filter_action": "allow", "filter": [
        {"syscall": "ioctl", "args": [{"index": 1, "type": "byte", "op": "eq", "val": 1}]}]}),
     "type must be"),
    (bad(vcpu={"default_action": "trap", "filter_action": "allow", "filter": [
        {"syscall": "ioctl", "args": [{"index": 1, "type": "dword", "op": "like",
                                       "val": 1}]}]}), "op must be one of"),
])  # fmt: skip
def test_a_malformed_filter_file_is_refused_in_one_line(
    tmp_path: Path, content: str, needle: str
) -> None:
    path = tmp_path / "f.json"
    path.write_text(content)
    sock = tmp_path / "api.sock"
    proc = subprocess.run(
        [sys.executable, "-m", "kvmkit.cli.firecracker", "--api-sock", str(sock),
         "--seccomp-filter", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"kvmkit-firecracker: --seccomp-filter {path}: "), lines
    assert needle in lines[0], lines
    assert not sock.exists()  # refused before the API came up


def test_missing_filter_file_and_conflicting_options(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "kvmkit.cli.firecracker", "--api-sock", str(tmp_path / "s")]
    proc = subprocess.run([*base, "--seccomp-filter", str(tmp_path / "nope.json")],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("nope.json: No such file or directory"), proc.stderr
    (tmp_path / "f.json").write_text(json.dumps(GOOD))
    proc = subprocess.run([*base, "--no-seccomp", "--seccomp-filter", str(tmp_path / "f.json")],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 2
    assert "exclude each other" in proc.stderr


def test_firecracker_style_file_is_read() -> None:
    # Firecracker's own spellings: dword/qword, masked_eq as an object, errno actions,
    # comments, the older arg_index/arg_type keys.
    data = {c: dict(GOOD[c]) for c in GOOD}
    data["vmm"] = {"default_action": {"errno": 1}, "filter_action": "allow", "comment": "x",
                   "filter": [
                       {"syscall": "fcntl", "comment": "F_SETFD", "args": [
                           {"index": 1, "type": "dword", "op": "eq", "val": 2, "comment": "c"}]},
                       {"syscall": "mmap", "args": [
                           {"arg_index": 3, "arg_type": "qword", "op": {"masked_eq": 32},
                            "val": 32}]},
                   ]}  # fmt: skip
    filters = seccomp.parse_filters(data, "test")
    assert filters["vmm"].default_action == seccomp.ACT_ERRNO | 1
    assert filters["vmm"].rules[1].conditions[0].mask == 32
    for f in filters.values():
        assert len(seccomp.compile_filter(f)) % 8 == 0  # struct sock_filter is 8 bytes
    # kvmkit's own file is in the same format and names every Firecracker category.
    defaults = seccomp.default_filters()
    assert set(seccomp.FIRECRACKER_CATEGORIES) <= set(defaults)
