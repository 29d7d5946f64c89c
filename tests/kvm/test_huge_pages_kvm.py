"""Guest memory on 2 MiB huge pages (a hugetlbfs memfd) on this host's /dev/kvm: with a tiny
guest, KVM's dirty log still reports 4 KiB pages and a full + diff snapshot restores into
huge-page memory again; a whole Machine with a topology, a guest NUMA node bound to host
node 0 and huge pages is snapshotted and restored as the same machine. The tests reserve the
huge pages they need on the host (/proc/sys/vm/nr_hugepages, as root) and give them back
afterwards."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_snapshot_state import COUNTER_GUEST, Reports, memory_digest

from kvmkit.kvm import Kvm
from kvmkit.memory import PAGE_SIZE, GuestMemory, HugePagesError, MemoryRegion, memfd_region
from kvmkit.snapshot import core
from kvmkit.snapshot.memory import enable_dirty_log
from kvmkit.testing import TinyGuest, pvh
from kvmkit.vmm.vcpu import VcpuRunner

HUGE = 2 << 20
NR_HUGEPAGES = Path("/proc/sys/vm/nr_hugepages")
GUEST_MEM = 16 << 20  # 8 huge pages
MACHINE_MIB = 64


@pytest.fixture
def reserved() -> Iterator[int]:
    """Reserve huge pages for one test (a 64 MiB machine and its restored copy); the host's
    previous count comes back afterwards even if the test fails."""
    before = int(NR_HUGEPAGES.read_text())
    want = before + 2 * (MACHINE_MIB << 20) // HUGE
    try:
        NR_HUGEPAGES.write_text(str(want))
    except PermissionError:
        pytest.fail("reserving huge pages needs root (/proc/sys/vm/nr_hugepages)")
    try:
        got = int(NR_HUGEPAGES.read_text())
        assert got == want, f"the host reserved {got - before} of {want - before} huge pages"
        yield want - before
    finally:
        NR_HUGEPAGES.write_text(str(before))


def kernel_page_size(region: MemoryRegion) -> int:
    """KernelPageSize of the mapping at the region's host address (/proc/self/smaps)."""
    text = Path("/proc/self/smaps").read_text()
    for block in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", text):
        if int(block.split("-", 1)[0], 16) == region.host_addr:
            m = re.search(r"KernelPageSize: +(\d+) kB", block)
            assert m is not None
            return int(m[1]) << 10
    raise AssertionError("mapping not found")


