"""Finding a statically linked busybox (Debian `busybox-static`) and the applets it provides.

Both the lane's initramfs and the default guest image are built around one static busybox:
the host's when it has `busybox-static` installed, otherwise a copy unpacked into the cache
(fetched by `kvmkit.lane.assets.ensure_busybox`).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
from pathlib import Path

from kvmkit.image import debian

HOST_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")
PACKAGE_PATHS = ("bin/busybox", "usr/bin/busybox")


def is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a program interpreter (a static binary)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(64)
            if head[:4] != b"\x7fELF" or head[4] != 2:
                return False
            (phoff,) = struct.unpack_from("<Q", head, 0x20)
            phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
            fh.seek(phoff)
            table = fh.read(phentsize * phnum)
    except (OSError, struct.error):
        return False
    pt_interp = 3
    return all(
        struct.unpack_from("<I", table, i * phentsize)[0] != pt_interp for i in range(phnum)
    )


def find_busybox(unpacked_root: Path) -> Path | None:
    """A static busybox already on this machine (the host's, or unpacked at `unpacked_root`).

    Never downloads anything.
    """
    for candidate in (*HOST_CANDIDATES, shutil.which("busybox")):
        if candidate and is_static_elf(Path(candidate)):
            return Path(candidate)
    if debian.unpacked(unpacked_root) is not None:
        for rel in PACKAGE_PATHS:
            if is_static_elf(unpacked_root / rel):
                return unpacked_root / rel
    return None


def applet_paths(busybox: Path) -> list[str]:
    """The applets' install paths (`bin/sh`, `usr/bin/awk`, ...) as busybox lists them."""
    proc = subprocess.run(
        [str(busybox), "--list-full"], capture_output=True, text=True, check=False
    )
    paths = [line.strip().strip("/") for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 or not paths:
        # An old busybox without --list-full: everything in bin/.
        proc = subprocess.run([str(busybox), "--list"], capture_output=True, text=True,
                              check=False)  # fmt: skip
        paths = [f"bin/{name.strip()}" for name in proc.stdout.splitlines() if name.strip()]
    return [p for p in paths if p and ".." not in p.split("/")]
