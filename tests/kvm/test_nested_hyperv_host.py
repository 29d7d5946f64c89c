"""--nested and --hyperv against this host's /dev/kvm: where the host cannot serve them (this
machine's PVM has no VMX/SVM, KVM_CAP_NESTED_STATE and KVM_CAP_HYPERV are 0) `kvmkit run`
refuses with one line and status 2 before anything is built, and the Python API raises the
same UserError; where it can, the same commands get past the check (the guest is a tiny PVH
kernel that triple-faults at once: status 5). The Linux-guest checks are in
tests/hwvirt/test_nested_hyperv_linux.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmkit.errors import UserError
from kvmkit.kvm import Kvm
from kvmkit.testing import pvh
from kvmkit.vmm.config import MachineConfig
from kvmkit.vmm.hyperv import host_hyperv
from kvmkit.vmm.machine import Machine
from kvmkit.vmm.nested import nesting_problem


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pvh.build(pvh.TRIPLE_FAULT, tmp_path_factory.mktemp("pvh") / "tf.elf")


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmkit", "run", *args], capture_output=True, text=True,
        timeout=120, env=dict(os.environ, KVMKIT_FORCE_RUN="1"),
    )  # fmt: skip


def host_refusal(option: str) -> str | None:
    """What kvmkit must say about `option` on this host (None: the host can do it)."""
    with Kvm() as kvm:
        if option == "--nested":
            problem = nesting_problem(kvm)
            return None if problem is None else (
                f"--nested: this host cannot give guests nested virtualization: {problem}")
        hv = host_hyperv(kvm)
        return f"--hyperv: this host's KVM cannot offer Hyper-V ({hv.problem})" if hv.problem \
            else None  # fmt: skip


@pytest.mark.parametrize("option", ["--nested", "--hyperv"])
def test_run_refuses_what_the_host_cannot_do(kernel: Path, option: str) -> None:
    proc = run("--kernel", str(kernel), option)
    expected = host_refusal(option)
    if expected is None:  # a host with nesting / Hyper-V: built and run, the guest faults
        assert proc.returncode == 5, proc.stderr
        return
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"kvmkit run: {expected}\n"  # one line, no traceback
    assert proc.stdout == ""


def test_nested_with_the_api_socket(kernel: Path, tmp_path: Path) -> None:
    """`--nested` combines with `--api-sock` (the API's pause, snapshot and migration then
    reach a nested guest; migrating one is not yet verified in the lane); a host that cannot
    nest is refused as without the socket, before
    the API serves. `--hyperv` does not combine with it: one line."""
    sock = tmp_path / "api.sock"
    proc = run("--kernel", str(kernel), "--nested", "--api-sock", str(sock))
    expected = host_refusal("--nested")
    if expected is None:
        assert proc.returncode == 5, proc.stderr
    else:
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr == f"kvmkit run: {expected}\n"
        assert not sock.exists()
    proc = run("--kernel", str(kernel), "--hyperv", "--api-sock", str(sock))
    assert proc.returncode == 2
    assert proc.stderr == "kvmkit run: --hyperv does not combine with --api-sock/--config-file\n"


def test_the_python_api_refuses_the_same(kernel: Path) -> None:
    expected = host_refusal("--nested")
    machine = Machine(MachineConfig(kernel=kernel, nested=True))
    try:
        if expected is None:
            machine.build()
            assert machine.extensions.nested
        else:
            with pytest.raises(UserError) as err:
                machine.build()
            assert str(err.value) == expected
            assert not machine.threads  # no vCPU was created
    finally:
        machine.close()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--hyperv=time,warp"], "--hyperv: unknown Hyper-V feature 'warp' (known: relaxed"),
        (["--hyperv=ipi"], "--hyperv: ipi needs vpindex (add it to the list)"),
        (["--hyperv="], "--hyperv=: empty feature name"),
        (["--hyperv=all,time"], "'all' does not combine with other names"),
        (["--hyperv-kvm-leaves"], "--hyperv-kvm-leaves needs --hyperv"),
    ],
)
def test_bad_hyperv_options_are_one_line(kernel: Path, args: list[str], needle: str) -> None:
    proc = run("--kernel", str(kernel), *args)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr, proc.stderr


def test_nesting_problem_reads_the_vendor_modules_parameter(tmp_path: Path) -> None:
    params = tmp_path / "kvm_amd" / "parameters"
    params.mkdir(parents=True)
    (params / "nested").write_text("0\n")
    with Kvm() as kvm:
        assert nesting_problem(kvm, modules_dir=tmp_path) == (
            "kvm_amd's nested parameter is off (/sys/module/kvm_amd/parameters/nested; "
            "reload it with nested=1)"
        )
        (params / "nested").write_text("1\n")
        problem = nesting_problem(kvm, modules_dir=tmp_path)
        from kvmkit.abi.constants import Cap

        if kvm.check_extension(Cap.NESTED_STATE) <= 0:  # this PVM host
            assert problem == (
                "KVM_CAP_NESTED_STATE is 0: this kernel cannot save a nested guest's state")


def test_probe_reports_nesting_and_enlightenments() -> None:
    proc = subprocess.run([sys.executable, "-m", "kvmkit", "probe", "--json", "--no-speed"],
                          capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    report = json.loads(proc.stdout)
    with Kvm() as kvm:
        problem = nesting_problem(kvm)
        hv = host_hyperv(kvm)
    assert report["nested"] is (problem is None)
    assert report["nested_reason"] == (problem or "")
    assert report["hyperv_features"] == list(hv.offered)
    assert report["hyperv_reason"] == hv.problem
    text = subprocess.run([sys.executable, "-m", "kvmkit", "probe", "--no-speed"],
                          capture_output=True, text=True, timeout=120, check=True).stdout
    line = next(ln for ln in text.splitlines() if ln.startswith("Hyper-V enlightenments"))
    assert line.split(None, 2)[2] == (", ".join(hv.offered) or f"none ({hv.problem})")
