"""Snapshot and restore of a `Machine` (a Linux microVM), on top of `kvmkit.snapshot.core`.

    machine.pause()                          # every vCPU parked outside KVM_RUN
    machine.snapshot("vm.state", "vm.mem")   # full; diff=True for the pages dirtied since
    machine.resume()                         # or close it, and later, in any process:
    m = restore_machine("vm.state", "vm.mem", command_output=sys.stdout.buffer.write)
    m.start(); m.wait()

What a Machine adds to the generic snapshot: its configuration and console nonce (meta), the
serial port's registers and every virtio device with its transport (devices), and where the
console protocol parser was (a command run under `kvmkit run -- COMMAND` keeps reporting its
output and exit status to the restoring process). The i8042, RTC and ACPI power devices hold
no state that outlives an access.

Virtio devices are quiesced by the pause: the worker thread parks between requests (never
inside a chain) and block devices fdatasync their images. A restore rebuilds them from the
saved configuration (same MMIO slots, IRQs, ioeventfds and irqfds), takes over their queue
state without a reset and kicks every ready queue once, so a request the guest queued just
before the pause is served. virtio-net reopens its tap by name; virtio-vsock binds a new
Unix socket (a stale one left by a killed process is removed) and, having no connection,
sends the guest a transport reset.
"""

from __future__ import annotations

import base64
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmkit.abi.constants import KVM_PIT_SPEAKER_DUMMY
from kvmkit.devices.virtio.blk import CACHE_TYPES, CACHE_WRITEBACK, DriveConfig, VirtioBlk
from kvmkit.devices.virtio.device import VirtioDevice, VirtioState, parse_state
from kvmkit.devices.virtio.net import NetConfig, VirtioNet, format_mac
from kvmkit.devices.virtio.ratelimit import RateLimiterConfig
from kvmkit.devices.virtio.rng import VirtioRng
from kvmkit.devices.virtio.vsock import VirtioVsock, VsockConfig
from kvmkit.errors import UserError
from kvmkit.kvm import Kvm, KvmError
from kvmkit.kvm.kick import install_kick_handler
from kvmkit.snapshot import core
from kvmkit.snapshot.format import Fields, SnapshotError
from kvmkit.snapshot.memory import enable_dirty_log
from kvmkit.snapshot.vcpu_state import resume_vcpu
from kvmkit.unixsock import remove_stale_socket
from kvmkit.vmm.config import MAX_VIRTIO_DEVICES, VIRTIO_TRANSPORTS, MachineConfig
from kvmkit.vmm.console import CommandOutput

if TYPE_CHECKING:
    from kvmkit.vmm.machine import Machine

PAUSE_TIMEOUT = 10.0
SETUP = core.VmSetup(
    irqchip=True, pit=True, pit_flags=KVM_PIT_SPEAKER_DUMMY,
    tss_addr=0xFFFB_D000, identity_map_addr=0xFFFB_C000,
)  # fmt: skip
# SETUP: the addresses and devices Machine.build creates
MAX_COMMAND_BUF = 1 << 16
MAX_VIRTIO = 64  # caps the device list read from a state file


def _pause_virtio(machine: Machine, timeout: float) -> None:
    """Park the virtio worker between requests and make the devices' effects durable."""
    worker = machine._virtio_worker
    if worker is None:
        return
    if not worker.pause(timeout):
        raise UserError(f"the virtio worker did not pause within {timeout} s")
    for _, _, dev in machine.virtio:
        try:
            dev.quiesce()
        except OSError as err:
            raise UserError(f"virtio {dev.name}: {err}") from None


def pause_machine(machine: Machine, timeout: float = PAUSE_TIMEOUT) -> None:
    """Kick every vCPU out of KVM_RUN and wait until each is parked (or has ended)."""
    for t in machine.threads:
        t.pause_point.request(t.vcpu)
    for t in machine.threads:
        if not t.pause_point.wait_parked(timeout, t.thread.is_alive):
            resume_machine(machine)
            raise UserError(f"vcpu{t.vcpu.id} did not pause within {timeout} s")
    try:
        _pause_virtio(machine, timeout)  # after the vCPUs: no new notification arrives
    except UserError:
        resume_machine(machine)
        raise
    machine.drain_coalesced()  # device state below includes every write the guest made


def resume_machine(machine: Machine) -> None:
    """KVM_KVMCLOCK_CTRL on each vCPU (the guest learns it was paused), then run them."""
    if machine._virtio_worker is not None:
        machine._virtio_worker.resume()
    for t in machine.threads:
        if t.pause_point.parked:
            resume_vcpu(t.vcpu)
    for t in machine.threads:
        t.pause_point.release()


