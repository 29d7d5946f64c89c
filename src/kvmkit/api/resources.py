"""From the API's configuration (Firecracker's JSON shapes, as the action layer stores them)
to the `MachineConfig` a Machine is built from, and from a running Machine's devices to
Firecracker's metrics groups.

Device and VMM modules are imported inside the functions: the action layer and the API
server import this module at start-up, and need the device code only once a VM is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmkit.mmds.store import Mmds

if TYPE_CHECKING:
    from kvmkit.api.metrics import Metrics
    from kvmkit.devices.virtio.balloon import BalloonConfig
    from kvmkit.devices.virtio.blk import DriveConfig
    from kvmkit.devices.virtio.net import NetConfig
    from kvmkit.devices.virtio.ratelimit import RateLimiterConfig
    from kvmkit.vmm.config import MachineConfig
    from kvmkit.vmm.machine import Machine, MachineResult


@dataclass
class Resources:
    """What the API has configured, in Firecracker's shapes (the bodies as accepted)."""

    machine: dict[str, Any]
    boot_source: dict[str, Any] | None = None
    drives: dict[str, dict[str, Any]] = field(default_factory=dict)
    ifaces: dict[str, dict[str, Any]] = field(default_factory=dict)
    vsock: dict[str, Any] | None = None
    entropy: dict[str, Any] | None = None
    balloon: dict[str, Any] | None = None  # the /balloon body as accepted
    vfio_devices: dict[str, dict[str, Any]] = field(default_factory=dict)  # kvmkit extension
    # The MMDS store and its configuration (kvmkit.mmds), shared with the devices serving it.
    mmds: Mmds = field(default_factory=Mmds)

    def drive_order(self) -> list[str]:
        """Drive ids in device order: the root device first (/dev/vda), then in the order
        they were put (Firecracker's order)."""
        return [d["drive_id"] for d in sorted(self.drives.values(),
                                              key=lambda d: not d["is_root_device"])]  # fmt: skip


def rate_limiter(body: dict[str, Any] | None) -> RateLimiterConfig | None:
    if body is None:
        return None
    from kvmkit.devices.virtio.ratelimit import RateLimiterConfig

    return RateLimiterConfig.from_api(body)


def balloon_config(body: dict[str, Any] | None) -> BalloonConfig | None:
    if body is None:
        return None
    from kvmkit.devices.virtio.balloon import BalloonConfig

    return BalloonConfig(body["amount_mib"], body["deflate_on_oom"],
                         body.get("stats_polling_interval_s", 0))  # fmt: skip


def drive_configs(res: Resources) -> list[DriveConfig]:
    """The drives as virtio-blk devices in `drive_order`; the drive id is the serial the
    guest reads (GET_ID); Firecracker's default cache type is Unsafe."""
    from kvmkit.devices.virtio.blk import CACHE_UNSAFE, DriveConfig

    out = []
    for drive_id in res.drive_order():
        d = res.drives[drive_id]
        root = bool(d["is_root_device"])
        out.append(DriveConfig(
            Path(d["path_on_host"]), bool(d.get("is_read_only", False)), drive_id,
            cache_type=d.get("cache_type", CACHE_UNSAFE),
            rate_limiter=rate_limiter(d.get("rate_limiter")), root=root,
            # Firecracker: "taken into account only if the is_root_device field is true".
            partuuid=d.get("partuuid") if root else None,
        ))  # fmt: skip
    return out


def net_configs(res: Resources) -> list[NetConfig]:
    """Network interfaces as virtio-net devices on their host taps, in the order they were
    put (eth0, eth1, ...); those /mmds/config names serve the MMDS."""
    from kvmkit.devices.virtio.net import NetConfig

    mmds = res.mmds
    serving = set(mmds.config.network_interfaces) if mmds.config is not None else set()
    return [
        NetConfig(i["host_dev_name"], i.get("guest_mac"), i.get("mtu"),
                  rate_limiter(i.get("rx_rate_limiter")), rate_limiter(i.get("tx_rate_limiter")),
                  mmds=mmds if i["iface_id"] in serving else None, iface_id=i["iface_id"])
        for i in res.ifaces.values()
    ]  # fmt: skip


