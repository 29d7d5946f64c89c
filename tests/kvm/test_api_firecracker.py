"""`kvmkit-firecracker` as a launcher starts Firecracker: every option of `firecracker --help`
parses, the ones with an effect have it (start times and the boot timer in metrics and logs,
the payload limit, the instance id), and the API's Firecracker-only parts work on a real
process with a tiny PVH kernel: /entropy, PATCH of a drive after boot, the metrics groups."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from api_proc import VmmProcess, grows

from kvmkit.testing import pvh

MACHINE = {"vcpu_count": 1, "mem_size_mib": 64}
# Writes Firecracker's boot-complete value (123) to the boot timer at 0xd0000000, then loops
# writing '.' to the serial port.
BOOT_TIMER_KERNEL = pvh.SERIAL_LOOP.replace(
    "1:\tmovw $0x3f8, %dx", "\tmovl $0xd0000000, %eax\n\tmovb $123, (%eax)\n1:\tmovw $0x3f8, %dx"
).replace("DELAY", "20000")


def firecracker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvmkit.cli.firecracker", *args], capture_output=True,
        text=True, timeout=timeout, env=dict(os.environ, KVMKIT_FORCE_RUN="1"),
    )  # fmt: skip


def test_print_and_exit_flags(tmp_path: Path) -> None:
    from kvmkit.snapshot.format import FORMAT_VERSION, encode

    assert firecracker("--version").stdout.startswith("kvmkit-firecracker v")
    assert firecracker("--snapshot-version").stdout.strip() == f"v{FORMAT_VERSION}"
    state = tmp_path / "vm.state"
    state.write_bytes(encode({}))
    assert firecracker("--describe-snapshot", str(state)).stdout.strip() == f"v{FORMAT_VERSION}"
    junk = tmp_path / "junk"
    junk.write_bytes(b"not a snapshot" * 10)
    proc = firecracker("--describe-snapshot", str(junk))
    assert proc.returncode == 2 and "not a kvmkit snapshot" in proc.stderr
    help_text = firecracker("--help").stdout
    # Every option Firecracker's main.rs declares (its ArgParser list).
    for flag in ("--api-sock", "--id", "--seccomp-filter", "--no-seccomp", "--start-time-us",
                 "--start-time-cpu-us", "--parent-cpu-time-us", "--config-file", "--metadata",
                 "--no-api", "--log-path", "--level", "--module", "--show-level",
                 "--show-log-origin", "--metrics-path", "--boot-timer", "--version",
                 "--snapshot-version", "--describe-snapshot", "--http-api-max-payload-size",
                 "--mmds-size-limit", "--enable-pci"):  # fmt: skip
        assert flag in help_text, flag


@pytest.mark.parametrize(
    ("args", "needle"),
    [(["--no-seccomp", "--seccomp-filter", "/etc/hostname"], "exclude each other"),
     (["--seccomp-filter", "/nonexistent/filter.bpf"], "No such file"),
     (["--id", "bad id!"], "--id"),
     (["--level", "Loud"], "invalid level"),
     (["--start-time-us", "-5"], "unsigned"),
     (["--no-api"], "--no-api needs --config-file"),
     (["--metadata", "/nonexistent.json"], "--metadata")],
)  # fmt: skip
def test_bad_flag_values_are_refused_in_one_line(args: list[str], needle: str) -> None:
    proc = firecracker(*args)
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_every_flag_at_once(tmp_path: Path) -> None:
    """A launcher's full command line: the process serves, with the effects the flags have."""
    log, metrics = tmp_path / "fc.log", tmp_path / "fc.metrics"
    log.touch()
    metrics.touch()
    meta = tmp_path / "meta.json"
    meta.write_text('{"latest": {"meta-data": {"ami-id": "x"}}}')
    kernel = pvh.build(BOOT_TIMER_KERNEL, tmp_path / "k.elf")
    start_us = time.monotonic_ns() // 1000
    vmm = VmmProcess(
        tmp_path, "--id", "fc-instance-1", "--no-seccomp",
        "--start-time-us", str(start_us), "--start-time-cpu-us", "0",
        "--parent-cpu-time-us", "1000", "--metadata", str(meta),
        "--log-path", str(log), "--level", "debug", "--show-level", "--show-log-origin",
        "--module", "kvmkit", "--metrics-path", str(metrics), "--boot-timer",
        "--http-api-max-payload-size", "4096", "--mmds-size-limit", "8192",
        name="fc", entry="firecracker",
    )  # fmt: skip
    try:
        assert vmm.ok("GET", "/") == {
            "id": "fc-instance-1", "state": "Not started", "vmm_version": vmm.ok(
                "GET", "/version")["firecracker_version"], "app_name": "kvmkit",
        }  # fmt: skip
        # --http-api-max-payload-size: a body over 4096 bytes is refused
        big = {"kernel_image_path": "x" * 5000}
        status, value = vmm("PUT", "/boot-source", big)
        assert status == 413 and "4096" in value["fault_message"]
        vmm.ok("PUT", "/machine-config", MACHINE)
        vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(kernel)})
        vmm.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        assert grows(vmm), vmm.stderr()
        vmm.ok("PUT", "/actions", {"action_type": "FlushMetrics"})
        line = json.loads(metrics.read_text().splitlines()[-1])
        startup = line["api_server"]["process_startup_time_us"]
        assert 0 < startup < (time.monotonic_ns() // 1000 - start_us)
        assert line["api_server"]["process_startup_time_cpu_us"] > 1000
        # --boot-timer: the guest's write of 123 at 0xd0000000, logged in Firecracker's words
        deadline = time.monotonic() + 30
        while "Guest-boot-time" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        entries = [json.loads(x) for x in log.read_text().splitlines()]
        boot = [e for e in entries if "Guest-boot-time" in e["msg"]]
        assert boot and boot[0]["msg"].startswith("[Info] Guest-boot-time = ")
        assert boot[0]["instance"] == "fc-instance-1" and "origin" in boot[0]
        # --metadata: the store's first contents
        assert vmm.ok("GET", "/mmds") == {"latest": {"meta-data": {"ami-id": "x"}}}
    finally:
        vmm.close()


def test_entropy_drive_patch_and_metrics_groups(tmp_path: Path) -> None:
    kernel = pvh.serial_loop_kernel(tmp_path / "loop.elf")
    disk, other = tmp_path / "disk.img", tmp_path / "other.img"
    disk.write_bytes(bytes(1 << 20))
    other.write_bytes(bytes(2 << 20))
    metrics = tmp_path / "m.jsonl"
    metrics.touch()
    vmm = VmmProcess(tmp_path, name="fc", entry="firecracker")
    try:
        limiter = {"bandwidth": {"size": 1000, "refill_time": 100},
                   "ops": {"size": 10, "one_time_burst": 5, "refill_time": 1000}}  # fmt: skip
        vmm.ok("PUT", "/entropy", {"rate_limiter": limiter})
        drive = {"drive_id": "data", "path_on_host": str(disk), "is_root_device": False,
                 "cache_type": "Writeback", "rate_limiter": limiter}  # fmt: skip
        vmm.ok("PUT", "/drives/data", drive)
        vmm.ok("PUT", "/metrics", {"metrics_path": str(metrics)})
        vmm.ok("PUT", "/machine-config", MACHINE)
        vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(kernel)})
        config = vmm.ok("GET", "/vm/config")
        assert config["entropy"] == {"rate_limiter": limiter}
        assert config["drives"] == [drive]
        vmm.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        assert grows(vmm), vmm.stderr()
        assert "after starting" in vmm.fault("PUT", "/entropy", {})
        # PATCH after boot: a bucket replaced, the other kept; then another image
        vmm.ok("PATCH", "/drives/data", {"drive_id": "data",
                                         "rate_limiter": {"ops": {"size": 0, "refill_time": 0}}})
        patched = vmm.ok("GET", "/vm/config")["drives"][0]
        assert patched["rate_limiter"] == {"bandwidth": limiter["bandwidth"],
                                           "ops": {"size": 0, "refill_time": 0}}  # fmt: skip
        vmm.ok("PATCH", "/drives/data", {"drive_id": "data", "path_on_host": str(other)})
        assert vmm.ok("GET", "/vm/config")["drives"][0]["path_on_host"] == str(other)
        missing = vmm.fault("PATCH", "/drives/data",
                            {"drive_id": "data", "path_on_host": str(tmp_path / "nope")})
        assert "No such file" in missing
        assert "Invalid drive_id" in vmm.fault(
            "PATCH", "/drives/nope", {"drive_id": "nope", "rate_limiter": {}}
        )
        assert "Invalid iface_id" in vmm.fault(
            "PATCH", "/network-interfaces/eth0", {"iface_id": "eth0", "rx_rate_limiter": {}}
        )
        vmm.ok("PUT", "/actions", {"action_type": "FlushMetrics"})
        line = json.loads(metrics.read_text().splitlines()[-1])
        for group in ("block", "block_data", "net", "vsock", "entropy", "mmds", "vmm", "vcpu",
                      "latencies_us"):  # fmt: skip
            assert group in line, group
        assert line["block_data"]["update_count"] == 1 and line["block"]["update_count"] == 1
        assert line["block"]["update_fails"] == 0
        assert line["patch_api_requests"]["drive_count"] == 4
        assert line["patch_api_requests"]["drive_fails"] == 2
        assert "entropy_rate_limiter_throttled" in line["entropy"]
    finally:
        vmm.close()


