"""A Machine's state as typed plain data, checked completely before any VM exists.

One capture and one apply of state, two transports. `Machine.capture_state()` returns the
`MachineState` of a paused machine:

    kvm       how the VM was built, its VM-wide state (PIT, clock, PIC, IOAPIC), every vCPU
              (`kvmkit.snapshot.core.KvmState`)
    devices   the serial port; every virtio device with its transport (virtio-mmio or
              virtio-pci: config space, MSI-X table); the PCI root's address latch
    meta      the configuration (the CPU topology, guest NUMA nodes and huge pages, so the
              machine is rebuilt the same; --nested and the Hyper-V features; drives with
              their image sizes, cache types and rate limiters, nets with the MAC the guest
              knows, MTU, rate limiters and API iface id, the MMDS configuration (not its
              store), the rng's rate limiter, the boot timer, vsock),
              the console nonce, where the command-output parser was

Guest memory is not in it: each transport carries memory its own way. The snapshot file pair
(`kvmkit.vmm.snapshot`) writes the state file and a sparse memory file beside it; a
migration stream sends pages while the guest runs and this state once it is paused. On the
other side `MachineState.from_dict()` checks a payload (every field's type and range, every
device's and transport's state, the drive images on this host) and
`Machine.from_state(state, memory)` rebuilds the machine onto memory from either source, in
the order its docstring gives.

Each stateful part follows Firecracker's `Persist`: `save()` returns its typed state, the
state's `from_dict()` validates data read from a file or a socket (raising `SnapshotError`,
one line, exit status 2), and `restore(state)` takes a checked state over; only what needs
the built device (its features, queue count, guest memory) is checked there. Every part is
versioned. The payload keys are the snapshot file's since format version 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmkit.arch.x86_64.numa import MAX_HOST_NODE, MAX_NODES, NumaNode
from kvmkit.arch.x86_64.topology import LEVELS, Topology
from kvmkit.devices.legacy.serial import SerialState
from kvmkit.devices.pci.root import PciRootState
from kvmkit.devices.virtio.balloon import BalloonConfig, VirtioBalloon
from kvmkit.devices.virtio.blk import CACHE_TYPES, CACHE_WRITEBACK, DriveConfig, VirtioBlk
from kvmkit.devices.virtio.device import VirtioDevice, VirtioState
from kvmkit.devices.virtio.mmio import MmioTransportState
from kvmkit.devices.virtio.net import NetConfig, VirtioNet
from kvmkit.devices.virtio.pci import PciTransportState
from kvmkit.devices.virtio.ratelimit import RateLimiterConfig
from kvmkit.devices.virtio.rng import VirtioRng
from kvmkit.devices.virtio.vsock import VirtioVsock, VsockConfig
from kvmkit.errors import UserError
from kvmkit.mmds.store import Mmds, MmdsConfig, check_ipv4
from kvmkit.snapshot.core import KIND, KvmState
from kvmkit.snapshot.format import Fields, SnapshotError
from kvmkit.vmm.config import MAX_VCPUS, MAX_VIRTIO_DEVICES, VIRTIO_TRANSPORTS, MachineConfig
from kvmkit.vmm.console import CommandState

MAX_VIRTIO = 64  # caps the device list read from a state file
TransportState = MmioTransportState | PciTransportState
_TRANSPORTS: dict[str, type[MmioTransportState] | type[PciTransportState]] = {
    MmioTransportState.KIND: MmioTransportState,
    PciTransportState.KIND: PciTransportState,
}


def virtio_classes(config: MachineConfig) -> list[type[VirtioDevice]]:
    """The virtio devices a Machine builds for `config`, in its order."""
    return [
        *[VirtioBlk] * len(config.drives), *[VirtioRng] * int(config.rng),
        *[VirtioNet] * len(config.nets), *[VirtioVsock] * int(config.vsock is not None),
        *[VirtioBalloon] * int(config.balloon is not None),
    ]  # fmt: skip


@dataclass(frozen=True)
class VirtioEntry:
    """One virtio device: where it sits (MMIO base and IRQ, or BAR address and -1 for a PCI
    function, whose interrupts are MSI-X vectors), its transport's state and its own."""

    base: int
    irq: int
    transport: TransportState
    device: VirtioState

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "irq": self.irq, "transport": self.transport.KIND,
                "transport_state": self.transport.to_dict(),
                "device": self.device.to_dict()}  # fmt: skip

    @classmethod
    def from_dict(
        cls, obj: Any, path: str, device_class: type[VirtioDevice], transport: str
    ) -> VirtioEntry:
        f = Fields(obj, path)
        kind = f.get_str("transport", 64)
        if kind != transport:
            raise SnapshotError(f"snapshot state: {path}: not a {transport} device")
        state_class = _TRANSPORTS[kind]
        return cls(
            base=f.get_int("base", 0, 2**64 - 1),
            irq=f.get_int("irq", -1, 255),
            transport=state_class.from_dict(f.obj.get("transport_state"),
                                            f"{path}.transport_state"),
            device=VirtioState.from_dict(f.obj.get("device"), f"{path}.device", device_class),
        )  # fmt: skip


