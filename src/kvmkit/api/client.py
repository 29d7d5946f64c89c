"""A small client of kvmkit's (or Firecracker's) API on a Unix socket, standard library only:
what `kvmkit ctl` and the tests use.

    status, body = request("/tmp/kvmkit.sock", "PATCH", "/vm", {"state": "Paused"})
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None = 60.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock


def request(
    sock_path: str, method: str, path: str, body: Any = None, *, timeout: float | None = 60.0
) -> tuple[int, Any]:
    """One request; returns (status, parsed JSON body or None)."""
    conn = UnixHTTPConnection(sock_path, timeout=timeout)
    try:
        headers = {"Accept": "application/json"}
        data = None
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        raw = resp.read()
        value = json.loads(raw) if raw else None
        return resp.status, value
    finally:
        conn.close()
