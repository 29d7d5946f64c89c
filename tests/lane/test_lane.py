"""Tests of `kvmkit lane` itself: each boots the lane VM (a few seconds each), so checks that
can share a boot do.  Skipped inside the lane (no nested TCG lanes) and where QEMU or the
lane kernel cannot be had; the host set-up (scripts/setup-host.sh) provides both."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from kvmkit.lane import assets

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.lane,
    pytest.mark.skipif(os.environ.get("KVMKIT_IN_LANE") == "1",
                       reason="lane tests boot a lane; not nested inside one"),
    pytest.mark.skipif(shutil.which(os.environ.get("KVMKIT_QEMU", "qemu-system-x86_64")) is None,
                       reason="QEMU missing: run scripts/setup-host.sh"),
]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # The lane's own package must be importable inside as well as here.
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])
    )
    env.update(extra)
    return env


def _lane(*args: str) -> list[str]:
    return [sys.executable, "-m", "kvmkit", "lane", *args]


def _qemu_running(initrd_dir: str) -> bool:
    """Whether any process still has this lane's private temporary directory on its command line."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if initrd_dir.encode() in cmdline and state != "Z":
            return True
    return False


def _initrd_dir(stderr_text: str) -> str:
    match = re.search(r"-initrd (\S+)/initrd\.cpio", stderr_text)
    assert match, stderr_text
    return match.group(1)


@pytest.fixture(scope="module", autouse=True)
def _prepared() -> None:
    # Fetch the kernel and build the initramfs once, outside any timed check.
    try:
        subprocess.run(_lane("--prepare"), env=_env(), check=True, capture_output=True,
                       timeout=900)
    except subprocess.CalledProcessError as err:
        pytest.skip(f"lane assets unavailable: {err.stderr.decode(errors='replace')[-300:]}")


CHECKS = textwrap.dedent(
    """
    import fcntl, json, os, subprocess, sys
    out = {}
    fd = os.open("/dev/kvm", os.O_RDWR)
    out["api"] = fcntl.ioctl(fd, 0xAE00, 0)  # KVM_GET_API_VERSION
    probe = subprocess.run([sys.executable, "-m", "kvmkit", "probe", "--json"],
                           capture_output=True, text=True)
    out["probe_status"] = probe.returncode
    out["probe"] = json.loads(probe.stdout) if probe.returncode == 0 else probe.stderr
    out["cwd"] = os.getcwd()
    out["in_lane"] = os.environ.get("KVMKIT_IN_LANE")
    out["marker"] = os.environ.get("LANE_TEST_MARKER")
    out["cpus"] = os.cpu_count()
    import socket
    server = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(server.getsockname(), timeout=10)
    peer, _ = server.accept()
    client.sendall(b"over loopback")
    out["loopback"] = peer.recv(64).decode()
    with open(os.path.join(sys.argv[1], "written-in-lane"), "w") as fh:
        fh.write("hello from the lane")
    print(json.dumps(out))
    """
)


def test_status_streaming_channels_kvm_and_shares(tmp_path: Path) -> None:
    """One boot: exit status, live stdout, separate stderr, env/cwd, writable share, /dev/kvm."""
    share = tmp_path / "share"
    share.mkdir()
    script = tmp_path / "checks.py"
    script.write_text(CHECKS)
    command = (
        "echo first-line; "
        f"python3 {script} {share} > {share}/result.json; "
        "echo to-stderr >&2; sleep 4; echo last-line; exit 7"
    )
    started = time.monotonic()
    proc = subprocess.Popen(
        _lane("--share", str(tmp_path), "--", "sh", "-c", command), cwd=REPO,
        env=_env(LANE_TEST_MARKER="passed through"), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    first = proc.stdout.readline()
    first_at = time.monotonic()
    rest_out = proc.stdout.read()
    err = proc.stderr.read().decode(errors="replace")
    status = proc.wait(timeout=600)
    ended = time.monotonic()

    assert status == 7, err
    assert first == b"first-line\n"
    assert rest_out == b"last-line\n"
    # Streamed: the first line came while the command still had its 4-second sleep ahead.
    assert ended - first_at >= 3.0, (first_at - started, ended - started)
    assert err == "to-stderr\n"  # no kernel console noise without --verbose

    result = json.loads((share / "result.json").read_text())
    assert result["api"] == 12
    assert result["cwd"] == str(REPO)
    assert result["in_lane"] == "1"
    assert result["marker"] == "passed through"
    assert result["cpus"] == 1  # the lane's default (docs/lane.md, "Why one vCPU")
    assert result["loopback"] == "over loopback"  # lo is up (TCP on 127.0.0.1 works)
    assert (share / "written-in-lane").read_text() == "hello from the lane"
    assert result["probe_status"] == 0, result["probe"]
    assert result["probe"]["implementation"] == "hardware-svm"
    assert result["probe"]["linux_guests"] is True


def test_timeout_kills_the_lane_and_leaves_no_qemu() -> None:
    started = time.monotonic()
    proc = subprocess.run(
        _lane("--verbose", "--timeout", "25", "--", "sh", "-c", "echo up; sleep 1000"),
        env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 124
    assert "timeout" in proc.stderr and "QEMU killed" in proc.stderr
    assert proc.stdout == "up\n"
    assert time.monotonic() - started < 120
    assert not _qemu_running(_initrd_dir(proc.stderr))


def test_interrupt_stops_qemu(tmp_path: Path) -> None:
    # stderr (the whole kernel console with --verbose) goes to a file: a pipe nobody reads
    # until the end would block the lane once the console passes the pipe's 64 KiB.
    with open(tmp_path / "stderr", "w+b") as errfile:
        proc = subprocess.Popen(
            _lane("--verbose", "--", "sh", "-c", "echo up; sleep 1000"), env=_env(),
            stdout=subprocess.PIPE, stderr=errfile,
            # A shell without job control starts background jobs with SIGINT ignored, and
            # the child would inherit that (Python then installs no KeyboardInterrupt):
            # the lane gets SIGINT's default disposition, as from a terminal.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"up\n"  # the command is running inside
        proc.send_signal(signal.SIGINT)
        status = proc.wait(timeout=120)
        errfile.seek(0)
        err = errfile.read().decode(errors="replace")
    assert status == 130, err
    assert "interrupted" in err
    assert not _qemu_running(_initrd_dir(err))


@pytest.mark.parametrize("how", ["KVMKIT_QEMU", "PATH"])
def test_missing_qemu_is_one_clear_line(how: str, tmp_path: Path) -> None:
    env = _env(KVMKIT_QEMU=str(tmp_path / "no-such-qemu")) if how == "KVMKIT_QEMU" \
        else _env(PATH=str(tmp_path))
    if how == "PATH":
        env.pop("KVMKIT_QEMU", None)
    proc = subprocess.run(_lane("--", "true"), env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "QEMU not found" in lines[0], proc.stderr


def test_module_list_is_complete_and_ordered() -> None:
    kernel = assets.ensure_kernel()
    order = [name for name, _ in assets.module_load_order(kernel, assets.LANE_MODULES)]
    for name in ("virtio", "virtio_ring", "virtio_pci", "virtio_console", "netfs", "fscache",
                 "9pnet", "9pnet_virtio", "9p", "irqbypass", "ccp", "kvm", "kvm_amd"):
        assert name in order
    assert order.index("ccp") < order.index("kvm_amd")
    assert order.index("kvm") < order.index("kvm_amd")
    assert order.index("netfs") < order.index("9p")