@dataclass(frozen=True)
class DeviceStates:
    serial: SerialState
    virtio: list[VirtioEntry]
    pci_root: PciRootState | None  # with virtio devices on PCI

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "serial0": self.serial.to_dict(),
            "virtio": [v.to_dict() for v in self.virtio],
        }
        if self.pci_root is not None:
            out["pci_root"] = self.pci_root.to_dict()
        return out

    @classmethod
    def from_dict(cls, obj: Any, config: MachineConfig) -> DeviceStates:
        """Every device of `config`, in the order Machine builds them (drives, the rng, nets,
        vsock), each with its transport's state."""
        f = Fields(obj, "devices")
        raw = f.get_list("virtio", MAX_VIRTIO) if f.has("virtio") else []
        want = virtio_classes(config)
        if len(raw) != len(want):
            raise SnapshotError(
                f"snapshot state: {len(raw)} virtio devices saved, the configuration has "
                f"{len(want)}"
            )
        virtio = [
            VirtioEntry.from_dict(entry, f"devices.virtio[{i}]", cls_, config.virtio_transport)
            for i, (entry, cls_) in enumerate(zip(raw, want, strict=True))
        ]
        if not f.has("serial0"):
            raise SnapshotError("snapshot state: devices.serial0 is missing")
        pci_root = None
        if f.obj.get("pci_root") is not None:
            pci_root = PciRootState.from_dict(f.obj["pci_root"], "devices.pci_root")
        return cls(SerialState.from_dict(f.obj["serial0"], "devices.serial0"), virtio, pci_root)


@dataclass(frozen=True)
class MachineState:
    """Everything of a paused Machine but its guest memory (see the module docstring)."""

    kvm: KvmState
    config: MachineConfig  # nets carry the MAC the guest knows
    drive_sizes: tuple[int, ...]  # each drive's image size when the state was taken
    nonce: str
    command: CommandState | None
    devices: DeviceStates

    def to_dict(self) -> dict[str, Any]:
        """The payload (JSON-able plain data; `memory` is the transport's to add)."""
        meta: dict[str, Any] = {
            "config": config_to_dict(self.config, self.drive_sizes), "nonce": self.nonce,
        }  # fmt: skip
        if self.command is not None:
            meta["command"] = self.command.to_dict()
        return {"kind": KIND, **self.kvm.to_dict(), "devices": self.devices.to_dict(),
                "meta": meta}  # fmt: skip

    @classmethod
    def from_dict(cls, payload: Any) -> MachineState:
        """Check a whole payload before anything is built; only SnapshotError escapes."""
        f = Fields(payload, "state")
        if f.get_str("kind", 64) != KIND:
            raise SnapshotError(f"snapshot state: not a {KIND} snapshot")
        kvm = KvmState.from_dict(payload)
        meta = f.get_obj("meta")
        config, sizes = _config_from(meta)
        if len(kvm.vcpus) != config.vcpus:
            raise SnapshotError("snapshot state: vCPU count does not match the configuration")
        topology = config.cpu_topology
        if [v.id for v in kvm.vcpus] != topology.apic_ids():
            raise SnapshotError(f"snapshot state: vCPU ids are not the APIC IDs of {topology}")
        if topology.needs_x2apic and not kvm.setup.x2apic_api:
            raise SnapshotError("snapshot state: APIC IDs above 254 without KVM_CAP_X2APIC_API")
        if config.nested != kvm.setup.nested:
            raise SnapshotError("snapshot state: meta.config.nested does not match setup.nested")
        command = None
        if meta.has("command"):
            command = CommandState.from_dict(meta.obj["command"], "meta.command")
        devices = DeviceStates.from_dict(f.obj.get("devices"), config)
        if config.virtio_transport == "pci" and devices.virtio and devices.pci_root is None:
            raise SnapshotError("snapshot state: devices.pci_root is missing")
        return cls(kvm, config, sizes, meta.get_str("nonce", 64), command, devices)