def _is_paused(machine: Machine) -> bool:
    worker = machine._virtio_worker
    if worker is not None and not worker.paused:
        return False
    return all(t.pause_point.parked or not t.thread.is_alive() for t in machine.threads)


def _save_virtio(machine: Machine) -> list[dict[str, Any]]:
    return [
        {"base": base, "irq": irq, "transport": transport.KIND,
         "transport_state": transport.save(), "device": dev.save()}
        for (base, irq, dev), transport in zip(machine.virtio, machine.virtio_transports,
                                               strict=True)
    ]  # fmt: skip


def snapshot_machine(
    machine: Machine, state_path: str | os.PathLike[str], mem_path: str | os.PathLike[str],
    *, diff: bool = False,
) -> core.Snapshot:  # fmt: skip
    """Snapshot a paused machine. After a full snapshot KVM dirty logging is on, so the next
    one can be a diff."""
    if machine.vm is None or machine.kvm is None or not machine.threads:
        raise UserError("the machine is not running: nothing to snapshot")
    if not _is_paused(machine):
        raise UserError("pause the machine before taking a snapshot")
    if diff and not all(r.log_dirty for r in machine.mem.regions):
        raise UserError("a diff snapshot needs a full snapshot of this machine first")
    machine.console.flush()  # the parser state below must include every byte printed so far
    cfg = machine.config
    # Drives as the devices have them now (a PATCH may have changed the image or the rate
    # limiter since boot); the limiters' buckets come back full.
    drives = [
        {"path": str(dev.path.absolute()), "read_only": dev.read_only,
         "serial": dev.serial.decode("latin-1"), "size": os.fstat(dev.fd).st_size,
         "cache_type": dev.cache_type, "rate_limiter": dev.limiter.config.to_api()}
        for _, _, dev in machine.virtio if isinstance(dev, VirtioBlk)
    ]  # fmt: skip
    # The MAC the guest knows (a random one when none was configured) and the tap by name.
    nets = [{"tap": dev.tap_name, "mac": format_mac(dev.mac), "mtu": dev.mtu,
             "rx_rate_limiter": dev.rx_limiter.config.to_api(),
             "tx_rate_limiter": dev.tx_limiter.config.to_api()}
            for _, _, dev in machine.virtio if isinstance(dev, VirtioNet)]  # fmt: skip
    rng_limiter = next(
        (dev.limiter.config.to_api() for _, _, dev in machine.virtio
         if isinstance(dev, VirtioRng)), None,
    )  # fmt: skip
    vsock = None
    if cfg.vsock is not None:
        vsock = {"cid": cfg.vsock.cid, "uds_path": str(cfg.vsock.uds_path.absolute())}
    meta: dict[str, Any] = {
        "config": {"vcpus": cfg.vcpus, "mem_mib": cfg.mem_mib, "command": list(cfg.command),
                   "drives": drives, "rng": cfg.rng, "virtio_transport": cfg.virtio_transport,
                   "nets": nets, "vsock": vsock, "rng_rate_limiter": rng_limiter,
                   "boot_timer": cfg.boot_timer},
        "nonce": machine.nonce,
    }  # fmt: skip
    if machine.command is not None:
        meta["command"] = {
            "started": machine.command.started,
            "sent": machine.command.sent,  # a released newline kept for the EXIT marker
            "buf": base64.b64encode(bytes(machine.command._buf[-MAX_COMMAND_BUF:])).decode(),
        }
    devices: dict[str, Any] = {}
    if machine.serial is not None:
        devices["serial0"] = machine.serial.save()
    devices["virtio"] = _save_virtio(machine)
    if machine.pci is not None:
        devices["pci_root"] = machine.pci.root.save()  # the 0xCF8 address latch
    snap = core.capture(
        machine.kvm, machine.vm, [t.vcpu for t in machine.threads], machine.mem, mem_path,
        SETUP, diff=diff, devices=devices, meta=meta,
    )  # fmt: skip
    core.save(state_path, snap)
    if not diff:
        enable_dirty_log(machine.mem, machine.vm)
    return snap


