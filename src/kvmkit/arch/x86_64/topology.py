"""CPU topology: sockets, dies, cores and threads, and the APIC IDs that encode them.

An x86 APIC ID is a bit field, one sub-field per topology level, lowest level in the low bits
(SDM vol. 3A 10.12.8 "Hierarchical Mapping of Shared Resources" and CPUID leaf 0BH/1FH: each
level's field is as wide as its count rounded up to a power of two; AMD APM vol. 2 16.3.2
"Extended APIC ID" and CPUID Fn8000_0008 ECX ApicIdSize describe the same layout):

    APIC ID = socket << pkg_shift | die << die_shift | core << core_shift | thread

    smt_bits  = ceil(log2(threads))        core_shift = smt_bits
    core_bits = ceil(log2(cores))          die_shift  = smt_bits + core_bits
    die_bits  = ceil(log2(dies))           pkg_shift  = smt_bits + core_bits + die_bits

A level that is not a power of two leaves IDs unused: one socket of 3 cores takes IDs 0, 1, 2
and the next socket starts at 4. vCPU indexes (Linux CPU numbers, the order of the ACPI MADT)
count threads fastest, then cores, dies and sockets, as QEMU numbers them; KVM names each vCPU
by its APIC ID (KVM_CREATE_VCPU's id is the initial APIC ID of the in-kernel LAPIC), so the
vCPU ids of such a machine are sparse.

`MAX_VCPUS` is kvmkit's one limit on the number of vCPUs; the host's KVM may allow fewer
(KVM_CAP_MAX_VCPUS) and bounds the APIC IDs (KVM_CAP_MAX_VCPU_ID): `check_host`.
"""

from __future__ import annotations

from dataclasses import dataclass

# kvmkit's limit on vCPUs in one VM: KVM_MAX_VCPUS on x86 since Linux 5.15
# (arch/x86/include/asm/kvm_host.h, also the default of CONFIG_KVM_MAX_NR_VCPUS since 6.9).
# The ACPI tables for this many (16-byte MADT x2APIC and 24-byte SRAT entries) fit the
# 128 KiB ACPI area (layout.ACPI_ADDR..ACPI_END).
MAX_VCPUS = 1024
# The largest APIC ID the 8-bit xAPIC structures can name: 0xFF is the broadcast ID (SDM vol.
# 3A 10.6.2.1), so xAPIC IDs are 0..254; above, the MADT needs x2APIC entries, the MP table
# cannot describe the machine, and KVM needs KVM_CAP_X2APIC_API.
MAX_XAPIC_ID = 254
LEVELS = ("sockets", "dies", "cores", "threads")


def bits_for(count: int) -> int:
    """Width of an APIC ID field for `count` IDs: ceil(log2(count)), 0 for one."""
    return max(count - 1, 0).bit_length()


@dataclass(frozen=True)
class CpuLocation:
    """Where vCPU `index` sits, and its APIC ID."""

    index: int
    socket: int
    die: int
    core: int
    thread: int
    apic_id: int


@dataclass(frozen=True)
class HostCpuLimits:
    """What the host's KVM allows (KVM API doc, KVM_CAP_MAX_VCPUS and KVM_CAP_MAX_VCPU_ID):
    how many vCPUs one VM may have, and the bound on vCPU ids (ids are < max_vcpu_id)."""

    max_vcpus: int
    max_vcpu_id: int


