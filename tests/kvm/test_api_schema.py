"""Property-based requests generated from kvmkit's own OpenAPI spec (schemathesis), valid
and invalid ones, against real `kvmkit run --api-sock` processes: no 5xx, no hang, every
answer matches the spec (status, content type, body schema), and the VMM keeps serving.

Two runs: against a VMM waiting for configuration (no generated kernel path exists, so it is
never started by them), and against one running the tiny serial-loop kernel, where the
snapshot endpoints and PUT /migration are left out (generated paths and addresses could
name any file or socket on the host).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from api_proc import VmmProcess, grows
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.transport import Response
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from kvmkit.api.client import request
from kvmkit.api.schema import spec

schema = schemathesis.openapi.from_dict(spec())
# Against the running VM, generated snapshot paths could name any file on the host and a
# generated migration address any socket (PUT /migration would connect there).
running_schema = (
    schemathesis.openapi.from_dict(spec())
    .exclude(path_regex="^/snapshot/")
    .exclude(operation_id="migrate")
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmmProcess]:
    proc = VmmProcess(tmp_path_factory.mktemp("schema"))
    yield proc
    proc.close()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmmProcess]:
    from kvmkit.testing.pvh import serial_loop_kernel

    work = tmp_path_factory.mktemp("running")
    proc = VmmProcess(work)
    proc.ok("PUT", "/machine-config", {"vcpu_count": 1, "mem_size_mib": 64})
    proc.ok("PUT", "/boot-source", {"kernel_image_path": str(serial_loop_kernel(work / "k"))})
    proc.ok("PUT", "/actions", {"action_type": "InstanceStart"})
    yield proc
    assert grows(proc) or proc.ok("GET", "/")["state"] == "Paused"
    proc.close()


def _body(case: Any) -> Any:
    body = case.body
    if body is None or type(body).__name__ == "NotSet":
        return None
    return body


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests(server: VmmProcess, case: Any) -> None:
    check_case(server, case)


@running_schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests_running_vm(running: VmmProcess, case: Any) -> None:
    check_case(running, case)
    assert running.ok("GET", "/")["state"] in ("Running", "Paused")


def check_case(server: VmmProcess, case: Any) -> None:
    body = _body(case)
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    path = case.formatted_path
    status, value = request(server.sock, case.method, path, data, timeout=30)
    assert status < 500, (case.method, path, body, status, value)
    prepared = requests.Request(case.method, f"http://localhost{path}", data=data).prepare()
    raw = b"" if value is None else json.dumps(value).encode()
    headers = {"Content-Type": ["application/json"]} if value is not None else {}
    response = Response(status, headers, raw, prepared, 0.01, True)
    checks = [not_a_server_error, status_code_conformance, response_schema_conformance]
    if status != 204:  # 204 No Content has no body and so no media type
        checks.append(content_type_conformance)
    case.validate_response(response, checks=checks)
    assert server.alive()
