"""The API server's HTTP/1.1 request reader (kvmkit.api.server, docs/api.md "Transport"),
over a real Unix socket with an in-process action layer: keep-alive, HTTP/1.0, Expect:
100-continue, and the limits it enforces on request lines and header fields."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmkit.api.actions import Vmm
from kvmkit.api.server import MAX_HEADERS, MAX_LINE, ApiServer


@pytest.fixture
def sock(tmp_path: Path) -> Iterator[str]:
    path = str(tmp_path / "api.sock")
    server = ApiServer(Vmm(), path).start()
    yield path
    server.close()


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def read_reply(s: socket.socket) -> tuple[bytes, dict[str, str], bytes]:
    """One response: status line, headers (lowercased names), body (Content-Length)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        assert chunk, buf
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        body += s.recv(4096)
    return lines[0].encode(), headers, body


def closed(s: socket.socket) -> bool:
    return s.recv(1) == b""


def test_keep_alive_serves_several_requests_on_one_connection(sock: str) -> None:
    with connect(sock) as s:
        for _ in range(3):
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, body = read_reply(s)
            assert status == b"HTTP/1.1 200 OK" and headers["server"] == "kvmkit"
            assert headers["content-type"] == "application/json"
            assert json.loads(body)["state"] == "Not started"
        s.sendall(b"GET /machine-config HTTP/1.1\r\nConnection: close\r\n\r\n")
        status, headers, body = read_reply(s)
        assert status.startswith(b"HTTP/1.1 200") and headers["connection"] == "close"
        assert closed(s)


def test_http_1_0_closes_after_the_answer(sock: str) -> None:
    with connect(sock) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        status, _, _ = read_reply(s)
        assert status.startswith(b"HTTP/1.1 200") and closed(s)


def test_expect_100_continue_gets_its_interim_answer_before_the_body(sock: str) -> None:
    body = b'{"vcpu_count": 2, "mem_size_mib": 64}'
    with connect(sock) as s:
        s.sendall(b"PUT /machine-config HTTP/1.1\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body))  # fmt: skip
        assert s.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(body)
        status, _, _ = read_reply(s)
        assert status == b"HTTP/1.1 204 No Content"
        s.sendall(b"GET /machine-config HTTP/1.1\r\n\r\n")
        _, _, answer = read_reply(s)
        assert json.loads(answer)["vcpu_count"] == 2


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /" + b"a" * MAX_LINE + b" HTTP/1.1\r\n\r\n", b"414"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_LINE + b"\r\n\r\n", b"431"),
        (b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * (MAX_HEADERS + 1) + b"\r\n", b"431"),
        (b"GET / HTTP/1.1\r\nNoColon\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\n Folded: x\r\n\r\n", b"400"),
        (b"GET / HTTP/2.0\r\n\r\n", b"400"),
        (b"GET / HTTP/x.y\r\n\r\n", b"400"),
        (b"GET /\r\n\r\n", b"400"),
        (b"GET / FTP/1.1\r\n\r\n", b"400"),
    ],
)
def test_malformed_requests_get_json_4xx_and_the_connection_closes(
    sock: str, request_bytes: bytes, status: bytes
) -> None:
    with connect(sock) as s:
        s.sendall(request_bytes)
        line, headers, body = read_reply(s)
        assert line.split()[1] == status, line
        assert headers["connection"] == "close" and json.loads(body)["fault_message"]
        assert closed(s)


def test_the_largest_allowed_header_count_is_served(sock: str) -> None:
    with connect(sock) as s:
        s.sendall(b"GET / HTTP/1.1\r\n" + b"X-A: b\r\n" * MAX_HEADERS + b"\r\n")
        status, _, _ = read_reply(s)
        assert status.startswith(b"HTTP/1.1 200")
