"""What a user asks for: one `MachineConfig`, the same whether it comes from the CLI, the
Python API or (later) the REST API and config file."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from kvmkit.arch.x86_64 import hyperv as hv
from kvmkit.arch.x86_64.numa import NumaNode, check_nodes
from kvmkit.arch.x86_64.topology import MAX_VCPUS as MAX_VCPUS  # kvmkit's one vCPU limit
from kvmkit.arch.x86_64.topology import (
    HostCpuLimits,
    Topology,
    format_cpulist,
    parse_cpulist,
)
from kvmkit.devices.virtio.balloon import BalloonConfig
from kvmkit.devices.virtio.blk import CACHE_TYPES, DriveConfig
from kvmkit.devices.virtio.net import NetConfig
from kvmkit.devices.virtio.ratelimit import RateLimiterConfig
from kvmkit.devices.virtio.vsock import VsockConfig
from kvmkit.errors import UserError
from kvmkit.memory import host as host_memory

MIN_MEM_MIB = 32
MAX_MEM_MIB = 1 << 20  # 1 TiB: anything above is a typo, not a microVM
MAX_VIRTIO_DEVICES = 9  # one ISA IRQ each (arch/x86_64/layout.py VIRTIO_MMIO_IRQS)
VIRTIO_TRANSPORTS = ("mmio", "pci")
MAX_PCI_FUNCTIONS = 31  # bus 0's 32 slots less the host bridge (devices/pci/root.py)


@dataclass
class MachineConfig:
    kernel: Path | None = None
    initrd: Path | None = None
    cmdline: str | None = None  # None: kvmkit's default for the kernel it boots
    vcpus: int = 1
    mem_mib: int = 256
    command: list[str] = field(default_factory=list)  # run in the default guest image
    extra_cmdline: str = ""
    # The serial port's fast paths (on by default; off gives a plain 16550A whose every
    # byte is an exit, to compare): THR writes through KVM's coalesced PIO ring, and the
    # TL16C750's 64-byte FIFO so that Linux writes 64 bytes per interrupt, not 16.
    coalesce_serial: bool = True
    serial_fifo64: bool = True
    # virtio devices (virtio-mmio): block drives in order (/dev/vda, vdb, ...) and the
    # entropy device (/dev/hwrng). Snapshots carry their state (docs/snapshot.md).
    drives: list[DriveConfig] = field(default_factory=list)
    rng: bool = False
    rng_rate_limiter: RateLimiterConfig | None = None  # Firecracker's /entropy rate_limiter
    # How the guest finds them (docs/virtio.md): "mmio" (virtio-mmio, from the DSDT or the
    # command line) or "pci" (the modern virtio-pci transport on a PCI bus with MSI-X).
    virtio_transport: str = "mmio"
    # virtio-net over host taps (eth0, eth1, ... in order) and one virtio-vsock device whose
    # host side is Unix sockets (docs/virtio.md).
    nets: list[NetConfig] = field(default_factory=list)
    vsock: VsockConfig | None = None
    # Firecracker's balloon (virtio-balloon, after every other virtio device; docs/virtio.md).
    balloon: BalloonConfig | None = None
    # Firecracker's boot timer (`--boot-timer`): a write of 123 to its MMIO byte at
    # layout.BOOT_TIMER_ADDR logs the guest's boot time; the virtio-mmio devices move up a
    # slot to make room, as in Firecracker.
    boot_timer: bool = False
    # CPU topology and NUMA (docs/topology.md): None is one socket with one core per vCPU;
    # guest NUMA nodes (empty: none); guest RAM on huge pages of this size ("2M") or None;
    # host CPUs for the vCPU threads: vCPU index -> CPUs, key -1 for every vCPU not named.
    topology: Topology | None = None
    numa: list[NumaNode] = field(default_factory=list)
    huge_pages: str | None = None
    cpu_affinity: dict[int, frozenset[int]] = field(default_factory=dict)
    # Host PCI devices given to the guest through VFIO, by address (DDDD:BB:DD.F), each
    # bound to vfio-pci on the host (docs/vfio.md). Such a machine cannot be snapshotted.
    vfio: list[str] = field(default_factory=list)
    # Nested virtualization (docs/nested.md): show the guest the host's VMX/SVM (hidden
    # otherwise) so it can run VMs of its own.
    nested: bool = False
    # Hyper-V enlightenments (docs/hyperv.md): False, True (every feature the host offers) or
    # the feature names (kvmkit.arch.x86_64.hyperv.FEATURES); KVM's own CPUID leaves are
    # hidden unless hyperv_kvm_leaves keeps them (at 0x40000100).
    hyperv: bool | frozenset[str] = False
    hyperv_kvm_leaves: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.hyperv, bool):  # any collection of names from Python
            names = frozenset(self.hyperv)
            self.hyperv = True if names == {hv.ALL} else names

    @property
    def hyperv_wanted(self) -> frozenset[str] | None:
        """The features asked for: None for "every one the host offers" (hyperv=True)."""
        return None if isinstance(self.hyperv, bool) else self.hyperv

    @property
    def cpu_topology(self) -> Topology:
        return self.topology if self.topology is not None else Topology.flat(self.vcpus)

    @property
    def huge_page_size(self) -> int:
        """Bytes per huge page backing guest RAM, 0 for base pages."""
        return host_memory.huge_page_size(self.huge_pages) if self.huge_pages else 0

    def vcpu_affinity(self, index: int) -> frozenset[int] | None:
        """Host CPUs for vCPU `index`'s thread, None to leave it as inherited."""
        return self.cpu_affinity.get(index, self.cpu_affinity.get(-1))

    @property
    def virtio_count(self) -> int:
        """How many virtio devices: drives, the rng, nets, vsock, the balloon (Machine's
        order)."""
        return (len(self.drives) + int(self.rng) + len(self.nets) + int(self.vsock is not None)
                + int(self.balloon is not None))  # fmt: skip

    def validate(self, host: HostCpuLimits | None = None) -> None:
        """Every check of the configuration, one line each (UserError). `host`: also check
        the vCPUs against what the host's KVM allows (Machine.build passes it)."""
        self.validate_shapes()
        if host is not None:
            try:
                self.cpu_topology.check_host(host)
            except ValueError as err:
                raise UserError(f"--vcpus {self.vcpus}: {err}") from None
        total = _host_memory_mib()
        if total is not None and self.mem_mib > total:
            raise UserError(f"--mem-mib {self.mem_mib}: the host has only {total} MiB of memory")
        for what, path in (("kernel", self.kernel), ("initrd", self.initrd)):
            if path is None:
                continue
            if not path.exists():
                raise UserError(f"{what} {path}: no such file")
            if not path.is_file():
                raise UserError(f"{what} {path}: not a regular file")
            if not os.access(path, os.R_OK):
                raise UserError(f"{what} {path}: not readable")
        if sum(d.root for d in self.drives) > 1:
            raise UserError("only one drive can be the root device")
        for drive in self.drives:
            if drive.cache_type not in CACHE_TYPES:
                raise UserError(f"--drive {drive.path}: cache type {drive.cache_type!r}")
            if drive.partuuid is not None and not drive.root:
                raise UserError(f"--drive {drive.path}: a partuuid only applies to the root drive")
            if not drive.path.is_file():
                raise UserError(f"--drive {drive.path}: not a regular file")
            if not os.access(drive.path, os.R_OK if drive.read_only else os.R_OK | os.W_OK):
                raise UserError(f"--drive {drive.path}: not readable/writable")
        if self.virtio_transport not in VIRTIO_TRANSPORTS:
            raise UserError(
                f"--virtio-transport {self.virtio_transport}: must be one of "
                + ", ".join(VIRTIO_TRANSPORTS)
            )
        for what, dev in [*(("--net", n) for n in self.nets), ("--vsock", self.vsock)]:
            try:
                if dev is not None:
                    dev.check()
            except ValueError as err:
                raise UserError(f"{what}: {err}") from None
        taps = [n.tap for n in self.nets]
        if len(set(taps)) != len(taps):
            raise UserError("--net: the same tap twice")
        if self.virtio_count > MAX_VIRTIO_DEVICES:
            raise UserError(f"at most {MAX_VIRTIO_DEVICES} virtio devices")
        if self.vfio:
            self._validate_vfio()
        if self.initrd is not None and self.kernel is None:
            raise UserError("--initrd needs --kernel (the default image brings its own)")
        self.validate_placement()
        self.validate_affinity()

    def validate_shapes(self) -> None:
        """The checks that need no host: vCPUs, topology, memory size, NUMA nodes, huge page
        size (a snapshot's configuration goes through these too)."""
        # kvmkit's one vCPU limit, enforced here for the CLI, the API and Python alike.
        if isinstance(self.vcpus, bool) or not 1 <= self.vcpus <= MAX_VCPUS:
            source = "" if self.topology is None else f" (--topology {self.topology})"
            raise UserError(f"--vcpus {self.vcpus}{source}: must be between 1 and {MAX_VCPUS}")
        try:
            self.cpu_topology.check(self.vcpus)
        except ValueError as err:
            raise UserError(f"--topology: {err}") from None
        if not MIN_MEM_MIB <= self.mem_mib <= MAX_MEM_MIB:
            raise UserError(
                f"--mem-mib {self.mem_mib}: must be between {MIN_MEM_MIB} and {MAX_MEM_MIB}"
            )
        try:
            page = self.huge_page_size
        except ValueError as err:
            raise UserError(f"--huge-pages: {err}") from None
        page_mib = max(page >> 20, 1)
        if self.mem_mib % page_mib:
            raise UserError(f"--mem-mib {self.mem_mib}: must be a multiple of {page_mib} with "
                            f"--huge-pages {self.huge_pages}")  # fmt: skip
        if self.numa:
            try:
                check_nodes(self.numa, self.vcpus, self.mem_mib, page_mib)
            except ValueError as err:
                raise UserError(f"--numa: {err}") from None
        if self.balloon is not None:
            # A balloon gives 4 KiB pages back; hugetlbfs frees whole huge pages only
            # (Firecracker refuses the pair with this message).
            if self.huge_pages:
                raise UserError("Firecracker's huge pages support is incompatible with memory "
                                "ballooning.")  # fmt: skip
            try:
                self.balloon.check(self.mem_mib)
            except ValueError as err:
                raise UserError(f"balloon: {err}") from None
        self.validate_hyperv()

    def validate_hyperv(self) -> None:
        """--hyperv names known features with their requirements; the KVM-leaves option
        only with --hyperv."""
        wanted = self.hyperv_wanted
        if wanted is not None:
            try:
                if not wanted:
                    raise ValueError("--hyperv: no features named")
                hv.parse_features(",".join(sorted(wanted)))
                hv.check_requirements(wanted)
            except ValueError as err:
                raise UserError(str(err)) from None
        if self.hyperv_kvm_leaves and self.hyperv is False:
            raise UserError("--hyperv-kvm-leaves needs --hyperv")

    def validate_placement(self) -> None:
        """What this host must give the guest's memory: the host nodes --numa binds to, and
        enough free huge pages."""
        bound = {n.host_node for n in self.numa if n.host_node is not None}
        if bound:
            present, allowed = host_memory.host_nodes(), host_memory.allowed_nodes()
            for node in sorted(bound):
                if node not in present:
                    raise UserError(
                        f"--numa host-node={node}: this host has no NUMA node {node} with "
                        f"memory (nodes: {format_cpulist(present)})"
                    )
                if allowed is not None and node not in allowed:
                    raise UserError(
                        f"--numa host-node={node}: this process may not use host node {node} "
                        f"(its cpuset allows memory nodes {format_cpulist(allowed)})"
                    )
        if self.huge_page_size:
            self._check_free_huge_pages(self.huge_page_size)

    def _check_free_huge_pages(self, page: int) -> None:
        """Enough free huge pages, on each bound host node and in all: the mmap would fail
        anyway, this says how many and how to get them before anything starts."""
        need: dict[int | None, int] = {None: (self.mem_mib << 20) // page}
        for n in self.numa:
            if n.host_node is not None:
                need[n.host_node] = need.get(n.host_node, 0) + (n.mem_mib << 20) // page
        for node, count in need.items():
            if node is None:
                free = host_memory.available_huge_pages(page)
                where, sysfs = "", "/proc/sys/vm/nr_hugepages"
            else:
                free = host_memory.free_huge_pages(page, node)
                where = f" on host node {node}"
                sysfs = (f"/sys/devices/system/node/node{node}/hugepages/hugepages-"
                         f"{page >> 10}kB/nr_hugepages")  # fmt: skip
            if free is None:
                raise UserError(f"--huge-pages {self.huge_pages}: no {page >> 20} MiB huge "
                                f"pages{where or ' on this host'}")  # fmt: skip
            if free < count:
                raise UserError(
                    f"--huge-pages {self.huge_pages}: the guest needs {count} huge pages of "
                    f"{page >> 20} MiB{where}, {free} are free to this process (reserve more "
                    f"in {sysfs})"
                )

    def validate_affinity(self) -> None:
        """--cpu-affinity names existing vCPUs and host CPUs this process may use."""
        allowed = os.sched_getaffinity(0)
        for index, cpus in sorted(self.cpu_affinity.items()):
            what = "--cpu-affinity" + ("" if index < 0 else f" {index}=")
            if index >= self.vcpus:
                raise UserError(f"{what}: there is no vCPU {index} (vCPUs are 0-{self.vcpus - 1})")
            if not cpus:
                raise UserError(f"{what}: no host CPUs")
            outside = sorted(cpus - allowed)
            if outside:
                raise UserError(
                    f"{what}: host CPU {outside[0]} is not available to this process (it may "
                    f"run on {format_cpulist(allowed)})"
                )


    def _validate_vfio(self) -> None:
        """Each device exists, is bound to vfio-pci and its IOMMU group is viable (sysfs;
        kvmkit.vfio.sysfs), before anything is built."""
        from kvmkit.vfio.sysfs import check_assignable

        seen: set[str] = set()
        for text in self.vfio:
            bdf = check_assignable(text).bdf
            if bdf in seen:
                raise UserError(f"--vfio {bdf}: the same device twice")
            seen.add(bdf)
        virtio_pci = self.virtio_count if self.virtio_transport == "pci" else 0
        if len(self.vfio) + virtio_pci > MAX_PCI_FUNCTIONS:
            raise UserError(f"at most {MAX_PCI_FUNCTIONS} PCI devices (virtio-pci and --vfio)")


def _host_memory_mib() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        return None
    return None


def parse_cpu_affinity(specs: list[str]) -> dict[int, frozenset[int]]:
    """`--cpu-affinity` values: "CPUS" (every vCPU thread on those host CPUs) or "V=CPUS"
    (vCPU V's thread), CPUS a Linux CPU list ("0-3,6"). Key -1 is "every vCPU not named"."""
    out: dict[int, frozenset[int]] = {}
    for spec in specs:
        vcpu, sep, cpus = spec.rpartition("=")
        try:
            index = int(vcpu, 10) if sep else -1
            if index < -1 or (sep and index < 0):
                raise ValueError
        except ValueError:
            raise UserError(f"--cpu-affinity {spec}: {vcpu!r} is not a vCPU number") from None
        if index in out:
            raise UserError(f"--cpu-affinity {spec}: " + (
                "every-vCPU list given twice" if index < 0 else f"vCPU {index} given twice"))
        try:
            out[index] = parse_cpulist(cpus)
        except ValueError as err:
            raise UserError(f"--cpu-affinity {spec}: {err}") from None
    return out
