"""Checks that need hardware-style KVM (VMX/SVM): run directly on such hosts, otherwise inside
`kvmkit lane` (emulated AMD-V) by `make test`."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvmkit.testing import TinyGuest

pytestmark = pytest.mark.hwvirt


def test_probe_reports_hardware_kvm_and_linux_guests() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kvmkit", "probe", "--json"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["implementation"].startswith("hardware-")
    assert data["linux_guests"] is True
    assert data["lapic_tmcct_live"] is True


def test_cpl0_c_guest_runs_natively() -> None:
    # On PVM this is emulated instruction by instruction; with SVM/VMX it runs on the CPU.
    source = r"""
    #include "kvmkit_guest.h"
    static u64 fib(u64 n) { return n < 2 ? n : fib(n - 1) + fib(n - 2); }
    int main(void) { guest_report(fib(22)); return 0; }
    """
    with TinyGuest("long64", cpl=0) as g:
        g.load_c(source)
        assert g.run(timeout=300).reports == [17711]
