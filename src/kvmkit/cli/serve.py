"""`kvmkit serve --control SOCK`: a pre-started VMM factory for orchestrators that launch
many microVMs (issue 20, docs/api.md "kvmkit serve").

A fresh `kvmkit-firecracker` process spends most of its start-up in the Python interpreter
and in importing kvmkit (bench/startup.py measures it). `kvmkit serve` pays that once: it
imports the API server, the action layer and the VMM, then waits on a control socket. Each
request forks a ready VMM process that runs `kvmkit-firecracker` with the request's
arguments (its own API socket, id, logger, seccomp options, ...), exactly as if launched on
its own; the serve process keeps no state about it.

The control protocol: one connection per VMM; the client sends one line of JSON,
`{"args": ["--api-sock", "/tmp/vm1.sock", "--id", "vm1"]}`, optionally with three file
descriptors (SCM_RIGHTS: the VMM's stdin, stdout and stderr; /dev/null without them), and
reads one line back: `{"pid": N}` or `{"error": "..."}`. The VMM is then started; its API
socket serves moments later (poll it, as after starting Firecracker). `spawn()` below is that
client.

The serve process stays single-threaded (fork copies only the calling thread) and serves one
request at a time (a client has 5 s to send its line), lets the kernel reap its children and
never runs a VM itself. Each VMM is its own session (setsid): signals to the
serve process do not reach the VMMs.
"""

from __future__ import annotations

import argparse
import array
import fcntl
import json
import os
import signal
import socket
import sys
from typing import Any

from kvmkit.errors import UserError

MAX_REQUEST = 65536  # bytes of one request line
MAX_ARGS = 256


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="pre-started VMM factory: fork a ready kvmkit-firecracker per control request",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--control", required=True, metavar="SOCK",
                   help="control socket path (Unix); see docs/api.md")  # fmt: skip
    p.set_defaults(func=serve)


def _warm() -> None:
    """Import what a VMM needs before its socket serves and to boot: done once here."""
    import kvmkit.api.server
    import kvmkit.cli.api_run
    import kvmkit.cli.firecracker
    import kvmkit.vmm.machine  # noqa: F401


def serve(args: argparse.Namespace) -> int:
    from kvmkit.unixsock import remove_stale_socket

    _warm()
    path = str(args.control)
    remove_stale_socket(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
    except OSError as err:
        raise UserError(f"--control {path}: {err.strerror or err}") from None
    listener.listen(64)
    # Children are reaped by the kernel: the serve process never waits for a VMM.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    print(f"kvmkit serve: control on {path}", file=sys.stderr, flush=True)
    try:
        while True:
            conn, _ = listener.accept()
            with conn:
                _handle(conn, listener)
    except KeyboardInterrupt:
        return 0
    finally:
        listener.close()
        try:
            os.unlink(path)
        except OSError:
            pass


def _handle(conn: socket.socket, listener: socket.socket) -> None:
    conn.settimeout(5)
    fds: list[int] = []
    try:
        line, fds = _read_request(conn)
        argv = _parse(line)
    except (OSError, ValueError) as err:
        for fd in fds:
            os.close(fd)
        _answer(conn, {"error": str(err)})
        return
    pid = os.fork()
    if pid == 0:  # the VMM: never returns into the serve loop
        status = 1
        try:
            listener.close()
            conn.close()
            status = _child(argv, fds)
        finally:
            os._exit(status)
    for fd in fds:
        os.close(fd)
    _answer(conn, {"pid": pid})


def _read_request(conn: socket.socket) -> tuple[bytes, list[int]]:
    data = b""
    fds: list[int] = []
    anc_size = socket.CMSG_SPACE(3 * array.array("i").itemsize)
    try:
        while b"\n" not in data:
            chunk, ancdata, _flags, _addr = conn.recvmsg(4096, anc_size)
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(payload[: len(payload) - len(payload) % got.itemsize])
                    fds.extend(got)
            if not chunk:
                break
            data += chunk
            if len(data) > MAX_REQUEST:
                raise ValueError(f"request longer than {MAX_REQUEST} bytes")
        if fds and len(fds) != 3:
            raise ValueError("pass no file descriptors or three (stdin, stdout, stderr)")
    except BaseException:
        for fd in fds:  # nothing received stays open in the serve process
            os.close(fd)
        raise
    return data.split(b"\n", 1)[0], fds


def _parse(line: bytes) -> list[str]:
    try:
        request = json.loads(line)
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError(f"not a JSON request: {err}") from None
    args = request.get("args") if isinstance(request, dict) else None
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ValueError('the request must be {"args": [strings]}')
    if len(args) > MAX_ARGS:
        raise ValueError(f"more than {MAX_ARGS} arguments")
    return list(args)


def _answer(conn: socket.socket, value: dict[str, Any]) -> None:
    try:
        conn.sendall(json.dumps(value).encode() + b"\n")
    except OSError:
        pass


def _child(argv: list[str], fds: list[int]) -> int:
    """Become the VMM: own session, default signal dispositions, the given stdio."""
    os.setsid()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if fds:
        # Above 2 first, so that no received descriptor is overwritten before it is used.
        moved = [fcntl.fcntl(fd, fcntl.F_DUPFD, 3) for fd in fds]
        for fd in fds:
            os.close(fd)
        for target, fd in enumerate(moved):
            os.dup2(fd, target)
            os.close(fd)
    else:
        null = os.open(os.devnull, os.O_RDWR)
        for target in (0, 1, 2):
            os.dup2(null, target)
        os.close(null)
    from kvmkit.cli.firecracker import main

    try:
        return main(argv)
    except SystemExit as exc:  # argparse: a bad option (its message went to stderr)
        return exc.code if isinstance(exc.code, int) else 2
    finally:
        sys.stdout.flush()
        sys.stderr.flush()


def spawn(control: str, args: list[str], stdio: tuple[int, int, int] | None = None,
          timeout: float = 10.0) -> int:  # fmt: skip
    """Ask the `kvmkit serve` at `control` for a VMM running `kvmkit-firecracker args`;
    returns its pid (UserError with the serve process's reason otherwise)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(control)
        line = json.dumps({"args": args}).encode() + b"\n"
        if stdio is None:
            s.sendall(line)
        else:
            s.sendmsg([line], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", stdio))])
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            reply += chunk
    value = json.loads(reply or b"{}")
    if "pid" not in value:
        raise UserError(f"kvmkit serve: {value.get('error', 'no answer')}")
    return int(value["pid"])
