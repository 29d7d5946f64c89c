"""virtio-mmio devices under the default Linux guest (needs VMX/SVM: runs in the lane here).

One boot checks several things: three virtio-blk drives appear (found from the ACPI DSDT), the
read-only one is read-only in the guest and refuses writes, its serial (GET_ID) shows, data
the guest wrote and fsync'ed to another survives a SIGKILL of the VMM right after the guest
reported the sync, a discard punches a hole in the image, /dev/hwrng (virtio-rng) yields data,
and a file the guest wrote on an ext4 filesystem and `sync`ed survives the same SIGKILL.

The ext4 image is made on the host with mkfs.ext4 (e2fsprogs): busybox's mke2fs writes ext2
only, so the guest cannot format ext4 itself.  After the kill the host reads the file back
without mounting (debugfs), byte for byte the payload.  The guest never unmounted, so the
superblock says `needs_recovery`; `sync(2)` committed the journal and then wrote the block
device's dirty buffers, the metadata's home locations included, so `e2fsck -fn` finds the
image clean as it is (exit 0; it skips the journal and notes the superblock's free block and
inode totals, which ext4 keeps in memory while mounted and settles at unmount or replay).
A copy with the journal replayed by e2fsck (what a mount would do) must be clean too, with
the same file.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.hwvirt

PATTERN = b"kvmkit-virtio-blk-survives-sigkill\n"
RO_CONTENT = b"read-only drive contents\n"
# The ext4 payload travels to the guest inside the read-only drive, at 512 KiB (block 128 of
# 4 KiB), so the test knows its bytes; the guest copies it into a file on the ext4 drive.
PAYLOAD_OFFSET = 512 << 10
PAYLOAD_BLOCKS = 75  # 300 KiB
PAYLOAD_PATH = "/kvmkit/payload.bin"
SBIN_PATH = "/usr/sbin:/sbin:/usr/bin:/bin"

GUEST_SCRIPT = r"""
echo "BLOCKS $(ls /sys/block | grep vd | tr '\n' ' ')"
echo "RO $(cat /sys/block/vdb/ro)"
echo "SERIAL $(cat /sys/block/vdb/serial)"
echo "RODATA $(head -c 24 /dev/vdb)"
if dd if=/dev/zero of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null; then
    echo ROWRITE ok; else echo ROWRITE refused; fi
echo "RNG $(head -c 4096 /dev/hwrng | wc -c) $(cat /sys/class/misc/hw_random/rng_current)"
blkdiscard -o 1048576 -l 65536 /dev/vda; echo "DISCARD $?"
mount -t ext4 /dev/vdc /mnt; echo "MOUNT $? $(awk '$2 == "/mnt" {print $3}' /proc/mounts)"
mkdir /mnt/kvmkit && dd if=/dev/vdb of=/mnt/kvmkit/payload.bin bs=4096 skip=128 count=75 2>/dev/null
echo "EXT4SUM $(sha256sum /mnt/kvmkit/payload.bin | cut -d' ' -f1)"
printf 'kvmkit-virtio-blk-survives-sigkill\n' | dd of=/dev/vda bs=512 seek=8 conv=fsync 2>/dev/null
raw=$?
sync
echo "SYNCED $raw $?"
printf .
sleep 600
"""
# Why the `printf .`: kvmkit run holds back a trailing newline (it could start the console
# protocol's EXIT marker) until more output comes, so without it the SYNCED line would only
# arrive when the VMM ends on its own, long after the sync, and the kill would prove nothing.


def _tool(name: str) -> str:
    path = shutil.which(name, path=SBIN_PATH)
    if path is None:
        pytest.fail(f"{name} not found: e2fsprogs is missing (scripts/setup-host.sh installs it)")
    return path


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120)


def _dump(image: Path, out: Path) -> bytes:
    """The payload file read out of an ext4 image by debugfs, without mounting it."""
    dump = _run([_tool("debugfs"), "-R", f"dump {PAYLOAD_PATH} {out}", str(image)])
    assert out.is_file(), dump.stdout + dump.stderr
    return out.read_bytes()


def test_blk_drives_readonly_flush_ext4_survive_kill_and_rng(tmp_path: Path) -> None:
    rw = tmp_path / "rw.img"
    rw.write_bytes(b"\xff" * (2 << 20))
    ro = tmp_path / "ro.img"
    payload = os.urandom(PAYLOAD_BLOCKS * 4096)
    ro.write_bytes((RO_CONTENT.ljust(PAYLOAD_OFFSET, b"\0") + payload).ljust(1 << 20, b"\0"))
    ro.chmod(0o444)
    # A fresh ext4 with e2fsprogs' defaults (journal, metadata_csum, 64bit, extents); inode
    # tables and journal written now, so the guest's lazy-init thread has nothing to do.
    fs = tmp_path / "ext4.img"
    with open(fs, "wb") as fh:
        fh.truncate(64 << 20)
    mkfs = _run([_tool("mkfs.ext4"), "-q", "-F", "-b", "4096", "-L", "kvmkit-ext4",
                 "-E", "lazy_itable_init=0,lazy_journal_init=0", str(fs)])
    assert mkfs.returncode == 0, mkfs.stderr

    proc = subprocess.Popen(
        [
            sys.executable, "-m", "kvmkit", "run", "--timeout", "500", "--rng",
            "--drive", str(rw), "--drive", f"{ro},ro,serial=kvmkit-ro-1", "--drive", str(fs),
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
        running_at_kill = proc.poll() is None
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=60)
    assert "SYNCED" in lines, f"guest output {lines}, stderr {err.decode(errors='replace')}"
    assert running_at_kill, "the VMM had ended by itself before the kill"
    assert lines["SYNCED"].split() == ["0", "0"]
    assert lines["BLOCKS"].split() == ["vda", "vdb", "vdc"]
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

    # ext4: the guest mounted it and saw the payload it copied there.
    assert lines["MOUNT"] == "0 ext4"
    assert lines["EXT4SUM"] == hashlib.sha256(payload).hexdigest()
    # The guest never unmounted: the superblock it wrote at mount (and flushed) says so.
    header = _run([_tool("dumpe2fs"), "-h", str(fs)])
    features = next(line for line in header.stdout.splitlines()
                    if line.startswith("Filesystem features:"))
    assert "needs_recovery" in features.split(), header.stdout
    # The image as the kill left it: e2fsck -n does not replay the journal (it says so) and
    # checks what is in place, which sync wrote; exit 0 is clean (the free totals it may note
    # are not errors).
    as_left = _run([_tool("e2fsck"), "-fn", str(fs)])
    print(f"e2fsck -fn on the image as killed: exit {as_left.returncode}\n{as_left.stdout}"
          f"{as_left.stderr}")
    assert as_left.returncode == 0, as_left.stdout + as_left.stderr
    assert _dump(fs, tmp_path / "as-left.out") == payload
    # Replay the journal on a copy, as a mount would; then the filesystem must be clean.
    copy = tmp_path / "ext4-replayed.img"
    shutil.copyfile(fs, copy)
    replay = _run([_tool("e2fsck"), "-y", "-E", "journal_only", str(copy)])
    print(f"e2fsck -y -E journal_only: exit {replay.returncode}\n{replay.stdout}{replay.stderr}")
    assert replay.returncode in (0, 1), replay.stdout + replay.stderr  # 1: fs was modified
    assert "recovering journal" in replay.stdout + replay.stderr
    check = _run([_tool("e2fsck"), "-fn", str(copy)])
    assert check.returncode == 0, check.stdout + check.stderr
    assert _dump(copy, tmp_path / "replayed.out") == payload
