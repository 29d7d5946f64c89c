"""CPU topology: APIC IDs and bit widths for a table of topologies, the CPUID every vCPU of
them gets (Intel and AMD leaves, decoded back the way a guest kernel does), guest NUMA nodes,
and the SRAT/SLIT/MADT bytes decoded by `iasl`."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_cpuid_msrs import amd_supported, intel_supported

from kvmkit.arch.x86_64 import acpi, layout
from kvmkit.arch.x86_64.cpuid import guest_cpuid
from kvmkit.arch.x86_64.numa import NumaNode, check_nodes, node_ranges, numa_tables
from kvmkit.arch.x86_64.topology import (
    MAX_VCPUS,
    HostCpuLimits,
    Topology,
    format_cpulist,
    parse_cpulist,
)
from kvmkit.kvm.cpuid import CpuidEntry, find

# (sockets, dies, cores, threads) -> (smt_bits, core_bits, die_bits, APIC IDs in vCPU order)
TABLE = {
    (1, 1, 1, 1): (0, 0, 0, [0]),
    (1, 1, 3, 1): (0, 2, 0, [0, 1, 2]),
    (2, 1, 3, 1): (0, 2, 0, [0, 1, 2, 4, 5, 6]),
    (1, 1, 2, 2): (1, 1, 0, [0, 1, 2, 3]),
    (2, 1, 4, 2): (1, 2, 0, list(range(16))),
    (2, 1, 6, 2): (1, 3, 0, [*range(12), *range(16, 28)]),
    (1, 2, 3, 2): (1, 2, 1, [0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13]),
    (2, 3, 1, 1): (0, 0, 2, [0, 1, 2, 4, 5, 6]),
    (1, 1, 1, 3): (2, 0, 0, [0, 1, 2]),
}


def topo(key: tuple[int, int, int, int]) -> Topology:
    return Topology(*key)


@pytest.mark.parametrize("key", TABLE)
def test_apic_ids_and_bit_widths(key: tuple[int, int, int, int]) -> None:
    t = topo(key)
    smt, core, die, ids = TABLE[key]
    assert (t.smt_bits, t.core_bits, t.die_bits) == (smt, core, die)
    assert (t.core_shift, t.die_shift, t.pkg_shift) == (smt, smt + core, smt + core + die)
    assert t.apic_ids() == ids
    assert t.vcpus == len(ids) == key[0] * key[1] * key[2] * key[3]
    # Each vCPU's location, re-encoded, is its APIC ID; threads count fastest.
    for i, apic in enumerate(ids):
        loc = t.location(i)
        assert loc.apic_id == apic
        assert (loc.socket, loc.die, loc.core, loc.thread) == (
            apic >> t.pkg_shift, (apic >> t.die_shift) & ((1 << die) - 1),
            (apic >> t.core_shift) & ((1 << core) - 1), apic & ((1 << smt) - 1),
        )  # fmt: skip
    assert not t.needs_x2apic


def test_flat_and_smt_topologies() -> None:
    assert Topology.flat(5).apic_ids() == [0, 1, 2, 3, 4]
    assert (Topology.flat(5).cores, Topology.flat(5).threads) == (5, 1)
    assert Topology.smt(1) == Topology()
    assert Topology.smt(6) == Topology(cores=3, threads=2)
    with pytest.raises(ValueError, match="1 or an even"):
        Topology.smt(3)


def test_parse_and_its_errors() -> None:
    assert Topology.parse("sockets=2,cores=3,threads=1") == Topology(2, 1, 3, 1)
    assert Topology.parse("dies=2") == Topology(dies=2)
    assert str(Topology(2, 1, 3, 1)) == "sockets=2,dies=1,cores=3,threads=1"
    for bad, message in [
        ("sockets=0", "at least 1"),
        ("cores=-2", "at least 1"),
        ("cores=x", "not a number"),
        ("cpus=2", "unknown part"),
        ("cores", "unknown part"),
        ("cores=2,cores=3", "twice"),
        ("threads=100000", "more than"),
    ]:
        with pytest.raises(ValueError, match=message):
            Topology.parse(bad)


def test_check_against_the_vcpu_count_and_the_host() -> None:
    Topology(2, 1, 3, 1).check(6)
    with pytest.raises(ValueError, match=r"has 6 vCPUs.*not 4"):
        Topology(2, 1, 3, 1).check(4)
    with pytest.raises(ValueError, match=f"more than kvmkit's {MAX_VCPUS}"):
        Topology(sockets=2, cores=MAX_VCPUS).check(2 * MAX_VCPUS)
    wide = Topology(sockets=3, cores=65)  # 7 core bits: the third socket starts at 256
    assert wide.max_apic_id == 2 * 128 + 64 and wide.needs_x2apic
    wide.check_host(HostCpuLimits(max_vcpus=1024, max_vcpu_id=4096))
    with pytest.raises(ValueError, match="KVM_CAP_MAX_VCPU_ID"):
        wide.check_host(HostCpuLimits(max_vcpus=1024, max_vcpu_id=300))
    with pytest.raises(ValueError, match="KVM_CAP_MAX_VCPUS"):
        wide.check_host(HostCpuLimits(max_vcpus=100, max_vcpu_id=4096))


def test_cpulists() -> None:
    assert parse_cpulist("0-2,5,7-8") == {0, 1, 2, 5, 7, 8}
    assert format_cpulist({0, 1, 2, 5, 7, 8}) == "0-2,5,7-8"
    for bad in ("", "a", "3-1", "-1", "1-"):
        with pytest.raises(ValueError):
            parse_cpulist(bad)
    with pytest.raises(ValueError, match="not below 4"):
        parse_cpulist("2-4", limit=4)


# -- CPUID, decoded the way Linux reads it
def _leaf(entries: list[CpuidEntry], fn: int, index: int = 0) -> CpuidEntry:
    e = find(entries, fn, index)
    assert e is not None, f"leaf {fn:#x}.{index} missing"
    return e


def _levels(entries: list[CpuidEntry], fn: int) -> list[tuple[int, int, int, int]]:
    """(level type, shift, logical processors, x2APIC ID) of each valid subleaf of 0xB/0x1F,
    in order, stopping at the invalid level as the SDM's enumeration does."""
    out = []
    for i in range(8):
        e = _leaf(entries, fn, i)
        assert e.ecx & 0xFF == i
        if (e.ecx >> 8) & 0xFF == 0:
            return out
        out.append(((e.ecx >> 8) & 0xFF, e.eax & 0x1F, e.ebx & 0xFFFF, e.edx))
    raise AssertionError("no invalid level")


