"""Network namespaces for tests that make taps (virtio-net): a namespace per test keeps the
taps, addresses and routes out of the host's own network. Needs root and iproute2's `ip`."""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000  # <linux/sched.h>


@contextlib.contextmanager
def temp_netns(prefix: str = "kvmkit") -> Iterator[str]:
    """A new named namespace (`ip netns add`), deleted with whatever is left in it."""
    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=30)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, timeout=30)


def in_netns(ns: str, fn: Callable[[], T], timeout: float = 120) -> T:
    """Run `fn` in a thread moved into namespace `ns` (namespaces are per thread): the taps
    and sockets it makes live there and can be used from any thread afterwards."""
    out: list[T] = []
    errors: list[BaseException] = []

    def body() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)
        try:
            out.append(fn())
        except BaseException as err:
            errors.append(err)

    t = threading.Thread(target=body)
    t.start()
    t.join(timeout)
    if errors:
        raise errors[0]
    if not out:
        raise TimeoutError(f"in_netns: no result within {timeout} s")
    return out[0]


def serve_http(ns: str, address: str, port: int, directory: Path) -> ThreadingHTTPServer:
    """A quiet HTTP server for `directory` on `address`:`port` in namespace `ns`, serving
    from a daemon thread; `shutdown()` and `server_close()` it when done."""

    class Quiet(SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(directory), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = in_netns(ns, lambda: ThreadingHTTPServer((address, port), Quiet))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
