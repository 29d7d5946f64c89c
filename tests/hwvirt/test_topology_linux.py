"""A Linux guest with a CPU topology (needs VMX/SVM: runs in the lane here): 16 vCPUs as 2
sockets of 4 cores of 2 threads all come online, and the guest kernel's view of packages,
cores, thread siblings and APIC IDs is the one kvmkit built (docs/topology.md).

The topology + NUMA + huge pages + host-node binding boot runs in its own two-node lane
(tests/lane/test_topology_numa_lane.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.hwvirt

# Everything the guest kernel says about its CPUs, one line per CPU.
TOPOLOGY_REPORT = (
    "nproc; for c in /sys/devices/system/cpu/cpu[0-9]*; do t=$c/topology; "
    "echo \"${c##*/} pkg=$(cat $t/physical_package_id) core=$(cat $t/core_id) "
    "threads=$(cat $t/thread_siblings_list) cores=$(cat $t/core_siblings_list)\"; done; "
    "grep -E '^(processor|apicid)' /proc/cpuinfo | tr -d ' \\t'"
)


def parse_report(text: str) -> tuple[int, dict[int, dict[str, str]], dict[int, int]]:
    lines = text.split()
    nproc = int(lines[0])
    cpus = {}
    for m in re.finditer(r"cpu(\d+) pkg=(\d+) core=(\d+) threads=(\S+) cores=(\S+)", text):
        cpus[int(m[1])] = {"pkg": m[2], "core": m[3], "threads": m[4], "cores": m[5]}
    apic = dict(zip(map(int, re.findall(r"processor:(\d+)", text)),
                    map(int, re.findall(r"apicid:(\d+)", text)), strict=True))  # fmt: skip
    return nproc, cpus, apic


def test_sixteen_vcpus_two_sockets_of_four_smt_cores_all_online() -> None:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "kvmkit", "run", "--timeout", "540", "--vcpus", "16",
         "--topology", "sockets=2,cores=4,threads=2", "--", "sh", "-c", TOPOLOGY_REPORT],
        capture_output=True, timeout=600, text=True,
    )  # fmt: skip
    print(f"16-vCPU boot and report: {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 0, proc.stderr
    nproc, cpus, apic = parse_report(proc.stdout)
    assert nproc == 16 and sorted(cpus) == list(range(16)), proc.stdout
    # 2 threads (1 bit), 4 cores (2 bits): dense APIC IDs, CPU n is APIC ID n.
    assert apic == {n: n for n in range(16)}
    for n, c in cpus.items():
        assert c["pkg"] == str(n // 8)
        first = n - n % 2
        assert c["threads"] == f"{first}-{first + 1}"  # the two threads of one core
        assert c["cores"] == ("0-7" if n < 8 else "8-15")
    # Core IDs: four per package, shared by a core's two threads.
    for p in range(2):
        cores = [cpus[n]["core"] for n in range(p * 8, p * 8 + 8)]
        assert cores[0::2] == cores[1::2] and len(set(cores)) == 4, cores
