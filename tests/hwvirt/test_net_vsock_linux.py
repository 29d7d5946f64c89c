"""virtio-net and virtio-vsock under the default Linux guest (needs VMX/SVM: runs in the lane,
which must load the `tun` module: `kvmkit lane --module tun`, as scripts/hwvirt_tests.py does).

net: a network namespace with a tap made by `kvmkit net setup` (10.0.77.1/24); kvmkit runs
in that namespace with `--net tap=...,mac=...` (over virtio-mmio and over virtio-pci); the
guest takes 10.0.77.2, pings the host, downloads a 4 MB file from a host HTTP server and
uploads a 3 MB one to it (POST): the bytes are checked both ways (md5).

vsock: a static AF_VSOCK program goes to the guest as a read-only drive. The host connects
through the Unix socket (`CONNECT 5000`) to the guest's echo server and checks 400 KB coming
back; the guest connects to host port 6000 (the Unix socket `<uds>_6000`), sends 400 KB and
reads 300 KB back. Both transfers are larger than the 256 KiB credit either side gives.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from vsock_probe import drive_image, fnv1a, pattern

from kvmkit.testing.netns import in_netns, temp_netns

pytestmark = pytest.mark.hwvirt

SIZE = 400_000  # vsock transfers: more than the 256 KiB credit either side gives


@pytest.fixture
def netns() -> Iterator[str]:
    if not os.path.exists("/dev/net/tun"):
        pytest.fail("no /dev/net/tun: run the lane with `--module tun`")
    with temp_netns() as name:
        yield name


def read_lines(
    proc: subprocess.Popen[bytes], until: str, lines: dict[str, str], deadline: float,
    on_line: Callable[[str, str], None] | None = None,
) -> None:  # fmt: skip
    assert proc.stdout is not None
    for raw in proc.stdout:
        key, _, value = raw.decode(errors="replace").strip().partition(" ")
        lines[key] = value
        if on_line is not None:
            on_line(key, value)
        if key == until or time.monotonic() > deadline:
            return


NET_SCRIPT = r"""
ip addr add 10.0.77.2/24 dev eth0; ip link set eth0 up
echo "MAC $(cat /sys/class/net/eth0/address)"
if ping -c 2 -W 10 10.0.77.1 >/dev/null; then echo PING ok; else echo PING fail; fi
timeout 120 wget -q -O /tmp/h.bin http://10.0.77.1:8000/h.bin
echo "WGET $? $(md5sum < /tmp/h.bin | cut -d' ' -f1) $(wc -c < /tmp/h.bin)"
# busybox wget posts its file as a C string: no NUL bytes in it
head -c 3000000 /dev/urandom | tr '\000' '\001' > /tmp/g.bin
echo "GUESTFILE $(md5sum < /tmp/g.bin | cut -d' ' -f1)"
timeout 120 wget -q -O /tmp/post.out --post-file /tmp/g.bin http://10.0.77.1:8000/upload
echo "POST $?"
echo "TCP $(grep Tcp: /proc/net/snmp | tail -1)"
"""


@pytest.mark.parametrize("transport", ["mmio", "pci"])
def test_net_tap_ping_and_tcp_both_ways(netns: str, tmp_path: Path, transport: str) -> None:
    setup = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-m", "kvmkit", "net", "setup", "ktap0",
         "--address", "10.0.77.1/24"],
        capture_output=True, text=True, timeout=300,  # a Python start in a loaded lane is slow
    )  # fmt: skip
    assert setup.returncode == 0, setup.stderr
    host_file = os.urandom(4_000_000)
    www = tmp_path / "www"
    www.mkdir()
    (www / "h.bin").write_bytes(host_file)
    uploaded: list[bytes] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        """GET serves h.bin; POST /upload keeps the body (what the guest sends)."""

        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(www), **kwargs)  # type: ignore[arg-type]

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            uploaded.append(self.rfile.read(length))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = in_netns(netns, lambda: http.server.ThreadingHTTPServer(("10.0.77.1", 8000), Handler))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        proc = subprocess.run(
            ["ip", "netns", "exec", netns, sys.executable, "-m", "kvmkit", "run", "--timeout",
             "500", "--virtio-transport", transport, "--net", "tap=ktap0,mac=02:00:00:00:77:02",
             "--", "sh", "-c", NET_SCRIPT],
            capture_output=True, timeout=560,
        )  # fmt: skip
        host_tcp = subprocess.run(["ip", "netns", "exec", netns, "grep", "Tcp:", "/proc/net/snmp"],
                                  capture_output=True, text=True).stdout  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    lines = {}
    for raw in proc.stdout.decode(errors="replace").splitlines():
        key, _, value = raw.strip().partition(" ")
        lines[key] = value
    why = (f"guest output {lines}, host {host_tcp}, "
           f"kvmkit stderr {proc.stderr.decode(errors='replace')[-3000:]}")  # fmt: skip
    assert proc.returncode == 0, why
    assert lines["MAC"] == "02:00:00:00:77:02", why
    assert lines["PING"] == "ok", why
    # host -> guest over TCP: the guest's md5 of what it downloaded
    assert lines["WGET"] == f"0 {hashlib.md5(host_file).hexdigest()} {len(host_file)}", why
    # guest -> host over TCP: the bytes the host received are the guest's file
    assert lines["POST"] == "0", why
    assert len(uploaded) == 1 and len(uploaded[0]) == 3_000_000, why
    assert hashlib.md5(uploaded[0]).hexdigest() == lines["GUESTFILE"], why


VSOCK_SCRIPT = r"""
dd if=/dev/vda of=/tmp/vp bs=4096 2>/dev/null; chmod +x /tmp/vp
/tmp/vp serve 5000 &
sleep 1
/tmp/vp send 6000 400000
wait
echo DONE
"""


def test_vsock_host_and_guest_initiated_streams(tmp_path: Path) -> None:
    drive = drive_image(tmp_path)
    uds = tmp_path / "v.sock"

    # Host port 6000: what the guest sends is kept, 300 KB of pattern go back.
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{uds}_6000")
    listener.listen(1)
    listener.settimeout(400)
    from_guest = bytearray()
    reply = pattern(300_000)

    def host_port_6000() -> None:
        conn, _ = listener.accept()
        conn.settimeout(120)
        while chunk := conn.recv(65536):
            from_guest.extend(chunk)
        conn.sendall(reply)
        conn.close()

    t6000 = threading.Thread(target=host_port_6000, daemon=True)
    t6000.start()

    echoed = bytearray()
    sent = pattern(SIZE)
    ok_line = b""

    def connect_5000() -> None:
        nonlocal ok_line
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(120)
        client.connect(str(uds))
        client.sendall(b"CONNECT 5000\n")
        while not ok_line.endswith(b"\n"):
            byte = client.recv(1)
            if not byte:
                break
            ok_line += byte
        writer = threading.Thread(
            target=lambda: (client.sendall(sent), client.shutdown(socket.SHUT_WR)), daemon=True
        )
        writer.start()
        while chunk := client.recv(65536):
            echoed.extend(chunk)
        writer.join(60)
        client.close()

    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmkit", "run", "--timeout", "500", "--drive", f"{drive},ro",
         "--vsock", f"cid=7,uds={uds}", "--", "sh", "-c", VSOCK_SCRIPT],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    lines: dict[str, str] = {}
    host_threads: list[threading.Thread] = []

    def on_line(key: str, value: str) -> None:
        if key == "LISTENING":
            t = threading.Thread(target=connect_5000, daemon=True)
            t.start()
            host_threads.append(t)

    try:
        read_lines(proc, "DONE", lines, time.monotonic() + 500, on_line)
        for t in host_threads:
            t.join(120)
        t6000.join(60)
        proc.wait(120)  # the guest's command ended: kvmkit powers off and cleans up
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=60)
        listener.close()
    why = f"guest output {lines}, kvmkit stderr {err.decode(errors='replace')[-3000:]}"
    assert "DONE" in lines, why
    # Host -> guest -> host through CONNECT: the guest echoed all of it.
    assert ok_line.startswith(b"OK ") and int(ok_line.split()[1]) >= 1 << 30
    assert lines["ECHOED"] == str(SIZE), why
    assert len(echoed) == SIZE and bytes(echoed) == sent
    # Guest -> host port 6000 (<uds>_6000) and back.
    assert len(from_guest) == SIZE and bytes(from_guest) == pattern(SIZE)
    assert lines["RECV"] == f"{len(reply)} {fnv1a(reply)}"
    assert not uds.exists()  # kvmkit removed its socket
