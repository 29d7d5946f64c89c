"""On a host whose KVM cannot run Linux guests, `kvmkit run` says so and names the lane."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kvmkit.probe import detect_implementation


@pytest.mark.skipif(
    detect_implementation()[0].startswith("hardware-"),
    reason="this host runs Linux guests directly",
)
def test_pvm_host_points_to_the_lane() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kvmkit", "run", "--", "true"],
        capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if k != "KVMKIT_FORCE_RUN"},
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "kvmkit lane -- kvmkit run true" in proc.stderr
