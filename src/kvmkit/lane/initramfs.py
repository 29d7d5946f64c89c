"""The lane's initramfs: a cached base archive plus a small per-run archive appended to it.

The base holds busybox, /init and the kernel modules (uncompressed: under TCG unpacking a few
MB of plain cpio is faster than decompressing it).  It depends only on the kernel, busybox,
the module list and the init script, so it is built once per combination and named by a hash
of them.  Per-run settings (command, environment, shares) travel in a second archive that
the kernel unpacks on top, so they never invalidate the cache.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import time
from pathlib import Path

from kvmkit.image.cpio import CpioWriter
from kvmkit.lane import assets
from kvmkit.lane.init_script import INIT

_BUILD_VERSION = "1"  # bump when the archive layout changes without the inputs changing


def _key(kernel: assets.LaneKernel, busybox: Path, modules: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for part in (_BUILD_VERSION, str(kernel.root), kernel.kver, kernel.version, INIT,
                 ",".join(modules)):
        h.update(part.encode() + b"\0")
    h.update(hashlib.sha256(busybox.read_bytes()).digest())
    return h.hexdigest()[:16]


def build_base(kernel: assets.LaneKernel, busybox: Path, modules: tuple[str, ...]) -> bytes:
    order = assets.module_load_order(kernel, modules)
    buf = io.BytesIO()
    with CpioWriter(buf) as w:
        for d in ("bin", "dev", "proc", "sys", "newroot", "kvmkit", "modules"):
            w.dir(d)
        w.chardev("dev/console", 5, 1)
        w.chardev("dev/null", 1, 3, 0o666)
        w.host_file("bin/busybox", busybox, 0o755)
        w.symlink("bin/sh", "busybox")
        w.file("init", INIT.encode(), 0o755)
        for name, path in order:
            w.file(f"modules/{name}.ko", assets.read_module(path))
        w.file("modules/order", "".join(f"{name}\n" for name, _ in order).encode())
    return buf.getvalue()


def base_initramfs(
    kernel: assets.LaneKernel, busybox: Path, modules: tuple[str, ...] = assets.LANE_MODULES
) -> Path:
    """The cached base archive for this kernel/busybox/module set, built if missing."""
    path = assets.lane_cache() / f"initramfs-{kernel.kver}-{_key(kernel, busybox, modules)}.cpio"
    if path.is_file():
        return path
    _remove_stale(path)
    data = build_base(kernel, busybox, modules)
    # Write-then-rename: concurrent lanes may build the same file, and readers must never
    # see a partial archive.
    fd, tmp = tempfile.mkstemp(prefix=".initramfs.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _remove_stale(keep: Path) -> None:
    # Old bases (other init script or module set) are dead weight; leave young ones alone in
    # case a lane started with them is about to copy one.
    now = time.time()
    for old in keep.parent.glob("initramfs-*.cpio"):
        try:
            if old != keep and now - old.stat().st_mtime > 3600:
                old.unlink()
        except OSError:
            pass


def run_archive(run_sh: str) -> bytes:
    buf = io.BytesIO()
    with CpioWriter(buf) as w:
        w.file("kvmkit/run.sh", run_sh.encode(), 0o644)
    return buf.getvalue()


def write_initrd(base: Path, run_sh: str, dest: Path) -> None:
    """Concatenate the base archive and this run's settings into `dest`."""
    with open(dest, "wb") as out, open(base, "rb") as src:
        while chunk := src.read(1 << 20):
            out.write(chunk)
        out.write(run_archive(run_sh))
