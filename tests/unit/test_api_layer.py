"""kvmkit's OpenAPI spec, its validator and the action layer before boot (no /dev/kvm)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.api import ApiError, Vmm
from kvmkit.api.actions import ROUTES
from kvmkit.api.schema import SchemaError, spec, validate
from kvmkit.api.server import Router


def test_spec_lists_exactly_the_routes_of_the_action_layer() -> None:
    """One table: every endpoint of kvmkit's OpenAPI spec is a route of the action layer,
    with the same body definition, and the other way round."""
    doc = spec()
    assert doc["swagger"] == "2.0"
    got = {}
    for p, ops in doc["paths"].items():
        for m, op in ops.items():
            body = [x for x in op.get("parameters", []) if x["in"] == "body"]
            schema = body[0]["schema"]["$ref"].rsplit("/", 1)[1] if body else None
            got[(m.upper(), re.sub(r"\{\w+\}", "{id}", p))] = schema
    assert got == {(r.method, r.path): r.schema for r in ROUTES}
    refs = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                refs.add(node["$ref"].rsplit("/", 1)[1])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    assert refs <= set(doc["definitions"])


@pytest.mark.parametrize(
    ("value", "schema", "needle"),
    [({"vcpu_count": 1}, "MachineConfiguration", "mem_size_mib"),
     ({"vcpu_count": True, "mem_size_mib": 64}, "MachineConfiguration", "expected integer"),
     ({"state": "Paused", "x": 1}, "Vm", "unknown field `x`, expected one of `state`"),
     ({"metrics_path": "m", "properties": {"a": 1}}, "Metrics", "properties.a"),
     ({"drives": [{"drive_id": "a"}]}, "FullVmConfiguration", "drives[0]"),
     ({"kernel_image_path": ""}, "BootSource", "empty")],
)  # fmt: skip
def test_validator_names_the_field(value: Any, schema: str, needle: str) -> None:
    with pytest.raises(SchemaError, match=None) as info:
        validate(value, schema)
    assert needle in str(info.value)


def test_python_api_and_config_file_share_the_rules(tmp_path: Path) -> None:
    vmm = Vmm()
    try:
        vmm.apply_config({"machine-config": {"vcpu_count": 2, "mem_size_mib": 64}})
        assert vmm.get_machine_config()["vcpu_count"] == 2
        with pytest.raises(ApiError, match="unknown field `memory-hotplug`"):
            vmm.apply_config({"memory-hotplug": {}})
        with pytest.raises(ApiError, match="before starting"):
            vmm.patch_vm({"state": "Paused"})
        with pytest.raises(ApiError, match="without kernel"):
            vmm.instance_start()
        status, value = Router(vmm).handle("PUT", "/vm", b"{}")
        assert status == 400 and "Invalid request method" in value["fault_message"]
        metrics = tmp_path / "m.jsonl"
        metrics.touch()
        vmm.put_metrics({"metrics_path": str(metrics), "emit_id": True})
        Router(vmm).handle("GET", "/", b"")
        vmm.flush_metrics()
        line = json.loads(metrics.read_text())
        assert line["id"] == "anonymous-instance"
        assert line["get_api_requests"]["instance_info_count"] == 1
    finally:
        vmm.close()


@given(st.binary(max_size=300), st.sampled_from(["PUT", "PATCH", "GET", "POST"]),
       st.sampled_from(["/actions", "/vm", "/drives/x", "/machine-config", "/snapshot/load",
                        "/logger", "/", "/nope"]))  # fmt: skip
@settings(max_examples=300, deadline=None)
def test_router_never_answers_5xx(body: bytes, method: str, path: str) -> None:
    vmm = Vmm()
    try:
        status, value = Router(vmm).handle(method, path, body)
        assert status in (200, 204, 400)
        if status == 400:
            assert set(value) == {"fault_message"}
    finally:
        vmm.close()


def test_migration_before_start_and_bad_requests_are_refused() -> None:
    vmm = Vmm()
    assert vmm.get_migration() == {"state": "none"}
    with pytest.raises(ApiError, match="not supported before starting"):
        vmm.put_migration({"destination_url": "unix:/tmp/x.sock"})
    for body, needle in [
        # serde's words, as for every body (docs/api.md)
        ({"destination_url": "ftp://x"}, "expected a string matching"),
        ({"destination_url": "unix:/x", "max_downtime_ms": 0}, "expected at least 1"),
        ({"destination_url": "unix:/x", "bandwidth_mib_s": "fast"}, "expected number"),
        ({"destination_url": "unix:/x", "other": 1}, "unknown field"),
        ({}, "destination_url"),
    ]:
        with pytest.raises(ApiError, match=needle):
            vmm.put_migration(body)
    status, value = Router(vmm).handle("PUT", "/migration", b'{"destination_url": 3}')
    assert status == 400 and "destination_url" in value["fault_message"]
    assert Router(vmm).handle("GET", "/migration", b"") == (200, {"state": "none"})


def test_smt_and_huge_pages_become_the_machine_topology_and_backing() -> None:
    from kvmkit.arch.x86_64.topology import Topology

    vmm = Vmm()
    try:
        vmm.put_machine_config({"vcpu_count": 4, "mem_size_mib": 64, "smt": True})
        vmm.set_command(["true"])
        config = vmm._machine_config()
        assert (config.vcpus, config.topology) == (4, Topology(cores=2, threads=2))
        assert config.cpu_topology.apic_ids() == [0, 1, 2, 3]
        vmm.patch_machine_config({"vcpu_count": 1})
        assert vmm._machine_config().topology == Topology()
        with pytest.raises(ApiError, match="1 or an even number"):
            vmm.patch_machine_config({"vcpu_count": 5})
        free = int(Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages").read_text())
        if free >= 32:
            vmm.patch_machine_config({"huge_pages": "2M"})
            assert vmm._machine_config().huge_pages == "2M"
        else:  # refused at once, saying how many are missing
            with pytest.raises(ApiError, match=f"the guest needs 32 huge pages of 2 MiB, {free}"):
                vmm.patch_machine_config({"huge_pages": "2M"})
    finally:
        vmm.close()


def test_config_file_devices_reach_the_machine_config(tmp_path: Path) -> None:
    """The config file's `entropy`, a drive's cache type, rate limiter and partuuid and an
    interface's MTU and limiters become the devices InstanceStart builds."""
    from kvmkit.devices.virtio.ratelimit import BucketConfig, RateLimiterConfig

    disk = tmp_path / "root.img"
    disk.write_bytes(bytes(1 << 20))
    limit = {"bandwidth": {"size": 4096, "refill_time": 100},
             "ops": {"size": 10, "refill_time": 1000, "one_time_burst": 5}}  # fmt: skip
    want = RateLimiterConfig(BucketConfig(4096, 100), BucketConfig(10, 1000, 5))
    vmm = Vmm()
    try:
        vmm.apply_config({
            "boot-source": {"kernel_image_path": str(disk), "boot_args": "console=ttyS0"},
            "drives": [{"drive_id": "root", "path_on_host": str(disk), "is_root_device": True,
                        "partuuid": "0badcafe-01", "cache_type": "Writeback",
                        "rate_limiter": limit}],
            "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap9", "mtu": 1400,
                                    "rx_rate_limiter": limit}],
            "entropy": {"rate_limiter": limit},
        })  # fmt: skip
        config = vmm._machine_config()
        assert config.rng and config.rng_rate_limiter == want
        (drive,) = config.drives
        assert (drive.root, drive.partuuid, drive.cache_type) == (True, "0badcafe-01",
                                                                  "Writeback")  # fmt: skip
        assert drive.rate_limiter == want
        (net,) = config.nets
        assert (net.mtu, net.rx_rate_limiter, net.tx_rate_limiter) == (1400, want, None)
        assert vmm.vm_config()["entropy"] == {"rate_limiter": limit}
    finally:
        vmm.close()


