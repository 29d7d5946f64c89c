"""Guest NUMA nodes: which vCPUs and how much memory each has, and where its memory lives on
the host.

Memory is handed out in address order: node 0 has the first `mem_mib` MiB of guest RAM, node
1 the next, and so on (`layout.ram_pieces`: a node may straddle the MMIO gap below 4 GiB).
The guest learns the nodes from the ACPI SRAT (CPU and memory affinity, by APIC ID) and their
distances from the SLIT (10 to itself, 20 to the others), as QEMU and Cloud Hypervisor
describe them. A node's `host_node` binds its guest memory to that host NUMA node
(mbind(MPOL_BIND), kvmkit.memory.host).
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmkit.arch.x86_64 import layout
from kvmkit.arch.x86_64.acpi import SLIT_LOCAL, SLIT_REMOTE, NumaTables
from kvmkit.arch.x86_64.topology import format_cpulist, parse_cpulist

MAX_NODES = 64  # a guest has at most this many nodes (SLIT: 64 x 64 distance bytes)
MAX_HOST_NODE = 1023  # Linux's MAX_NUMNODES with NODES_SHIFT=10 (Debian x86-64)


@dataclass(frozen=True)
class NumaNode:
    """`--numa cpus=A-B[,cpus=C-D],mem-mib=M[,host-node=N]`: vCPU indexes, MiB of guest RAM,
    and the host node to bind that memory to (None: wherever the host puts it)."""

    cpus: frozenset[int]
    mem_mib: int
    host_node: int | None = None

    @classmethod
    def parse(cls, spec: str) -> NumaNode:
        cpus: set[int] = set()
        mem_mib: int | None = None
        host_node: int | None = None
        for part in spec.split(","):
            key, sep, value = part.partition("=")
            if key == "cpus" and sep:
                cpus |= parse_cpulist(value)
            elif key == "mem-mib" and sep and mem_mib is None:
                mem_mib = _number(key, value)
            elif key == "host-node" and sep and host_node is None:
                host_node = _number(key, value)
            else:
                raise ValueError(
                    f"unknown or repeated part {part!r} (cpus=A-B, repeatable for more "
                    "ranges; mem-mib=M; host-node=N)"
                )
        if not cpus:
            raise ValueError("needs cpus=A-B (the vCPUs of this node)")
        if mem_mib is None:
            raise ValueError("needs mem-mib=M (the node's memory)")
        return cls(frozenset(cpus), mem_mib, host_node)

    def __str__(self) -> str:
        out = f"cpus={format_cpulist(self.cpus)},mem-mib={self.mem_mib}"
        return out if self.host_node is None else f"{out},host-node={self.host_node}"


def _number(key: str, value: str) -> int:
    try:
        return int(value, 10)
    except ValueError:
        raise ValueError(f"{key}={value!r}: not a number") from None


def check_nodes(nodes: list[NumaNode], vcpus: int, mem_mib: int, granule_mib: int = 1) -> None:
    """ValueError unless every vCPU is in exactly one node, the nodes' memory adds up to
    `mem_mib`, and each node's memory is a positive multiple of `granule_mib` (the huge page
    size, when guest memory is backed by huge pages)."""
    if len(nodes) > MAX_NODES:
        raise ValueError(f"{len(nodes)} nodes: at most {MAX_NODES}")
    owner: dict[int, int] = {}
    for i, node in enumerate(nodes):
        outside = sorted(c for c in node.cpus if c >= vcpus)
        if outside:
            raise ValueError(f"node {i} ({node}): vCPU {outside[0]} does not exist "
                             f"(vCPUs are 0-{vcpus - 1})")  # fmt: skip
        for cpu in sorted(node.cpus):
            if cpu in owner:
                raise ValueError(f"vCPU {cpu} is in node {owner[cpu]} and node {i}")
            owner[cpu] = i
        if node.mem_mib < 1:
            raise ValueError(f"node {i} ({node}): mem-mib must be at least 1")
        if node.mem_mib % granule_mib:
            raise ValueError(
                f"node {i} ({node}): mem-mib must be a multiple of {granule_mib} (the huge "
                "page size)"
            )
        if node.host_node is not None and not 0 <= node.host_node <= MAX_HOST_NODE:
            raise ValueError(f"node {i} ({node}): host-node must be 0..{MAX_HOST_NODE}")
    missing = sorted(set(range(vcpus)) - set(owner))
    if missing:
        raise ValueError(f"vCPUs {format_cpulist(missing)} are in no node")
    total = sum(n.mem_mib for n in nodes)
    if total != mem_mib:
        raise ValueError(f"the nodes have {total} MiB of memory, the machine {mem_mib} MiB")


def node_ranges(nodes: list[NumaNode], mem_size: int) -> list[tuple[int, int, int]]:
    """(gpa, size, node index) of every piece of guest RAM, in address order."""
    out = []
    offset = 0
    for i, node in enumerate(nodes):
        size = node.mem_mib << 20
        out += [(gpa, length, i) for gpa, length in layout.ram_pieces(offset, size, mem_size)]
        offset += size
    return out


def numa_tables(nodes: list[NumaNode], vcpus: int, mem_size: int) -> NumaTables:
    """The SRAT/SLIT contents for `nodes` (already checked with `check_nodes`)."""
    cpu_nodes = [next(i for i, n in enumerate(nodes) if cpu in n.cpus) for cpu in range(vcpus)]
    n = len(nodes)
    distances = [[SLIT_LOCAL if i == j else SLIT_REMOTE for j in range(n)] for i in range(n)]
    return NumaTables(cpu_nodes, node_ranges(nodes, mem_size), distances)