@dataclass(frozen=True)
class Topology:
    sockets: int = 1
    dies: int = 1  # per socket
    cores: int = 1  # per die
    threads: int = 1  # per core

    def __post_init__(self) -> None:
        for name in LEVELS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be a whole number of at least 1")
            if value > MAX_VCPUS:
                raise ValueError(f"{name}={value}: more than {MAX_VCPUS} vCPUs")

    @classmethod
    def flat(cls, vcpus: int) -> Topology:
        """kvmkit's topology when none is given: one socket, one core per vCPU, one thread per
        core (APIC IDs 0..vcpus-1, as before topologies could be chosen)."""
        return cls(cores=vcpus)

    @classmethod
    def smt(cls, vcpus: int) -> Topology:
        """Firecracker's `smt: true`: one socket of vcpus/2 cores with 2 threads each (one vCPU
        stays a single thread); the vCPU count must be 1 or even."""
        if vcpus == 1:
            return cls()
        if vcpus % 2:
            raise ValueError(f"{vcpus} vCPUs with SMT: the count must be 1 or an even number")
        return cls(cores=vcpus // 2, threads=2)

    @classmethod
    def parse(cls, spec: str) -> Topology:
        """`sockets=S,dies=D,cores=C,threads=T` (any subset; the rest are 1)."""
        values: dict[str, int] = {}
        for part in spec.split(","):
            key, sep, raw = part.partition("=")
            key = key.strip()
            if key not in LEVELS or not sep:
                raise ValueError(f"unknown part {part!r} (sockets=S,dies=D,cores=C,threads=T)")
            if key in values:
                raise ValueError(f"{key} given twice")
            try:
                values[key] = int(raw, 10)
            except ValueError:
                raise ValueError(f"{key}={raw!r}: not a number") from None
        return cls(**values)

    def __str__(self) -> str:
        return ",".join(f"{name}={getattr(self, name)}" for name in LEVELS)

    # -- counts and bit widths
    @property
    def vcpus(self) -> int:
        return self.sockets * self.dies * self.cores * self.threads

    @property
    def per_package(self) -> int:
        """Logical processors in one socket."""
        return self.dies * self.cores * self.threads

    @property
    def smt_bits(self) -> int:
        return bits_for(self.threads)

    @property
    def core_bits(self) -> int:
        return bits_for(self.cores)

    @property
    def die_bits(self) -> int:
        return bits_for(self.dies)

    @property
    def core_shift(self) -> int:
        return self.smt_bits

    @property
    def die_shift(self) -> int:
        return self.smt_bits + self.core_bits

    @property
    def pkg_shift(self) -> int:
        return self.smt_bits + self.core_bits + self.die_bits

    # -- vCPUs
    def location(self, index: int) -> CpuLocation:
        if not 0 <= index < self.vcpus:
            raise ValueError(f"vCPU {index} out of range for {self.vcpus} vCPUs")
        thread = index % self.threads
        core = index // self.threads % self.cores
        die = index // (self.threads * self.cores) % self.dies
        socket = index // self.per_package
        apic_id = (
            socket << self.pkg_shift | die << self.die_shift | core << self.core_shift | thread
        )
        return CpuLocation(index, socket, die, core, thread, apic_id)

    def apic_id(self, index: int) -> int:
        return self.location(index).apic_id

    def apic_ids(self) -> list[int]:
        """APIC IDs of vCPUs 0..vcpus-1, ascending."""
        return [self.apic_id(i) for i in range(self.vcpus)]

    @property
    def max_apic_id(self) -> int:
        return self.apic_id(self.vcpus - 1)

    @property
    def needs_x2apic(self) -> bool:
        """Some APIC ID does not fit the 8-bit xAPIC ID (see MAX_XAPIC_ID)."""
        return self.max_apic_id > MAX_XAPIC_ID

    # -- checks
    def check(self, vcpus: int) -> None:
        """ValueError unless this topology has exactly `vcpus` vCPUs within kvmkit's limit."""
        if self.vcpus != vcpus:
            raise ValueError(
                f"{self} has {self.vcpus} vCPUs ({self.sockets}x{self.dies}x{self.cores}x"
                f"{self.threads}), not {vcpus}"
            )
        if self.vcpus > MAX_VCPUS:
            raise ValueError(f"{self} has {self.vcpus} vCPUs, more than kvmkit's {MAX_VCPUS}")

    def check_host(self, limits: HostCpuLimits) -> None:
        """ValueError when the host's KVM cannot create these vCPUs."""
        if self.vcpus > limits.max_vcpus:
            raise ValueError(
                f"{self.vcpus} vCPUs: this host's KVM allows {limits.max_vcpus} per VM "
                "(KVM_CAP_MAX_VCPUS)"
            )
        if self.max_apic_id >= limits.max_vcpu_id:
            raise ValueError(
                f"{self} needs APIC IDs up to {self.max_apic_id}: this host's KVM allows vCPU "
                f"ids below {limits.max_vcpu_id} (KVM_CAP_MAX_VCPU_ID)"
            )


def parse_cpulist(text: str, *, limit: int | None = None) -> frozenset[int]:
    """A Linux CPU list ("0-3", "0,2,5-7"; cpuset(7) "List format") as a set of numbers.
    `limit`: numbers must be below it."""
    out: set[int] = set()
    for part in text.split(","):
        first, sep, last = part.strip().partition("-")
        try:
            lo = int(first, 10)
            hi = int(last, 10) if sep else lo
        except ValueError:
            raise ValueError(f"{text!r}: not a CPU list (like 0-3,6)") from None
        if lo < 0 or hi < lo:
            raise ValueError(f"{text!r}: bad range {part!r}")
        if limit is not None and hi >= limit:
            raise ValueError(f"{text!r}: {hi} is not below {limit}")
        if hi - lo > 1 << 16:
            raise ValueError(f"{text!r}: range {part!r} is too large")
        out.update(range(lo, hi + 1))
    return frozenset(out)


def format_cpulist(cpus: frozenset[int] | set[int] | list[int]) -> str:
    """The shortest Linux CPU list for `cpus` ("0-2,4")."""
    parts: list[str] = []
    ordered = sorted(set(cpus))
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)
