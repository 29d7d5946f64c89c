"""Topologies on this host's /dev/kvm with tiny guests: sparse vCPU ids up to the kernel's
maximum, x2APIC IDs above 255 read by the guest itself (CPUID and the x2APIC ID register),
LAPIC state with 32-bit IDs (KVM_CAP_X2APIC_API), and a whole Machine built from a topology
with guest NUMA nodes."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest

from kvmkit.abi.constants import MpState
from kvmkit.arch.x86_64 import layout
from kvmkit.arch.x86_64.numa import NumaNode
from kvmkit.arch.x86_64.topology import Topology
from kvmkit.errors import UserError
from kvmkit.kvm import Kvm, KvmError
from kvmkit.memory import GuestMemory
from kvmkit.testing import TinyGuest, pvh
from kvmkit.vmm import cpus
from kvmkit.vmm.config import MachineConfig

REPORT = "mov $0x1002, %dx\nout %eax, %dx\n"
DONE = "xor %eax, %eax\nmov $0x1000, %dx\nout %eax, %dx\n"
# CPL0 (on PVM only CPL0 code goes through KVM's emulator, which answers CPUID from the table
# KVM_SET_CPUID2 set; CPL3 CPUID runs on the host CPU): report the x2APIC ID from CPUID 0xB,
# the legacy 8-bit initial APIC ID of leaf 1, then switch the LAPIC to x2APIC mode
# (IA32_APIC_BASE bits 11 EN and 10 EXTD, SDM vol. 3A 10.12.1) and report the x2APIC ID
# register (MSR 0x802, 10.12.5.1).
READ_APIC_IDS = f"""
    mov $0xb, %eax
    xor %ecx, %ecx
    cpuid
    mov %edx, %eax
    {REPORT}
    mov $1, %eax
    cpuid
    mov %ebx, %eax
    shr $24, %eax
    {REPORT}
    mov $0x1b, %ecx
    rdmsr
    or $0xc00, %eax
    wrmsr
    mov $0x802, %ecx
    rdmsr
    {REPORT}
    {DONE}
"""


def test_sparse_vcpu_ids_up_to_the_kernel_maximum() -> None:
    with Kvm() as kvm:
        limits = cpus.host_limits(kvm)
        print(f"host limits: {limits}")
        assert limits.max_vcpu_id > 256
        with kvm.create_vm() as vm:
            cpus.enable_x2apic_api(vm)
            ids = [0, 1, 254, 255, 256, limits.max_vcpu_id - 1]
            for i in ids:
                assert vm.create_vcpu(i).id == i
            with pytest.raises(KvmError):
                vm.create_vcpu(limits.max_vcpu_id)
            # kvmkit's path names the vCPU, its APIC ID and the host's limits in one line.
            beyond = Topology(sockets=limits.max_vcpu_id // 1024 + 1, cores=1024)
            with pytest.raises(UserError, match="KVM_CAP_MAX_VCPU_ID") as err:
                cpus.create_vcpu(vm, beyond, (limits.max_vcpu_id // 1024) * 1024)
            assert "\n" not in str(err.value)


@pytest.mark.parametrize("index", [0, 64, 65, 129, 130, 194])
def test_each_vcpu_reads_its_own_apic_id(index: int) -> None:
    topology = Topology(sockets=3, cores=65)  # APIC IDs 0-64, 128-192, 256-320
    apic_id = topology.apic_id(index)
    with TinyGuest("long64", cpl=0, irqchip=True, topology=topology) as g:
        assert g.x2apic_api == cpus.X2APIC_API_FLAGS
        assert [v.id for v in g.vcpus] == topology.apic_ids()
        vcpu = g.vcpus[index]
        vcpu.set_mp_state(MpState.RUNNABLE)  # an AP would otherwise wait for INIT/SIPI
        g.load_asm(READ_APIC_IDS)
        out = g.run(vcpu=vcpu)
        lapic = vcpu.get_lapic()
    assert out.reports == [apic_id, apic_id & 0xFF, apic_id]
    # KVM_CAP_X2APIC_API: the LAPIC state of an x2APIC-mode vCPU holds the full 32-bit ID.
    assert lapic.get_reg(0x20) == apic_id


def test_x2apic_lapic_state_restores_into_a_new_vm() -> None:
    topology = Topology(sockets=3, cores=65)
    with TinyGuest("long64", cpl=0, irqchip=True, topology=topology) as g:
        vcpu = g.vcpus[194]
        vcpu.set_mp_state(MpState.RUNNABLE)
        g.load_asm(READ_APIC_IDS)
        g.run(vcpu=vcpu)
        saved, apic_base = vcpu.get_lapic(), vcpu.get_sregs().apic_base
    with TinyGuest("long64", cpl=0, irqchip=True, topology=topology) as g2:
        target = g2.vcpus[194]
        sregs = target.get_sregs()
        sregs.apic_base = apic_base  # x2APIC mode first: KVM checks the ID against it
        target.set_sregs(sregs)
        target.set_lapic(saved)
        assert target.get_lapic().get_reg(0x20) == 320
        # The ID is the vCPU's: the same page cannot become another vCPU's LAPIC.
        other = g2.vcpus[193]
        sregs = other.get_sregs()
        sregs.apic_base = apic_base
        other.set_sregs(sregs)
        with pytest.raises(KvmError):
            other.set_lapic(saved)


@pytest.fixture(scope="module")
def pvh_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PVH "kernel" that triple-faults at once: a whole Machine is built and run on any KVM,
    PVM included."""
    return pvh.build(pvh.TRIPLE_FAULT, tmp_path_factory.mktemp("pvh") / "tf.elf")


