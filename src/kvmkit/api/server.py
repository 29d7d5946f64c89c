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
MAX_LINE = 65536  # bytes of a request or header line (http.server's limit, kept)
MAX_HEADERS = 100  # header fields of a request (http.server's _MAXHEADERS, kept)
REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
           403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
           413: "Content Too Large", 414: "URI Too Long",
           431: "Request Header Fields Too Large"}  # RFC 9110 §15, RFC 6585 §5
ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
MAX_ID = 64

# Firecracker endpoints kvmkit does not implement: named in the 400 they get.
NOT_IMPLEMENTED = ("/balloon/hinting", "/cpu-config", "/serial", "/hotplug", "/pmem")

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


class _Handler(socketserver.StreamRequestHandler):
    """HTTP/1.1 requests of one connection (RFC 9112): a request line, header fields, a
    Content-Length body; keep-alive unless the client says `Connection: close` or speaks
    HTTP/1.0. Written here rather than taken from http.server, whose imports (http.client,
    email, ssl and OpenSSL's libraries) cost the API ~20 ms and megabytes of RSS at start-up
    (bench/startup.py); its limits are kept (request and header lines of 64 KiB, 100 header
    fields) and every malformed request gets a JSON 4xx and the connection closed."""

    timeout = READ_TIMEOUT
    server: _UnixServer
    command = ""
    path = ""
    headers: dict[str, str]
    close_connection = True

    def handle(self) -> None:
        self.close_connection = False
        while not self.close_connection:
            self._handle_one()

    def _handle_one(self) -> None:
        self.close_connection = True  # until a request line and its header fields parse
        self.command = ""
        self.headers = {}
        try:
            line = self.rfile.readline(MAX_LINE + 1)
        except OSError:  # the read timeout, or the client reset the connection
            return
        if not line:
            return
        if len(line) > MAX_LINE:
            self._reply(414, {"fault_message": "Request line too long"})
            return
        words = line.decode("latin-1").rstrip("\r\n").split()
        if not words:
            return
        if len(words) != 3 or not words[2].startswith("HTTP/"):
            self._reply(400, {"fault_message": f"Bad request syntax {line[:80]!r}"})
            return
        method, target, version = words
        major, _, minor = version[5:].partition(".")
        if not (major.isdigit() and minor.isdigit() and len(major) < 4 and len(minor) < 4):
            self._reply(400, {"fault_message": f"Bad request version {version[:20]!r}"})
            return
        if (int(major), int(minor)) >= (2, 0):
            self._reply(400, {"fault_message": f"Unsupported HTTP version {version[:20]}"})
            return
        self.command = method
        self.path = "/" + target.lstrip("/") if target.startswith("//") else target
        if not self._read_headers():
            return
        connection = self.headers.get("connection", "").lower()
        self.close_connection = connection == "close" or (
            (int(major), int(minor)) < (1, 1) and connection != "keep-alive"
        )
        if self.headers.get("expect", "").lower() == "100-continue" and version != "HTTP/1.0":
            try:  # RFC 9110 §10.1.1: the client waits for this before sending its body
                self.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            except OSError:
                self.close_connection = True
                return
        self._dispatch()

    def _read_headers(self) -> bool:
        """The header fields into `self.headers` (names lowercased, a repeated field keeps
        its last value); False when the request ended or was refused."""
        for _ in range(MAX_HEADERS + 1):
            try:
                line = self.rfile.readline(MAX_LINE + 1)
            except OSError:
                return False
            if not line:
                return False
            if len(line) > MAX_LINE:
                self._reply(431, {"fault_message": "Header line too long"})
                return False
            if line in (b"\r\n", b"\n"):
                return True
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep or not name or name != name.strip():
                self._reply(400, {"fault_message": f"Invalid header line {line[:80]!r}"})
                return False
            self.headers[name.lower()] = value.strip(" \t\r\n")
        self._reply(431, {"fault_message": f"More than {MAX_HEADERS} header fields"})
        return False

    def _reply(self, status: int, value: Any) -> None:
        head = [f"HTTP/1.1 {status} {REASONS.get(status, '')}", "Server: kvmkit",
                "Date: " + time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())]  # fmt: skip
        data = b""
        if value is None:
            if status != 204:
                head.append("Content-Length: 0")
        else:
            data = json.dumps(value).encode()
            head += ["Content-Type: application/json", f"Content-Length: {len(data)}"]
        if self.close_connection:
            head.append("Connection: close")
        out = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")
        if self.command != "HEAD":
            out += data
        try:
            self.wfile.write(out)
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
        if self.headers.get("transfer-encoding"):
            self.close_connection = True
            self._reply(400, {"fault_message": "Transfer-Encoding is not supported; send "
                              "Content-Length"})  # fmt: skip
            return
        length_text = self.headers.get("content-length", "0").strip() or "0"
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
