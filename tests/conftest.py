"""Test-suite policy shared by every test directory.

- Tests under tests/kvm/ are marked `kvm`: they need a usable /dev/kvm. Without one they are
  skipped with the reason; with one, any skipped `kvm` test fails the session, so a broken
  feature cannot hide behind a skip.
- Tests marked `hwvirt` need hardware-style virtualization (VMX/SVM). On a host without it
  they are skipped here and `make test` runs them inside `kvmkit lane`; where they do run
  (hardware host or inside the lane), a skip fails the session the same way.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from kvmkit.probe import detect_implementation

_skipped_required: list[str] = []


def kvm_usable() -> tuple[bool, str]:
    device = os.environ.get("KVMKIT_DEVICE", "/dev/kvm")
    try:
        from kvmkit.kvm import Kvm

        with Kvm(device) as kvm:
            kvm.create_vm().close()
    except OSError as err:
        return False, f"{device} not usable: {err}"
    return True, ""


KVM_OK, KVM_WHY = kvm_usable()
IMPLEMENTATION, _ = detect_implementation()
HWVIRT_OK = KVM_OK and IMPLEMENTATION.startswith("hardware-")


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        f"kvmkit: /dev/kvm usable: {'yes' if KVM_OK else 'no (' + KVM_WHY + ')'}; "
        f"implementation: {IMPLEMENTATION}; in lane: {os.environ.get('KVMKIT_IN_LANE') == '1'}"
    ]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _write_lane_configs(items)
    kvm_dir = Path(__file__).parent / "kvm"
    for item in items:
        if kvm_dir in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.kvm)
        if item.get_closest_marker("kvm") and not KVM_OK:
            item.add_marker(pytest.mark.skip(reason=KVM_WHY))
        if item.get_closest_marker("hwvirt") and not HWVIRT_OK:
            item.add_marker(
                pytest.mark.skip(
                    reason=f"needs VMX/SVM (host KVM is {IMPLEMENTATION}); "
                    "`make test` runs these inside `kvmkit lane`"
                )
            )


def _write_lane_configs(items: list[pytest.Item]) -> None:
    """With KVMKIT_LANE_CONFIGS=FILE, write one JSON line per test: the lane it needs (the
    `lane_devices` marker's devices and modules; none: the default lane). scripts/
    hwvirt_tests.py groups the hwvirt tests by it, one lane boot per group."""
    path = os.environ.get("KVMKIT_LANE_CONFIGS")
    if not path:
        return
    with open(path, "w") as f:
        for item in items:
            marker = item.get_closest_marker("lane_devices")
            devices = list(marker.args) if marker else []
            modules = list(marker.kwargs.get("modules", ())) if marker else []
            line = {"nodeid": item.nodeid, "devices": devices, "modules": modules}
            f.write(json.dumps(line) + "\n")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _record_progress(report)
    if not report.skipped or hasattr(report, "wasxfail"):
        return
    keywords = report.keywords
    if ("kvm" in keywords and KVM_OK) or ("hwvirt" in keywords and HWVIRT_OK):
        _skipped_required.append(report.nodeid)


def _record_progress(report: pytest.TestReport) -> None:
    """With KVMKIT_TEST_PROGRESS=FILE, append "<outcome> <nodeid>" once per test as it ends
    (scripts/hwvirt_tests.py watches it to resume the remaining tests after a lane wedge)."""
    path = os.environ.get("KVMKIT_TEST_PROGRESS")
    if not path:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        if hasattr(report, "wasxfail"):
            outcome = "xpassed" if report.passed else "xfailed"
        elif report.when == "setup" and report.failed:
            outcome = "error"
        else:
            outcome = report.outcome
    elif report.when == "teardown" and report.failed:
        outcome = "error"
    else:
        return
    if outcome in ("failed", "error", "xpassed"):
        # The reason, for the runner to print even if the lane is stopped before pytest's
        # own summary (written first: the progress line is what the runner waits for).
        with open(path + ".log", "a") as f:
            f.write(f"=== {outcome} {report.nodeid} ({report.when})\n{report.longreprtext}\n")
    with open(path, "a") as f:
        f.write(f"{outcome} {report.nodeid}\n")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _skipped_required:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [
            "tests that need /dev/kvm or hardware virtualization were skipped although "
            "it is usable here:",
            *(f"  {nodeid}" for nodeid in _skipped_required),
        ]
        if reporter is not None:
            reporter.write_line("\n".join(lines), red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
