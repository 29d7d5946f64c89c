"""Metrics as JSON lines, in Firecracker's shape: one object per flush, counters grouped as
Firecracker groups them (`api_server`, `get_api_requests`, `put_api_requests`,
`patch_api_requests`, `vcpu`, `vmm`, `uart`, `block`, `net`, `vsock`, `entropy`, `mmds`,
`balloon`, `latencies_us`). Counters are written as the change since the previous flush, as
Firecracker's `SharedIncMetric`s are; the startup times and latencies are levels.

`block` and `net` sum every drive and network interface; as Firecracker, each device also
has its own group, `block_<drive_id>` and `net_<iface_id>` (added when the VM starts).
"""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from collections.abc import Callable
from typing import Any

FLUSH_PERIOD = 60.0  # Firecracker writes metrics every 60 s, and on FlushMetrics

# Firecracker's names (src/vmm/src/logger/metrics.rs and each device's metrics.rs) for the
# counters kvmkit keeps.
BLOCK = ["read_bytes", "write_bytes", "read_count", "write_count", "flush_count",
         "rate_limiter_throttled_events", "rate_limiter_event_count", "update_count",
         "update_fails"]  # fmt: skip
NET = ["rx_bytes_count", "tx_bytes_count", "rx_packets_count", "tx_packets_count", "rx_fails",
       "tx_malformed_frames", "tap_write_fails", "rx_rate_limiter_throttled",
       "tx_rate_limiter_throttled", "rx_event_rate_limiter_count",
       "tx_rate_limiter_event_count"]  # fmt: skip
GROUPS: dict[str, list[str]] = {
    "api_server": ["process_startup_time_us", "process_startup_time_cpu_us",
                   "sync_response_fails"],
    "get_api_requests": ["instance_info_count", "machine_cfg_count", "vmm_version_count",
                         "vm_config_count", "mmds_count"],
    "put_api_requests": [
        "actions_count", "actions_fails", "boot_source_count", "boot_source_fails",
        "drive_count", "drive_fails", "logger_count", "logger_fails", "machine_cfg_count",
        "machine_cfg_fails", "metrics_count", "metrics_fails", "network_count",
        "network_fails", "vsock_count", "vsock_fails", "snapshot_create_count",
        "snapshot_create_fails", "snapshot_load_count", "snapshot_load_fails", "mmds_count",
        "mmds_fails",
    ],
    "patch_api_requests": ["drive_count", "drive_fails", "machine_cfg_count",
                           "machine_cfg_fails", "network_count", "network_fails",
                           "vm_count", "vm_fails", "mmds_count", "mmds_fails"],
    "vcpu": ["exit_io_in", "exit_io_out", "exit_mmio_read", "exit_mmio_write", "failures"],
    "vmm": ["device_events", "panic_count"],
    "uart": ["read_count", "write_count", "missed_read_count", "missed_write_count",
             "error_count", "flush_count"],
    "block": BLOCK,
    "net": NET,
    "vsock": ["rx_bytes_count", "tx_bytes_count", "rx_packets_count", "tx_packets_count",
              "conns_added", "conns_killed", "conns_removed"],
    "entropy": ["entropy_event_count", "entropy_bytes", "entropy_rate_limiter_throttled",
                "rate_limiter_event_count"],
    "balloon": ["inflate_count", "stats_updates_count", "stats_update_fails",
                "deflate_count", "event_fails"],
    "mmds": ["rx_accepted", "rx_accepted_err", "rx_accepted_unusual", "tx_frames", "tx_bytes",
             "tx_errors", "connections_created", "connections_destroyed"],
    "latencies_us": ["full_create_snapshot", "diff_create_snapshot", "load_snapshot",
                     "pause_vm", "resume_vm"],
}  # fmt: skip
# Values that are levels, not counters: written as they are, not as deltas.
GAUGES = {
    ("api_server", "process_startup_time_us"), ("api_server", "process_startup_time_cpu_us"),
    ("vmm", "panic_count"),
} | {("latencies_us", n) for n in GROUPS["latencies_us"]}  # fmt: skip


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.values: dict[str, dict[str, int]] = {g: dict.fromkeys(n, 0) for g, n in GROUPS.items()}
        self._flushed: dict[str, dict[str, int]] = copy.deepcopy(self.values)
        self._fd: int | None = None
        self.path: str | None = None
        self.emit_id: str | None = None
        self.properties: dict[str, str] = {}
        # Called before each flush to copy device and vCPU counters in (set by the VMM).
        self.collect: Callable[[Metrics], None] | None = None
        self._stop = threading.Event()

    def inc(self, group: str, name: str, n: int = 1) -> None:
        with self._lock:
            values = self.values.setdefault(group, {})
            values[name] = values.get(name, 0) + n

    def set(self, group: str, name: str, value: int) -> None:
        with self._lock:
            self.values.setdefault(group, {})[name] = value

    @property
    def configured(self) -> bool:
        return self._fd is not None

    def open(self, path: str) -> None:
        """An existing file or FIFO (as Firecracker: it does not create it), appended to."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC)
        if not _is_file_or_fifo(fd):
            os.close(fd)
            raise OSError(f"{path}: not a regular file or FIFO")
        self._fd, self.path = fd, path
        threading.Thread(target=self._periodic, name="metrics", daemon=True).start()

    def _periodic(self) -> None:
        while not self._stop.wait(FLUSH_PERIOD):
            try:
                self.flush()
            except OSError:
                pass

    def line(self) -> dict[str, Any]:
        if self.collect is not None:
            self.collect(self)
        with self._lock:
            out: dict[str, Any] = {"utc_timestamp_ms": int(time.time() * 1000)}
            if self.emit_id is not None:
                out["id"] = self.emit_id
            if self.properties:
                out["properties"] = dict(self.properties)
            for group, values in self.values.items():
                flushed = self._flushed.get(group, {})
                out[group] = {
                    name: value if (group, name) in GAUGES
                    else value - flushed.get(name, 0)
                    for name, value in values.items()
                }  # fmt: skip
            self._flushed = copy.deepcopy(self.values)
        return out

    def flush(self) -> None:
        if self._fd is None:
            raise OSError("the metrics system is not configured")
        data = (json.dumps(self.line(), separators=(",", ":")) + "\n").encode()
        os.write(self._fd, data)

    def close(self) -> None:
        self._stop.set()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _is_file_or_fifo(fd: int) -> bool:
    import stat

    mode = os.fstat(fd).st_mode
    return stat.S_ISREG(mode) or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode)
