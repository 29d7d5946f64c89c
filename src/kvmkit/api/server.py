"""HTTP/1.1 over a Unix socket (Firecracker's API transport), standard library only.

One thread per connection (at most MAX_CONNECTIONS at once; more are closed at accept),
keep-alive, a time limit on every read from a client (a slow or silent client is dropped, a
client that disconnects mid-request only ends its own thread), bodies up to MAX_BODY bytes
(Firecracker's default payload limit). Requests that change the VM are serialized by the
action layer. Every answer is JSON: 200 with a body, 204 on success without one, 4xx with
`{"fault_message": ...}`; an unexpected error becomes a 400 naming it (logged with its
traceback), never a 5xx.
"""

from __future__ import annotations

import contextlib
import errno
import http.server
import json
import logging
import os
import socketserver
import threading
import time
import urllib.parse
from typing import Any

from kvmkit.api.actions import ROUTES, ApiError, Route, Vmm
from kvmkit.threads import ThreadKind, start_thread
from kvmkit.unixsock import remove_stale_socket

log = logging.getLogger("kvmkit.api")

MAX_BODY = 51200  # Firecracker's default --http-api-max-payload-size
DISCARD_LIMIT = 1 << 20  # of an oversized body, bytes read and dropped after the 413
DISCARD_SECONDS = 2.0
# Seconds a client may take for each read of its request (tests shorten it).
READ_TIMEOUT = float(os.environ.get("KVMKIT_API_READ_TIMEOUT", "10"))
MAX_CONNECTIONS = 128
ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
MAX_ID = 64

# Firecracker endpoints kvmkit does not implement: named in the 400 they get.
NOT_IMPLEMENTED = ("/balloon", "/cpu-config", "/serial", "/hotplug", "/pmem")

Reply = tuple[int, Any]


