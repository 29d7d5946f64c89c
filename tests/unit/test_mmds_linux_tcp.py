"""The MMDS endpoint against the host's own Linux TCP/IP stack, no VM needed: a tap in a
network namespace this test creates plays the guest's NIC (what the kernel sends on it is
what a guest would send; what we write to it, the kernel receives), and busybox `wget`/`nc`
and `curl` in that namespace are the clients a guest runs. Needs root and /dev/net/tun.
The lane test (tests/hwvirt/test_mmds_linux.py) does the same through a real guest."""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from kvmkit.abi import tun
from kvmkit.devices.virtio.net import _ifreq, _set_up
from kvmkit.mmds.stack import MmdsStack
from kvmkit.mmds.store import Mmds, MmdsConfig
from kvmkit.testing.netns import in_netns, temp_netns

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/net/tun") or not shutil.which("busybox"),
    reason="needs root, /dev/net/tun and busybox",
)
TAP = "mmdsk0"
URL = "http://169.254.169.254"


class Wire:
    """The tap's fd on one side, the MMDS endpoint on the other, a thread between them."""

    def __init__(self, netns: str, stack: MmdsStack) -> None:
        self.stack = stack
        self.netns = netns

        def make() -> int:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
            fcntl.ioctl(fd, tun.TUNSETIFF, _ifreq(TAP, tun.IFF_TAP | tun.IFF_NO_PI))
            _set_up(TAP)
            return fd

        self.fd = in_netns(netns, make)
        self.ip("addr", "add", "172.16.0.2/24", "dev", TAP)
        self.ip("route", "add", "169.254.169.254", "dev", TAP)
        self.other = 0  # frames for the tap's other side (the kernel's IPv6 chatter)
        self._stop = os.eventfd(0)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.netns, *args], check=True, timeout=30)

    def _run(self) -> None:
        while True:
            ready, _, _ = select.select([self.fd, self._stop], [], [])
            if self._stop in ready:
                return
            try:
                frame = os.read(self.fd, 65536)
            except BlockingIOError:
                continue
            if not self.stack.intercept(frame):
                self.other += 1
            while (out := self.stack.next_frame()) is not None:
                os.write(self.fd, out)

    def run(self, *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], capture_output=True,
                              text=True, timeout=60)  # fmt: skip

    def close(self) -> None:
        os.eventfd_write(self._stop, 1)
        self._thread.join(10)
        os.close(self.fd)
        os.close(self._stop)


@pytest.fixture
def wire() -> Iterator[Wire]:
    m = Mmds(limit=200_000)
    m.config = MmdsConfig(["eth0"], "V2")
    m.put({"latest": {"meta-data": {"ami-id": "ami-1", "big": "b" * 100_000,
                                    "placement": {"zone": "z1"}}}})  # fmt: skip
    with temp_netns("kvmkit-mmds") as ns:
        w = Wire(ns, MmdsStack(m, "169.254.169.254"))
        try:
            yield w
        finally:
            w.close()


def test_linux_clients_through_the_endpoint(wire: Wire) -> None:
    bb = ["busybox", "wget", "-q", "-O", "-"]
    # V2 without a token: refused (busybox prints the status line).
    r = wire.run(*bb, f"{URL}/latest/meta-data/ami-id")
    assert r.returncode != 0 and "401" in r.stderr, r
    # The guest script's way to a token: busybox nc, stdin held open until the answer came.
    r = wire.run("sh", "-c", r"(printf 'PUT /latest/api/token HTTP/1.1\r\n"
                 r"X-metadata-token-ttl-seconds: 60\r\n\r\n'; sleep 2) | "
                 r"busybox nc 169.254.169.254 80 | tail -n 1")  # fmt: skip
    token = r.stdout.strip()
    assert r.returncode == 0 and len(token) > 20, r
    auth = f"X-metadata-token: {token}"
    r = wire.run(*bb, "--header", auth, f"{URL}/latest/meta-data/ami-id")
    assert (r.returncode, r.stdout) == (0, "ami-1"), r
    r = wire.run(*bb, "--header", auth, f"{URL}/latest/meta-data/")
    assert r.stdout.split("\n") == ["ami-id", "big", "placement/"], r
    # 100 KB through Linux's windows and MSS.
    r = wire.run(*bb, "--header", auth, f"{URL}/latest/meta-data/big")
    assert r.returncode == 0 and r.stdout == "b" * 100_000, (r.returncode, len(r.stdout))
    if shutil.which("curl"):
        r = wire.run("curl", "-s", "-X", "PUT", "-H", "X-metadata-token-ttl-seconds: 5",
                     f"{URL}/latest/api/token")  # fmt: skip
        r = wire.run("curl", "-s", "-H", f"X-metadata-token: {r.stdout}", "-H",
                     "Accept: application/json", f"{URL}/latest/meta-data/placement")  # fmt: skip
        assert (r.returncode, r.stdout) == (0, '{"zone":"z1"}'), r
    # Every connection was closed by both sides: nothing is left behind (the last FIN may
    # still be on its way through the wire thread).
    deadline = time.monotonic() + 5
    while wire.stack.conns and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not wire.stack.conns
