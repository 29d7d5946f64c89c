"""`kvmkit probe` as a user runs it."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

from kvmkit.probe import detect_implementation

KEYS = {
    "api_version", "implementation", "linux_guests", "capabilities", "cpl0_ips", "cpl3_ips",
    "lapic_tmcct_live", "lapic_expired_oneshot_keeps_tmict",
}  # fmt: skip


def kvmkit(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmkit", *args], capture_output=True, text=True, timeout=300
    )


def test_probe_json_reports_this_host() -> None:
    proc = kvmkit("probe", "--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert KEYS <= data.keys()
    assert data["api_version"] == 12
    assert data["implementation"] == detect_implementation()[0]
    assert data["linux_guests"] == data["implementation"].startswith("hardware-")
    assert data["capabilities"]["IRQCHIP"] == 1
    assert data["cpl0_ips"] > 1e5 and data["cpl3_ips"] > 1e6
    release = tuple(int(x) for x in platform.release().split(".")[:2])
    assert data["lapic_tmcct_live"] is (release >= (5, 8))
    assert isinstance(data["lapic_expired_oneshot_keeps_tmict"], bool)
    assert data["errors"] == {}


def test_probe_table() -> None:
    proc = kvmkit("probe", "--no-speed")
    assert proc.returncode == 0, proc.stderr
    assert "KVM API version" in proc.stdout and "IRQCHIP" in proc.stdout


def test_missing_device_is_one_line_exit_2() -> None:
    proc = kvmkit("probe", "--device", "/nonexistent/kvm")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "does not exist" in proc.stderr


def test_non_kvm_device_is_one_line_exit_2() -> None:
    proc = kvmkit("probe", "--device", "/dev/null")
    assert proc.returncode == 2
    assert "not a KVM device" in proc.stderr and "Traceback" not in proc.stderr


def test_demo_runs_a_tiny_guest() -> None:
    proc = kvmkit("demo")
    assert proc.returncode == 0, proc.stderr
    assert "guest reported: 78498 primes" in proc.stdout