def config_to_dict(cfg: MachineConfig, drive_sizes: tuple[int, ...]) -> dict[str, Any]:
    """`meta.config` of the payload: what a machine is built from, with each drive's image
    size (a migration sends it first, so the destination checks it before any page)."""
    drives = [
        {"path": str(d.path.absolute()), "read_only": d.read_only, "serial": d.serial,
         "size": size, "cache_type": d.cache_type,
         "rate_limiter": _limiter_dict(d.rate_limiter)}
        for d, size in zip(cfg.drives, drive_sizes, strict=True)
    ]  # fmt: skip
    vsock = None
    if cfg.vsock is not None:
        vsock = {"cid": cfg.vsock.cid, "uds_path": str(cfg.vsock.uds_path.absolute())}
    return {"vcpus": cfg.vcpus, "mem_mib": cfg.mem_mib, "command": list(cfg.command),
            "drives": drives, "rng": cfg.rng, "virtio_transport": cfg.virtio_transport,
            "nets": [{"tap": n.tap, "mac": n.mac, "mtu": n.mtu, "iface_id": n.iface_id,
                      "mmds": n.mmds is not None,
                      "rx_rate_limiter": _limiter_dict(n.rx_rate_limiter),
                      "tx_rate_limiter": _limiter_dict(n.tx_rate_limiter)}
                     for n in cfg.nets],
            "mmds_config": _mmds_config_dict(cfg),
            "vsock": vsock, "rng_rate_limiter": _limiter_dict(cfg.rng_rate_limiter),
            "boot_timer": cfg.boot_timer,
            "balloon": None if cfg.balloon is None else cfg.balloon.to_dict(),
            **_save_cpu_memory(cfg)}  # fmt: skip


def _mmds_config_dict(cfg: MachineConfig) -> dict[str, Any] | None:
    """The MMDS configuration the nets serve (Firecracker keeps it in the snapshot; the data
    store is not kept: snapshot-support.md, "Firecracker Snapshotting characteristics")."""
    for n in cfg.nets:
        if n.mmds is not None and n.mmds.config is not None:
            return n.mmds.config.to_api()
    return None


def _mmds_from(cfg: Fields) -> Mmds | None:
    """`meta.config.mmds_config` as an empty store with that configuration (absent or null in
    states from before it, or of a VM without MMDS: none)."""
    if cfg.obj.get("mmds_config") is None:
        return None
    m = cfg.get_obj("mmds_config")
    version = m.get_str("version", 8)
    if version not in ("V1", "V2"):
        raise SnapshotError(f"snapshot state: {m.path}.version {version!r}")
    ifaces = m.get_list("network_interfaces", MAX_VIRTIO)
    if not ifaces or not all(isinstance(i, str) and 0 < len(i) <= 64 for i in ifaces):
        raise SnapshotError(f"snapshot state: {m.path}.network_interfaces must be iface ids")
    try:
        address = check_ipv4(m.get_str("ipv4_address", 16))
    except ValueError as err:
        raise SnapshotError(f"snapshot state: {m.path}: {err}") from None
    return Mmds(config=MmdsConfig(list(ifaces), version, address, m.get_bool("imds_compat")))


def config_from_dict(obj: Any) -> tuple[MachineConfig, tuple[int, ...]]:
    """`config_to_dict`'s data checked as a state's `meta.config` is (SnapshotError)."""
    return _config_from(Fields({"config": obj}, "meta"))