def _config_from(meta: Fields) -> MachineConfig:
    cfg = meta.get_obj("config")
    command = cfg.get_list("command", 4096)
    if not all(isinstance(a, str) and len(a) < 65536 for a in command):
        raise SnapshotError("snapshot state: meta.config.command must be strings")
    drives = []
    for i, raw in enumerate(cfg.get_list("drives", MAX_VIRTIO) if cfg.has("drives") else []):
        d = Fields(raw, f"meta.config.drives[{i}]")
        path = Path(d.get_str("path", 4096))
        size = d.get_int("size", 0, 2**63 - 1)
        # The image is not part of the snapshot: it must still be there, unchanged in size.
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
        # Snapshots from before cache types and limiters: Writeback (FLUSH offered), none.
        cache = d.get_str("cache_type", 16) if d.has("cache_type") else CACHE_WRITEBACK
        if cache not in CACHE_TYPES:
            raise SnapshotError(f"snapshot state: {d.path}.cache_type {cache!r}")
        drives.append(DriveConfig(
            path, d.get_bool("read_only"), d.get_str("serial", 4096), cache_type=cache,
            rate_limiter=_limiter_from(d, "rate_limiter"),
        ))  # fmt: skip
    transport = cfg.get_str("virtio_transport", 16) if cfg.has("virtio_transport") else "mmio"
    if transport not in VIRTIO_TRANSPORTS:
        raise SnapshotError(f"snapshot state: meta.config.virtio_transport {transport!r}")
    nets = []
    for i, raw in enumerate(cfg.get_list("nets", MAX_VIRTIO) if cfg.has("nets") else []):
        n = Fields(raw, f"meta.config.nets[{i}]")
        mtu = n.obj.get("mtu")
        if mtu is not None:
            mtu = n.get_int("mtu", 68, 65535)
        net = NetConfig(
            n.get_str("tap", 64), n.get_str("mac", 64), mtu,
            _limiter_from(n, "rx_rate_limiter"), _limiter_from(n, "tx_rate_limiter"),
        )  # fmt: skip
        try:
            net.check()
        except ValueError as err:
            raise SnapshotError(f"snapshot state: {n.path}: {err}") from None
        nets.append(net)
    if len({n.tap for n in nets}) != len(nets):
        raise SnapshotError("snapshot state: meta.config.nets: the same tap twice")
    vsock = None
    if cfg.obj.get("vsock") is not None:
        v = cfg.get_obj("vsock")
        vsock = VsockConfig(v.get_int("cid"), Path(v.get_str("uds_path", 4096)))
        try:
            vsock.check(exists_ok=True)  # a file left at the path: restore_machine
        except ValueError as err:
            raise SnapshotError(f"snapshot state: {v.path}: {err}") from None
    config = MachineConfig(
        vcpus=cfg.get_int("vcpus", 1, 255), mem_mib=cfg.get_int("mem_mib", 1, 1 << 20),
        command=command, drives=drives, rng=cfg.get_bool("rng") if cfg.has("rng") else False,
        virtio_transport=transport, nets=nets, vsock=vsock,
        rng_rate_limiter=_limiter_from(cfg, "rng_rate_limiter"),
        # The boot timer moves the virtio-mmio devices: it must come back with them.
        boot_timer=cfg.get_bool("boot_timer") if cfg.has("boot_timer") else False,
    )  # fmt: skip
    if config.virtio_count > MAX_VIRTIO_DEVICES:
        raise SnapshotError(f"snapshot state: more than {MAX_VIRTIO_DEVICES} virtio devices")
    return config


def _limiter_from(f: Fields, key: str) -> RateLimiterConfig | None:
    """A rate limiter saved as its API shape (absent or null in older snapshots: none)."""
    raw = f.obj.get(key)
    if not raw:  # absent, null, or {}: no limiter
        return None
    try:
        return RateLimiterConfig.from_api(raw, f"{f.path}.{key}")
    except ValueError as err:
        raise SnapshotError(f"snapshot state: {err}") from None


def _virtio_classes(config: MachineConfig) -> list[type[VirtioDevice]]:
    """The virtio devices a Machine builds for `config`, in its order."""
    return [
        *[VirtioBlk] * len(config.drives), *[VirtioRng] * int(config.rng),
        *[VirtioNet] * len(config.nets), *[VirtioVsock] * int(config.vsock is not None),
    ]  # fmt: skip


def _check_virtio(devices: Fields, config: MachineConfig) -> list[tuple[Fields, VirtioState]]:
    """Every saved virtio device, checked before a VM exists: one per configured device, in
    the order Machine builds them (drives, the rng, nets, vsock)."""
    raw = devices.get_list("virtio", MAX_VIRTIO) if devices.has("virtio") else []
    want = _virtio_classes(config)
    if len(raw) != len(want):
        raise SnapshotError(
            f"snapshot state: {len(raw)} virtio devices saved, the configuration has {len(want)}"
        )
    out = []
    for i, (entry, cls) in enumerate(zip(raw, want, strict=True)):
        f = Fields(entry, f"devices.virtio[{i}]")
        state = parse_state(f.obj.get("device"), f"{f.path}.device")
        if state.device_id != cls.DEVICE_ID:
            raise SnapshotError(f"snapshot state: {f.path} is not the configured device")
        cls.check_device_state(state.device, f"{f.path}.device.device")
        out.append((f, state))
    return out


