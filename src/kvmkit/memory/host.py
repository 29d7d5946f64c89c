"""Where guest RAM lives on the host: huge pages and NUMA memory policy.

- Huge pages: guest RAM in a memfd on the kernel's internal hugetlbfs mount
  (`memfd_create(MFD_HUGETLB | MFD_HUGE_2MB)`, memfd_create(2)), mapped shared. The kernel
  reserves the whole mapping's pages when it is mapped, so a host with too few free huge pages
  fails the mmap with ENOMEM (Documentation/admin-guide/mm/hugetlbpage.rst) instead of killing
  the VMM with SIGBUS later; `free_huge_pages` lets kvmkit say so before it starts.
- NUMA: `bind` applies mbind(MPOL_BIND) to a range of a mapping (mbind(2)) before its pages
  are touched, so they are allocated on that host node only. Under a cpuset the node must be
  in the process's `Mems_allowed` (proc(5)), else mbind fails with EINVAL: `allowed_nodes`.
  For huge pages the per-node supply is not part of the reservation, so a bound huge-page
  range is populated at once (madvise(MADV_POPULATE_WRITE), Linux 5.14): a shortage on that
  node is an error at start-up rather than a SIGBUS when the guest first touches the page.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from pathlib import Path

HUGE_PAGE_SIZES = {"2M": 2 << 20}  # what --huge-pages / huge_pages accept (Firecracker's)
HUGEPAGES_SYSFS = Path("/sys/kernel/mm/hugepages")
NODES_SYSFS = Path("/sys/devices/system/node")
# x86-64 system call numbers (arch/x86/entry/syscalls/syscall_64.tbl) and
# include/uapi/linux/mempolicy.h, include/uapi/asm-generic/mman-common.h
SYS_MBIND = 237
SYS_GET_MEMPOLICY = 239
MPOL_BIND = 2
MPOL_MODE_FLAGS = (1 << 15) | (1 << 14) | (1 << 13)  # MPOL_F_STATIC/RELATIVE_NODES, NUMA_BALANCING
MAX_NODES = 1024  # nodemask bits read back from get_mempolicy (Linux's largest MAX_NUMNODES)
MADV_POPULATE_WRITE = 23

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def huge_page_size(name: str) -> int:
    """Bytes of the huge page size `name` ("2M"); ValueError for others."""
    try:
        return HUGE_PAGE_SIZES[name]
    except KeyError:
        raise ValueError(
            f"huge page size {name!r}: kvmkit supports " + ", ".join(HUGE_PAGE_SIZES)
        ) from None


def _hugepages_dir(size: int, node: int | None) -> Path:
    base = HUGEPAGES_SYSFS if node is None else NODES_SYSFS / f"node{node}" / "hugepages"
    return base / f"hugepages-{size >> 10}kB"


def free_huge_pages(size: int, node: int | None = None) -> int | None:
    """Free huge pages of `size` bytes on the host (or on host NUMA `node`); None when the
    host has no such huge page size (or no such node)."""
    try:
        return int((_hugepages_dir(size, node) / "free_hugepages").read_text())
    except (OSError, ValueError):
        return None


def available_huge_pages(size: int) -> int | None:
    """Free huge pages of `size` bytes this process can reserve: the kernel counts only the
    nodes its cpuset and an MPOL_BIND memory policy allow (mm/hugetlb.c allowed_mems_nr), so
    under `numactl --membind=0` only node 0's free pages count. None: no such page size."""
    total = free_huge_pages(size)
    nodes = allowed_nodes()
    policy = policy_nodes()
    if policy is not None:
        nodes = policy if nodes is None else nodes & policy
    if total is None or nodes is None or nodes >= host_nodes():
        return total
    per_node = [free_huge_pages(size, n) for n in nodes]
    return sum(n for n in per_node if n is not None)


def policy_nodes() -> frozenset[int] | None:
    """The nodes an MPOL_BIND memory policy of the calling thread restricts allocations to
    (set_mempolicy(2), `numactl --membind`); None for policies that do not (default,
    preferred, interleave, local)."""
    mode = ctypes.c_int()
    words = MAX_NODES // 64
    mask = (ctypes.c_ulong * words)()
    rc = _libc.syscall(SYS_GET_MEMPOLICY, ctypes.byref(mode), mask, ctypes.c_ulong(MAX_NODES),
                       None, 0)  # fmt: skip
    if rc != 0 or mode.value & ~MPOL_MODE_FLAGS != MPOL_BIND:
        return None
    return frozenset(i for i in range(MAX_NODES) if mask[i // 64] >> (i % 64) & 1)


def host_nodes() -> frozenset[int]:
    """Host NUMA nodes that have memory (one node, 0, on a machine without NUMA)."""
    try:
        text = (NODES_SYSFS / "has_memory").read_text().strip()
    except OSError:
        return frozenset({0})
    return _parse_list(text) or frozenset({0})


def allowed_nodes() -> frozenset[int] | None:
    """Nodes this process may allocate memory on (its cpuset's mems, `Mems_allowed_list` in
    /proc/self/status); None when the kernel does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Mems_allowed_list:"):
                    return _parse_list(line.split(":", 1)[1].strip())
    except OSError:
        return None
    return None


def _parse_list(text: str) -> frozenset[int]:
    out: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(out)


def bind(addr: int, length: int, node: int) -> None:
    """mbind(MPOL_BIND) the mapped host range [addr, addr + length) to host `node`: pages
    allocated for it from now on come from `node` only. OSError on failure."""
    # nodemask: one bit per node in unsigned longs; maxnode counts one more than the bits
    # the kernel reads (mm/mempolicy.c get_nodes() uses maxnode - 1).
    words = node // 64 + 1
    mask = (ctypes.c_ulong * words)()
    mask[node // 64] = 1 << (node % 64)
    rc = _libc.syscall(
        SYS_MBIND, ctypes.c_void_p(addr), ctypes.c_ulong(length), MPOL_BIND,
        mask, ctypes.c_ulong(words * 64 + 1), 0,
    )  # fmt: skip
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def populate(mapping: mmap.mmap, offset: int, length: int) -> None:
    """Allocate the pages of a range now (MADV_POPULATE_WRITE). OSError (ENOMEM, EFAULT for
    hugetlb) when they cannot be had; a kernel before 5.14 (EINVAL) is left to fault later."""
    try:
        mapping.madvise(MADV_POPULATE_WRITE, offset, length)
    except OSError as err:
        if err.errno != errno.EINVAL:
            raise
