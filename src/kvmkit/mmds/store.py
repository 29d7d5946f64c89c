"""The MMDS data store, its configuration and its session tokens.

Firecracker's rules (docs/mmds/mmds-user-guide.md, src/vmm/src/mmds/data_store.rs):
- `PUT /mmds` replaces the store, `PATCH /mmds` applies a JSON Merge Patch (RFC 7396) and
  is refused before the first PUT; either is refused (API status 413) when the store,
  serialized compactly, would be larger than the limit (`--mmds-size-limit`, by default the
  API's payload limit), and then the store is left as it was.
- The guest reads a value by its JSON Pointer (RFC 6901), which is the request's path; the
  answer is JSON (`Accept: application/json`) or IMDS text: a string as it is, an object
  as its keys one a line, with '/' after those whose value is an object; other types have
  no IMDS form (501).
- V2 session tokens: `PUT /latest/api/token` with a lifetime of 1..21600 s gives a token
  that GET requests must carry until it expires. kvmkit's token is the expiry time and an
  HMAC-SHA256 of it under a key drawn at random for this store: nothing is kept per token,
  so a guest asking for many tokens costs no memory.

One `Mmds` is shared by the API threads and every virtio-net device that serves it; its
lock makes each update whole (a guest reads the old store or the new one, never a mix).
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

DEFAULT_LIMIT = 51200  # Firecracker's default (its API payload limit)
DEFAULT_IPV4 = "169.254.169.254"
MIN_TTL, MAX_TTL = 1, 21600  # the guide: "not lower than 1 or greater than 21600 (6 hours)"
MAX_TOKEN_CHARS = 128  # a token header longer than any kvmkit issues is not decoded
_EXPIRY = struct.Struct("<Q")  # ms on this store's monotonic clock


class MmdsError(ValueError):
    """A store update the API refuses: `status` 400, or 413 when over the limit."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class NotFound(LookupError):
    """No value at that path."""


class UnsupportedType(ValueError):
    """The value has no IMDS text form (a number, a boolean, an array, null)."""


def compact_size(value: Any) -> int:
    """Bytes of `value` serialized as Firecracker measures it (serde_json::to_vec: compact,
    UTF-8)."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 §2: the patched value (target is not changed)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def check_ipv4(text: str) -> str:
    """The MMDS address: link-local 169.254.[1-254].[0-255] (the pattern of Firecracker's
    API spec, MmdsConfig.ipv4_address), else ValueError in Firecracker's words."""
    try:
        addr = ipaddress.IPv4Address(text)
    except ValueError:
        raise ValueError("The MMDS IPv4 address is not link local.") from None
    raw = addr.packed
    if raw[:2] != b"\xa9\xfe" or not 1 <= raw[2] <= 254:
        raise ValueError("The MMDS IPv4 address is not link local.")
    return str(addr)


@dataclass
class MmdsConfig:
    """`PUT /mmds/config`, checked: the version, the address and the interfaces."""

    network_interfaces: list[str]
    version: str = "V1"
    ipv4_address: str = DEFAULT_IPV4
    imds_compat: bool = False

    def to_api(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "network_interfaces": list(self.network_interfaces),
            "ipv4_address": self.ipv4_address,
            "imds_compat": self.imds_compat,
        }


@dataclass
class Mmds:
    """The data store, the configuration in force and the token key."""

    limit: int = DEFAULT_LIMIT
    config: MmdsConfig | None = None
    _data: Any = None
    _initialized: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _key: bytes = field(default_factory=lambda: os.urandom(32))

    # -- the host side (the API)
    def put(self, value: Any) -> None:
        if compact_size(value) > self.limit:
            raise MmdsError("MMDS limit exceeded error: The MMDS patch request doesn't fit.", 413)
        with self._lock:
            self._data = copy.deepcopy(value)
            self._initialized = True

    def patch(self, value: Any) -> None:
        with self._lock:
            if not self._initialized:
                raise MmdsError("MMDS error: The MMDS data store is not initialized.")
            patched = merge_patch(self._data, value)
            if compact_size(patched) > self.limit:
                raise MmdsError(
                    "MMDS limit exceeded error: The MMDS patch request doesn't fit.", 413
                )
            self._data = patched

    def get(self) -> Any:
        """The whole store for `GET /mmds` (`{}` before the first PUT, as Firecracker)."""
        with self._lock:
            return {} if self._data is None else copy.deepcopy(self._data)

    @property
    def version(self) -> str:
        return "V1" if self.config is None else self.config.version

    @property
    def imds_compat(self) -> bool:
        return self.config is not None and self.config.imds_compat

    # -- the guest side
    def lookup(self, path: str, as_json: bool) -> str:
        """The value at `path` (a request path: '//' folded to '/', a trailing '/'
        ignored, each segment a JSON Pointer reference token) as JSON or IMDS text."""
        while "//" in path:
            path = path.replace("//", "/")
        if path.endswith("/"):
            path = path[:-1]
        with self._lock:
            node = self._data
            if node is None:
                raise NotFound(path)
            if path:
                for token in path[1:].split("/") if path.startswith("/") else [None]:
                    node = _step(node, token)
            if as_json:
                return json.dumps(node, separators=(",", ":"), ensure_ascii=False)
            return _imds(node)

    def new_token(self, ttl: int) -> str:
        # Imported here, not at the top: hashlib maps OpenSSL's libcrypto, RSS and start-up
        # time that a VMM without MMDS tokens does not need (bench/startup.py).
        import base64
        import hashlib
        import hmac

        expiry = int(time.monotonic() * 1000) + ttl * 1000
        raw = _EXPIRY.pack(expiry)
        mac = hmac.new(self._key, raw, hashlib.sha256).digest()
        return base64.urlsafe_b64encode(raw + mac).decode()

    def token_valid(self, token: str) -> bool:
        import base64
        import hashlib
        import hmac

        if len(token) > MAX_TOKEN_CHARS:
            return False
        try:
            raw = base64.urlsafe_b64decode(token.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            return False
        if len(raw) != _EXPIRY.size + hashlib.sha256().digest_size:
            return False
        mac = hmac.new(self._key, raw[: _EXPIRY.size], hashlib.sha256).digest()
        if not hmac.compare_digest(mac, raw[_EXPIRY.size :]):
            return False
        (expiry,) = _EXPIRY.unpack_from(raw)
        return bool(time.monotonic() * 1000 < expiry)


def _step(node: Any, token: str | None) -> Any:
    """One JSON Pointer step (RFC 6901 §4: '~1' is '/', '~0' is '~'; an array index is
    digits without a leading zero)."""
    if token is None:  # a path that does not start with '/' is no pointer
        raise NotFound("")
    key = token.replace("~1", "/").replace("~0", "~")
    if isinstance(node, dict):
        if key not in node:
            raise NotFound(key)
        return node[key]
    if isinstance(node, list):
        if (
            not (key.isascii() and key.isdigit())
            or (len(key) > 1 and key[0] == "0")
            or int(key) >= len(node)
        ):
            raise NotFound(key)
        return node[int(key)]
    raise NotFound(key)


def _imds(node: Any) -> str:
    if isinstance(node, str):
        return node
    if isinstance(node, dict):
        return "\n".join(k + "/" if isinstance(v, dict) else k for k, v in node.items())
    raise UnsupportedType("Cannot retrieve value. The value has an unsupported type.")