@pytest.mark.parametrize("key", TABLE)
def test_intel_cpuid_of_every_vcpu(key: tuple[int, int, int, int]) -> None:
    t = topo(key)
    for i in range(t.vcpus):
        out = guest_cpuid(intel_supported(), t, i)
        loc = t.location(i)
        leaf1 = _leaf(out, 1)
        assert leaf1.ebx >> 24 == loc.apic_id & 0xFF
        assert (leaf1.ebx >> 16) & 0xFF == 1 << t.pkg_shift
        assert bool(leaf1.edx & (1 << 28)) == (t.per_package > 1)
        levels = _levels(out, 0xB)
        assert [lv[3] for lv in levels] == [loc.apic_id] * 2
        assert [(lv[0], lv[1], lv[2]) for lv in levels] == [
            (1, t.smt_bits, t.threads), (2, t.pkg_shift, t.per_package),
        ]  # fmt: skip
        # What Linux's detect_extended_topology derives from it.
        assert loc.apic_id >> levels[-1][1] == loc.socket
        assert (loc.apic_id >> levels[0][1]) & ((1 << (levels[1][1] - levels[0][1])) - 1) == (
            loc.die << t.core_bits | loc.core
        )
        v2 = _levels(out, 0x1F)
        if t.dies > 1:
            assert [(lv[0], lv[1], lv[2]) for lv in v2] == [
                (1, t.smt_bits, t.threads), (2, t.die_shift, t.threads * t.cores),
                (5, t.pkg_shift, t.per_package),
            ]  # fmt: skip
        else:
            assert v2 == levels
        l1, l2, l3 = (_leaf(out, 4, n) for n in range(3))
        for cache in (l1, l2, l3):
            assert cache.eax >> 26 == (1 << (t.core_bits + t.die_bits)) - 1
        assert (l1.eax >> 14) & 0xFFF == (l2.eax >> 14) & 0xFFF == (1 << t.smt_bits) - 1
        assert (l3.eax >> 14) & 0xFFF == (1 << t.die_shift) - 1