# Scans PCI bus 0 through configuration mechanism #1 (0xCF8/0xCFC) for a virtio vendor id
# (0x1AF4) and writes 'P' if one is there, 'M' if not, then '.' in a loop.
PCI_SCAN_KERNEL = pvh._NOTE + """
	xorl %ecx, %ecx
1:	movl %ecx, %eax
	shll $11, %eax
	orl $0x80000000, %eax
	movw $0xcf8, %dx
	outl %eax, %dx
	movw $0xcfc, %dx
	inl %dx, %eax
	cmpw $0x1af4, %ax
	je 2f
	incl %ecx
	cmpl $32, %ecx
	jne 1b
	movb $'M', %al
	jmp 3f
2:	movb $'P', %al
3:	movw $0x3f8, %dx
	outb %al, %dx
4:	movb $'.', %al
	outb %al, %dx
	movl $20000, %ecx
5:	decl %ecx
	jnz 5b
	jmp 4b
"""


@pytest.mark.parametrize(("flags", "seen"), [(["--enable-pci"], b"P"), ([], b"M")])
def test_enable_pci_puts_the_virtio_devices_on_pci(
    tmp_path: Path, flags: list[str], seen: bytes
) -> None:
    kernel = pvh.build(PCI_SCAN_KERNEL, tmp_path / "scan.elf")
    vmm = VmmProcess(tmp_path, *flags, name="fc", entry="firecracker")
    try:
        vmm.ok("PUT", "/entropy", {})
        vmm.ok("PUT", "/machine-config", MACHINE)
        vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(kernel), "boot_args": "x"})
        vmm.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        assert grows(vmm), vmm.stderr()
        assert vmm.out_path.read_bytes()[:1] == seen
    finally:
        vmm.close()