def _config_from(meta: Fields) -> tuple[MachineConfig, tuple[int, ...]]:
    """The configuration in `meta.config`, checked as the command line checks it, and the
    drives' image sizes, checked against the images on this host."""
    cfg = meta.get_obj("config")
    command = cfg.get_list("command", 4096)
    if not all(isinstance(a, str) and len(a) < 65536 for a in command):
        raise SnapshotError("snapshot state: meta.config.command must be strings")
    drives, sizes = [], []
    for i, raw in enumerate(cfg.get_list("drives", MAX_VIRTIO) if cfg.has("drives") else []):
        d = Fields(raw, f"meta.config.drives[{i}]")
        path = Path(d.get_str("path", 4096))
        size = d.get_int("size", 0, 2**63 - 1)
        # The image is not part of the state: it must still be there, unchanged in size.
        try:
            now = path.stat().st_size if path.is_file() else None
        except OSError:
            now = None
        if now is None:
            raise SnapshotError(f"drive {path}: missing (the snapshot needs its disk image)")
        if now != size:
            raise SnapshotError(
                f"drive {path}: the image is {now} bytes, it was {size} when the snapshot was "
                "taken (another image?)"
            )
        # States from before cache types and limiters: Writeback (FLUSH offered), none.
        cache = d.get_str("cache_type", 16) if d.has("cache_type") else CACHE_WRITEBACK
        if cache not in CACHE_TYPES:
            raise SnapshotError(f"snapshot state: {d.path}.cache_type {cache!r}")
        drives.append(DriveConfig(
            path, d.get_bool("read_only"), d.get_str("serial", 4096), cache_type=cache,
            rate_limiter=_limiter_from(d, "rate_limiter"),
        ))  # fmt: skip
        sizes.append(size)
    transport = cfg.get_str("virtio_transport", 16) if cfg.has("virtio_transport") else "mmio"
    if transport not in VIRTIO_TRANSPORTS:
        raise SnapshotError(f"snapshot state: meta.config.virtio_transport {transport!r}")
    nets = []
    mmds = _mmds_from(cfg)
    for i, raw in enumerate(cfg.get_list("nets", MAX_VIRTIO) if cfg.has("nets") else []):
        n = Fields(raw, f"meta.config.nets[{i}]")
        mtu = n.get_int("mtu", 68, 65535) if n.obj.get("mtu") is not None else None
        # States from before iface ids and the MMDS: no id, no MMDS.
        iface_id = n.get_str("iface_id", 64) if n.obj.get("iface_id") is not None else None
        serves = n.get_bool("mmds") if n.obj.get("mmds") is not None else False
        if serves and mmds is None:
            raise SnapshotError(f"snapshot state: {n.path} serves an MMDS without mmds_config")
        net = NetConfig(
            n.get_str("tap", 64), n.get_str("mac", 64), mtu,
            _limiter_from(n, "rx_rate_limiter"), _limiter_from(n, "tx_rate_limiter"),
            mmds=mmds if serves else None, iface_id=iface_id,
        )  # fmt: skip
        try:
            net.check()
        except ValueError as err:
            raise SnapshotError(f"snapshot state: {n.path}: {err}") from None
        nets.append(net)
    if len({n.tap for n in nets}) != len(nets):
        raise SnapshotError("snapshot state: meta.config.nets: the same tap twice")
    ids = [n.iface_id for n in nets if n.iface_id is not None]
    if len(set(ids)) != len(ids):
        raise SnapshotError("snapshot state: meta.config.nets: the same iface_id twice")
    vsock = None
    if cfg.obj.get("vsock") is not None:
        v = cfg.get_obj("vsock")
        vsock = VsockConfig(v.get_int("cid"), Path(v.get_str("uds_path", 4096)))
        try:
            vsock.check(exists_ok=True)  # a file left at the path: Machine.from_state
        except ValueError as err:
            raise SnapshotError(f"snapshot state: {v.path}: {err}") from None
    balloon = None
    if cfg.obj.get("balloon") is not None:  # states from before the balloon have none
        b = cfg.get_obj("balloon")
        balloon = BalloonConfig(b.get_int("amount_mib", 0, 1 << 20), b.get_bool("deflate_on_oom"),
                                b.get_int("stats_polling_interval_s", 0, 0xFFFF))  # fmt: skip
    config = MachineConfig(
        vcpus=cfg.get_int("vcpus", 1, MAX_VCPUS), mem_mib=cfg.get_int("mem_mib", 1, 1 << 20),
        command=command, drives=drives, rng=cfg.get_bool("rng") if cfg.has("rng") else False,
        virtio_transport=transport, nets=nets, vsock=vsock,
        rng_rate_limiter=_limiter_from(cfg, "rng_rate_limiter"),
        # The boot timer moves the virtio-mmio devices: it must come back with them.
        boot_timer=cfg.get_bool("boot_timer") if cfg.has("boot_timer") else False,
        balloon=balloon, **_load_cpu_memory(cfg),
    )  # fmt: skip
    if config.virtio_count > MAX_VIRTIO_DEVICES:
        raise SnapshotError(f"snapshot state: more than {MAX_VIRTIO_DEVICES} virtio devices")
    try:
        config.validate_shapes()
    except UserError as err:
        raise SnapshotError(f"snapshot state: meta.config: {err}") from None
    return config, tuple(sizes)


