"""The HTTP/1.1 subset the guest speaks to the MMDS, and the answers.

Requests (RFC 9112 §2-§6, the part MMDS needs): a request line, header fields, an optional
`Content-Length` body; no chunked bodies (501), at most MAX_REQUEST bytes in all (the
endpoint resets a connection whose request does not fit). The target may be origin form
(`/latest/meta-data`) or absolute form (`http://169.254.169.254/latest`); a query is
dropped.

Answers follow Firecracker (src/vmm/src/mmds/mod.rs, docs/mmds/mmds-user-guide.md): GET
and PUT only (405 with `Allow: GET, PUT`); `PUT /latest/api/token` with
`X-metadata-token-ttl-seconds` (or `X-aws-ec2-metadata-token-ttl-seconds`) of 1..21600
answers a token as text, and is refused with an `X-Forwarded-For` header; with V2 a GET
needs a valid `X-metadata-token` (or `X-aws-ec2-metadata-token`: 401 without one), with V1
it is served whatever token it carries. Values come as JSON with `Accept:
application/json` (unless `imds_compat`), as IMDS text otherwise. Every answer closes the
connection (`Connection: close`): one request per connection keeps the endpoint's state
to one request and one answer.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvmkit.mmds.store import MAX_TTL, MIN_TTL, Mmds, NotFound, UnsupportedType

MAX_REQUEST = 4096  # bytes of head and body; wget's and curl's requests are ~150
MAX_FIELDS = 64
TOKEN_PATH = "/latest/api/token"
TOKEN_HEADERS = ("x-metadata-token", "x-aws-ec2-metadata-token")
TTL_HEADERS = ("x-metadata-token-ttl-seconds", "x-aws-ec2-metadata-token-ttl-seconds")
REASONS = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    501: "Not Implemented",
}
NO_TOKEN = (
    "No MMDS token provided. Use `X-metadata-token` or `X-aws-ec2-metadata-token` "
    "header to specify the session token."
)
BAD_TOKEN = "MMDS token not valid."
NO_TTL = (
    "Token time to live value not found. Use `X-metadata-token-ttl-seconds` or "
    "`X-aws-ec2-metadata-token-ttl-seconds` header to specify the token's lifetime."
)
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class HttpError(Exception):
    """A request that cannot be parsed: answered with `status` and `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class TooLarge(Exception):
    """No complete request within MAX_REQUEST bytes: the connection is reset."""


@dataclass
class Request:
    method: str
    path: str
    version: str
    headers: dict[str, str]  # names lowercased; a repeated field: its last value


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain"
    allow: str | None = None

    def encode(self, version: str = "HTTP/1.1") -> bytes:
        head = [
            f"{version} {self.status} {REASONS.get(self.status, '')}",
            "Server: kvmkit",
            "Connection: close",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
        ]
        if self.allow is not None:
            head.append(f"Allow: {self.allow}")
        return ("\r\n".join(head) + "\r\n\r\n").encode() + self.body


def parse(buf: bytes | bytearray) -> tuple[Request, int] | None:
    """The first request in `buf` and the bytes it took, or None when more must come.
    HttpError for a malformed one; TooLarge when none ends within MAX_REQUEST bytes."""
    end = bytes(buf[:MAX_REQUEST]).find(b"\r\n\r\n")
    if end < 0:
        if len(buf) >= MAX_REQUEST:
            raise TooLarge
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0] or not set(parts[0].encode()) <= _TCHAR:
        raise HttpError(400, "Invalid request line.")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise HttpError(400, f"Unsupported HTTP version: {version[:16]}.")
    if len(lines) - 1 > MAX_FIELDS:
        raise HttpError(400, "Too many header fields.")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or not set(name.encode("latin-1")) <= _TCHAR:
            raise HttpError(400, "Invalid header.")
        headers[name.lower()] = value.strip(" \t")
    if "transfer-encoding" in headers:
        raise HttpError(501, "Transfer-Encoding is not supported.")
    length_text = headers.get("content-length", "0")
    if not (length_text.isascii() and length_text.isdigit()):
        raise HttpError(400, "Invalid Content-Length.")
    total = end + 4 + int(length_text)
    if total > MAX_REQUEST:
        raise TooLarge
    if len(buf) < total:
        return None
    return Request(method, _path(target), version, headers), total


def _path(target: str) -> str:
    """The path of a request target (origin or absolute form), without its query."""
    if target.lower().startswith("http://"):
        rest = target[7:]
        slash = rest.find("/")
        target = "" if slash < 0 else rest[slash:]
    return target.split("?", 1)[0].split("#", 1)[0]


def respond(mmds: Mmds, req: Request) -> Response:
    if not req.path:
        return Response(400, b"Invalid URI.")
    if req.method == "PUT":
        return _put(mmds, req)
    if req.method != "GET":
        return Response(405, b"Not allowed HTTP method.", allow="GET, PUT")
    if mmds.version == "V2":
        token = next((req.headers[h] for h in TOKEN_HEADERS if h in req.headers), None)
        if token is None:
            return Response(401, NO_TOKEN.encode())
        if not mmds.token_valid(token):
            return Response(401, BAD_TOKEN.encode())
    as_json = not mmds.imds_compat and "application/json" in req.headers.get("accept", "").lower()
    try:
        body = mmds.lookup(req.path, as_json)
    except NotFound:
        return Response(404, f"Resource not found: {req.path}.".encode())
    except UnsupportedType as err:
        return Response(501, str(err).encode())
    return Response(200, body.encode(), "application/json" if as_json else "text/plain")


def _put(mmds: Mmds, req: Request) -> Response:
    if "x-forwarded-for" in req.headers:
        return Response(
            400, b"Invalid header. Reason: Unsupported header name. Key: X-Forwarded-For"
        )
    path = req.path
    while "//" in path:
        path = path.replace("//", "/")
    if path != TOKEN_PATH:
        return Response(404, f"Resource not found: {req.path}.".encode())
    name = next((h for h in TTL_HEADERS if h in req.headers), None)
    if name is None:
        return Response(400, NO_TTL.encode())
    text = req.headers[name]
    if not (text.isascii() and text.isdigit()) or len(text) > 10:
        return Response(
            400, f"Invalid header. Reason: Invalid value. Key:{name}; Value:{text[:64]}".encode()
        )
    ttl = int(text)
    if not MIN_TTL <= ttl <= MAX_TTL:
        return Response(
            400,
            f"Invalid time to live value provided for token: {ttl}. Please "
            f"provide a value between {MIN_TTL} and {MAX_TTL}.".encode(),
        )
    return Response(200, mmds.new_token(ttl).encode())