def test_run_refuses_device_options_beside_the_api(tmp_path: Path) -> None:
    """`kvmkit run --api-sock` takes --drive, --net and --vsock as the API's devices; a
    --rootfs (or --rng) there is refused, not dropped."""
    img = tmp_path / "root.ext4"
    img.write_bytes(bytes(4096))
    proc = subprocess.run(
        [sys.executable, "-m", "kvmkit", "run", "--api-sock", str(tmp_path / "a.sock"),
         "--rootfs", str(img)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2 and "configure them through the API" in proc.stderr
    assert not (tmp_path / "a.sock").exists()


def test_mmds_store_and_config_through_the_api(tmp_path: Path) -> None:
    """PUT/PATCH/GET /mmds and PUT /mmds/config over the socket: Firecracker's answers,
    its 413 when the store would pass --mmds-size-limit, its config errors; the config
    shows in GET /vm/config and is refused after InstanceStart, the store is not."""
    vmm = VmmProcess(tmp_path, "--mmds-size-limit", "100", name="fc", entry="firecracker")
    try:
        assert vmm.ok("GET", "/mmds") == {}
        assert "not initialized" in vmm.fault("PATCH", "/mmds", {"a": "1"})
        vmm.ok("PUT", "/mmds", {"latest": {"meta-data": {"id": "i-1", "k": "v"}}})
        vmm.ok("PATCH", "/mmds", {"latest": {"meta-data": {"k": None, "n": "2"}}})
        assert vmm.ok("GET", "/mmds") == {"latest": {"meta-data": {"id": "i-1", "n": "2"}}}
        message = vmm.fault("PUT", "/mmds", {"big": "x" * 100}, status=413)
        assert message == "MMDS limit exceeded error: The MMDS patch request doesn't fit."
        vmm.fault("PATCH", "/mmds", {"big": "x" * 100}, status=413)
        assert vmm.ok("GET", "/mmds") == {"latest": {"meta-data": {"id": "i-1", "n": "2"}}}
        assert "invalid type" in vmm.fault("PUT", "/mmds", ["not", "an", "object"])

        assert "missing field `network_interfaces`" in vmm.fault("PUT", "/mmds/config", {})
        assert "is empty" in vmm.fault("PUT", "/mmds/config", {"network_interfaces": []})
        assert "does not correspond to any existing network interface" in vmm.fault(
            "PUT", "/mmds/config", {"network_interfaces": ["eth0"]})
        vmm.ok("PUT", "/network-interfaces/eth0", {"iface_id": "eth0",
                                                   "host_dev_name": "kvmkmmds0"})  # fmt: skip
        assert "unknown variant `V3`" in vmm.fault(
            "PUT", "/mmds/config", {"network_interfaces": ["eth0"], "version": "V3"})
        for bad in ("10.0.0.1", "169.254.0.7", "169.254.255.1", "not-an-ip"):
            assert "The MMDS IPv4 address is not link local." in vmm.fault(
                "PUT", "/mmds/config", {"network_interfaces": ["eth0"], "ipv4_address": bad})
        vmm.ok("PUT", "/mmds/config", {"network_interfaces": ["eth0"], "version": "V2"})
        assert vmm.ok("GET", "/vm/config")["mmds-config"] == {
            "version": "V2", "network_interfaces": ["eth0"], "ipv4_address": "169.254.169.254",
            "imds_compat": False}  # fmt: skip

        (tmp_path / "m.jsonl").touch()  # Firecracker's metrics file must exist too
        vmm.ok("PUT", "/metrics", {"metrics_path": str(tmp_path / "m.jsonl")})
        vmm.ok("PUT", "/actions", {"action_type": "FlushMetrics"})
        line = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])
        assert line["patch_api_requests"]["mmds_count"] == 3
        assert line["put_api_requests"]["mmds_fails"] >= 9
        assert line["get_api_requests"]["mmds_count"] == 3
    finally:
        vmm.close()
    # After InstanceStart (a VM without interfaces: no tap on this host's network), the
    # config is fixed and the store still changes.
    vmm = VmmProcess(tmp_path, name="fc2", entry="firecracker")
    try:
        kernel = pvh.serial_loop_kernel(tmp_path / "loop.elf")
        vmm.ok("PUT", "/mmds", {"n": "1"})
        vmm.ok("PUT", "/machine-config", MACHINE)
        vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(kernel)})
        vmm.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        assert "not supported after starting" in vmm.fault(
            "PUT", "/mmds/config", {"network_interfaces": ["eth0"]})
        vmm.ok("PATCH", "/mmds", {"n": "3"})
        assert vmm.ok("GET", "/mmds") == {"n": "3"}
    finally:
        vmm.close()


