"""Fuzz target: the REST server's HTTP/1.1 framing over a Unix socket
(kvmkit.api.server._Handler: request lines, headers, Content-Length and Transfer-Encoding,
keep-alive, oversized bodies) with the routes and action layer behind it (api_common).
The input is what a client writes on one connection; the connection's handler must
answer and return, and nothing but an answer may come out of it."""

from __future__ import annotations

import socket
import types

from api_common import FuzzVmm

from kvmkit.api import server


def TestOneInput(data: bytes) -> None:
    vmm = FuzzVmm()
    fake_server = types.SimpleNamespace(router=server.Router(vmm), busy=server._InFlight())
    client, conn = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        for sock in (client, conn):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        client.sendall(data)
        client.shutdown(socket.SHUT_WR)
        # What the server's connection thread runs: the handler reads requests until the
        # client's end of file, answering each.
        server._Handler(conn, "unix", fake_server)
    finally:
        conn.close()
        client.close()
        vmm.close()
