"""The host end of virtio-vsock as Firecracker has it: Unix sockets, no virtio here.

- A host program connects to the listening socket at `uds_path` and writes `CONNECT
  <port>\\n`; `on_connect(sock, port)` then hands the socket to the device, which asks the
  guest (REQUEST). When the guest accepts, `send_ok` tells the program `OK <hostport>\\n` and
  the socket carries the stream.
- A guest connecting to host port P gets a socket connected to `<uds_path>_P` (`connect`).

Bounded: at most MAX_PENDING_CLIENTS programs may be connected without having sent their
CONNECT line, whose length is capped; beyond, new ones are closed at once.
"""

from __future__ import annotations

import functools
import logging
import os
import selectors
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kvmkit.guestlog import GuestLog

log = logging.getLogger(__name__)

MAX_PENDING_CLIENTS = 64  # host clients that have not finished their CONNECT line
CONNECT_LINE_MAX = 32  # "CONNECT 4294967295\n" is 19 bytes

# watch(fd, events, callback) / unwatch(fd): the device's worker watches the host fds.
Watch = Callable[[int, int, Callable[[int], None]], None]
Unwatch = Callable[[int], None]


@dataclass(eq=False)
class _Client:
    """A host client of the listening socket that has not sent its CONNECT line yet."""

    sock: socket.socket
    line: bytearray = field(default_factory=bytearray)


class UdsHost:
    """The listening socket at `uds_path` and its not-yet-connected clients."""

    def __init__(self, uds_path: str | Path) -> None:
        self.uds_path = Path(uds_path)
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind(os.fspath(self.uds_path))
        st = os.stat(self.uds_path)
        self._uds_id = (st.st_dev, st.st_ino)  # close() removes this file, not a newer one
        self.listener.listen(16)
        self.listener.setblocking(False)
        self.clients: dict[int, _Client] = {}  # fd -> client
        self._watch: Watch | None = None
        self._unwatch: Unwatch | None = None
        self._on_connect: Callable[[socket.socket, int], None] | None = None
        self.glog = GuestLog(log)

    def start(self, watch: Watch, unwatch: Unwatch,
              on_connect: Callable[[socket.socket, int], None]) -> None:  # fmt: skip
        """Accept host programs (on the worker that `watch` runs callbacks on)."""
        self._watch, self._unwatch, self._on_connect = watch, unwatch, on_connect
        watch(self.listener.fileno(), selectors.EVENT_READ, self._accept)

    def stop(self) -> None:
        """Stop watching the listener and the pending clients (they stay open)."""
        if self._unwatch is None:
            return
        if self.listener.fileno() >= 0:
            self._unwatch(self.listener.fileno())
        for client in self.clients.values():
            self._unwatch(client.sock.fileno())

    def close_clients(self) -> None:
        self.stop()
        for client in self.clients.values():
            client.sock.close()
        self.clients.clear()

    def close(self) -> None:
        self.close_clients()
        if self.listener.fileno() >= 0:
            self.listener.close()
            # Only our own socket file: a process restoring a snapshot of this VM may have
            # put its own at the path already (it removes a stale one).
            try:
                st = os.stat(self.uds_path)
                if (st.st_dev, st.st_ino) == self._uds_id:
                    self.uds_path.unlink()
            except OSError:
                pass

    def reopen(self) -> bool:
        """Bind `uds_path` again after `close` (a live migration that failed after the
        hand-over: kvmkit.migration); False if the listener is open still. OSError when the
        path cannot be bound. `start` watches the new listener."""
        if self.listener.fileno() >= 0:
            return False
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            listener.bind(os.fspath(self.uds_path))
            listener.listen(16)
            st = os.stat(self.uds_path)
        except OSError:
            listener.close()
            raise
        listener.setblocking(False)
        self.listener, self._uds_id = listener, (st.st_dev, st.st_ino)
        return True

    def connect(self, port: int) -> socket.socket:
        """A non-blocking socket connected to `<uds_path>_<port>`; OSError when nothing
        listens there (ENOENT, ECONNREFUSED) or its backlog is full (EAGAIN)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        try:
            sock.connect(f"{self.uds_path}_{port}")
        except OSError:
            sock.close()
            raise
        return sock

    @staticmethod
    def send_ok(sock: socket.socket, host_port: int) -> bool:
        """Tell a host program its connection was accepted: `OK <hostport>\\n`. False if
        it went away (a fresh socket's send buffer takes the few bytes otherwise)."""
        line = f"OK {host_port}\n".encode()
        try:
            return sock.send(line) == len(line)
        except OSError:
            return False

    # -- callbacks on the worker
    def _accept(self, events: int) -> None:
        assert self._watch is not None
        while True:
            try:
                sock, _ = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as err:
                self.glog.warning("vsock %s: accept: %s", self.uds_path, err)
                return
            if len(self.clients) >= MAX_PENDING_CLIENTS:
                sock.close()
                continue
            sock.setblocking(False)
            client = _Client(sock)
            self.clients[sock.fileno()] = client
            self._watch(sock.fileno(), selectors.EVENT_READ,
                        functools.partial(self._client_line, client))  # fmt: skip

    def _client_line(self, client: _Client, events: int) -> None:
        """Read the host client's `CONNECT <port>\\n` (it may come in pieces). The line is
        peeked first so that data the client sent right after it stays in the socket."""
        try:
            peek = client.sock.recv(CONNECT_LINE_MAX - len(client.line), socket.MSG_PEEK)
            end = peek.find(b"\n")
            data = client.sock.recv(end + 1 if end >= 0 else len(peek))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        client.line += data
        if data and b"\n" not in client.line and len(client.line) < CONNECT_LINE_MAX:
            return
        assert self._unwatch is not None and self._on_connect is not None
        self._unwatch(client.sock.fileno())
        self.clients.pop(client.sock.fileno(), None)
        line, nl, _ = bytes(client.line).partition(b"\n")
        words = line.split()
        if nl and len(words) == 2 and words[0] == b"CONNECT" and words[1].isdigit():
            port = int(words[1])
            if 0 <= port <= 0xFFFFFFFF:
                self._on_connect(client.sock, port)  # the device takes the socket over
                return
        client.sock.close()