def test_too_few_huge_pages_is_a_clear_error() -> None:
    free = int(Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages").read_text())
    with pytest.raises(HugePagesError, match=r"huge pages of 2 MiB needed .* too few are free"):
        memfd_region(0, (free + 1) * HUGE, huge_page_size=HUGE)


def test_dirty_log_and_diff_snapshot_on_huge_pages(reserved: int, tmp_path: Path) -> None:
    with Kvm() as kvm:
        g = TinyGuest("long64", cpl=3, irqchip=True, kvm=kvm, mem_size=GUEST_MEM,
                      huge_page_size=HUGE)  # fmt: skip
        with g:
            (region,) = g.mem.regions
            assert region.huge_page_size == HUGE and kernel_page_size(region) == HUGE
            counter = g.load_asm(COUNTER_GUEST)["counter"]
            enable_dirty_log(g.mem, g.vm)
            host = Reports()
            runner = VcpuRunner(g.vcpu, host.on_exit)
            runner.start()
            host.wait(2)
            runner.pause()
            core.capture(kvm, g.vm, g.vcpus, g.mem, tmp_path / "base.mem", core.VmSetup())
            runner.resume()
            host.wait(len(host.values) + 2)
            g.mem.write(0xA00000, b"written by the VMM")
            runner.pause()
            diff = core.capture(kvm, g.vm, g.vcpus, g.mem, tmp_path / "diff.mem",
                                core.VmSetup(), diff=True)  # fmt: skip
            core.save(tmp_path / "diff.state", diff)
            digest, saved = memory_digest(g.mem), g.mem.read_u64(counter)
            runner.stop()
        (entry,) = diff.memory.regions
        assert entry.dirty is not None
        pages = {i * 8 + b for i, byte in enumerate(entry.dirty) for b in range(8) if byte >> b & 1}
        # 4 KiB granularity on huge-page memory: the counter's page and the VMM's page, not
        # the 2 MiB pages around them.
        assert counter // PAGE_SIZE in pages and 0xA00000 // PAGE_SIZE in pages
        assert len(pages) < 32, len(pages)

        snap = core.read(tmp_path / "diff.state")
        restored = core.load(kvm, snap, tmp_path / "diff.mem", base_mem=tmp_path / "base.mem",
                             huge_page_size=HUGE)  # fmt: skip
        after = Reports()
        try:
            (region,) = restored.mem.regions
            assert region.huge_page_size == HUGE and kernel_page_size(region) == HUGE
            assert memory_digest(restored.mem) == digest
            restored.resume()
            runner = VcpuRunner(restored.vcpus[0], after.on_exit)
            runner.start()
            after.wait(2)
            runner.stop()
        finally:
            restored.close()
    assert after.values[0] > saved and not after.unexpected


def numa_line(mem: GuestMemory, gpa: int) -> list[str]:
    """The /proc/self/numa_maps fields of the mapping holding guest address `gpa`."""
    region = mem.region_for(gpa)
    host = region.host_addr + gpa - region.guest_phys_addr
    lines = Path("/proc/self/numa_maps").read_text().splitlines()
    starts = sorted((int(x.split()[0], 16), x) for x in lines)
    return next(x for start, x in reversed(starts) if start <= host).split()


def test_machine_snapshot_restores_the_same_topology_numa_and_huge_pages(
    reserved: int, tmp_path: Path
) -> None:
    from kvmkit.arch.x86_64.numa import NumaNode
    from kvmkit.arch.x86_64.topology import Topology
    from kvmkit.vmm.config import MachineConfig
    from kvmkit.vmm.machine import Machine
    from kvmkit.vmm.snapshot import restore_machine, snapshot_machine

    elf = pvh.build(pvh.HALT, tmp_path / "halt.elf")  # stays up, touching nothing
    topology = Topology(sockets=3, cores=65)  # APIC IDs up to 320: KVM_CAP_X2APIC_API
    config = MachineConfig(
        kernel=elf, vcpus=195, mem_mib=MACHINE_MIB, topology=topology, huge_pages="2M",
        numa=[NumaNode(frozenset(range(130)), 32, 0), NumaNode(frozenset(range(130, 195)), 32)],
    )  # fmt: skip
    state, mem = tmp_path / "vm.state", tmp_path / "vm.mem"
    with Machine(config) as vm:
        vm.start()
        assert vm.x2apic_api
        vm.pause()
        snapshot_machine(vm, state, mem)
    meta = core.read(state).meta["config"]
    assert meta["topology"] == {"sockets": 3, "dies": 1, "cores": 65, "threads": 1}
    assert meta["huge_pages"] == "2M" and meta["numa"][0]["host_node"] == 0
    assert [n["cpus"] for n in meta["numa"]] == [list(range(130)), list(range(130, 195))]

    restored = restore_machine(state, mem)
    with restored:
        assert restored.config.cpu_topology == topology
        assert [t.vcpu.id for t in restored.threads] == topology.apic_ids()
        assert restored.x2apic_api
        (region,) = restored.mem.regions
        assert region.huge_page_size == HUGE and kernel_page_size(region) == HUGE
        # Node 0's 32 MiB bound to host node 0, node 1's left to the host's default policy.
        assert "bind:0" in numa_line(restored.mem, 0) and "huge" in numa_line(restored.mem, 0)
        assert "default" in numa_line(restored.mem, 32 << 20)
        restored.start()
        restored.pause()  # the restored vCPUs run (and stop) like the source's
