"""The host side of vsock_probe.c (the guest's AF_VSOCK tool): built static and handed to
the guest as a read-only drive (`dd if=/dev/vda of=/tmp/vp; chmod +x /tmp/vp`), and the
data pattern and checksum it uses."""

from __future__ import annotations

import subprocess
from pathlib import Path

SOURCE = Path(__file__).with_suffix(".c")


def drive_image(tmp_path: Path) -> Path:
    """vsock_probe built static, padded to whole 4 KiB blocks: a drive image."""
    prog = tmp_path / "vp"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(prog), str(SOURCE)], check=True,
                   timeout=120)  # fmt: skip
    raw = prog.read_bytes()
    drive = tmp_path / "vp.img"
    drive.write_bytes(raw.ljust((len(raw) + 4095) // 4096 * 4096, b"\0"))
    return drive


def pattern(n: int) -> bytes:
    """vsock_probe.c's pattern: byte i is i % 251 (a prime: a chunk out of place shows)."""
    return (bytes(range(251)) * (n // 251 + 1))[:n]


def fnv1a(data: bytes) -> str:
    """The FNV-1a 32-bit hash `vsock_probe send` prints of what it received."""
    h = 2166136261
    for b in data:
        h = ((h ^ b) * 16777619) & 0xFFFFFFFF
    return f"{h:08x}"
