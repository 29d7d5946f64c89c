"""The one action layer behind kvmkit's REST API, its config file, `kvmkit run`/`kvmkit ctl`
and the Python API: a `Vmm` holds the configuration in Firecracker's shapes, applies
Firecracker's pre-boot/post-boot rules, and drives a `Machine` once started.

    vmm = Vmm()
    vmm.put_machine_config({"vcpu_count": 2, "mem_size_mib": 256})
    vmm.put_boot_source({"kernel_image_path": "vmlinux", "boot_args": "console=ttyS0"})
    vmm.instance_start()
    vmm.patch_vm({"state": "Paused"})
    vmm.snapshot_create({"snapshot_path": "vm.state", "mem_file_path": "vm.mem"})

Every request is one row of `ROUTES` (Firecracker's pre-boot and runtime controllers in one
table): its method and path, the states it is allowed in, the OpenAPI definition its body
must match, the handler, and the name Firecracker's request metrics count it under.
`Vmm.request` checks the body, the id in the path against the body, takes the request lock
and the state, then calls the handler; the REST server routes through the same table, and
the Python methods (`put_drive`, `patch_vm`, ...) are `request` with their row. Errors are
`ApiError` (status 400 and a fault message); the REST server maps them to
`{"fault_message": ...}`.

Nothing here imports the devices, the VMM or the snapshot code at start-up: they come in
with InstanceStart or a snapshot load.
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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvmkit import __version__
from kvmkit.api import balloon, resources
from kvmkit.api import logger as api_logger
from kvmkit.api.metrics import Metrics
from kvmkit.api.schema import SchemaError, validate
from kvmkit.errors import UserError
from kvmkit.mmds.store import DEFAULT_IPV4, Mmds, MmdsConfig, MmdsError, check_ipv4

if TYPE_CHECKING:
    from kvmkit.migration.send import MigrationProgress
    from kvmkit.vmm.config import MachineConfig
    from kvmkit.vmm.machine import Machine, MachineResult

DEFAULT_MAX_DOWNTIME_MS = 300  # kvmkit.vmm.machine's (QEMU's default downtime limit)

log = logging.getLogger("kvmkit.api")

DEFAULT_MEM_MIB = 128  # Firecracker's defaults for GET /machine-config before a PUT
DEFAULT_VCPUS = 1
MAX_DRIVES = 64
MAX_IFACES = 64
MAX_VFIO = 31  # PCI bus 0's slots less the host bridge (vmm/config.py MAX_PCI_FUNCTIONS)
BUSY_TIMEOUT = 60.0  # a request waits this long for another one to finish, then 400
CLOSE_WAIT = 10.0  # close() waits this long for the request in progress to end
NOT_AFTER_START = "The requested operation is not supported after starting the microVM."
NOT_BEFORE_START = "The requested operation is not supported before starting the microVM."
BAD_BODY = "An error occurred when deserializing the json body of a request: "
ID_MISMATCH = "The id from the path does not match the id from the body!"


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


ANY = frozenset(State)
PRE_BOOT = frozenset({State.NOT_STARTED})
POST_BOOT = frozenset({State.RUNNING, State.PAUSED})


@dataclass(frozen=True)
class Route:
    """One endpoint: `path` has `{id}` for per-device endpoints; `handler` is the name of the
    Vmm method doing the work (called with the body, and the id first when there is one);
    `metric` Firecracker's counter stem in `<method>_api_requests` (`drive` ->
    `drive_count`, `drive_fails`); `schema` the body's OpenAPI definition; `id_field` the
    body field that must equal the id in the path; `parse` a check of the body that, as
    in Firecracker's request parser, comes before the state rule."""

    method: str
    path: str
    handler: str
    states: frozenset[State]
    metric: str
    schema: str | None = None
    id_field: str | None = None
    parse: Callable[[dict[str, Any]], None] | None = None
    locks: bool = True  # False: the handler takes the request lock and checks the state

    @property
    def reads(self) -> bool:
        return self.method == "GET"


def _patch_drive_body(body: dict[str, Any]) -> None:
    if "path_on_host" not in body and "rate_limiter" not in body:
        raise ApiError(
            "Please specify at least one property to patch: path_on_host, rate_limiter."
        )


