"""Property-based requests generated from kvmkit's own OpenAPI spec (schemathesis), valid
and invalid ones, against a real `kvmkit run --api-sock` process: no 5xx, no hang, every
answer matches the spec (status, content type, body schema), and the VMM keeps serving.

The VMM is never started here (no kernel in the generated boot sources exists), so snapshot
creation and logger/metrics paths cannot touch files outside the test's directory beyond
opening existing ones for append.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
from api_proc import VmmProcess
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


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmmProcess]:
    proc = VmmProcess(tmp_path_factory.mktemp("schema"))
    yield proc
    proc.close()


def _body(case: Any) -> Any:
    body = case.body
    if body is None or type(body).__name__ == "NotSet":
        return None
    return body


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_generated_requests(server: VmmProcess, case: Any) -> None:
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
