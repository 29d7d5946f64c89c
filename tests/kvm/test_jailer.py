"""`kvmkit-jailer` on the host, for real: root, new mount and pid namespaces, a network
namespace made here, the cgroup v2 hierarchy, uid/gid 1234. The jailed `kvmkit-firecracker`
answers at `<jail>/run/firecracker.socket`, runs without any capability as 1234:1234, sees
the jail as its root, boots a tiny guest from files put in the jail, and cannot reach host
files through the paths API clients send."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kvmkit import jail
from kvmkit.api.client import request
from kvmkit.testing import pvh
from kvmkit.testing.netns import temp_netns

BIN = Path(sys.executable).parent
JAILER = BIN / "kvmkit-jailer"
VMM = BIN / "kvmkit-firecracker"
UID = GID = 1234
MACHINE = {"vcpu_count": 1, "mem_size_mib": 64}
ENV = dict(os.environ, KVMKIT_FORCE_RUN="1", KVMKIT_API_READ_TIMEOUT="2")

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the jailer needs root")


def jailer(*args: str, timeout: float = 60,
           leader: bool = False) -> subprocess.CompletedProcess[str]:  # fmt: skip
    return subprocess.run([str(JAILER), *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout, start_new_session=leader)  # fmt: skip


def status(pid: int, task: int | None = None) -> dict[str, str]:
    where = f"/proc/{pid}" if task is None else f"/proc/{task}/task/{pid}"
    out = {}
    for line in Path(f"{where}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def wait_for(path: Path, proc: subprocess.Popen[bytes] | None, err: Path) -> None:
    deadline = time.monotonic() + 60
    while not path.exists():
        if proc is not None:
            assert proc.poll() is None, err.read_text()
        assert time.monotonic() < deadline, f"{path} did not appear: {err.read_text()}"
        time.sleep(0.05)


def api(sock: Path, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    return request(str(sock), method, path, body, timeout=30)


def ok(sock: Path, method: str, path: str, body: Any = None) -> Any:
    got, value = api(sock, method, path, body)
    assert got in (200, 204), (method, path, got, value)
    return value


def end(pid: int) -> None:
    """SIGTERM, then SIGKILL: a pid namespace's init takes SIGTERM only through kvmkit's
    handler, which it has once it serves."""
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not Path(f"/proc/{pid}").exists() or status(pid).get("State", "").startswith("Z"):
                return
            time.sleep(0.1)


@pytest.fixture
def jails() -> Iterator[Path]:
    """A short chroot base under /tmp (a Unix socket path holds at most 107 bytes, and
    pytest's tmp_path is long), removed afterwards."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="kj", dir="/tmp"))
    yield base / "jails"
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def cgroup_parent() -> Iterator[str | None]:
    """A parent cgroup of our own in the v2 hierarchy, removed with whatever the jailer made
    under it; None (and the reason printed) where the hierarchy is not there or not ours."""
    base = jail.cgroup2_mount()
    name = f"kvmkit-test-{uuid.uuid4().hex[:8]}"
    if base is None or not os.access(base, os.W_OK):
        print(f"no writable cgroup v2 hierarchy ({base}): the cgroup part is not checked")
        yield None
        return
    yield name
    top = Path(base, name)
    for d in sorted(top.glob("**/"), key=lambda p: len(p.parts), reverse=True):
        d.rmdir()


def test_jailed_vmm_serves_boots_and_confines_paths(tmp_path: Path, jails: Path,
                                                    cgroup_parent: str | None) -> None:  # fmt: skip
    base = jails
    root = base / "kvmkit-firecracker" / "t1" / "root"
    root.mkdir(parents=True)
    # What the client will name, put in the jail beforehand as Firecracker's docs say
    # (hard links or copies, readable or writable by the VMM's uid).
    pvh.serial_loop_kernel(root / "vmlinux")
    (root / "vmlinux").chmod(0o644)
    (root / "disk.img").write_bytes(bytes(1 << 20))
    os.chown(root / "disk.img", UID, GID)
    cg_args = [] if cgroup_parent is None else [
        "--parent-cgroup", cgroup_parent, "--cgroup", "cgroup.max.descendants=0"]
    out, err = tmp_path / "vmm.out", tmp_path / "vmm.err"
    with temp_netns("kvmkit-jail") as ns:
        # The tap is made by the host's administrator, in the VMM's namespace, for its uid
        # (the VMM has no CAP_NET_ADMIN to make one), as with Firecracker.
        subprocess.run(["ip", "-n", ns, "tuntap", "add", "dev", "tap0", "mode", "tap",
                        "user", str(UID), "group", str(GID)], check=True)  # fmt: skip
        proc = subprocess.Popen(
            [str(JAILER), "--id", "t1", "--uid", str(UID), "--gid", str(GID),
             "--exec-file", str(VMM), "--chroot-base-dir", str(base),
             "--netns", f"/run/netns/{ns}", *cg_args, "--", "--level", "Info"],
            stdout=out.open("wb"), stderr=err.open("wb"), stdin=subprocess.DEVNULL, env=ENV,
        )  # fmt: skip
        sock = root / "run" / "firecracker.socket"  # Firecracker's default, in the jail
        try:
            wait_for(sock, proc, err)
            assert ok(sock, "GET", "/")["id"] == "t1"
            pid = proc.pid  # the jailer exec'd the VMM: same process
            st = status(pid)
            assert st["Uid"].split() == [str(UID)] * 4 and st["Gid"].split() == [str(GID)] * 4
            assert st["Groups"] == ""
            for caps in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                assert int(st[caps], 16) == 0, (caps, st[caps])
            assert st["NoNewPrivs"] == "1"
            assert os.path.samefile(f"/proc/{pid}/root", root)
            assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{ns}").st_ino
            assert os.stat(f"/proc/{pid}/ns/mnt").st_ino != os.stat("/proc/self/ns/mnt").st_ino
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            assert b"/kvmkit-firecracker" in cmdline and b"--id=t1" in cmdline
            if cgroup_parent is not None:
                cg = f"/{cgroup_parent}/t1"
                assert f"0::{cg}\n" in Path(f"/proc/{pid}/cgroup").read_text()
                base_cg = jail.cgroup2_mount()
                assert base_cg is not None
                value = Path(base_cg + cg, "cgroup.max.descendants").read_text()
                assert value.strip() == "0"
            # The jail holds the device nodes, and no host file.
            inside = sorted(p.name for p in (root / "dev").iterdir())
            assert inside == ["kvm", "net", "urandom"]
            assert not (root / "etc" / "passwd").exists()
            # Client paths resolve in the jail: host files are out of reach, whatever the
            # spelling, and so is the jail's own host path.
            for path in ("/etc/passwd", "../../etc/passwd", "/proc/self/environ",
                         str(root / "disk.img")):  # fmt: skip
                got, value = api(sock, "PUT", "/drives/d", {
                    "drive_id": "d", "path_on_host": path, "is_root_device": False,
                    "is_read_only": True})  # fmt: skip
                assert got == 400 and "No such file" in value["fault_message"], (path, value)
            for method, path, body in (
                ("PUT", "/boot-source", {"kernel_image_path": "/etc/hostname"}),
                ("PUT", "/boot-source", {"kernel_image_path": "/vmlinux",
                                         "initrd_path": "/etc/hostname"}),
                ("PUT", "/logger", {"log_path": "/etc/hostname"}),
                ("PUT", "/metrics", {"metrics_path": "/etc/hostname"}),
                ("PUT", "/snapshot/load", {"snapshot_path": "/etc/hostname", "mem_backend": {
                    "backend_type": "File", "backend_path": "/etc/hostname"}}),
            ):  # fmt: skip
                got, value = api(sock, method, path, body)
                assert got == 400 and "No such file" in value["fault_message"], (path, value)
            # Only standard I/O came from the jailer: no fd of the host's namespaces or files.
            fds = {fd: os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
            assert {fds["0"], fds["1"], fds["2"]} == {"/dev/null", str(out), str(err)}
            assert all(t.startswith(("socket:", "anon_inode:")) for fd, t in fds.items()
                       if fd not in ("0", "1", "2")), fds  # fmt: skip
            # A read-only runtime file is visible (docs/security.md says so) but not writable.
            got, value = api(sock, "PUT", "/drives/d", {
                "drive_id": "d", "path_on_host": os.path.realpath(sys.executable),
                "is_root_device": False, "is_read_only": False})  # fmt: skip
            assert got == 400, value
            ok(sock, "PUT", "/drives/d", {"drive_id": "d", "path_on_host": "/disk.img",
                                          "is_root_device": False})  # fmt: skip
            ok(sock, "PUT", "/network-interfaces/eth0",
               {"iface_id": "eth0", "host_dev_name": "tap0"})  # fmt: skip
            ok(sock, "PUT", "/vsock", {"guest_cid": 3, "uds_path": "/run/v.sock"})
            # kvmkit counts huge pages in /sys, which the jail lacks (docs/security.md).
            got, value = api(sock, "PUT", "/machine-config", {**MACHINE, "huge_pages": "2M"})
            assert got == 400 and "no 2 MiB huge pages" in value["fault_message"], value
            ok(sock, "PUT", "/machine-config", MACHINE)
            ok(sock, "PUT", "/boot-source", {"kernel_image_path": "/vmlinux"})
            ok(sock, "PUT", "/actions", {"action_type": "InstanceStart"})
            assert (root / "run" / "v.sock").is_socket()
            start = out.stat().st_size
            deadline = time.monotonic() + 20
            while out.stat().st_size == start and time.monotonic() < deadline:
                time.sleep(0.1)
            assert out.stat().st_size > start, err.read_text()
            # Files the VMM writes land in the jail, as its uid.
            ok(sock, "PATCH", "/vm", {"state": "Paused"})
            ok(sock, "PUT", "/snapshot/create", {"snapshot_path": "/run/vm.state",
                                                 "mem_file_path": "/run/vm.mem"})  # fmt: skip
            assert (root / "run" / "vm.state").stat().st_uid == UID
            assert (root / "run" / "vm.mem").stat().st_size == 64 << 20
            assert not Path("/run/vm.state").exists()
        finally:
            end(proc.pid)
            proc.wait(10)
    shutil.rmtree(base)


def test_seccomp_new_pid_ns_and_daemonize(jails: Path) -> None:
    """The jailer's other modes: the VMM as pid 1 of its own pid namespace (its host pid in
    `<jail>/kvmkit-firecracker.pid`), daemonized, under kvmkit's seccomp filters. The jailer
    starts as a process group leader, which cannot setsid: it forks for that."""
    base = jails
    root = base / "kvmkit-firecracker" / "t2" / "root"
    root.mkdir(parents=True)
    pvh.serial_loop_kernel(root / "vmlinux")
    (root / "vmlinux").chmod(0o644)
    proc = jailer("--id", "t2", "--uid", str(UID), "--gid", str(GID), "--exec-file",
                  str(VMM), "--chroot-base-dir", str(base), "--new-pid-ns", "--daemonize",
                  "--resource-limit", "no-file=512", "--", "--seccomp",
                  leader=True)  # fmt: skip
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    pid_file = root / "kvmkit-firecracker.pid"
    sock = root / "run" / "firecracker.socket"
    wait_for(pid_file, None, pid_file)
    pid = int(pid_file.read_text())
    try:
        wait_for(sock, None, pid_file)
        st = status(pid)
        assert st["NSpid"].split()[-1] == "1"  # init of its own pid namespace
        assert st["Uid"].split()[0] == str(UID) and int(st["CapEff"], 16) == 0
        assert os.readlink(f"/proc/{pid}/fd/1") == "/dev/null"
        assert os.getsid(pid) != os.getsid(0)  # a session of its own (setsid)
        limits = Path(f"/proc/{pid}/limits").read_text()
        assert any(line.startswith("Max open files") and line.split()[3:5] == ["512", "512"]
                   for line in limits.splitlines()), limits  # fmt: skip
        ok(sock, "PUT", "/machine-config", MACHINE)
        ok(sock, "PUT", "/boot-source", {"kernel_image_path": "/vmlinux"})
        ok(sock, "PUT", "/actions", {"action_type": "InstanceStart"})
        time.sleep(1)
        assert ok(sock, "GET", "/")["state"] == "Running"
        seen = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:  # an API connection thread may end meanwhile
                seen.append((task.name, status(pid=int(task.name), task=pid)["Seccomp"]))
            except FileNotFoundError:
                continue
        assert len(seen) >= 3 and all(mode == "2" for _, mode in seen), seen
    finally:
        end(pid)
    shutil.rmtree(base)


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["--id", "bad id!"], "--id"),
     (["--id", "x" * 65], "--id"),
     (["--exec-file", "/nonexistent/kvmkit-firecracker"], "no such file"),
     (["--exec-file", "/bin/true"], "must contain 'firecracker'"),
     (["--netns", "/run/netns/kvmkit-no-such-ns"], "--netns"),
     (["--netns", "/etc/hostname"], "not a network namespace"),
     (["--cgroup-version", "1", "--cgroup", "cpu.weight=10"], "cgroup v2 only"),
     (["--cgroup", "nonesuch.max=1"], "controller is not available"),
     (["--resource-limit", "stack=1"], "fsize, no-file")],
)  # fmt: skip
def test_refusals_leave_nothing(tmp_path: Path, args: list[str], needle: str) -> None:
    base = tmp_path / "jails"
    given = dict(zip(args[::2], args[1::2], strict=False))
    cmd = {"--id": "t3", "--uid": str(UID), "--gid": str(GID), "--exec-file": str(VMM),
           "--chroot-base-dir": str(base)}  # fmt: skip
    extra = [a for k, v in given.items() if k not in cmd for a in (k, v)]
    cmd.update({k: v for k, v in given.items() if k in cmd})
    proc = jailer(*[a for kv in cmd.items() for a in kv], *extra)
    assert proc.returncode == 2, proc
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvmkit-jailer: ") and needle in lines[0], lines
    assert not base.exists()


