"""virtio-mmio devices under the default Linux guest (needs VMX/SVM: runs in the lane here).

One boot checks several things: two virtio-blk drives appear (found from the ACPI DSDT), the
read-only one is read-only in the guest and refuses writes, its serial (GET_ID) shows, data
the guest wrote and fsync'ed to the other survives a SIGKILL of the VMM right after the guest
reported the sync, a discard punches a hole in the image, and /dev/hwrng (virtio-rng) yields data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.hwvirt

PATTERN = b"kvmkit-virtio-blk-survives-sigkill\n"
RO_CONTENT = b"read-only drive contents\n"

GUEST_SCRIPT = r"""
echo "BLOCKS $(ls /sys/block | grep vd | tr '\n' ' ')"
echo "RO $(cat /sys/block/vdb/ro)"
echo "SERIAL $(cat /sys/block/vdb/serial)"
echo "RODATA $(head -c 24 /dev/vdb)"
if dd if=/dev/zero of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null; then
    echo ROWRITE ok; else echo ROWRITE refused; fi
echo "RNG $(head -c 4096 /dev/hwrng | wc -c) $(cat /sys/class/misc/hw_random/rng_current)"
blkdiscard -o 1048576 -l 65536 /dev/vda; echo "DISCARD $?"
printf 'kvmkit-virtio-blk-survives-sigkill\n' | dd of=/dev/vda bs=512 seek=8 conv=fsync 2>/dev/null
echo "SYNCED $?"
sleep 600
"""


def test_blk_two_drives_readonly_flush_survives_kill_and_rng(tmp_path: Path) -> None:
    rw = tmp_path / "rw.img"
    rw.write_bytes(b"\xff" * (2 << 20))
    ro = tmp_path / "ro.img"
    ro.write_bytes(RO_CONTENT.ljust(1 << 20, b"\0"))
    ro.chmod(0o444)

    proc = subprocess.Popen(
        [
            sys.executable, "-m", "kvmkit", "run", "--timeout", "500", "--rng",
            "--drive", str(rw), "--drive", f"{ro},ro,serial=kvmkit-ro-1",
            "--", "sh", "-c", GUEST_SCRIPT,
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    lines: dict[str, str] = {}
    assert proc.stdout is not None
    deadline = time.monotonic() + 550
    try:
        for raw in proc.stdout:
            key, _, value = raw.decode(errors="replace").strip().partition(" ")
            lines[key] = value
            if key == "SYNCED" or time.monotonic() > deadline:
                break
        # The guest reported the sync: kill the VMM before it can flush anything itself.
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=60)
    assert "SYNCED" in lines, f"guest output {lines}, stderr {err.decode(errors='replace')}"
    assert lines["SYNCED"] == "0"
    assert lines["BLOCKS"].split() == ["vda", "vdb"]
    assert lines["RO"] == "1"
    assert lines["SERIAL"] == "kvmkit-ro-1"
    assert lines["RODATA"] == RO_CONTENT.decode().strip()
    assert lines["ROWRITE"] == "refused"
    assert lines["DISCARD"] == "0"
    assert lines["RNG"].split()[0] == "4096"
    assert lines["RNG"].split()[1].startswith("virtio_rng")
    # The data the guest fsync'ed (FLUSH -> fdatasync) is in the image after the kill.
    assert rw.read_bytes()[8 * 512 : 8 * 512 + len(PATTERN)] == PATTERN
    assert ro.read_bytes().startswith(RO_CONTENT)
    # The discarded range is a hole in the image now (reads as zeros); the rest is intact.
    image = rw.read_bytes()
    assert image[1 << 20 : (1 << 20) + 65536] == bytes(65536)
    assert image[(1 << 20) + 65536 :] == b"\xff" * ((1 << 20) - 65536)
