"""Configure and boot the default Linux guest entirely through kvmkit's REST API (real HTTP
on a real Unix socket, `kvmkit run --api-sock` waiting for InstanceStart, as Firecracker
does), run a command in it through the image's console protocol (`kvmkit.nonce` and
`kvmkit.cmd` on the kernel command line) and check its output and exit status."""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmkit.api.client import request
from kvmkit.image.guest import default_image
from kvmkit.vmm.machine import BASE_CMDLINE

pytestmark = pytest.mark.hwvirt


def test_boot_default_guest_through_the_api(tmp_path: Path) -> None:
    image = default_image()
    sock = str(tmp_path / "api.sock")
    out = tmp_path / "console.out"
    err = tmp_path / "stderr.txt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmkit", "run", "--api-sock", sock],
        stdout=out.open("wb"), stderr=err.open("wb"), stdin=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            assert proc.poll() is None, err.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert request(sock, "GET", "/")[1]["state"] == "Not started"
        nonce = secrets.token_hex(8)
        command = ["sh", "-c", "echo hello from the api; nproc; exit 7"]
        cmd = base64.urlsafe_b64encode(json.dumps(command).encode()).decode().rstrip("=")
        boot_args = f"{BASE_CMDLINE} quiet kvmkit.nonce={nonce} kvmkit.cmd={cmd}"
        for method, path, body in [
            ("PUT", "/machine-config", {"vcpu_count": 2, "mem_size_mib": 256}),
            ("PUT", "/boot-source", {"kernel_image_path": str(image.kernel),
                                     "initrd_path": str(image.initrd),
                                     "boot_args": boot_args}),
            ("PUT", "/actions", {"action_type": "InstanceStart"}),
        ]:  # fmt: skip
            status, value = request(sock, method, path, body)
            assert status == 204, (path, status, value, err.read_text())
        status, info = request(sock, "GET", "/")
        assert (status, info["state"]) == (200, "Running")
        config = request(sock, "GET", "/vm/config")[1]
        assert config["boot-source"]["initrd_path"] == str(image.initrd)
        # The guest's init runs the command, reports its status and powers off; the
        # process ends with the VM (status 0: poweroff).
        returncode = proc.wait(600)
        console = out.read_bytes().decode(errors="replace")
        assert returncode == 0, (returncode, err.read_text(), console[-2000:])
        match = re.search(
            rf"KVMKIT-{nonce}-BEGIN\r?\n(.*)\r?\nKVMKIT-{nonce}-EXIT (\d+)", console, re.S
        )
        assert match, console[-2000:]
        output = match.group(1).replace("\r\n", "\n")
        assert output.strip().splitlines() == ["hello from the api", "2"], output
        assert match.group(2) == "7"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
