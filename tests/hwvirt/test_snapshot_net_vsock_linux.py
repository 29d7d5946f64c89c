"""Snapshot and restore of a Linux guest with virtio-net and virtio-vsock (needs VMX/SVM: runs
in the lane, with the `tun` module as scripts/hwvirt_tests.py loads it).

One boot, in a network namespace with a tap made by `kvmkit net setup` (10.0.78.1/24). The
guest takes 10.0.78.2, pings the host and listens on vsock port 5000 (vsock_probe.c, handed
to it as a read-only drive: two connections one after the other on one listener). The host
connects through the Unix socket (`CONNECT 5000`) and gets a line echoed: that connection is
established when the VM, running in this process, is paused and snapshotted, and ends on the
host side when it is closed. `kvmkit restore` resumes the snapshot in a new process, in the
namespace:

- the guest saw the transport reset (Firecracker's behaviour, virtio 1.2 §5.10.6.6): its
  read on the connection from before fails with ECONNRESET;
- a new host `CONNECT 5000` reaches the same guest listener, from the next host port, and
  100 KB come back; the guest connects to host port 6000 (`<uds>_6000`) and data flows
  both ways;
- the guest pings the host and downloads a file from a host HTTP server in the namespace:
  the reopened tap carries frames both ways (rx resumed, md5 checked);
- the guest's command ends and its status is `kvmkit restore`'s; the socket file is gone.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from vsock_probe import drive_image, fnv1a, pattern

from kvmkit.devices.virtio.blk import DriveConfig
from kvmkit.devices.virtio.net import NetConfig
from kvmkit.devices.virtio.vsock import VsockConfig
from kvmkit.kvm.kick import install_kick_handler
from kvmkit.testing.netns import in_netns, serve_http, temp_netns
from kvmkit.vmm.config import MachineConfig
from kvmkit.vmm.machine import Machine
from kvmkit.vmm.snapshot import snapshot_machine

pytestmark = pytest.mark.hwvirt

TAP = "ksnap0"
SIZE = 100_000
REPLY = 50_000
SCRIPT = rf"""
dd if=/dev/vda of=/tmp/vp bs=4096 2>/dev/null; chmod +x /tmp/vp
ip addr add 10.0.78.2/24 dev eth0; ip link set eth0 up
if ping -c 1 -W 20 10.0.78.1 >/dev/null; then echo PING ok; else echo PING fail; fi
/tmp/vp serve 5000 2
if ping -c 2 -W 20 10.0.78.1 >/dev/null; then echo PING2 ok; else echo PING2 fail; fi
timeout 120 wget -q -O /tmp/h.bin http://10.0.78.1:8000/h.bin
echo "WGET $? $(md5sum < /tmp/h.bin | cut -d' ' -f1)"
/tmp/vp send 6000 {SIZE}
echo DONE
"""


class Lines:
    """The guest command's output lines as they come, from any thread."""

    def __init__(self) -> None:
        self.text = ""
        self._cond = threading.Condition()

    def feed(self, data: bytes) -> None:
        with self._cond:
            self.text += data.decode(errors="replace")
            self._cond.notify_all()

    def value(self, key: str) -> str | None:
        """The rest of the first whole line starting with `key`."""
        for line in self.text.split("\n")[:-1]:
            word, _, rest = line.strip().partition(" ")
            if word == key:
                return rest
        return None

    def wait(self, key: str, timeout: float) -> str:
        with self._cond:
            self._cond.wait_for(lambda: self.value(key) is not None, timeout)
            got = self.value(key)
        assert got is not None, f"no {key} line within {timeout} s; guest output:\n{self.text}"
        return got


def connect(uds: Path, port: int) -> tuple[socket.socket, int]:
    """A host CONNECT through the Unix socket; returns the stream and its host port."""
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(120)
    client.connect(str(uds))
    client.sendall(f"CONNECT {port}\n".encode())
    line = b""
    while not line.endswith(b"\n"):
        byte = client.recv(1)
        assert byte, f"EOF after {line!r}"
        line += byte
    word, host_port = line.split()
    assert word == b"OK", line
    return client, int(host_port)


def read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(65536):
        out += chunk
    return bytes(out)