def cpu_memory_options(mc: dict[str, Any]) -> dict[str, Any]:
    """machine-config's `smt` and `huge_pages` as MachineConfig fields: SMT is one socket of
    two-thread cores (Firecracker's; the vCPU count must be 1 or even), "2M" hugetlbfs.
    ValueError with the message the API answers."""
    from kvmkit.arch.x86_64.topology import Topology

    topology = None
    if mc.get("smt"):
        try:
            topology = Topology.smt(mc["vcpu_count"])
        except ValueError as err:
            raise ValueError(f"machine-config.smt: {err}") from None
    huge = mc.get("huge_pages", "None")
    return {"topology": topology, "huge_pages": None if huge == "None" else huge}


def machine_config(res: Resources, *, command: list[str] | None, virtio_transport: str,
                   boot_timer: bool) -> MachineConfig:  # fmt: skip
    """The whole MachineConfig; a command without a boot source boots the default image.
    ValueError for a configuration that cannot be one (a bad rate limiter, `smt` with an
    odd vCPU count)."""
    from kvmkit.devices.virtio.vsock import VsockConfig
    from kvmkit.vmm.config import MachineConfig

    mc = res.machine
    config = MachineConfig(
        vcpus=mc["vcpu_count"], mem_mib=mc["mem_size_mib"], command=list(command or []),
        drives=drive_configs(res), nets=net_configs(res),
        vsock=None if res.vsock is None else VsockConfig(
            res.vsock["guest_cid"], Path(res.vsock["uds_path"])),
        rng=res.entropy is not None, vfio=[d["bdf"] for d in res.vfio_devices.values()],
        rng_rate_limiter=rate_limiter((res.entropy or {}).get("rate_limiter")),
        virtio_transport=virtio_transport, boot_timer=boot_timer, **cpu_memory_options(mc),
        balloon=balloon_config(res.balloon),
    )  # fmt: skip
    if res.boot_source is not None:
        bs = res.boot_source
        config.kernel = Path(bs["kernel_image_path"])
        config.initrd = Path(bs["initrd_path"]) if "initrd_path" in bs else None
        config.cmdline = bs.get("boot_args")
    return config


# -- metrics from a running machine (Firecracker's groups and names, kvmkit.api.metrics)