def test_intel_gets_leaf_1f_for_dies_when_kvm_did_not_list_it() -> None:
    sup = [e for e in intel_supported() if e.function != 0x1F]
    sup[0] = sup[0].with_regs(eax=0xD)
    out = guest_cpuid(sup, Topology(1, 2, 2, 1), 3)
    assert _leaf(out, 0).eax == 0x1F
    assert [lv[0] for lv in _levels(out, 0x1F)] == [1, 2, 5]
    flat = guest_cpuid(sup, Topology(1, 1, 2, 1), 1)
    assert _leaf(flat, 0).eax == 0xD and find(flat, 0x1F) is None


@pytest.mark.parametrize("key", TABLE)
def test_amd_cpuid_of_every_vcpu(key: tuple[int, int, int, int]) -> None:
    t = topo(key)
    core_ids: dict[tuple[int, int], set[int]] = {}
    for i in range(t.vcpus):
        out = guest_cpuid(amd_supported(), t, i)
        loc = t.location(i)
        e8 = _leaf(out, 0x80000008)
        apic_id_size, nc = (e8.ecx >> 12) & 0xF, e8.ecx & 0xFF
        assert apic_id_size == t.pkg_shift and nc == t.per_package - 1
        # Linux's amd_detect_cmp: the package is the APIC ID above ApicIdSize bits.
        assert loc.apic_id >> apic_id_size == loc.socket
        e1e = _leaf(out, 0x8000001E)
        assert e1e.eax == loc.apic_id
        assert (e1e.ebx >> 8) & 0xFF == t.threads - 1
        assert (e1e.ecx >> 8) & 0x7 == t.dies - 1
        assert e1e.ecx & 0xFF == loc.socket * t.dies + loc.die
        core_ids.setdefault((loc.socket, e1e.ebx & 0xFF), set()).add(loc.die * t.cores + loc.core)
        assert bool(_leaf(out, 0x80000001).ecx & 0x2) == (t.per_package > 1)
        l3 = _leaf(out, 0x8000001D, 3)
        # Linux's cacheinfo_amd_init_llc_id: the LLC ID is the APIC ID above the sharing bits.
        sharing = ((l3.eax >> 14) & 0xFFF) + 1
        assert loc.apic_id >> (sharing - 1).bit_length() == loc.socket << t.die_bits | loc.die
        assert _levels(out, 0xB)[-1][1] == t.pkg_shift
    # Threads of one core share a core ID; different cores of a package never do.
    assert all(len(cores) == 1 for cores in core_ids.values())
    assert len(core_ids) == t.sockets * t.dies * t.cores


def test_amd_topology_extensions_announced_with_their_leaves() -> None:
    sup = amd_supported()
    sup[3] = sup[3].with_regs(ecx=sup[3].ecx & ~(1 << 22))  # a CPU without TOPOEXT
    assert sup[3].function == 0x80000001
    assert _leaf(guest_cpuid(sup, Topology(cores=2, threads=2), 1), 0x80000001).ecx & (1 << 22)
    without = [e for e in sup if e.function != 0x8000001E]
    out = guest_cpuid(without, Topology(cores=2, threads=2), 1)
    assert not _leaf(out, 0x80000001).ecx & (1 << 22)


