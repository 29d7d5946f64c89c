"""Runs inside a two-node lane (tests/lane/test_topology_numa_lane.py), as root, started under
`taskset -c 0`: puts itself in a cgroup cpuset (CPU 0, memory nodes 0-1) and under a strict
memory policy (set_mempolicy(MPOL_BIND, node 0)) before kvmkit is imported, reserves huge
pages on both nodes, then boots a Linux guest with a topology, two guest NUMA nodes bound to
the two host nodes and huge pages, snapshots it, restores it in this process and lets it
finish. Prints one JSON object of what it saw; the test makes the assertions.

Afterwards, outside the policy: a host node the cpuset does not allow, and huge pages that
are not reserved, each refused in one line.
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

CGROUP = Path("/sys/fs/cgroup")
HUGE = "hugepages/hugepages-2048kB/nr_hugepages"
NODE = Path("/sys/devices/system/node")
SYS_SET_MEMPOLICY = 238  # arch/x86/entry/syscalls/syscall_64.tbl
MPOL_DEFAULT, MPOL_BIND = 0, 2  # include/uapi/linux/mempolicy.h
libc = ctypes.CDLL(None, use_errno=True)

# The guest: its view of CPUs and nodes, READY, 6 one-second sleeps (the host pauses it
# within a second of READY, snapshots and restores it), AFTER and the nodes again from the
# restored machine.
GUEST = (
    "for c in /sys/devices/system/cpu/cpu[0-9]*; do t=$c/topology; "
    "echo \"${c##*/} pkg=$(cat $t/physical_package_id) core=$(cat $t/core_id)\"; done; "
    "grep -E '^(processor|apicid)' /proc/cpuinfo | tr -d ' \\t'; "
    "for n in /sys/devices/system/node/node[0-9]*; do "
    "echo \"${n##*/} cpus=$(cat $n/cpulist) kib=$(sed -n 's/.*MemTotal: *\\([0-9]*\\).*/\\1/p' "
    "$n/meminfo) distance=$(cat $n/distance)\"; done; "
    "dmesg | grep 'ACPI: SRAT: Node'; echo READY; "
    "i=0; while [ $i -lt 6 ]; do sleep 1; i=$((i+1)); done; "
    "echo AFTER; cat /sys/devices/system/node/node1/cpulist; nproc"
)


def set_mempolicy(mode: int, nodes: set[int]) -> None:
    mask = ctypes.c_ulong(sum(1 << n for n in nodes))
    if libc.syscall(SYS_SET_MEMPOLICY, mode, ctypes.byref(mask) if nodes else None, 65) != 0:
        raise OSError(ctypes.get_errno(), "set_mempolicy")


def cgroup(name: str, cpus: str, mems: str) -> Path:
    if not (CGROUP / "cgroup.controllers").exists():
        CGROUP.mkdir(parents=True, exist_ok=True)
        os.system(f"mount -t cgroup2 none {CGROUP}")
    (CGROUP / "cgroup.subtree_control").write_text("+cpuset")
    group = CGROUP / name
    group.mkdir(exist_ok=True)
    (group / "cpuset.cpus").write_text(cpus)
    (group / "cpuset.mems").write_text(mems)
    return group


def join(group: Path) -> None:
    (group / "cgroup.procs").write_text(str(os.getpid()))


def numa_maps(mem: Any) -> list[str]:
    """The numa_maps lines of the guest RAM mappings (mbind splits a mapping into one line
    per policy)."""
    ranges = [(r.host_addr, r.host_addr + r.size) for r in mem.regions]
    return [line for line in Path("/proc/self/numa_maps").read_text().splitlines()
            if any(lo <= int(line.split()[0], 16) < hi for lo, hi in ranges)]  # fmt: skip


def main() -> None:
    report: dict[str, Any] = {"started_affinity": sorted(os.sched_getaffinity(0))}
    for node, pages in ((0, 136), (1, 72)):
        # Node 0 has room for the whole guest: under MPOL_BIND(0) the kernel checks the
        # reservation of a hugetlb mapping against node 0's free pages alone.
        (NODE / f"node{node}" / HUGE).write_text(str(pages))
    strict = cgroup("kvmkit-topology", "0", "0-1")
    join(strict)
    set_mempolicy(MPOL_BIND, {0})
    report["mems_allowed"] = next(line for line in Path("/proc/self/status").read_text()
                                  .splitlines() if line.startswith("Mems_allowed_list"))

    from kvmkit.arch.x86_64.numa import NumaNode
    from kvmkit.arch.x86_64.topology import Topology
    from kvmkit.errors import UserError
    from kvmkit.memory import host
    from kvmkit.vmm.config import MachineConfig
    from kvmkit.vmm.machine import Machine
    from kvmkit.vmm.snapshot import restore_machine, snapshot_machine

    report["policy_nodes"] = sorted(host.policy_nodes() or [])
    config = MachineConfig(
        vcpus=6, mem_mib=256, topology=Topology(sockets=2, cores=3), huge_pages="2M",
        numa=[NumaNode(frozenset({0, 1, 2}), 128, 0), NumaNode(frozenset({3, 4, 5}), 128, 1)],
        cpu_affinity={-1: frozenset({0})}, command=["sh", "-c", GUEST],
    )  # fmt: skip
    before, after = bytearray(), bytearray()
    state, mem = Path("/tmp/vm.state"), Path("/tmp/vm.mem")
    t0 = time.monotonic()
    with Machine(config, command_output=before.extend) as vm:
        vm.start()
        report["vcpu_ids"] = [t.vcpu.id for t in vm.threads]
        report["vcpu_thread_cpus"] = [
            sorted(os.sched_getaffinity(t.thread.native_id or 0)) for t in vm.threads
        ]
        report["numa_maps_before"] = numa_maps(vm.mem)
        if not vm.console.wait_for(b"READY", 600):
            report["console"] = vm.console.tail().decode(errors="replace")
            print(json.dumps(report))
            return
        report["boot_s"] = round(time.monotonic() - t0, 1)
        time.sleep(0.5)
        vm.pause()
        snapshot_machine(vm, state, mem)
    restored = restore_machine(state, mem, command_output=after.extend)
    with restored:
        report["restored_vcpu_ids"] = [t.vcpu.id for t in restored.threads]
        report["restored_huge_pages"] = restored.config.huge_pages
        report["numa_maps_after"] = numa_maps(restored.mem)
        restored.config.cpu_affinity = {-1: frozenset({0})}
        restored.start()
        result = restored.wait(300)
    report["status"] = None if result is None else result.exit_status
    report["guest_before"] = before.decode(errors="replace")
    report["guest_after"] = after.decode(errors="replace")
    report["total_s"] = round(time.monotonic() - t0, 1)

    # Outside the strict policy: what kvmkit refuses, in one line each.
    set_mempolicy(MPOL_DEFAULT, set())
    join(cgroup("kvmkit-mem0", "0", "0"))
    bound1 = MachineConfig(mem_mib=64, numa=[NumaNode(frozenset({0}), 64, 1)])
    for name, cfg in (("host_node_outside_cpuset", bound1),):
        try:
            cfg.validate()
            report[name] = "accepted"
        except UserError as err:
            report[name] = str(err)
    join(cgroup("kvmkit-topology", "0", "0-1"))
    for node in (0, 1):
        (NODE / f"node{node}" / HUGE).write_text("0")
    try:
        MachineConfig(mem_mib=64, huge_pages="2M").validate()
        report["no_huge_pages"] = "accepted"
    except UserError as err:
        report["no_huge_pages"] = str(err)
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    sys.exit(main())