def test_failure_midway_is_undone(tmp_path: Path, cgroup_parent: str | None) -> None:
    """A cgroup file that does not exist is found after the jail directory and the cgroup
    are made: both are removed again."""
    if cgroup_parent is None:
        return  # printed by the fixture
    base = tmp_path / "jails"
    proc = jailer("--id", "t4", "--uid", str(UID), "--gid", str(GID), "--exec-file", str(VMM),
                  "--chroot-base-dir", str(base), "--parent-cgroup", cgroup_parent,
                  "--cgroup", "cgroup.nonesuch=1")  # fmt: skip
    assert proc.returncode == 2 and "cgroup.nonesuch" in proc.stderr, proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert not base.exists()
    base_cg = jail.cgroup2_mount()
    assert base_cg is not None and not Path(base_cg, cgroup_parent).exists()


def test_not_root_is_refused(tmp_path: Path) -> None:
    """In a forked child that has become uid 1234 (the interpreter, under /root here, is out
    of a non-root user's reach, so the check runs in-process)."""
    from kvmkit.cli import jailer as cli

    read, write = os.pipe()
    child = os.fork()
    if child == 0:
        rc = 99
        try:
            os.dup2(write, 2)
            sys.stderr = os.fdopen(2, "w")  # not pytest's capture
            os.setgroups([])
            os.setresgid(GID, GID, GID)
            os.setresuid(UID, UID, UID)
            rc = cli.main(["--id", "t5", "--uid", "1", "--gid", "1", "--exec-file", str(VMM),
                           "--chroot-base-dir", str(tmp_path / "j")])  # fmt: skip
            sys.stderr.flush()
        except BaseException as err:
            os.write(2, repr(err).encode())
        finally:
            os._exit(rc)
    os.close(write)
    with os.fdopen(read) as f:
        stderr = f.read()
    _, code = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(code) == 2 and "must run as root" in stderr, stderr
    assert len(stderr.splitlines()) == 1
    assert not (tmp_path / "j").exists()