def test_x2apic_ids_above_255_in_cpuid() -> None:
    t = Topology(sockets=3, cores=65)
    out = guest_cpuid(amd_supported(), t, 2 * 65 + 64)  # the last vCPU
    assert t.apic_id(194) == 320
    assert _leaf(out, 0x8000001E).eax == 320
    assert all(lv[3] == 320 for lv in _levels(out, 0xB))
    assert _leaf(out, 1).ebx >> 24 == 320 & 0xFF  # the legacy 8-bit field: modulo 256


# -- NUMA
def test_numa_node_parse_and_errors() -> None:
    n = NumaNode.parse("cpus=0-2,cpus=5,mem-mib=128,host-node=1")
    assert n == NumaNode(frozenset({0, 1, 2, 5}), 128, 1)
    assert str(n) == "cpus=0-2,5,mem-mib=128,host-node=1"
    for bad, message in [
        ("mem-mib=128", "needs cpus"),
        ("cpus=0-1", "needs mem-mib"),
        ("cpus=0,1,mem-mib=64", "unknown or repeated part '1'"),
        ("cpus=0,mem-mib=x", "not a number"),
        ("cpus=0,mem-mib=1,mem-mib=2", "repeated"),
        ("cpus=2-1,mem-mib=1", "bad range"),
    ]:
        with pytest.raises(ValueError, match=message):
            NumaNode.parse(bad)