def test_config_file_mmds_config_names_the_serving_interfaces(tmp_path: Path) -> None:
    """The config file's `mmds-config` (after its interfaces) gives the named interface the
    MMDS store, not the other; `GET /vm/config` answers it with its defaults filled in."""
    kernel = tmp_path / "k"
    kernel.write_bytes(b"x")
    vmm = Vmm()
    try:
        vmm.mmds_size_limit = 64
        vmm.apply_config({
            "boot-source": {"kernel_image_path": str(kernel)},
            "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap8"},
                                   {"iface_id": "eth1", "host_dev_name": "tap9"}],
            "mmds-config": {"network_interfaces": ["eth1"], "ipv4_address": "169.254.170.2"},
        })  # fmt: skip
        eth0, eth1 = vmm._machine_config().nets
        assert eth0.mmds is None and eth1.mmds is vmm.res.mmds
        assert eth1.mmds.config is not None and eth1.mmds.config.ipv4_address == "169.254.170.2"
        assert vmm.vm_config()["mmds-config"] == {
            "version": "V1", "network_interfaces": ["eth1"], "ipv4_address": "169.254.170.2",
            "imds_compat": False}  # fmt: skip
        with pytest.raises(ApiError) as err:
            vmm.put_mmds({"k": "v" * 64})  # --mmds-size-limit 64
        assert err.value.status == 413
    finally:
        vmm.close()