def test_net_and_vsock_guest_restores_with_a_transport_reset(tmp_path: Path) -> None:
    drive = drive_image(tmp_path)
    uds = tmp_path / "v.sock"
    state, mem = tmp_path / "vm.state", tmp_path / "vm.mem"

    with temp_netns() as ns:
        setup = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "kvmkit", "net", "setup", TAP,
             "--address", "10.0.78.1/24"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert setup.returncode == 0, setup.stderr

        # -- boot, connect, snapshot (this process)
        out = Lines()
        cfg = MachineConfig(
            command=["sh", "-c", SCRIPT], drives=[DriveConfig(drive, read_only=True)],
            nets=[NetConfig(TAP, "02:00:00:00:78:02")], vsock=VsockConfig(7, uds),
        )  # fmt: skip
        with Machine(cfg, command_output=out.feed) as vm:
            install_kick_handler()  # from the main thread (signal.signal); build runs in
            in_netns(ns, vm.build)  # another, which opens the tap in the namespace
            vm.start()
            out.wait("LISTENING", 500)
            assert out.value("PING") == "ok", out.text
            old, old_port = connect(uds, 5000)
            old.sendall(b"before the snapshot\n")
            assert old.recv(64) == b"before the snapshot\n"
            t0 = time.monotonic()
            vm.pause()
            snapshot_machine(vm, state, mem)
            took = time.monotonic() - t0
        # The process that took it is done with its host side: the connection ends there,
        # the socket file is removed.
        assert read_all(old) == b""
        old.close()
        assert not uds.exists()
        print(f"snapshot {took:.2f} s; guest output before:\n{out.text}")

        # -- the guest's connection to host port 6000 after the restore
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(f"{uds}_6000")
        listener.listen(1)
        listener.settimeout(400)
        from_guest = bytearray()

        def host_port_6000() -> None:
            conn, _ = listener.accept()
            conn.settimeout(120)
            from_guest.extend(read_all(conn))
            conn.sendall(pattern(REPLY))
            conn.close()

        t6000 = threading.Thread(target=host_port_6000, daemon=True)
        t6000.start()

        # -- a host HTTP server in the namespace, for the guest after the restore
        host_file = os.urandom(200_000)
        www = tmp_path / "www"
        www.mkdir()
        (www / "h.bin").write_bytes(host_file)
        server = serve_http(ns, "10.0.78.1", 8000, www)

        # -- restore in a new process
        after = Lines()
        t0 = time.monotonic()
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "kvmkit", "restore",
             "--state", str(state), "--mem", str(mem), "--timeout", "400"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert proc.stdout is not None
        stdout = proc.stdout
        reader = threading.Thread(
            target=lambda: [after.feed(chunk) for chunk in iter(lambda: stdout.read1(4096), b"")],
            daemon=True,
        )
        reader.start()
        echoed = b""
        try:
            deadline = time.monotonic() + 120
            while not uds.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            print(f"restored socket after {time.monotonic() - t0:.2f} s")
            # The guest saw the transport reset: the connection from before is gone.
            connerr = after.wait("CONNERR", 300)
            client, new_port = connect(uds, 5000)  # the same listener, a new connection
            writer = threading.Thread(
                target=lambda: (client.sendall(pattern(SIZE)), client.shutdown(socket.SHUT_WR)),
                daemon=True,
            )
            writer.start()
            echoed = read_all(client)
            writer.join(60)
            client.close()
            after.wait("DONE", 300)
            status = proc.wait(120)
            t6000.join(60)
        finally:
            proc.kill()
            proc.wait(60)
            reader.join(10)
            listener.close()
            server.shutdown()
            server.server_close()
            assert proc.stderr is not None
            err = proc.stderr.read().decode(errors="replace")
        why = f"guest output after the restore:\n{after.text}\nkvmkit restore: {err[-3000:]}"
        print(why)
        assert connerr.startswith("Connection reset by peer after 20"), why
        assert new_port == old_port + 1, why
        assert after.value("ECHOED") == str(SIZE), why
        assert echoed == pattern(SIZE)
        assert after.value("PING2") == "ok", why
        assert after.value("WGET") == f"0 {hashlib.md5(host_file).hexdigest()}", why
        assert bytes(from_guest) == pattern(SIZE), why
        assert after.value("RECV") == f"{REPLY} {fnv1a(pattern(REPLY))}", why
        assert status == 0, why
        assert not uds.exists()  # the restoring process removed its socket at exit