def test_numa_node_checks() -> None:
    a, b = NumaNode(frozenset({0, 1, 2}), 128), NumaNode(frozenset({3, 4, 5}), 128)
    check_nodes([a, b], 6, 256)
    for nodes, vcpus, mem, message in [
        ([a, NumaNode(frozenset({2, 3, 4, 5}), 128)], 6, 256, "vCPU 2 is in node 0 and node 1"),
        ([a, NumaNode(frozenset({3, 4}), 128)], 6, 256, "vCPUs 5 are in no node"),
        ([a, b], 6, 300, "the nodes have 256 MiB of memory, the machine 300 MiB"),
        ([a, b], 4, 256, "vCPU 4 does not exist"),
        ([a, NumaNode(frozenset({3, 4, 5}), 0)], 6, 128, "at least 1"),
        ([a, NumaNode(frozenset({3, 4, 5}), 127)], 6, 255, "multiple of 2"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_nodes(nodes, vcpus, mem, granule_mib=2)


def test_node_memory_straddles_the_mmio_gap() -> None:
    gib = 1 << 30
    nodes = [NumaNode(frozenset({0}), 2048), NumaNode(frozenset({1}), 2048)]
    assert node_ranges(nodes, 4 * gib) == [
        (0, 2 * gib, 0), (2 * gib, gib, 1), (layout.MMIO_GAP_END, gib, 1),
    ]  # fmt: skip
    assert layout.ram_pieces(0, 4096, 4 * gib) == [(0, 4096)]
    with pytest.raises(ValueError):
        layout.ram_pieces(4 * gib - 4096, 8192, 4 * gib)


# -- ACPI tables, as iasl decodes them
def _iasl(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / f"{name}.dat"
    path.write_bytes(data)
    proc = subprocess.run(["iasl", "-d", str(path)], capture_output=True, text=True,
                          cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return (tmp_path / f"{name}.dsl").read_text()


def _fields(dsl: str, name: str) -> list[str]:
    return re.findall(rf"\] +{re.escape(name)} : (\S+)", dsl)


NEEDS_IASL = pytest.mark.skipif(shutil.which("iasl") is None, reason="iasl (acpica-tools)")


@NEEDS_IASL
def test_srat_and_slit_decoded_by_iasl(tmp_path: Path) -> None:
    t = Topology(sockets=2, cores=3)
    nodes = [NumaNode(frozenset({0, 1, 2}), 2048), NumaNode(frozenset({3, 4, 5}), 2048, 1)]
    tables = numa_tables(nodes, 6, 4 << 30)
    srat = _iasl(tmp_path, "srat", acpi.build_srat(t.apic_ids(), tables))
    assert "Table Revision : 00000001" in srat
    assert _fields(srat, "Apic ID") == ["00", "01", "02", "04", "05", "06"]
    assert _fields(srat, "Proximity Domain Low(8)") == ["00"] * 3 + ["01"] * 3
    assert _fields(srat, "Base Address") == ["0000000000000000", "0000000080000000",
                                             "0000000100000000"]  # fmt: skip
    assert _fields(srat, "Address Length") == ["0000000080000000", "0000000040000000",
                                               "0000000040000000"]  # fmt: skip
    assert _fields(srat, "Proximity Domain") == ["00000000", "00000001", "00000001"]
    slit = _iasl(tmp_path, "slit", acpi.build_slit(tables.distances))
    assert "Localities : 0000000000000002" in slit
    assert re.findall(r"Locality +\d : (.+)", slit) == ["0A 14", "14 0A"]


@NEEDS_IASL
def test_x2apic_entries_in_madt_and_srat_decoded_by_iasl(tmp_path: Path) -> None:
    t = Topology(sockets=3, cores=65)  # APIC IDs 0-64, 128-192, 256-320
    ids = t.apic_ids()
    madt = _iasl(tmp_path, "apic", acpi.build_madt(ids))
    local = [int(x, 16) for x in _fields(madt, "Local Apic ID")]
    x2 = [int(x, 16) for x in _fields(madt, "Processor x2Apic ID")]
    assert local == [a for a in ids if a < 255] and x2 == [a for a in ids if a >= 255]
    uids = [int(x, 16) for x in _fields(madt, "Processor UID")]
    assert uids[-1] == 0xFFFFFFFF  # the x2APIC NMI entry, for every processor
    assert uids[-66:-1] == list(range(130, 195))  # x2APIC processors keep their vCPU number
    assert "[Local x2APIC NMI]" in madt and "[Local APIC NMI]" in madt
    assert _fields(madt, "I/O Apic ID") == ["00"]  # one past 320 does not fit 8 bits
    nodes = [NumaNode(frozenset(range(130)), 64), NumaNode(frozenset(range(130, 195)), 64)]
    srat = _iasl(tmp_path, "srat", acpi.build_srat(ids, numa_tables(nodes, 195, 128 << 20)))
    assert "[Processor Local x2APIC Affinity]" in srat
    x2_affinity = re.findall(r"x2APIC Affinity\]\n.*\n\n.*\n.*Proximity Domain : (\S+)\n"
                             r".*Apic ID : (\S+)", srat)  # fmt: skip
    assert [(int(d, 16), int(a, 16)) for d, a in x2_affinity] == [(1, a) for a in range(256, 321)]


def test_acpi_tables_list_srat_and_slit_only_with_numa() -> None:
    from kvmkit.devices.legacy.power import AcpiPower
    from kvmkit.memory import GuestMemory

    with_numa = numa_tables([NumaNode(frozenset({0}), 32), NumaNode(frozenset({1}), 32)], 2,
                            64 << 20)  # fmt: skip
    for numa, expected in [(None, [b"FACP", b"APIC"]),
                           (with_numa, [b"FACP", b"APIC", b"SRAT", b"SLIT"])]:  # fmt: skip
        mem = GuestMemory()
        mem.add_anonymous(0, 2 << 20)
        try:
            rsdp = acpi.write_acpi_tables(mem, [0, 1], pm_port=AcpiPower.PM1_EVT_PORT,
                                          reset_port=AcpiPower.RESET_PORT, numa=numa)  # fmt: skip
            xsdt = mem.read_u64(rsdp + 24)
            count = (mem.read_u32(xsdt + 4) - 36) // 8
            sigs = [mem.read(mem.read_u64(xsdt + 36 + 8 * i), 4) for i in range(count)]
            assert sigs == expected
            for i in range(count):
                at = mem.read_u64(xsdt + 36 + 8 * i)
                assert sum(mem.read(at, mem.read_u32(at + 4))) & 0xFF == 0
        finally:
            mem.close()