ROUTES: tuple[Route, ...] = (
    Route("GET", "/", "describe", ANY, "instance_info"),
    Route("GET", "/version", "version", ANY, "vmm_version"),
    Route("GET", "/machine-config", "get_machine_config", ANY, "machine_cfg"),
    Route("GET", "/vm/config", "vm_config", ANY, "vm_config"),
    Route("PUT", "/machine-config", "_put_machine_config", PRE_BOOT, "machine_cfg",
          "MachineConfiguration"),
    Route("PATCH", "/machine-config", "_patch_machine_config", PRE_BOOT, "machine_cfg",
          "PartialMachineConfiguration"),
    Route("PUT", "/boot-source", "_put_boot_source", PRE_BOOT, "boot_source", "BootSource"),
    Route("PUT", "/drives/{id}", "_put_drive", PRE_BOOT, "drive", "Drive", "drive_id"),
    Route("PATCH", "/drives/{id}", "_patch_drive", POST_BOOT, "drive", "PartialDrive",
          "drive_id", _patch_drive_body),
    Route("PUT", "/network-interfaces/{id}", "_put_network_interface", PRE_BOOT, "network",
          "NetworkInterface", "iface_id"),
    Route("PATCH", "/network-interfaces/{id}", "_patch_network_interface", POST_BOOT,
          "network", "PartialNetworkInterface", "iface_id"),
    Route("PUT", "/vsock", "_put_vsock", PRE_BOOT, "vsock", "Vsock"),
    Route("PUT", "/entropy", "_put_entropy", PRE_BOOT, "entropy", "EntropyDevice"),
    # Firecracker's balloon (its docs/ballooning.md; kvmkit.api.balloon)
    Route("GET", "/balloon", "get_balloon", ANY, "balloon"),
    Route("PUT", "/balloon", "_put_balloon", PRE_BOOT, "balloon", "Balloon"),
    Route("PATCH", "/balloon", "_patch_balloon", POST_BOOT, "balloon", "BalloonUpdate"),
    Route("GET", "/balloon/statistics", "get_balloon_statistics", ANY, "balloon"),
    Route("PATCH", "/balloon/statistics", "_patch_balloon_statistics", POST_BOOT, "balloon",
          "BalloonStatsUpdate"),
    # kvmkit extension (docs/vfio.md)
    Route("PUT", "/vfio-devices/{id}", "_put_vfio_device", PRE_BOOT, "vfio", "VfioDevice",
          "device_id"),
    # The MMDS store: any state (Firecracker's both controllers); its config pre-boot.
    Route("GET", "/mmds", "get_mmds", ANY, "mmds"),
    Route("PUT", "/mmds", "_put_mmds", ANY, "mmds", "MmdsContentsObject"),
    Route("PATCH", "/mmds", "_patch_mmds", ANY, "mmds", "MmdsContentsObject"),
    Route("PUT", "/mmds/config", "_put_mmds_config", PRE_BOOT, "mmds", "MmdsConfig"),
    Route("PUT", "/logger", "_put_logger", PRE_BOOT, "logger", "Logger"),
    Route("PUT", "/metrics", "_put_metrics", PRE_BOOT, "metrics", "Metrics"),
    # Each action has its own state rule (InstanceStart pre-boot, SendCtrlAltDel running).
    Route("PUT", "/actions", "_action", ANY, "actions", "InstanceActionInfo"),
    Route("PATCH", "/vm", "_patch_vm", POST_BOOT, "vm", "Vm"),
    Route("PUT", "/snapshot/create", "_snapshot_create", POST_BOOT, "snapshot_create",
          "SnapshotCreateParams"),
    Route("PUT", "/snapshot/load", "_snapshot_load", PRE_BOOT, "snapshot_load",
          "SnapshotLoadParams"),
    # Live migration (kvmkit's own, docs/migration.md): PUT answers 200 with the outcome
    # and holds the request lock only while it starts (others are refused meanwhile).
    Route("GET", "/migration", "get_migration", ANY, "migration"),
    Route("PUT", "/migration", "put_migration", POST_BOOT, "migration", "MigrationParams",
          locks=False),
)  # fmt: skip
_BY_KEY = {(r.method, r.path): r for r in ROUTES}


def route(method: str, path: str) -> Route:
    return _BY_KEY[(method, path)]


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
    """The body matches `schema`, or Firecracker's deserialization error."""
    try:
        validate(body, schema)
    except SchemaError as err:
        raise ApiError(f"{BAD_BODY}{err}.") from None
    assert isinstance(body, dict)
    return body