def _parse_body(raw: bytes) -> Any:
    if not raw.strip():
        raise ApiError("The request body is empty; a JSON object is required.")

    def no_constants(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise ApiError(f"The request body is not valid JSON: {err}") from None


def _id(segment: str, what: str) -> str:
    """A drive_id/iface_id from the path (Firecracker: alphanumeric and '_')."""
    value = urllib.parse.unquote(segment)
    if not value or len(value) > MAX_ID or not set(value) <= ID_CHARS:
        raise ApiError(
            f"Invalid {what} {value[:80]!r}: 1 to {MAX_ID} characters, alphanumeric or '_'"
        )
    return value


class Router:
    """(method, path, body bytes) -> (status, JSON value or None), over a `Vmm`, through the
    action layer's table of routes (`kvmkit.api.actions.ROUTES`), which also names the
    request counters."""

    def __init__(self, vmm: Vmm) -> None:
        self.vmm = vmm

    def handle(self, method: str, target: str, body: bytes) -> Reply:
        path = urllib.parse.urlsplit(target).path or "/"
        if len(path) > 1:
            path = path.rstrip("/")
        r, segment = _match(method, path)
        try:
            if r is None:
                raise ApiError(_unknown(method, path))
            ident = _id(segment, r.id_field) if segment is not None and r.id_field else None
            value = self.vmm.request(
                r.method, r.path, None if r.reads else _parse_body(body), ident
            )
        except ApiError as err:
            self._count(method, r, fail=True)
            log.info("%s %s: %d %s", method, path, err.status, err.message)
            return err.status, {"fault_message": err.message}
        except Exception as err:  # never a 5xx: report what went wrong as bad input
            self._count(method, r, fail=True)
            log.exception("%s %s: unexpected error", method, path)
            return 400, {"fault_message": f"{method} {path} failed: {type(err).__name__}: {err}"}
        self._count(method, r)
        # Reads answer with a body; so does PUT /migration (its outcome); the rest: 204.
        status = 200 if r.reads or value is not None else 204
        log.info("%s %s: %d", method, path, status)
        return status, value if status == 200 else None

    def _count(self, method: str, r: Route | None, fail: bool = False) -> None:
        if r is None:
            return
        group = f"{method.lower()}_api_requests"
        values = self.vmm.metrics.values.get(group)
        if values is None:
            return
        if f"{r.metric}_count" in values:
            self.vmm.metrics.inc(group, f"{r.metric}_count")
        if fail and f"{r.metric}_fails" in values:
            self.vmm.metrics.inc(group, f"{r.metric}_fails")


def _match(method: str, path: str) -> tuple[Route | None, str | None]:
    """The route for `method path` (None if there is none) and the id segment of a
    per-device path."""
    for r in ROUTES:
        if r.method != method:
            continue
        if r.path == path:
            return r, None
        prefix = r.path.removesuffix("{id}")
        if prefix != r.path and path.startswith(prefix) and "/" not in path[len(prefix):]:
            return r, path[len(prefix):]
    return None, None


def _unknown(method: str, path: str) -> str:
    for prefix in NOT_IMPLEMENTED:
        if path == prefix or path.startswith(prefix + "/"):
            return f"kvmkit does not implement {method} {path}"
    return f"Invalid request method and/or path: {method} {path}"


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kvmkit"
    sys_version = ""
    timeout = READ_TIMEOUT
    server: _UnixServer

    def __getattr__(self, name: str) -> Any:
        if name.startswith("do_"):  # every method reaches the router (POST, DELETE...: 400)
            return self._dispatch
        raise AttributeError(name)

    def address_string(self) -> str:
        return "unix"

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("api: " + format, *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # Malformed request lines and headers (http.server's own checks): JSON too, with a
        # status line even when the request line could not be parsed (no HTTP/0.9 replies).
        self.close_connection = True
        self.request_version = "HTTP/1.1"
        self._reply(code if 400 <= code < 500 else 400, {"fault_message": message or "bad request"})

    def _reply(self, status: int, value: Any) -> None:
        try:
            self.send_response(status)
            if value is None:
                if status != 204:
                    self.send_header("Content-Length", "0")
                self.end_headers()
            else:
                data = json.dumps(value).encode()
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if self.close_connection:
                    self.send_header("Connection", "close")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def _discard(self, length: int) -> None:
        """Read and drop up to `length` bytes the client is still sending (for at most
        DISCARD_SECONDS), so that a client writing its whole body before it reads gets the
        answer already sent instead of a broken pipe."""
        deadline = time.monotonic() + DISCARD_SECONDS
        try:
            while length > 0 and time.monotonic() < deadline:
                self.connection.settimeout(max(0.05, deadline - time.monotonic()))
                chunk = self.connection.recv(min(length, 65536))
                if not chunk:
                    return
                length -= len(chunk)
        except OSError:
            return

    def _dispatch(self) -> None:
        if self.headers.get("Transfer-Encoding"):
            self.close_connection = True
            self._reply(400, {"fault_message": "Transfer-Encoding is not supported; send "
                              "Content-Length"})  # fmt: skip
            return
        length_text = self.headers.get("Content-Length", "0").strip() or "0"
        # ASCII digits only: str.isdigit() also takes "²" (headers are Latin-1), which int()
        # refuses (tests/fuzz/corpus/api_http/crash-*: the handler raised ValueError).
        if not (length_text.isascii() and length_text.isdigit()):
            self.close_connection = True
            self._reply(400, {"fault_message": f"Invalid Content-Length {length_text[:40]!r}"})
            return
        # int() refuses strings of more than 4300 digits; a length of more than 20 is
        # oversized anyway.
        digits = length_text.lstrip("0") or "0"
        length = int(digits) if len(digits) <= 20 else 1 << 64
        if length > MAX_BODY:
            self.close_connection = True
            self._reply(413, {"fault_message": f"Request payload with size {length} is larger "
                              f"than the limit of {MAX_BODY} allowed by server."})  # fmt: skip
            self._discard(min(length, DISCARD_LIMIT))
            return
        try:
            body = self.rfile.read(length) if length else b""
        except OSError:  # timeout or reset mid-body: drop the client
            self.close_connection = True
            return
        if len(body) < length:  # the client went away mid-body
            self.close_connection = True
            return
        with self.server.busy:
            status, value = self.server.router.handle(self.command, self.path, body)
            self._reply(status, value)


_SUN_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path), unix(7)


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = MAX_CONNECTIONS
    router: Router

    def __init__(self, path: str, router: Router) -> None:
        self.router = router
        self.active = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self.busy = _InFlight()
        super().__init__(path, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.active.acquire(blocking=False):
            self.shutdown_request(request)  # too many clients: drop this one
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self.active.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.active.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("api: connection ended with an error", exc_info=True)


class _InFlight:
    """Counts requests being handled, so that closing the server can let them answer (a
    PUT /migration answers just as the microVM ends, which ends the process)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._count = 0

    def __enter__(self) -> None:
        with self._cond:
            self._count += 1

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._count -= 1
            self._cond.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._count == 0, timeout)


class ApiServer:
    """Serve `vmm` on the Unix socket `path` from a background thread."""

    def __init__(self, vmm: Vmm, path: str) -> None:
        self.path = path
        remove_stale_socket(path)
        # Bind and listen under a temporary name, then rename it to `path`: the file appears
        # only once connections are accepted. Bound at `path` directly, a client that waits
        # for the file (as Firecracker's clients do) could connect between bind(2) and
        # listen(2) and get ECONNREFUSED (the soak, bench/soak.py, did under load), and so
        # could another VMM's stale-socket probe, which would then remove a live socket.
        # rename(2), not link(2): the seccomp filters allow it (src/kvmkit/seccomp); a file
        # created at `path` since the probe above is refused rather than replaced.
        # (A temporary name beyond sun_path's 108 bytes: bound at `path` directly.)
        head, tail = os.path.split(path)
        tmp = os.path.join(head, f".{tail}.{os.getpid()}.tmp")
        if len(os.fsencode(tmp)) >= _SUN_PATH_MAX:
            tmp = path
        try:
            self._server = _UnixServer(tmp, Router(vmm))
            if tmp != path:
                try:
                    if os.path.lexists(path):
                        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST))
                    os.rename(tmp, path)
                except OSError:
                    self._server.server_close()
                    raise
                finally:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
        except OSError as err:
            raise OSError(err.errno, f"cannot listen on {path}: {err.strerror}") from None
        # close() removes this socket file, not one somebody put at the path after ours
        # was deleted (docs/security.md: the API socket file deleted while the VMM runs).
        st = os.stat(path)
        self._sock_id = (st.st_dev, st.st_ino)
        self._thread: threading.Thread | None = None

    def start(self) -> ApiServer:
        # The listener is an `api` thread: under seccomp it loads the api filter first, and
        # the connection threads it starts inherit it.
        self._thread = start_thread(ThreadKind.API, "server", self._server.serve_forever, 0.2)
        return self

    def close(self, grace: float = 2.0) -> None:
        """Stop serving; requests already being handled get `grace` seconds to answer."""
        self._server.busy.wait_idle(grace)
        self._server.shutdown()
        self._server.server_close()
        with contextlib.suppress(OSError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._sock_id:
                os.unlink(self.path)