@pytest.fixture(scope="module")
def halt_kernel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PVH "kernel" that halts with interrupts off: its vCPU threads stay up until stopped."""
    return pvh.build(pvh.HALT, tmp_path_factory.mktemp("pvh") / "halt.elf")


def acpi_tables(mem: GuestMemory) -> dict[bytes, bytes]:
    """The tables the XSDT lists, by signature."""
    xsdt = mem.read_u64(layout.ACPI_ADDR + 24)
    tables = {}
    for i in range((mem.read_u32(xsdt + 4) - 36) // 8):
        at = mem.read_u64(xsdt + 36 + 8 * i)
        tables[mem.read(at, 4)] = mem.read(at, mem.read_u32(at + 4))
    return tables


def madt_entries(madt: bytes) -> list[bytes]:
    out, at = [], 44
    while at < len(madt):
        out.append(madt[at : at + madt[at + 1]])
        at += madt[at + 1]
    return out


def test_machine_built_from_a_topology_with_numa_nodes(halt_kernel: Path) -> None:
    from kvmkit.vmm.machine import EndReason, Machine

    topology = Topology(sockets=2, dies=2, cores=3, threads=2)  # 24 vCPUs, APIC IDs to 29
    config = MachineConfig(
        kernel=halt_kernel, vcpus=24, mem_mib=256, topology=topology,
        numa=[NumaNode(frozenset(range(12)), 192, 0), NumaNode(frozenset(range(12, 24)), 64)],
        cpu_affinity={-1: frozenset({0}), 5: frozenset({1})},
    )  # fmt: skip
    before = os.sched_getaffinity(0)
    with Machine(config) as m:
        m.build()
        assert [t.vcpu.id for t in m.threads] == topology.apic_ids()
        assert m.x2apic_api == 0  # all IDs fit 8 bits
        tables = acpi_tables(m.mem)
        madt, srat = tables[b"APIC"], tables[b"SRAT"]
        lapics = [e[3] for e in madt_entries(madt) if e[0] == 0]
        assert lapics == topology.apic_ids()
        # SRAT: 24 Local APIC affinity entries (16 bytes) then memory ranges (40 bytes).
        cpus_srat = [(srat[at + 2], srat[at + 3]) for at in range(48, 48 + 24 * 16, 16)]
        assert cpus_srat == [(0 if i < 12 else 1, a) for i, a in enumerate(topology.apic_ids())]
        mems = [struct.unpack_from("<IQQ", srat, at + 2)[0:1] + struct.unpack_from("<QQ", srat,
                at + 8) for at in range(48 + 24 * 16, len(srat), 40)]  # fmt: skip
        assert mems == [(0, 0, 192 << 20), (1, 192 << 20, 64 << 20)]
        # The MP table is there: 24 vCPUs with 8-bit IDs fit its reserved KiB.
        assert m.mem.read(0x9FC00, 4) == b"_MP_"
        # Node 0's memory is bound to host node 0 (numa_maps: "bind:0" on that range).
        region = m.mem.region_for(0)
        maps = Path("/proc/self/numa_maps").read_text().splitlines()
        line = next(x for x in maps if int(x.split()[0], 16) == region.host_addr)
        assert "bind:0" in line.split()
        m.start()
        # --cpu-affinity: vCPU 5 on host CPU 1, the others on CPU 0; this thread unchanged.
        pinned = [os.sched_getaffinity(t.thread.native_id or 0) for t in m.threads]
        assert pinned == [{1} if i == 5 else {0} for i in range(24)]
        assert os.sched_getaffinity(0) == before
        m.stop()
        result = m.wait(60)
    assert result is not None and result.reason == EndReason.STOPPED


def test_machine_with_256_vcpus_uses_x2apic_and_no_mp_table(pvh_kernel: Path) -> None:
    from kvmkit.vmm.machine import EndReason, Machine

    with Machine(MachineConfig(kernel=pvh_kernel, vcpus=256, mem_mib=64)) as m:
        m.build()
        assert m.x2apic_api == cpus.X2APIC_API_FLAGS  # APIC ID 255 does not fit xAPIC
        assert m.threads[-1].vcpu.id == 255
        entries = madt_entries(acpi_tables(m.mem)[b"APIC"])
        assert [e[3] for e in entries if e[0] == 0] == list(range(255))
        (x2apic,) = [e for e in entries if e[0] == 9]
        assert struct.unpack_from("<III", x2apic, 4) == (255, 1, 255)  # ID, enabled, UID
        assert m.mem.read(0x9FC00, 4) != b"_MP_"  # the MP table cannot name APIC ID 255
        m.start()
        result = m.wait(120)
    assert result is not None and result.reason == EndReason.TRIPLE_FAULT