class Vmm:
    def __init__(
        self, *, instance_id: str = "anonymous-instance",
        console_output: Callable[[bytes], None] | None = None,
        command_output: Callable[[bytes], None] | None = None, kvm_device: str = "/dev/kvm",
        virtio_transport: str = "mmio", boot_timer: bool = False, nested: bool = False,
    ) -> None:  # fmt: skip
        self.instance_id = instance_id
        self.console_output = console_output
        self.command_output = command_output
        self.kvm_device = kvm_device
        # `kvmkit-firecracker --enable-pci`: virtio devices on PCI; `--boot-timer`:
        # Firecracker's boot timer device.
        self.virtio_transport = virtio_transport
        self.boot_timer = boot_timer
        # `kvmkit run --nested --api-sock`: the guest sees the host's VMX/SVM (docs/nested.md;
        # the API itself has no such setting).
        self.nested = nested
        self.state = State.NOT_STARTED
        self.res = resources.Resources(machine={
            "vcpu_count": DEFAULT_VCPUS, "mem_size_mib": DEFAULT_MEM_MIB, "smt": False,
            "track_dirty_pages": False, "huge_pages": "None",
        }, mmds=Mmds())  # fmt: skip
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
        # Set by close() (SIGTERM): a snapshot being written gives up (docs/security.md).
        self._closing = threading.Event()
        self._log_handler: logging.Handler | None = None
        self._configured = False  # anything boot-specific set (snapshot load then refused)
        self._drive_ids: list[str] = []  # device order of the started VM
        self._iface_ids: list[str] = []
        # Live migration (kvmkit extension): GET /migration shows this; while one runs,
        # requests that change the VM are refused.
        self.migration: dict[str, Any] = {"state": "none"}
        self._migrating = False
        if threading.current_thread() is threading.main_thread():
            # vCPU kicks (pause, stop) from the API threads need the signal handler, and
            # only the main thread can install it: create the Vmm there.
            from kvmkit.kvm.kick import install_kick_handler

            install_kick_handler()

    @property
    def mmds_size_limit(self) -> int:
        """`--mmds-size-limit`: the MMDS store's limit in bytes (Firecracker's default: the
        API payload limit, 51200)."""
        return self.res.mmds.limit

    @mmds_size_limit.setter
    def mmds_size_limit(self, value: int | None) -> None:
        if value is not None:
            self.res.mmds.limit = value

    # -- the configuration, as Firecracker's resources (kept for the Python API's readers)
    @property
    def machine_config(self) -> dict[str, Any]:
        return self.res.machine

    @property
    def boot_source(self) -> dict[str, Any] | None:
        return self.res.boot_source

    @property
    def drives(self) -> dict[str, dict[str, Any]]:
        return self.res.drives

    @property
    def ifaces(self) -> dict[str, dict[str, Any]]:
        return self.res.ifaces

    @property
    def vsock(self) -> dict[str, Any] | None:
        return self.res.vsock

    @property
    def entropy(self) -> dict[str, Any] | None:
        return self.res.entropy

    @property
    def vfio_devices(self) -> dict[str, dict[str, Any]]:
        return self.res.vfio_devices

    # -- the dispatcher
    def request(self, method: str, path: str, body: Any = None, ident: str | None = None) -> Any:
        """Serve one request of `ROUTES` (path as in the table, `{id}` given as `ident`):
        the body checked against its schema, the path id against the body, then the
        request lock (for anything but a read) and the state rule, then the handler."""
        r = route(method, path)
        args: list[Any] = [] if ident is None else [ident]
        if r.schema is not None:
            body = _check(body, r.schema)
            if r.id_field is not None and body[r.id_field] != ident:
                raise ApiError(ID_MISMATCH)
            if r.parse is not None:
                r.parse(body)
            args.append(body)
        handler = getattr(self, r.handler)
        if r.reads:
            return handler(*args)
        if not r.locks:  # it takes the lock itself, for the part that needs it
            return handler(*args)
        with self._held():  # refused while a migration runs
            self._allowed(r.states)
            return handler(*args)

    def _allowed(self, states: frozenset[State]) -> None:
        if self.state not in states:
            raise ApiError(NOT_AFTER_START if self.state is not State.NOT_STARTED
                           else NOT_BEFORE_START)  # fmt: skip

    # -- the Python API: one method per route
    def put_machine_config(self, body: Any) -> None:
        self.request("PUT", "/machine-config", body)

    def patch_machine_config(self, body: Any) -> None:
        self.request("PATCH", "/machine-config", body)

    def put_boot_source(self, body: Any) -> None:
        self.request("PUT", "/boot-source", body)

    def put_drive(self, drive_id: str, body: Any) -> None:
        self.request("PUT", "/drives/{id}", body, drive_id)

    def patch_drive(self, drive_id: str, body: Any) -> None:
        self.request("PATCH", "/drives/{id}", body, drive_id)

    def put_network_interface(self, iface_id: str, body: Any) -> None:
        self.request("PUT", "/network-interfaces/{id}", body, iface_id)

    def patch_network_interface(self, iface_id: str, body: Any) -> None:
        self.request("PATCH", "/network-interfaces/{id}", body, iface_id)

    def put_vsock(self, body: Any) -> None:
        self.request("PUT", "/vsock", body)

    def put_entropy(self, body: Any) -> None:
        self.request("PUT", "/entropy", body)

    def put_balloon(self, body: Any) -> None:
        self.request("PUT", "/balloon", body)

    def patch_balloon(self, body: Any) -> None:
        self.request("PATCH", "/balloon", body)

    def patch_balloon_statistics(self, body: Any) -> None:
        self.request("PATCH", "/balloon/statistics", body)

    def put_vfio_device(self, device_id: str, body: Any) -> None:
        self.request("PUT", "/vfio-devices/{id}", body, device_id)

    def put_logger(self, body: Any) -> None:
        self.request("PUT", "/logger", body)

    def put_mmds(self, body: Any) -> None:
        self.request("PUT", "/mmds", body)

    def patch_mmds(self, body: Any) -> None:
        self.request("PATCH", "/mmds", body)

    def put_mmds_config(self, body: Any) -> None:
        self.request("PUT", "/mmds/config", body)

    def put_metrics(self, body: Any) -> None:
        self.request("PUT", "/metrics", body)

    def action(self, body: Any) -> None:
        self.request("PUT", "/actions", body)

    def instance_start(self) -> None:
        self.action({"action_type": "InstanceStart"})

    def flush_metrics(self) -> None:
        self.action({"action_type": "FlushMetrics"})

    def send_ctrl_alt_del(self) -> None:
        self.action({"action_type": "SendCtrlAltDel"})

    def patch_vm(self, body: Any) -> None:
        self.request("PATCH", "/vm", body)

    def snapshot_create(self, body: Any) -> None:
        self.request("PUT", "/snapshot/create", body)

    def snapshot_load(self, body: Any) -> None:
        self.request("PUT", "/snapshot/load", body)

    def set_command(self, command: list[str]) -> None:
        """kvmkit extension (`kvmkit run -- COMMAND`, Python): run `command` in the guest
        and report its output and status; without a boot source the default guest image
        boots. (No Firecracker endpoint: through the API, `kvmkit.nonce=`/`kvmkit.cmd=` in
        boot_args do the same.)"""
        with self._held():
            self._allowed(PRE_BOOT)
            if not command or not all(isinstance(a, str) for a in command):
                raise ApiError("the command must be a non-empty list of strings")
            self.command = list(command)
            self._configured = True

    def _held(self) -> _Held:
        if not self._lock.acquire(timeout=BUSY_TIMEOUT):
            raise ApiError("the VMM is busy with another request; try again")
        if self._migrating:
            self._lock.release()
            raise ApiError("a migration of this microVM is in progress")
        return _Held(self._lock)

    # -- reads
    def describe(self) -> dict[str, Any]:
        return {
            "id": self.instance_id, "state": self.state.value, "vmm_version": __version__,
            "app_name": "kvmkit",
        }  # fmt: skip

    def version(self) -> dict[str, Any]:
        return {"firecracker_version": __version__}

    def get_machine_config(self) -> dict[str, Any]:
        return copy.deepcopy(self.res.machine)

    def vm_config(self) -> dict[str, Any]:
        """The whole configuration in the --config-file shape (GET /vm/config)."""
        res = self.res
        out: dict[str, Any] = {"machine-config": self.get_machine_config()}
        if res.boot_source is not None:
            out["boot-source"] = copy.deepcopy(res.boot_source)
        out["drives"] = [copy.deepcopy(d) for d in res.drives.values()]
        out["network-interfaces"] = [copy.deepcopy(n) for n in res.ifaces.values()]
        if res.vfio_devices:
            out["vfio-devices"] = [copy.deepcopy(d) for d in res.vfio_devices.values()]
        for key, value in (("vsock", res.vsock), ("entropy", res.entropy),
                           ("balloon", balloon.config(self)),
                           ("logger", self.logger), ("metrics", self.metrics_config)):
            if value is not None:
                out[key] = copy.deepcopy(value)
        if res.mmds.config is not None:
            out["mmds-config"] = res.mmds.config.to_api()
        return out

    def get_mmds(self) -> Any:
        return self.res.mmds.get()

    # -- pre-boot configuration
    def _put_machine_config(self, body: dict[str, Any]) -> None:
        self._set_machine_config(
            {"smt": False, "track_dirty_pages": False, "huge_pages": "None", **body}
        )

    def _patch_machine_config(self, body: dict[str, Any]) -> None:
        self._set_machine_config({**self.res.machine, **body})

    def _set_machine_config(self, cfg: dict[str, Any]) -> None:
        from kvmkit.vmm.config import MachineConfig

        balloon.check_machine_config(self.res, cfg)
        try:
            MachineConfig(vcpus=cfg["vcpu_count"], mem_mib=cfg["mem_size_mib"],
                          **resources.cpu_memory_options(cfg)).validate()  # fmt: skip
        except UserError as err:
            raise ApiError(f"machine-config: {err}") from None
        except ValueError as err:
            raise ApiError(str(err)) from None
        cfg.pop("cpu_template", None)  # only "None" is accepted: the same as none
        self.res.machine = cfg
        self._configured = True

    def _put_boot_source(self, body: dict[str, Any]) -> None:
        _check_file("kernel_image_path", body["kernel_image_path"])
        if "initrd_path" in body:
            _check_file("initrd_path", body["initrd_path"])
        self.res.boot_source = dict(body)
        self._configured = True

    def _check_drive_file(self, path: str, read_only: bool) -> None:
        _check_file("path_on_host", path, block_ok=True)
        if not read_only and not os.access(path, os.W_OK):
            raise ApiError(f"path_on_host {path!r}: not writable")

    def _put_drive(self, drive_id: str, body: dict[str, Any]) -> None:
        self._check_drive_file(body["path_on_host"], body.get("is_read_only", False))
        if body["is_root_device"]:
            for other in self.res.drives.values():
                if other["is_root_device"] and other["drive_id"] != drive_id:
                    raise ApiError("A root block device already exists!")
        if drive_id not in self.res.drives and len(self.res.drives) >= MAX_DRIVES:
            raise ApiError(f"at most {MAX_DRIVES} drives")
        self.res.drives[drive_id] = dict(body)
        self._configured = True

    def _put_network_interface(self, iface_id: str, body: dict[str, Any]) -> None:
        for other in self.res.ifaces.values():
            if other["iface_id"] == iface_id:
                continue
            if other["host_dev_name"] == body["host_dev_name"]:
                raise ApiError(f"host_dev_name {body['host_dev_name']!r} is already in use")
            if "guest_mac" in body and other.get("guest_mac") == body["guest_mac"]:
                raise ApiError(f"guest_mac {body['guest_mac']} is already in use")
        if iface_id not in self.res.ifaces and len(self.res.ifaces) >= MAX_IFACES:
            raise ApiError(f"at most {MAX_IFACES} network interfaces")
        self.res.ifaces[iface_id] = dict(body)
        self._configured = True

    def _put_vsock(self, body: dict[str, Any]) -> None:
        parent = Path(body["uds_path"]).parent
        if not parent.is_dir():
            raise ApiError(f"uds_path {body['uds_path']!r}: {parent} is not a directory")
        self.res.vsock = dict(body)
        self._configured = True

    def _put_entropy(self, body: dict[str, Any]) -> None:
        self.res.entropy = dict(body)
        self._configured = True

    # -- the balloon (kvmkit.api.balloon has the rules)
    def get_balloon(self) -> dict[str, Any]:
        return balloon.get(self)

    def get_balloon_statistics(self) -> dict[str, Any]:
        return balloon.statistics(self)

    def _put_balloon(self, body: dict[str, Any]) -> None:
        balloon.put(self.res, body)
        self._configured = True

    def _patch_balloon(self, body: dict[str, Any]) -> None:
        balloon.patch(self, body)

    def _patch_balloon_statistics(self, body: dict[str, Any]) -> None:
        balloon.patch_statistics(self, body)

    def _put_vfio_device(self, device_id: str, body: dict[str, Any]) -> None:
        """kvmkit extension: give the guest host PCI device `bdf` (VFIO passthrough). The
        host's checks (bound to vfio-pci, IOMMU group viable) run at InstanceStart."""
        from kvmkit.vfio.sysfs import parse_bdf

        try:
            bdf = parse_bdf(body["bdf"])
        except ValueError as err:
            raise ApiError(f"bdf: {err}") from None
        devices = self.res.vfio_devices
        for other in devices.values():
            if other["device_id"] != device_id and parse_bdf(other["bdf"]) == bdf:
                raise ApiError(f"bdf {bdf} is already in use")
        if device_id not in devices and len(devices) >= MAX_VFIO:
            raise ApiError(f"at most {MAX_VFIO} VFIO devices")
        devices[device_id] = dict(body)
        self._configured = True

    # -- the MMDS (kvmkit.mmds; Firecracker's docs/mmds/mmds-user-guide.md)
    def _put_mmds(self, body: dict[str, Any]) -> None:
        try:
            self.res.mmds.put(body)
        except MmdsError as err:
            raise ApiError(str(err), err.status) from None

    def _patch_mmds(self, body: dict[str, Any]) -> None:
        try:
            self.res.mmds.patch(body)
        except MmdsError as err:
            raise ApiError(str(err), err.status) from None

    def _put_mmds_config(self, body: dict[str, Any]) -> None:
        ifaces = list(dict.fromkeys(body["network_interfaces"]))
        if not ifaces:
            raise ApiError("MMDS config error: The list of network interface IDs that allow "
                           "forwarding MMDS requests is empty.")  # fmt: skip
        if any(i not in self.res.ifaces for i in ifaces):
            raise ApiError("MMDS config error: The list of network interface IDs provided "
                           "contains at least one ID that does not correspond to any existing "
                           "network interface.")  # fmt: skip
        try:
            address = check_ipv4(body.get("ipv4_address", DEFAULT_IPV4))
        except ValueError as err:
            raise ApiError(f"MMDS config error: {err}") from None
        self.res.mmds.config = MmdsConfig(ifaces, body.get("version", "V1"), address,
                                          body.get("imds_compat", False))  # fmt: skip
        self._configured = True

    def _put_logger(self, body: dict[str, Any]) -> None:
        handler = None
        if "log_path" in body:
            try:
                handler = api_logger.install(
                    body["log_path"], level=body.get("level", "Info"),
                    instance=self.instance_id, show_level=body.get("show_level", False),
                    show_origin=body.get("show_log_origin", False), module=body.get("module"),
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

    def _put_metrics(self, body: dict[str, Any]) -> None:
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

    def report_start_time(self, start_time_us: int | None, start_time_cpu_us: int | None,
                          parent_cpu_time_us: int | None) -> None:  # fmt: skip
        """Firecracker's `--start-time-us`, `--start-time-cpu-us`, `--parent-cpu-time-us`:
        the process start as the launcher saw it (CLOCK_MONOTONIC and CPU time in µs);
        `api_server.process_startup_time_us`/`_cpu_us` become the time from there to now."""
        if start_time_us is not None:
            now = time.monotonic_ns() // 1000
            self.metrics.set("api_server", "process_startup_time_us", max(0, now - start_time_us))
        if start_time_cpu_us is not None:
            cpu = time.process_time_ns() // 1000
            self.metrics.set("api_server", "process_startup_time_cpu_us",
                             max(0, cpu - start_time_cpu_us + (parent_cpu_time_us or 0)))

    # -- post-boot updates (Firecracker's runtime controller)
    def _device(self, kind: str, ident: str) -> Any:
        from kvmkit.devices.virtio.blk import VirtioBlk
        from kvmkit.devices.virtio.net import VirtioNet

        assert self.machine is not None
        cls, ids = (VirtioBlk, self._drive_ids) if kind == "drive" else (VirtioNet,
                                                                        self._iface_ids)
        devices = [d for _, _, d in self.machine.virtio if isinstance(d, cls)]
        if ident not in ids or len(ids) != len(devices):
            what = "drive_id" if kind == "drive" else "iface_id"
            raise ApiError(f"Invalid {what}: no {kind} {ident!r} in this microVM")
        return devices[ids.index(ident)]

    def _limiter(self, body: dict[str, Any], key: str) -> Any:
        if key not in body:
            return None
        try:
            return resources.rate_limiter(body[key])
        except ValueError as err:
            raise ApiError(f"{BAD_BODY}{err}.") from None

    def _patch_drive(self, drive_id: str, body: dict[str, Any]) -> None:
        dev = self._device("drive", drive_id)
        stored = self.res.drives[drive_id]
        limiter = self._limiter(body, "rate_limiter")
        if "path_on_host" in body:
            self._check_drive_file(body["path_on_host"], dev.read_only)
            try:
                dev.replace_image(body["path_on_host"])
            except OSError as err:
                raise ApiError(f"path_on_host {body['path_on_host']!r}: {err.strerror}") from None
            stored["path_on_host"] = body["path_on_host"]
        if limiter is not None:
            dev.update_rate_limiter(limiter)
            stored["rate_limiter"] = dev.limiter.config.to_api()
        log.info("drive %s updated: %s", drive_id, body)

    def _patch_network_interface(self, iface_id: str, body: dict[str, Any]) -> None:
        dev = self._device("network", iface_id)
        rx, tx = self._limiter(body, "rx_rate_limiter"), self._limiter(body, "tx_rate_limiter")
        dev.update_rate_limiters(rx, tx)
        stored = self.res.ifaces[iface_id]
        if rx is not None:
            stored["rx_rate_limiter"] = dev.rx_limiter.config.to_api()
        if tx is not None:
            stored["tx_rate_limiter"] = dev.tx_limiter.config.to_api()
        log.info("network interface %s updated: %s", iface_id, body)

    # -- actions
    def _action(self, body: dict[str, Any]) -> None:
        kind = body["action_type"]
        if kind == "InstanceStart":
            self._allowed(PRE_BOOT)
            self._instance_start()
        elif kind == "FlushMetrics":
            if not self.metrics.configured:
                raise ApiError("The metrics system is not configured: PUT /metrics first.")
            try:
                self.metrics.flush()
            except OSError as err:
                raise ApiError(f"cannot write metrics: {err.strerror or err}") from None
        else:
            self._allowed(POST_BOOT)
            assert self.machine is not None
            if self.state is State.PAUSED:
                raise ApiError("the microVM is paused: resume it first")
            if not self.machine.send_ctrl_alt_del():
                raise ApiError("the guest has not enabled the i8042 keyboard interrupt")

    def _machine_config(self) -> MachineConfig:
        """The MachineConfig InstanceStart builds from the configuration so far."""
        if self.res.boot_source is None and self.command is None:
            raise ApiError("Cannot start microvm without kernel configuration.")
        try:
            config = resources.machine_config(
                self.res, command=self.command, virtio_transport=self.virtio_transport,
                boot_timer=self.boot_timer,
            )  # fmt: skip
        except ValueError as err:
            raise ApiError(str(err)) from None
        config.nested = self.nested
        return config

    def _instance_start(self) -> None:
        config = self._machine_config()
        try:
            config.validate()
        except (UserError, ValueError) as err:
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
            machine.build()
        except (UserError, OSError, ValueError) as err:
            machine.close()
            raise ApiError(f"cannot start the microVM: {err}") from None
        self._drive_ids = self.res.drive_order()
        self._iface_ids = list(self.res.ifaces)
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

    def _patch_vm(self, body: dict[str, Any]) -> None:
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

    def _snapshot_create(self, body: dict[str, Any]) -> None:
        diff = body.get("snapshot_type", "Full") == "Diff"
        if self.state is not State.PAUSED:
            raise ApiError("Cannot create a snapshot: the microVM is not paused.")
        if diff and not self.res.machine.get("track_dirty_pages"):
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
        from kvmkit.snapshot.memory import SnapshotCancelled
        from kvmkit.vmm.snapshot import snapshot_machine

        try:
            snapshot_machine(self.machine, body["snapshot_path"], body["mem_file_path"],
                             diff=diff, cancel=self._closing.is_set)  # fmt: skip
        except (UserError, KvmError, OSError, SnapshotCancelled) as err:
            raise ApiError(f"Cannot create a snapshot: {err}") from None
        self._latency("diff_create_snapshot" if diff else "full_create_snapshot", t0)
        log.info("snapshot written to %s and %s", body["snapshot_path"],
                 body["mem_file_path"])  # fmt: skip

    def _snapshot_load(self, body: dict[str, Any]) -> None:
        has_file, has_backend = "mem_file_path" in body, "mem_backend" in body
        if has_file == has_backend:
            raise ApiError("exactly one of mem_file_path and mem_backend is required")
        if not has_file and body["mem_backend"]["backend_type"] == "Uffd":
            raise ApiError(
                "Cannot load the snapshot: the Uffd memory backend (a userfaultfd page-fault "
                "handler process) is not implemented by kvmkit; use backend_type File"
            )
        mem = body["mem_file_path"] if has_file else body["mem_backend"]["backend_path"]
        res = self.res
        if (self._configured or res.drives or res.ifaces or res.vsock or res.entropy
                or res.balloon):  # fmt: skip
            raise ApiError(
                "Loading a microVM snapshot not allowed after configuring boot-specific "
                "resources."
            )
        self._check_host()
        from kvmkit.kvm import KvmError
        from kvmkit.snapshot.format import SnapshotError
        from kvmkit.vmm.snapshot import Overrides, restore_machine

        taps: dict[str, str] = {}
        for entry in body.get("network_overrides", []):
            if entry["iface_id"] in taps:
                raise ApiError(f"Cannot load the snapshot: network_overrides names "
                               f"{entry['iface_id']!r} twice")  # fmt: skip
            taps[entry["iface_id"]] = entry["host_dev_name"]
        vsock = body.get("vsock_override")
        overrides = Overrides(taps, None if vsock is None else vsock["uds_path"])
        # enable_diff_snapshots is the deprecated name of track_dirty_pages (the API spec).
        track = bool(body.get("track_dirty_pages") or body.get("enable_diff_snapshots"))
        t0 = time.monotonic()
        try:
            machine = restore_machine(
                body["snapshot_path"], mem, command_output=self.command_output,
                kvm_device=self.kvm_device, overrides=overrides, mmds=res.mmds,
                track_dirty=track, merged=True,
            )  # fmt: skip
        except (SnapshotError, UserError, OSError, ValueError, KvmError) as err:
            raise ApiError(f"Cannot load the snapshot: {err}") from None
        cfg = machine.config
        res.machine.update(vcpu_count=cfg.vcpus, mem_size_mib=cfg.mem_mib,
                           track_dirty_pages=track)  # fmt: skip
        # The API ids the snapshot keeps (the drive id is the drive's serial), for metrics
        # and PATCH after the load; a state from before iface ids has none.
        serials = [d.serial for d in cfg.drives]
        self._drive_ids = serials if all(serials) else []
        ids = [n.iface_id for n in cfg.nets]
        self._iface_ids = [i for i in ids if i is not None] if None not in ids else []
        res.balloon = balloon.from_machine(machine)
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
        with self._held():
            self._allowed(POST_BOOT)
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
        with self._held():
            self._allowed(PRE_BOOT)
            cfg = machine.config
            self.res.machine.update(vcpu_count=cfg.vcpus, mem_size_mib=cfg.mem_mib)
            self._run(machine, paused=paused)

    # -- config file (Firecracker's --config-file shape)
    def apply_config(self, data: Any) -> None:
        """Apply a whole configuration (the --config-file JSON); the VM is not started."""
        try:
            validate(data, "FullVmConfiguration")
        except SchemaError as err:
            raise ApiError(f"{BAD_BODY}{err}.") from None
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
        if "mmds-config" in data:
            self.put_mmds_config(data["mmds-config"])
        if "vsock" in data:
            self.put_vsock(data["vsock"])
        if "entropy" in data:
            self.put_entropy(data["entropy"])
        if "balloon" in data:
            self.put_balloon(data["balloon"])
        for device in data.get("vfio-devices", []):
            self.put_vfio_device(device["device_id"], device)

    # -- metrics from the machine
    def _collect_metrics(self, metrics: Metrics) -> None:
        if self.machine is not None:
            resources.collect(metrics, self.machine, self.result, self._drive_ids,
                              self._iface_ids)  # fmt: skip

    def close(self) -> None:
        # A request in progress (a snapshot being written from guest memory) must leave the
        # machine before it is torn down: ask it to give up, then wait for the request lock
        # (bounded: a request stuck in the kernel, e.g. on a hung file system, does not keep
        # the process from ending; its temporary file is left then).
        self._closing.set()
        held = self._lock.acquire(timeout=CLOSE_WAIT)
        try:
            if self.machine is not None:
                self.machine.close()
        finally:
            if held:
                self._lock.release()
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