def _limiter_dict(config: RateLimiterConfig | None) -> dict[str, Any] | None:
    return None if config is None else config.to_api()


def _limiter_from(f: Fields, key: str) -> RateLimiterConfig | None:
    """A rate limiter saved in its API shape (absent, null or {} in older states: none)."""
    raw = f.obj.get(key)
    if not raw:
        return None
    try:
        return RateLimiterConfig.from_api(raw, f"{f.path}.{key}")
    except ValueError as err:
        raise SnapshotError(f"snapshot state: {err}") from None


def _save_cpu_memory(cfg: MachineConfig) -> dict[str, Any]:
    """The topology, guest NUMA nodes and huge pages of meta.config (docs/topology.md)."""
    topo = cfg.topology  # None: one socket with one core per vCPU
    return {
        "topology": None if topo is None else {name: getattr(topo, name) for name in LEVELS},
        "numa": [{"cpus": sorted(n.cpus), "mem_mib": n.mem_mib, "host_node": n.host_node}
                 for n in cfg.numa],
        "huge_pages": cfg.huge_pages,
        **_save_extensions(cfg),
    }  # fmt: skip


def _save_extensions(cfg: MachineConfig) -> dict[str, Any]:
    """--nested and --hyperv in meta.config: the Hyper-V features the guest got (resolved
    against the host when the machine was built), or None."""
    hyperv: list[str] | str | None = None
    if cfg.hyperv is True:
        hyperv = "all"
    elif cfg.hyperv:
        hyperv = sorted(cfg.hyperv)
    return {"nested": cfg.nested, "hyperv": hyperv, "hyperv_kvm_leaves": cfg.hyperv_kvm_leaves}


def _load_extensions(cfg: Fields) -> dict[str, Any]:
    """`_save_extensions`'s fields, checked (MachineConfig.validate_hyperv checks the names);
    absent in states from before them: neither."""
    hyperv: bool | frozenset[str] = False
    raw = cfg.obj.get("hyperv")
    if raw == "all":
        hyperv = True
    elif raw is not None:
        names = cfg.get_list("hyperv", 64)
        if not names or not all(isinstance(n, str) and len(n) <= 64 for n in names):
            raise SnapshotError("snapshot state: meta.config.hyperv must be feature names")
        hyperv = frozenset(names)
    return {
        "nested": cfg.get_bool("nested") if cfg.has("nested") else False,
        "hyperv": hyperv,
        "hyperv_kvm_leaves": (cfg.get_bool("hyperv_kvm_leaves")
                              if cfg.has("hyperv_kvm_leaves") else False),
    }  # fmt: skip


def _load_cpu_memory(cfg: Fields) -> dict[str, Any]:
    """`_save_cpu_memory`'s fields, checked; absent in states from before them (a flat
    topology, no NUMA, base pages)."""
    topology = None
    if cfg.obj.get("topology") is not None:
        t = cfg.get_obj("topology")
        try:
            topology = Topology(**{name: t.get_int(name, 1, MAX_VCPUS) for name in LEVELS})
        except ValueError as err:
            raise SnapshotError(f"snapshot state: {t.path}: {err}") from None
    numa = []
    for i, raw in enumerate(cfg.get_list("numa", MAX_NODES) if cfg.has("numa") else []):
        n = Fields(raw, f"meta.config.numa[{i}]")
        host = None if n.obj.get("host_node") is None else n.get_int("host_node", 0, MAX_HOST_NODE)
        cpus = n.get_ints("cpus", MAX_VCPUS, width=16)
        numa.append(NumaNode(frozenset(cpus), n.get_int("mem_mib", 1, 1 << 20), host))
    huge = cfg.get_str("huge_pages", 16) if cfg.obj.get("huge_pages") is not None else None
    return {"topology": topology, "numa": numa, "huge_pages": huge, **_load_extensions(cfg)}