def test_balloon_through_the_api_and_a_snapshot(tmp_path: Path) -> None:
    """Firecracker's /balloon rules on a running tiny guest (it has no balloon driver: the
    device stays inactive, as with a guest kernel without virtio_balloon), the balloon
    metrics group, and the balloon carried by a snapshot into a new process. The guest side
    (inflating, RSS, statistics) is tests/hwvirt/test_firecracker_dropin_linux.py's."""
    kernel = pvh.serial_loop_kernel(tmp_path / "loop.elf")
    metrics = tmp_path / "m.jsonl"
    metrics.touch()
    state, mem = tmp_path / "vm.state", tmp_path / "vm.mem"
    vmm = VmmProcess(tmp_path, name="fc", entry="firecracker")
    try:
        assert vmm.fault("GET", "/balloon") == "No balloon device found."
        vmm.ok("PUT", "/machine-config", MACHINE)
        assert vmm.fault("PUT", "/balloon", {"amount_mib": 65, "deflate_on_oom": False}) == (
            "Amount of pages requested is too large."
        )
        missing = vmm.fault("PUT", "/balloon", {"amount_mib": 1})
        assert "missing field `deflate_on_oom`" in missing
        body = {"amount_mib": 40, "deflate_on_oom": True, "stats_polling_interval_s": 1}
        vmm.ok("PUT", "/balloon", body)
        assert vmm.ok("GET", "/balloon") == body
        assert "smaller than the previously set balloon" in vmm.fault(
            "PATCH", "/machine-config", {"mem_size_mib": 32}
        )
        vmm.ok("PUT", "/metrics", {"metrics_path": str(metrics)})
        vmm.ok("PUT", "/boot-source", {"kernel_image_path": str(kernel)})
        vmm.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        assert grows(vmm), vmm.stderr()
        assert "after starting" in vmm.fault("PUT", "/balloon", body)
        assert vmm.ok("GET", "/balloon") == body
        assert vmm.ok("GET", "/balloon/statistics") == {
            "target_pages": 40 * 256, "actual_pages": 0, "target_mib": 40, "actual_mib": 0,
        }  # fmt: skip
        assert vmm.fault("PATCH", "/balloon", {"amount_mib": 65}) == (
            "Amount of pages requested is too large."
        )
        # No driver took the device: Firecracker's "inactive" answer.
        assert "Device is inactive" in vmm.fault("PATCH", "/balloon", {"amount_mib": 8})
        assert vmm.fault("PATCH", "/balloon/statistics", {"stats_polling_interval_s": 0}) == (
            "Cannot enable/disable the statistics after boot."
        )
        vmm.ok("PUT", "/actions", {"action_type": "FlushMetrics"})
        line = json.loads(metrics.read_text().splitlines()[-1])
        assert line["balloon"] == {"inflate_count": 0, "stats_updates_count": 0,
                                   "stats_update_fails": 0, "deflate_count": 0,
                                   "event_fails": 0}  # fmt: skip
        vmm.ok("PATCH", "/vm", {"state": "Paused"})
        vmm.ok("PUT", "/snapshot/create", {"snapshot_path": str(state),
                                            "mem_file_path": str(mem)})  # fmt: skip
    finally:
        vmm.close()
    second = VmmProcess(tmp_path, name="second", entry="firecracker")
    try:
        second.ok("PUT", "/snapshot/load", {"snapshot_path": str(state),
                                             "mem_file_path": str(mem), "resume_vm": True})
        assert second.ok("GET", "/balloon") == body
        assert second.ok("GET", "/balloon/statistics")["target_mib"] == 40
        assert grows(second), second.stderr()
    finally:
        second.close()
    other = VmmProcess(tmp_path, name="noballoon", entry="firecracker")
    try:
        other.ok("PUT", "/machine-config", MACHINE)
        other.ok("PUT", "/boot-source", {"kernel_image_path": str(kernel)})
        other.ok("PUT", "/actions", {"action_type": "InstanceStart"})
        assert other.fault("GET", "/balloon/statistics") == "No balloon device found."
        assert other.fault("PATCH", "/balloon", {"amount_mib": 1}) == "No balloon device found."
    finally:
        other.close()
