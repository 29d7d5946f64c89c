"""The one action layer behind kvmkit's REST API, its config file, `kvmkit run`/`kvmkit ctl`
and the Python API: a `Vmm` holds the pre-boot configuration in Firecracker's shapes, applies
Firecracker's pre-boot/post-boot rules, and drives a `Machine` once started.

    vmm = Vmm()
    vmm.put_machine_config({"vcpu_count": 2, "mem_size_mib": 256})
    vmm.put_boot_source({"kernel_image_path": "vmlinux", "boot_args": "console=ttyS0"})
    vmm.instance_start()
    vmm.patch_vm({"state": "Paused"})
    vmm.snapshot_create({"snapshot_path": "vm.state", "mem_file_path": "vm.mem"})

Every method takes the JSON body as a dict, validates it against kvmkit's OpenAPI spec
(`kvmkit/api/openapi.json`) and raises `ApiError` (status 400 and a fault message) on bad
input or a request out of order. The REST server maps that to `{"fault_message": ...}`.

Drives, network interfaces and vsock are accepted, validated and reported in `vm_config()`,
but a Machine cannot attach virtio devices yet: `instance_start` refuses with a fault message
naming them instead of ignoring them. `attach_devices` is where the virtio devices plug in.
"""

from __future__ import annotations

import copy
import enum
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmkit import __version__
from kvmkit.api import logger as api_logger
from kvmkit.api.metrics import Metrics
from kvmkit.api.schema import SchemaError, validate
from kvmkit.arch.x86_64.topology import Topology
from kvmkit.devices.virtio.blk import DriveConfig, VirtioBlk
from kvmkit.devices.virtio.net import NetConfig
from kvmkit.devices.virtio.vsock import VsockConfig
from kvmkit.errors import UserError
from kvmkit.vmm.config import MachineConfig

if TYPE_CHECKING:
    from kvmkit.migration.send import MigrationProgress
    from kvmkit.vmm.machine import Machine, MachineResult

DEFAULT_MAX_DOWNTIME_MS = 300  # kvmkit.vmm.machine's (QEMU's default downtime limit)

log = logging.getLogger("kvmkit.api")

DEFAULT_MEM_MIB = 128  # Firecracker's defaults for GET /machine-config before a PUT
DEFAULT_VCPUS = 1
MAX_DRIVES = 64
MAX_IFACES = 64
MAX_VFIO = 31  # PCI bus 0's slots less the host bridge (vmm/config.py MAX_PCI_FUNCTIONS)
BUSY_TIMEOUT = 60.0  # a request waits this long for another one to finish, then 400
NOT_AFTER_START = "The requested operation is not supported after starting the microVM."
NOT_BEFORE_START = "The requested operation is not supported before starting the microVM."


