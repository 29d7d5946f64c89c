"""Guest RAM of a machine on the host: its regions (huge pages or not) and, for guest NUMA
nodes with a host node, the memory policy of each node's share (kvmkit.memory.host).

Guest RAM stays one region per contiguous range of guest-physical addresses (below the MMIO
gap and above 4 GiB), whatever the guest nodes: device emulation reads guest buffers that may
cross a node boundary, and one mapping serves them. Each node's share of a region is bound
with mbind on that sub-range of the mapping, before any of its pages is touched.
"""

from __future__ import annotations

from kvmkit.arch.x86_64 import layout
from kvmkit.arch.x86_64.numa import node_ranges
from kvmkit.errors import UserError
from kvmkit.memory import GuestMemory, HugePagesError
from kvmkit.memory import host as host_memory
from kvmkit.vmm.config import MachineConfig


def add_guest_ram(mem: GuestMemory, config: MachineConfig) -> None:
    """The machine's RAM regions (memfd, on hugetlbfs with huge pages), bound to their host
    nodes. UserError when the host cannot give the memory."""
    page = config.huge_page_size
    for start, size in layout.ram_ranges(config.mem_mib << 20):
        try:
            mem.add_memfd(start, size, huge_page_size=page)
        except HugePagesError as err:
            raise UserError(f"--huge-pages {config.huge_pages}: {err}") from None
    bind_numa_nodes(mem, config)


def bind_numa_nodes(mem: GuestMemory, config: MachineConfig) -> None:
    """mbind each guest node's memory to its host node (those that name one); with huge pages
    the bound range is allocated at once, so a node without enough of them is a clear error
    now and not a SIGBUS when the guest first touches the memory."""
    for gpa, size, index in node_ranges(config.numa, config.mem_mib << 20):
        host_node = config.numa[index].host_node
        if host_node is None:
            continue
        region = mem.region_for(gpa, size)
        offset = gpa - region.guest_phys_addr
        what = f"--numa {config.numa[index]}"
        try:
            host_memory.bind(region.host_addr + offset, size, host_node)
        except OSError as err:
            raise UserError(f"{what}: cannot bind memory to host node {host_node}: "
                            f"{err.strerror}") from None  # fmt: skip
        if region.huge_page_size:
            try:
                host_memory.populate(region.mapping, offset, size)
            except OSError as err:
                raise UserError(
                    f"{what}: host node {host_node} has too few free huge pages for "
                    f"{size >> 20} MiB ({err.strerror})"
                ) from None