def _restore_virtio(machine: Machine, saved: list[tuple[Fields, VirtioState]]) -> None:
    """Take over each device's and transport's state (no reset), then kick the ready queues."""
    entries = zip(machine.virtio, machine.virtio_transports, saved, strict=True)
    for (base, irq, dev), transport, (f, _) in entries:
        # irq -1: a PCI function (its interrupts are MSI-X vectors, in the transport state)
        if (f.get_int("base"), f.get_int("irq", -1, 255)) != (base, irq):
            raise SnapshotError(f"snapshot state: {f.path}: not at this machine's slot")
        if f.get_str("transport", 64) != transport.KIND:
            raise SnapshotError(f"snapshot state: {f.path}: not a {transport.KIND} device")
        dev.restore(f.obj["device"], f"{f.path}.device")
        transport.restore(f.obj.get("transport_state"), f"{f.path}.transport_state")
    for _, _, dev in machine.virtio:
        dev.kick_ready_queues()


def restore_machine(
    state_path: str | os.PathLike[str], mem_path: str | os.PathLike[str], *,
    base_mem: str | os.PathLike[str] | None = None,
    command_output: Callable[[bytes], None] | None = None, kvm_device: str = "/dev/kvm",
) -> Machine:  # fmt: skip
    """A Machine built from a snapshot, ready to `start()` (it resumes where it was paused).
    A bad state or memory file raises SnapshotError before any VM exists."""
    from kvmkit.vmm.machine import Machine
    from kvmkit.vmm.vcpu import VcpuThread

    snap = core.read(state_path)
    meta = Fields(snap.meta, "meta")
    config = _config_from(meta)
    nonce = meta.get_str("nonce", 64)
    command_state = meta.get_obj("command") if meta.has("command") else None
    serial_state = snap.devices.get("serial0")
    if not isinstance(serial_state, dict):
        raise SnapshotError("snapshot state: devices.serial0 is missing")
    if len(snap.vcpus) != config.vcpus:
        raise SnapshotError("snapshot state: vCPU count does not match the configuration")
    virtio_saved = _check_virtio(Fields(snap.devices, "devices"), config)
    snap.memory.check_file(base_mem if snap.memory.diff and base_mem is not None else mem_path)
    if config.vsock is not None:
        # The process that took the snapshot removes its socket when it exits; a killed one
        # leaves the file. A live socket (that VM still runs) is not taken over.
        try:
            remove_stale_socket(config.vsock.uds_path)
        except OSError as err:
            raise UserError(f"vsock: {err.strerror or err}") from None

    install_kick_handler()
    machine = Machine(config, command_output=command_output, kvm_device=kvm_device)
    machine.nonce = nonce
    try:
        try:
            machine.kvm = kvm = Kvm(kvm_device)
        except OSError as err:
            raise UserError(str(err.strerror or err)) from None
        restored = core.load(kvm, snap, mem_path, base_mem=base_mem)
        machine.vm, machine.mem = restored.vm, restored.mem
        machine._add_devices(restored.vm)
        assert machine.serial is not None
        try:
            machine.serial.restore(serial_state)
        except ValueError as err:
            raise SnapshotError(f"snapshot state: {err}") from None
        _restore_virtio(machine, virtio_saved)
        if machine.pci is not None and isinstance(snap.devices.get("pci_root"), dict):
            machine.pci.root.restore(snap.devices["pci_root"])
        if config.command:
            sink = command_output or (lambda data: None)
            machine.command = CommandOutput(nonce, sink)
            if command_state is not None:
                machine.command.started = command_state.get_bool("started")
                buf = command_state.get_blob("buf", max_size=MAX_COMMAND_BUF)
                machine.command._buf[:] = buf
                if command_state.has("sent"):
                    machine.command.sent = command_state.get_int("sent", 0, len(buf))
        for vcpu in restored.vcpus:
            machine.threads.append(
                VcpuThread(vcpu, machine.pio, machine.mmio, machine._on_vcpu_event)
            )
        restored.resume()  # KVM_KVMCLOCK_CTRL right before the vCPU threads start
    except BaseException:
        machine.close()
        raise
    return machine


def snapshot_after(
    machine: Machine, seconds: float, state_path: Path, mem_path: Path
) -> int | None:
    """`kvmkit run --snapshot-after`: wait, pause, snapshot, stop the VM. None if the VM
    ended first (the caller reports that as usual), else the exit status 0."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if machine.wait(min(0.2, max(deadline - time.monotonic(), 0))) is not None:
            return None
    t0 = time.monotonic()
    pause_machine(machine)
    try:
        snapshot_machine(machine, state_path, mem_path)
    except KvmError as err:
        raise UserError(f"snapshot failed: {err}") from None
    took = time.monotonic() - t0
    machine.stop()
    print(f"kvmkit run: snapshot written to {state_path} and {mem_path} in {took:.2f} s; "
          "the VM was stopped", flush=True, file=sys.stderr)  # fmt: skip
    return 0
