"""kvmkit's OpenAPI spec, its validator and the action layer before boot (no /dev/kvm)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.api import ApiError, Vmm
from kvmkit.api.schema import SchemaError, spec, validate
from kvmkit.api.server import Router

ISSUE_ENDPOINTS = {
    ("get", "/"), ("get", "/version"), ("get", "/machine-config"), ("put", "/machine-config"),
    ("patch", "/machine-config"), ("put", "/boot-source"), ("put", "/drives/{drive_id}"),
    ("patch", "/drives/{drive_id}"), ("put", "/network-interfaces/{iface_id}"),
    ("patch", "/network-interfaces/{iface_id}"), ("put", "/vsock"), ("put", "/actions"),
    ("patch", "/vm"), ("put", "/snapshot/create"), ("put", "/snapshot/load"),
    ("put", "/logger"), ("put", "/metrics"), ("get", "/vm/config"),
    ("put", "/vfio-devices/{device_id}"),  # kvmkit extension (docs/vfio.md)
    ("get", "/migration"), ("put", "/migration"),  # kvmkit extension (issue 14)
}  # fmt: skip


def test_spec_lists_exactly_the_implemented_endpoints() -> None:
    doc = spec()
    assert doc["swagger"] == "2.0"
    got = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert got == ISSUE_ENDPOINTS
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
     ({"state": "Paused", "x": 1}, "Vm", "unknown field 'x'"),
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
        with pytest.raises(ApiError, match="'balloon'"):
            vmm.apply_config({"balloon": {}})
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
        ({"destination_url": "ftp://x"}, "does not match"),
        ({"destination_url": "unix:/x", "max_downtime_ms": 0}, "below the minimum"),
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
