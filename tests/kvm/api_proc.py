"""A `kvmkit run --api-sock` process for the API tests, and requests to it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from kvmkit.api.client import request


class VmmProcess:
    def __init__(self, workdir: Path, *args: str, name: str = "api", entry: str = "run",
                 netns: str | None = None) -> None:  # fmt: skip
        self.sock = str(workdir / f"{name}.sock")
        self.out_path = workdir / f"{name}.out"
        self.err_path = workdir / f"{name}.err"
        env = dict(os.environ, KVMKIT_FORCE_RUN="1", KVMKIT_API_READ_TIMEOUT="2")
        if entry == "firecracker":
            argv = [sys.executable, "-m", "kvmkit.cli.firecracker", "--api-sock", self.sock]
        else:
            argv = [sys.executable, "-m", "kvmkit", "run", "--api-sock", self.sock]
        if netns is not None:  # the process (and the taps it opens) in that namespace
            argv = ["ip", "netns", "exec", netns, *argv]
        self.proc = subprocess.Popen(
            [*argv, *args], stdout=self.out_path.open("wb"), stderr=self.err_path.open("wb"),
            stdin=subprocess.DEVNULL, env=env, cwd=workdir, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while not os.path.exists(self.sock):
            assert self.proc.poll() is None, self.stderr()
            assert time.monotonic() < deadline, "the API socket did not appear"
            time.sleep(0.05)

    def __call__(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        return request(self.sock, method, path, body, timeout=30)

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, value = self(method, path, body)
        assert status in (200, 204), (method, path, status, value)
        return value

    def fault(self, method: str, path: str, body: Any = None, status: int = 400) -> str:
        got, value = self(method, path, body)
        assert got == status, (method, path, body, got, value)
        assert isinstance(value, dict) and set(value) == {"fault_message"}, value
        message: str = value["fault_message"]
        assert message
        return message

    def raw(self, data: bytes, *, read: bool = True, timeout: float = 10) -> bytes:
        """Send bytes on a fresh connection; return what comes back until it closes."""
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(self.sock)
        try:
            s.sendall(data)
            if not read:
                return b""
            chunks = []
            while True:
                try:
                    chunk = s.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
        finally:
            s.close()

    def output_size(self) -> int:
        return self.out_path.stat().st_size

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        # What it started and left (the VMM below `ip netns exec`, or below strace under
        # the seccomp measurement of docs/security.md): its own session, ended with it.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.returncode


def grows(vmm: VmmProcess, within: float = 10.0) -> bool:
    """True if the guest's console output grows within `within` seconds."""
    start = vmm.output_size()
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if vmm.output_size() > start:
            return True
        time.sleep(0.1)
    return False