class ApiError(Exception):
    """A request the VMM refuses: `status` (4xx) and one line for `fault_message`."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class State(enum.Enum):
    NOT_STARTED = "Not started"
    RUNNING = "Running"
    PAUSED = "Paused"


def _check_file(what: str, path: str, *, block_ok: bool = False) -> None:
    try:
        st = os.stat(path)
    except OSError as err:
        raise ApiError(f"{what} {path!r}: {err.strerror}") from None
    if not (stat.S_ISREG(st.st_mode) or (block_ok and stat.S_ISBLK(st.st_mode))):
        raise ApiError(f"{what} {path!r}: not a regular file")
    if not os.access(path, os.R_OK):
        raise ApiError(f"{what} {path!r}: not readable")


def _check(body: Any, schema: str) -> dict[str, Any]:
    try:
        validate(body, schema)
    except SchemaError as err:
        raise ApiError(str(err)) from None
    assert isinstance(body, dict)
    return body


def _cpu_memory_options(mc: dict[str, Any]) -> dict[str, Any]:
    """machine-config's `smt` and `huge_pages` as MachineConfig fields: SMT is one socket of
    two-thread cores (Firecracker's; the vCPU count must be 1 or even), "2M" hugetlbfs."""
    topology = None
    if mc.get("smt"):
        try:
            topology = Topology.smt(mc["vcpu_count"])
        except ValueError as err:
            raise ApiError(f"machine-config.smt: {err}") from None
    huge = mc.get("huge_pages", "None")
    return {"topology": topology, "huge_pages": None if huge == "None" else huge}


class Vmm:
    def __init__(
        self, *, instance_id: str = "anonymous-instance",
        console_output: Callable[[bytes], None] | None = None,
        command_output: Callable[[bytes], None] | None = None, kvm_device: str = "/dev/kvm",
    ) -> None:  # fmt: skip
        self.instance_id = instance_id
        self.console_output = console_output
        self.command_output = command_output
        self.kvm_device = kvm_device
        self.state = State.NOT_STARTED
        self.machine_config: dict[str, Any] = {
            "vcpu_count": DEFAULT_VCPUS, "mem_size_mib": DEFAULT_MEM_MIB, "smt": False,
            "track_dirty_pages": False, "huge_pages": "None",
        }  # fmt: skip
        self.boot_source: dict[str, Any] | None = None
        self.drives: dict[str, dict[str, Any]] = {}
        self.ifaces: dict[str, dict[str, Any]] = {}
        self.vsock: dict[str, Any] | None = None
        self.vfio_devices: dict[str, dict[str, Any]] = {}  # kvmkit extension (VFIO)
        self.logger: dict[str, Any] | None = None
        self.metrics_config: dict[str, Any] | None = None
        self.metrics = Metrics()
        self.metrics.collect = self._collect_metrics
        self.metrics.set("api_server", "process_startup_time_us", 0)
        # kvmkit extension for `kvmkit run -- COMMAND` and the Python API: run this command
        # in the guest (kvmkit's console protocol); without a boot source, in the default
        # guest image.
        self.command: list[str] | None = None
        self.machine: Machine | None = None
        self.result: MachineResult | None = None
        self.ended = threading.Event()
        self._lock = threading.Lock()
        self._log_handler: logging.Handler | None = None
        self._configured = False  # anything boot-specific set (snapshot load then refused)
        # Live migration (kvmkit extension): GET /migration shows this; while one runs,
        # requests that change the VM are refused.
        self.migration: dict[str, Any] = {"state": "none"}
        self._migrating = False
        if threading.current_thread() is threading.main_thread():
            # vCPU kicks (pause, stop) from the API threads need the signal handler, and
            # only the main thread can install it: create the Vmm there.
            from kvmkit.kvm.kick import install_kick_handler

            install_kick_handler()

    # -- helpers
    def _mutating(self) -> _Held:
        if not self._lock.acquire(timeout=BUSY_TIMEOUT):
            raise ApiError("the VMM is busy with another request; try again")
        if self._migrating:
            self._lock.release()
            raise ApiError("a migration of this microVM is in progress")
        return _Held(self._lock)

    def _pre_boot(self) -> None:
        if self.state is not State.NOT_STARTED:
            raise ApiError(NOT_AFTER_START)

    def _post_boot(self) -> None:
        if self.state is State.NOT_STARTED:
            raise ApiError(NOT_BEFORE_START)

    # -- reads
    def describe(self) -> dict[str, Any]:
        return {
            "id": self.instance_id, "state": self.state.value, "vmm_version": __version__,
            "app_name": "kvmkit",
        }  # fmt: skip

    def version(self) -> dict[str, Any]:
        return {"firecracker_version": __version__}

    def get_machine_config(self) -> dict[str, Any]:
        return copy.deepcopy(self.machine_config)

    def vm_config(self) -> dict[str, Any]:
        """The whole configuration in the --config-file shape (GET /vm/config)."""
        out: dict[str, Any] = {"machine-config": self.get_machine_config()}
        if self.boot_source is not None:
            out["boot-source"] = copy.deepcopy(self.boot_source)
        out["drives"] = [copy.deepcopy(d) for d in self.drives.values()]
        out["network-interfaces"] = [copy.deepcopy(n) for n in self.ifaces.values()]
        if self.vsock is not None:
            out["vsock"] = copy.deepcopy(self.vsock)
        if self.vfio_devices:
            out["vfio-devices"] = [copy.deepcopy(d) for d in self.vfio_devices.values()]
        if self.logger is not None:
            out["logger"] = copy.deepcopy(self.logger)
        if self.metrics_config is not None:
            out["metrics"] = copy.deepcopy(self.metrics_config)
        return out

    # -- pre-boot configuration
    def put_machine_config(self, body: Any) -> None:
        body = _check(body, "MachineConfiguration")
        with self._mutating():
            self._pre_boot()
            self._set_machine_config(
                {"smt": False, "track_dirty_pages": False, "huge_pages": "None", **body}
            )

    def patch_machine_config(self, body: Any) -> None:
        body = _check(body, "PartialMachineConfiguration")
        with self._mutating():
            self._pre_boot()
            self._set_machine_config({**self.machine_config, **body})

    def _set_machine_config(self, cfg: dict[str, Any]) -> None:
        try:
            MachineConfig(vcpus=cfg["vcpu_count"], mem_mib=cfg["mem_size_mib"],
                          **_cpu_memory_options(cfg)).validate()  # fmt: skip
        except UserError as err:
            raise ApiError(f"machine-config: {err}") from None
        cfg.pop("cpu_template", None)  # only "None" is accepted: the same as none
        self.machine_config = cfg
        self._configured = True

    def put_boot_source(self, body: Any) -> None:
        body = _check(body, "BootSource")
        _check_file("kernel_image_path", body["kernel_image_path"])
        if "initrd_path" in body:
            _check_file("initrd_path", body["initrd_path"])
        with self._mutating():
            self._pre_boot()
            self.boot_source = dict(body)
            self._configured = True

    def put_drive(self, drive_id: str, body: Any) -> None:
        body = _check(body, "Drive")
        if body["drive_id"] != drive_id:
            raise ApiError("The id from the path does not match the id from the body!")
        _check_file("path_on_host", body["path_on_host"], block_ok=True)
        if not body.get("is_read_only", False) and not os.access(body["path_on_host"], os.W_OK):
            raise ApiError(f"path_on_host {body['path_on_host']!r}: not writable")
        with self._mutating():
            self._pre_boot()
            if body["is_root_device"]:
                for other in self.drives.values():
                    if other["is_root_device"] and other["drive_id"] != drive_id:
                        raise ApiError("A root block device already exists!")
            if drive_id not in self.drives and len(self.drives) >= MAX_DRIVES:
                raise ApiError(f"at most {MAX_DRIVES} drives")
            self.drives[drive_id] = dict(body)
            self._configured = True

    def patch_drive(self, drive_id: str, body: Any) -> None:
        body = _check(body, "PartialDrive")
        if body["drive_id"] != drive_id:
            raise ApiError("The id from the path does not match the id from the body!")
        with self._mutating():
            self._post_boot()
            # Drives cannot be changed after boot yet (Firecracker allows a new path here).
            raise ApiError(f"drive {drive_id!r}: no such drive")

    def put_network_interface(self, iface_id: str, body: Any) -> None:
        body = _check(body, "NetworkInterface")
        if body["iface_id"] != iface_id:
            raise ApiError("The id from the path does not match the id from the body!")
        with self._mutating():
            self._pre_boot()
            for other in self.ifaces.values():
                if other["iface_id"] == iface_id:
                    continue
                if other["host_dev_name"] == body["host_dev_name"]:
                    raise ApiError(f"host_dev_name {body['host_dev_name']!r} is already in use")
                if "guest_mac" in body and other.get("guest_mac") == body["guest_mac"]:
                    raise ApiError(f"guest_mac {body['guest_mac']} is already in use")
            if iface_id not in self.ifaces and len(self.ifaces) >= MAX_IFACES:
                raise ApiError(f"at most {MAX_IFACES} network interfaces")
            self.ifaces[iface_id] = dict(body)
            self._configured = True

    def patch_network_interface(self, iface_id: str, body: Any) -> None:
        body = _check(body, "PartialNetworkInterface")
        if body["iface_id"] != iface_id:
            raise ApiError("The id from the path does not match the id from the body!")
        with self._mutating():
            self._post_boot()
            raise ApiError(f"network interface {iface_id!r}: no such interface")

    def put_vsock(self, body: Any) -> None:
        body = _check(body, "Vsock")
        parent = Path(body["uds_path"]).parent
        if not parent.is_dir():
            raise ApiError(f"uds_path {body['uds_path']!r}: {parent} is not a directory")
        with self._mutating():
            self._pre_boot()
            self.vsock = dict(body)
            self._configured = True

    def put_vfio_device(self, device_id: str, body: Any) -> None:
        """kvmkit extension: give the guest host PCI device `bdf` (VFIO passthrough). The
        host's checks (bound to vfio-pci, IOMMU group viable) run at InstanceStart."""
        body = _check(body, "VfioDevice")
        if body["device_id"] != device_id:
            raise ApiError("The id from the path does not match the id from the body!")
        from kvmkit.vfio.sysfs import parse_bdf

        try:
            bdf = parse_bdf(body["bdf"])
        except ValueError as err:
            raise ApiError(f"bdf: {err}") from None
        with self._mutating():
            self._pre_boot()
            for other in self.vfio_devices.values():
                if other["device_id"] != device_id and parse_bdf(other["bdf"]) == bdf:
                    raise ApiError(f"bdf {bdf} is already in use")
            if device_id not in self.vfio_devices and len(self.vfio_devices) >= MAX_VFIO:
                raise ApiError(f"at most {MAX_VFIO} VFIO devices")
            self.vfio_devices[device_id] = dict(body)
            self._configured = True

    def put_logger(self, body: Any) -> None:
        body = _check(body, "Logger")
        with self._mutating():
            self._pre_boot()
            handler = None
            if "log_path" in body:
                try:
                    handler = api_logger.install(
                        body["log_path"], level=body.get("level", "Info"),
                        instance=self.instance_id, show_level=body.get("show_level", False),
                        show_origin=body.get("show_log_origin", False),
                        module=body.get("module"),
                    )  # fmt: skip
                except OSError as err:
                    why = err.strerror or err
                    raise ApiError(f"log_path {body['log_path']!r}: {why}") from None
            if self._log_handler is not None:
                logging.getLogger("kvmkit").removeHandler(self._log_handler)
                self._log_handler.close()
            self._log_handler = handler
            self.logger = dict(body)
            log.info("logger configured: %s", body)

    def put_metrics(self, body: Any) -> None:
        body = _check(body, "Metrics")
        with self._mutating():
            self._pre_boot()
            if self.metrics.configured:
                raise ApiError("Reinitialization of metrics not allowed.")
            try:
                self.metrics.open(body["metrics_path"])
            except OSError as err:
                why = err.strerror or err
                raise ApiError(f"metrics_path {body['metrics_path']!r}: {why}") from None
            if body.get("emit_id"):
                self.metrics.emit_id = self.instance_id
            self.metrics.properties = dict(body.get("properties", {}))
            self.metrics_config = dict(body)

    def set_command(self, command: list[str]) -> None:
        """kvmkit extension (`kvmkit run -- COMMAND`, Python): run `command` in the guest
        and report its output and status; without a boot source the default guest image
        boots."""
        with self._mutating():
            self._pre_boot()
            if not command or not all(isinstance(a, str) for a in command):
                raise ApiError("the command must be a non-empty list of strings")
            self.command = list(command)
            self._configured = True

    # -- actions
    def action(self, body: Any) -> None:
        body = _check(body, "InstanceActionInfo")
        kind = body["action_type"]
        if kind == "InstanceStart":
            self.instance_start()
        elif kind == "FlushMetrics":
            self.flush_metrics()
        else:
            self.send_ctrl_alt_del()

    def flush_metrics(self) -> None:
        if not self.metrics.configured:
            raise ApiError("The metrics system is not configured: PUT /metrics first.")
        try:
            self.metrics.flush()
        except OSError as err:
            raise ApiError(f"cannot write metrics: {err.strerror or err}") from None

    def send_ctrl_alt_del(self) -> None:
        with self._mutating():
            self._post_boot()
            assert self.machine is not None
            if self.state is State.PAUSED:
                raise ApiError("the microVM is paused: resume it first")
            if not self.machine.send_ctrl_alt_del():
                raise ApiError("the guest has not enabled the i8042 keyboard interrupt")

    def _machine_config(self) -> MachineConfig:
        mc = self.machine_config
        if self.boot_source is not None:
            bs = self.boot_source
            return MachineConfig(
                kernel=Path(bs["kernel_image_path"]),
                initrd=Path(bs["initrd_path"]) if "initrd_path" in bs else None,
                cmdline=bs.get("boot_args"), vcpus=mc["vcpu_count"],
                mem_mib=mc["mem_size_mib"], command=list(self.command or []),
                drives=self._drive_configs(), nets=self._net_configs(),
                vsock=self._vsock_config(), vfio=self._vfio_bdfs(),
                **_cpu_memory_options(mc),
            )  # fmt: skip
        if self.command is not None:
            return MachineConfig(
                vcpus=mc["vcpu_count"], mem_mib=mc["mem_size_mib"], command=list(self.command),
                drives=self._drive_configs(), nets=self._net_configs(),
                vsock=self._vsock_config(), vfio=self._vfio_bdfs(),
                **_cpu_memory_options(mc),
            )
        raise ApiError("Cannot start microvm without kernel configuration.")

    def _drive_configs(self) -> list[DriveConfig]:
        """The drives as virtio-blk devices, the root device first (/dev/vda), then in the
        order they were put (Firecracker's order); the drive id is the serial (GET_ID)."""
        ordered = sorted(self.drives.values(), key=lambda d: not d["is_root_device"])
        return [
            DriveConfig(Path(d["path_on_host"]), bool(d.get("is_read_only", False)),
                        d["drive_id"])
            for d in ordered
        ]  # fmt: skip

    def _net_configs(self) -> list[NetConfig]:
        """Network interfaces as virtio-net devices on their host taps, in the order they
        were put (eth0, eth1, ...)."""
        return [NetConfig(i["host_dev_name"], i.get("guest_mac")) for i in self.ifaces.values()]

    def _vsock_config(self) -> VsockConfig | None:
        if self.vsock is None:
            return None
        return VsockConfig(self.vsock["guest_cid"], Path(self.vsock["uds_path"]))

    def _vfio_bdfs(self) -> list[str]:
        return [d["bdf"] for d in self.vfio_devices.values()]

    def attach_devices(self, machine: Machine) -> None:
        """Devices the Machine does not build from its MachineConfig plug in here; drives,
        network interfaces and vsock all go through MachineConfig now."""

    def instance_start(self) -> None:
        with self._mutating():
            self._pre_boot()
            config = self._machine_config()
            try:
                config.validate()
            except UserError as err:
                raise ApiError(str(err)) from None
            self._check_host()
            from kvmkit.vmm.machine import Machine

            if config.kernel is None:
                from kvmkit.image.guest import default_image

                try:
                    default_image()
                except (UserError, OSError) as err:
                    raise ApiError(f"default guest image: {err}") from None
            machine = Machine(config, command_output=self.command_output,
                              kvm_device=self.kvm_device)  # fmt: skip
            try:
                self.attach_devices(machine)
                machine.build()
            except ApiError:
                machine.close()
                raise
            except (UserError, OSError, ValueError) as err:
                machine.close()
                raise ApiError(f"cannot start the microVM: {err}") from None
            self._run(machine)
            log.info("InstanceStart: %d vCPU(s), %d MiB", config.vcpus, config.mem_mib)

    def _check_host(self) -> None:
        from kvmkit.probe import detect_implementation

        implementation, why = detect_implementation()
        if not implementation.startswith("hardware-") and not os.environ.get("KVMKIT_FORCE_RUN"):
            raise ApiError(
                f"this host's /dev/kvm is {implementation} ({why}): unmodified Linux guests "
                "cannot run on it; run kvmkit inside `kvmkit lane`"
            )

    def _run(self, machine: Machine, paused: bool = False) -> None:
        """Start the vCPU threads (parked at once when `paused`) and watch for the end."""
        if self.console_output is not None:
            # Firecracker's console: the guest never waits for the VMM's stdout; output that
            # does not fit while stdout is full is dropped and counted (vmm/console.py).
            machine.console.add_listener(self.console_output, lossless=False)
        machine.start(paused=paused)
        self.machine = machine
        self.state = State.PAUSED if paused else State.RUNNING
        threading.Thread(target=self._watch, args=(machine,), name="vmm-watch",
                         daemon=True).start()  # fmt: skip

    def _watch(self, machine: Machine) -> None:
        result = machine.wait()
        self.result = result
        if result is not None:
            log.info("the microVM ended: %s", result.message)
        self.ended.set()

    def wait(self, timeout: float | None = None) -> MachineResult | None:
        """Block until a started VM ends (None on timeout)."""
        if not self.ended.wait(timeout):
            return None
        return self.result

    def patch_vm(self, body: Any) -> None:
        body = _check(body, "Vm")
        with self._mutating():
            self._post_boot()
            assert self.machine is not None
            t0 = time.monotonic()
            if body["state"] == "Paused":
                if self.state is State.RUNNING:
                    try:
                        self.machine.pause()
                    except UserError as err:
                        raise ApiError(str(err)) from None
                    self.state = State.PAUSED
                    self._latency("pause_vm", t0)
                    log.info("paused")
            elif self.state is State.PAUSED:
                self.machine.resume()
                self.state = State.RUNNING
                self._latency("resume_vm", t0)
                log.info("resumed")

    def _latency(self, name: str, t0: float) -> None:
        self.metrics.set("latencies_us", name, int((time.monotonic() - t0) * 1e6))

    def snapshot_create(self, body: Any) -> None:
        body = _check(body, "SnapshotCreateParams")
        diff = body.get("snapshot_type", "Full") == "Diff"
        with self._mutating():
            self._post_boot()
            if self.state is not State.PAUSED:
                raise ApiError("Cannot create a snapshot: the microVM is not paused.")
            if diff and not self.machine_config.get("track_dirty_pages"):
                raise ApiError(
                    "Diff snapshots are not allowed on uVMs with dirty page tracking disabled."
                )
            for key in ("snapshot_path", "mem_file_path"):
                parent = Path(body[key]).parent
                if not parent.is_dir():
                    raise ApiError(f"{key} {body[key]!r}: {parent} is not a directory")
            if os.path.abspath(body["snapshot_path"]) == os.path.abspath(body["mem_file_path"]):
                raise ApiError("snapshot_path and mem_file_path must be different files")
            assert self.machine is not None
            t0 = time.monotonic()
            from kvmkit.kvm import KvmError
            from kvmkit.vmm.snapshot import snapshot_machine

            try:
                snapshot_machine(self.machine, body["snapshot_path"], body["mem_file_path"],
                                 diff=diff)  # fmt: skip
            except (UserError, KvmError, OSError) as err:
                raise ApiError(f"Cannot create a snapshot: {err}") from None
            self._latency("diff_create_snapshot" if diff else "full_create_snapshot", t0)
            log.info("snapshot written to %s and %s", body["snapshot_path"],
                     body["mem_file_path"])  # fmt: skip

    def snapshot_load(self, body: Any) -> None:
        body = _check(body, "SnapshotLoadParams")
        has_file, has_backend = "mem_file_path" in body, "mem_backend" in body
        if has_file == has_backend:
            raise ApiError("exactly one of mem_file_path and mem_backend is required")
        mem = body["mem_file_path"] if has_file else body["mem_backend"]["backend_path"]
        with self._mutating():
            self._pre_boot()
            if self._configured or self.drives or self.ifaces or self.vsock is not None:
                raise ApiError(
                    "Loading a microVM snapshot not allowed after configuring boot-specific "
                    "resources."
                )
            self._check_host()
            from kvmkit.snapshot.format import SnapshotError
            from kvmkit.vmm.snapshot import restore_machine

            t0 = time.monotonic()
            try:
                machine = restore_machine(
                    body["snapshot_path"], mem, command_output=self.command_output,
                    kvm_device=self.kvm_device,
                )  # fmt: skip
            except (SnapshotError, UserError, OSError, ValueError) as err:
                raise ApiError(f"Cannot load the snapshot: {err}") from None
            cfg = machine.config
            self.machine_config.update(vcpu_count=cfg.vcpus, mem_size_mib=cfg.mem_mib)
            if body.get("track_dirty_pages") or body.get("enable_diff_snapshots"):
                self.machine_config["track_dirty_pages"] = True
            try:
                self._run(machine, paused=True)
                if body.get("resume_vm"):
                    machine.resume()
                    self.state = State.RUNNING
            except UserError as err:
                machine.close()
                self.machine, self.state = None, State.NOT_STARTED
                raise ApiError(f"Cannot load the snapshot: {err}") from None
            self._latency("load_snapshot", t0)
            log.info("snapshot %s loaded (%s)", body["snapshot_path"], self.state.value)

    # -- live migration (kvmkit extension, docs/migration.md)
    def get_migration(self) -> dict[str, Any]:
        """GET /migration: the state of the last (or running) migration and its progress."""
        return copy.deepcopy(self.migration)

    def put_migration(self, body: Any) -> dict[str, Any]:
        """PUT /migration: migrate the running microVM to a `kvmkit restore --incoming` at
        `destination_url`; answers when it is over. Success: the guest runs at the
        destination and this VMM's microVM has ended. Failure (ApiError): it runs on here."""
        body = _check(body, "MigrationParams")
        url = body["destination_url"]
        with self._mutating():
            self._post_boot()
            machine = self.machine
            assert machine is not None
            if self.state is State.PAUSED:
                raise ApiError("the microVM is paused: resume it before migrating")
            if self.ended.is_set():
                raise ApiError("the microVM has ended: nothing to migrate")
            self._migrating = True
            self.migration = {"state": "setup", "destination_url": url}
        t0 = time.monotonic()

        def progress(p: MigrationProgress) -> None:
            self.migration = {**p.to_dict(), "destination_url": url}

        try:
            result = machine.migrate(
                url, max_downtime_ms=body.get("max_downtime_ms", DEFAULT_MAX_DOWNTIME_MS),
                bandwidth_mib_s=body.get("bandwidth_mib_s"), progress=progress,
            )  # fmt: skip
        except UserError as err:
            self.migration = {**self.migration, "state": "failed", "error": str(err)}
            log.warning("migration to %s failed: %s", url, err)
            raise ApiError(str(err)) from None
        finally:
            self._migrating = False
        self.migration = {**result.progress.to_dict(), **result.to_dict(),
                          "state": "completed", "destination_url": url}  # fmt: skip
        self._latency("migration", t0)
        log.info("migrated to %s: %s", url, result.summary())
        return copy.deepcopy(self.migration)

    def adopt(self, machine: Machine, *, paused: bool = False) -> None:
        """Run a machine built elsewhere (a migration received by `kvmkit restore
        --incoming --api-sock`): the API controls it from here."""
        with self._mutating():
            self._pre_boot()
            cfg = machine.config
            self.machine_config.update(vcpu_count=cfg.vcpus, mem_size_mib=cfg.mem_mib)
            self._run(machine, paused=paused)

    # -- config file (Firecracker's --config-file shape)
    def apply_config(self, data: Any) -> None:
        """Apply a whole configuration (the --config-file JSON); the VM is not started."""
        try:
            validate(data, "FullVmConfiguration", "config")
        except SchemaError as err:
            raise ApiError(str(err)) from None
        if "logger" in data:
            self.put_logger(data["logger"])
        if "metrics" in data:
            self.put_metrics(data["metrics"])
        if "machine-config" in data:
            self.put_machine_config(data["machine-config"])
        if "boot-source" in data:
            self.put_boot_source(data["boot-source"])
        for drive in data.get("drives", []):
            self.put_drive(drive["drive_id"], drive)
        for iface in data.get("network-interfaces", []):
            self.put_network_interface(iface["iface_id"], iface)
        if "vsock" in data:
            self.put_vsock(data["vsock"])
        for device in data.get("vfio-devices", []):
            self.put_vfio_device(device["device_id"], device)

    # -- metrics from the machine
    def _collect_metrics(self, metrics: Metrics) -> None:
        machine = self.machine
        if machine is None:
            return
        totals = {"exit_io_in": 0, "exit_io_out": 0, "exit_mmio_read": 0, "exit_mmio_write": 0}
        for t in machine.threads:
            for name in totals:
                totals[name] += getattr(t.stats, name)
        for name, value in totals.items():
            metrics.set("vcpu", name, value)
        if self.result is not None and self.result.reason.value == "error":
            metrics.set("vcpu", "failures", 1)
        serial = machine.serial
        if serial is not None:
            metrics.set("uart", "read_count", serial.read_count)
            metrics.set("uart", "write_count", serial.write_count)
            # Bytes the console dropped for a reader that fell behind count as missed too
            # (Firecracker counts the bytes its non-blocking stdout refused).
            metrics.set("uart", "missed_write_count",
                        serial.missed_write_count + machine.console.dropped)  # fmt: skip
        block = {"read_bytes": 0, "write_bytes": 0, "read_count": 0, "write_count": 0,
                 "flush_count": 0}  # fmt: skip
        for _, _, device in machine.virtio:
            if isinstance(device, VirtioBlk):
                for name in block:
                    block[name] += getattr(device, name)
        for name, value in block.items():
            metrics.set("block", name, value)

    def close(self) -> None:
        if self.machine is not None:
            self.machine.close()
        self.metrics.close()
        if self._log_handler is not None:
            logging.getLogger("kvmkit").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None


class _Held:
    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        self._lock.release()
