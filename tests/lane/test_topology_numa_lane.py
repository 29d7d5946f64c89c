"""Topology, guest NUMA, host-node binding and huge pages with a Linux guest, in a lane whose
emulated machine has two NUMA nodes (QEMU `-numa`, through KVMKIT_LANE_QEMU_ARGS) so that
guest memory can really be bound to two host nodes. One lane boot, one guest boot (plus its
in-process snapshot and restore): numa_probe.py runs inside and reports what it saw.

The guest is `--vcpus 6 --topology sockets=2,cores=3,threads=1` with two nodes of 128 MiB
(the issue's "done when" machine), on 2 MiB huge pages, node i bound to host node i, started
under `taskset -c 0`, in a cgroup cpuset and under set_mempolicy(MPOL_BIND)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from test_lane import pytestmark as lane_marks

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("numa_probe.py")
# Two 1 GiB nodes; the lane's one vCPU on node 0, node 1 memory only.
TWO_NODES = (
    "-object memory-backend-ram,id=m0,size=1024M -object memory-backend-ram,id=m1,size=1024M "
    "-numa node,nodeid=0,cpus=0,memdev=m0 -numa node,nodeid=1,memdev=m1"
)

pytestmark = lane_marks  # a lane test: skipped inside a lane and without QEMU


def numa_line(lines: list[str], policy: str) -> dict[str, str]:
    """The numa_maps line with this policy, as {field: value} ("huge" -> "")."""
    (line,) = [x for x in lines if policy in x.split()]
    return dict(f.partition("=")[::2] for f in line.split()[1:])


def test_topology_numa_nodes_bound_to_host_nodes_on_huge_pages() -> None:
    path = [str(REPO / "src"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, KVMKIT_LANE_QEMU_ARGS=TWO_NODES,
               PYTHONPATH=os.pathsep.join(filter(None, path)))  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "kvmkit", "lane", "--mem-mib", "2048", "--timeout", "1200", "--",
         "taskset", "-c", "0", sys.executable, str(PROBE)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1300,
    )  # fmt: skip
    print(f"two-node lane with the topology/NUMA guest: {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    print({k: report[k] for k in ("boot_s", "total_s", "numa_maps_before", "numa_maps_after",
                                  "host_node_outside_cpuset", "no_huge_pages") if k in report})
    assert "console" not in report, report.get("console")

    # Started under taskset -c 0, in the cpuset, under MPOL_BIND(0): the VM and its vCPUs
    # were created there, and every vCPU thread is pinned (--cpu-affinity 0).
    assert report["started_affinity"] == [0]
    assert report["mems_allowed"].split()[-1] == "0-1"
    assert report["policy_nodes"] == [0]
    assert report["vcpu_ids"] == report["restored_vcpu_ids"] == [0, 1, 2, 4, 5, 6]
    assert report["vcpu_thread_cpus"] == [[0]] * 6

    # The guest: two packages of three cores, sparse APIC IDs, two nodes with their CPUs.
    guest = report["guest_before"]
    cpus = re.findall(r"cpu(\d+) pkg=(\d+) core=(\d+)", guest)
    assert [(int(c), int(p)) for c, p, _ in cpus] == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1),
                                                       (5, 1)]  # fmt: skip
    assert [int(core) for _, _, core in cpus] == [0, 1, 2, 0, 1, 2]
    assert [int(a) for a in re.findall(r"apicid:(\d+)", guest)] == [0, 1, 2, 4, 5, 6]
    nodes = re.findall(r"node(\d) cpus=(\S+) kib=(\d+) distance=(\d+ \d+)", guest)
    assert [(n, c, d) for n, c, _, d in nodes] == [("0", "0-2", "10 20"), ("1", "3-5", "20 10")]
    for _, _, kib, _ in nodes:  # what the kernel keeps for itself is not in MemTotal
        assert 64 * 1024 < int(kib) <= 128 * 1024
    assert "Node 0 PXM 0 [mem 0x00000000-0x07ffffff]" in guest
    assert "Node 1 PXM 1 [mem 0x08000000-0x0fffffff]" in guest

    # Host side: each node's 128 MiB is one huge-page range bound to its host node, all 64
    # pages of it on that node - before the snapshot and in the restored machine.
    for key in ("numa_maps_before", "numa_maps_after"):
        lines = report[key]
        for node in (0, 1):
            fields = numa_line(lines, f"bind:{node}")
            assert "huge" in fields and fields.get(f"N{node}") == "64", (key, lines)
            assert f"N{1 - node}" not in fields, (key, lines)
    assert report["restored_huge_pages"] == "2M"

    # The restored guest went on where it was and finished.
    assert report["status"] == 0, report
    assert "AFTER" in report["guest_after"] and "AFTER" not in report["guest_before"]
    assert report["guest_after"].split()[-2:] == ["3-5", "6"]

    # Refusals, one line each.
    assert report["host_node_outside_cpuset"] == (
        "--numa host-node=1: this process may not use host node 1 (its cpuset allows memory "
        "nodes 0)"
    )
    assert report["no_huge_pages"].startswith("--huge-pages 2M: the guest needs 32 huge pages")
    assert "\n" not in report["no_huge_pages"]