def collect(metrics: Metrics, machine: Machine, result: MachineResult | None,
            drive_ids: list[str], iface_ids: list[str]) -> None:  # fmt: skip
    """Copy the machine's counters into `metrics` (called before each flush)."""
    from kvmkit.devices.virtio.balloon import VirtioBalloon
    from kvmkit.devices.virtio.blk import VirtioBlk
    from kvmkit.devices.virtio.net import VirtioNet
    from kvmkit.devices.virtio.rng import VirtioRng
    from kvmkit.devices.virtio.vsock import VirtioVsock

    totals = {"exit_io_in": 0, "exit_io_out": 0, "exit_mmio_read": 0, "exit_mmio_write": 0}
    for t in machine.threads:
        for name in totals:
            totals[name] += getattr(t.stats, name)
    for name, value in totals.items():
        metrics.set("vcpu", name, value)
    if result is not None and result.reason.value == "error":
        metrics.set("vcpu", "failures", 1)
    if result is not None and result.reason.value == "panic":
        metrics.set("vmm", "panic_count", 1)
    serial = machine.serial
    if serial is not None:
        metrics.set("uart", "read_count", serial.read_count)
        metrics.set("uart", "write_count", serial.write_count)
        # Bytes the console dropped for a reader that fell behind count as missed too
        # (Firecracker counts the bytes its non-blocking stdout refused).
        metrics.set("uart", "missed_write_count",
                    serial.missed_write_count + machine.console.dropped)  # fmt: skip
    blocks = [d for _, _, d in machine.virtio if isinstance(d, VirtioBlk)]
    nets = [d for _, _, d in machine.virtio if isinstance(d, VirtioNet)]
    _per_device(metrics, "block", [
        (drive_id, {
            "read_bytes": d.read_bytes, "write_bytes": d.write_bytes,
            "read_count": d.read_count, "write_count": d.write_count,
            "flush_count": d.flush_count,
            "rate_limiter_throttled_events": d.limiter.throttled,
            "rate_limiter_event_count": d.limiter.timer_events,
            "update_count": d.update_count, "update_fails": d.update_fails,
        }) for drive_id, d in zip(_ids(drive_ids, blocks, "drive"), blocks, strict=True)
    ])  # fmt: skip
    _per_device(metrics, "net", [
        (iface_id, {
            "rx_bytes_count": d.rx_bytes, "tx_bytes_count": d.tx_bytes,
            "rx_packets_count": d.rx_frames, "tx_packets_count": d.tx_frames,
            "rx_fails": d.rx_dropped, "tx_malformed_frames": d.tx_malformed,
            "tap_write_fails": d.tap_write_fails,
            "rx_rate_limiter_throttled": d.rx_limiter.throttled,
            "tx_rate_limiter_throttled": d.tx_limiter.throttled,
            "rx_event_rate_limiter_count": d.rx_limiter.timer_events,
            "tx_rate_limiter_event_count": d.tx_limiter.timer_events,
        }) for iface_id, d in zip(_ids(iface_ids, nets, "eth"), nets, strict=True)
    ])  # fmt: skip
    # The MMDS: one group summing every interface that serves it (Firecracker's is global).
    mmds: dict[str, int] = {}
    for net in nets:
        if net.mmds is not None:
            for name, value in net.mmds.metrics().items():
                mmds[name] = mmds.get(name, 0) + value
    for name, value in mmds.items():
        metrics.set("mmds", name, value)
    for _, _, dev in machine.virtio:
        if isinstance(dev, VirtioVsock):
            for name, value in (
                ("rx_bytes_count", dev.rx_bytes), ("tx_bytes_count", dev.tx_bytes),
                ("rx_packets_count", dev.rx_packets), ("tx_packets_count", dev.tx_packets),
                ("conns_added", dev.conns_added), ("conns_removed", dev.conns_removed),
                ("conns_killed", dev.conns_killed),
            ):  # fmt: skip
                metrics.set("vsock", name, value)
        elif isinstance(dev, VirtioRng):
            for name, value in (
                ("entropy_event_count", dev.entropy_event_count),
                ("entropy_bytes", dev.entropy_bytes),
                ("entropy_rate_limiter_throttled", dev.limiter.throttled),
                ("rate_limiter_event_count", dev.limiter.timer_events),
            ):
                metrics.set("entropy", name, value)
        elif isinstance(dev, VirtioBalloon):
            for name, value in (
                ("inflate_count", dev.inflate_count),
                ("stats_updates_count", dev.stats_updates_count),
                ("stats_update_fails", dev.stats_update_fails),
                ("deflate_count", dev.deflate_count), ("event_fails", dev.event_fails),
            ):  # fmt: skip
                metrics.set("balloon", name, value)


def _ids(ids: list[str], devices: list[Any], prefix: str) -> list[str]:
    """The API ids of the devices (a Machine built from a snapshot has none: numbered)."""
    if len(ids) == len(devices):
        return ids
    return [f"{prefix}{i}" for i in range(len(devices))]


def _per_device(metrics: Metrics, group: str, devices: list[tuple[str, dict[str, int]]]) -> None:
    """Firecracker's layout: `<group>_<id>` per device and `<group>` summing them."""
    totals: dict[str, int] = {}
    for ident, values in devices:
        for name, value in values.items():
            metrics.set(f"{group}_{ident}", name, value)
            totals[name] = totals.get(name, 0) + value
    for name, value in totals.items():
        metrics.set(group, name, value)
