"""The default guest image: Debian's generic kernel and an initramfs written by kvmkit.

    image = default_image(progress=print)
    image.kernel, image.initrd, image.vmlinux, image.kernel_release

The kernel is the one the lane uses (`kvmkit.lane.assets.ensure_kernel`: Debian's
`linux-image-<abi>-amd64-unsigned`, unpacked into the cache, never installed), so lane and
guests share one download; `vmlinux` is its decompressed ELF for PVH boots.  The initramfs
(uncompressed newc cpio) holds a static busybox with its applet symlinks, the virtio,
vsock, console and ext4 modules with their dependencies in load order, KVM's modules for
`--nested` guests in a second list, and /init
(`kvmkit.image.guest_init`).

It is built once into `<cache>/image/<release>-<key>/` where the key hashes the inputs
(kernel package and version, busybox, init script, module list, layout version); a JSON
manifest beside the initramfs, written last, records the inputs and marks the build
complete.  Builds hold a lock and write files under temporary names renamed into place, so
concurrent processes never see a partial image.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvmkit.cache import cache_dir
from kvmkit.errors import UserError
from kvmkit.image import busybox as bb
from kvmkit.image import debian
from kvmkit.image.cpio import CpioWriter
from kvmkit.image.guest_init import INIT
from kvmkit.lane import assets

# What the later virtio devices need; dependencies (virtio_pci_modern_dev/legacy_dev,
# net_failover, failover, vsock, vmw_vsock_virtio_transport_common, rng-core if modular...)
# are added in load order from each module's .modinfo.  Built-in ones are skipped.
# ext4 (depends= jbd2, mbcache, crc16, resolved from .modinfo) lets a guest mount a disk
# image.  Its crc32c comes through the crypto API (`softdep=pre: crypto-crc32c`, an alias,
# which nothing here resolves), and metadata_csum (mkfs.ext4's default since e2fsprogs
# 1.43) cannot be mounted without it, so crc32c_generic is listed, loaded before ext4.
IMAGE_MODULES = (
    "virtio",
    "virtio_ring",
    "virtio_pci",
    "virtio_mmio",
    "virtio_blk",
    "virtio_net",
    "virtio_rng",
    "virtio_balloon",
    "vmw_vsock_virtio_transport",
    "virtio_console",
    "crc32c_generic",
    "ext4",
)
# The guest's own KVM, for `--nested` (docs/nested.md): kvm_amd needs kvm and ccp, kvm and
# kvm_intel need irqbypass (resolved from .modinfo). They go in a second order file that /init
# reads only when the CPU shows svm or vmx, so other guests do not spend boot time on them.
KVM_MODULES = ("kvm_amd", "kvm_intel")
LAYOUT_VERSION = "1"  # bump when the archive layout changes without the inputs changing
MANIFEST = "manifest.json"
INITRD = "initrd.cpio"
ORDER_FILE = "kvmkit.order"  # in lib/modules/<release>/: module paths, one a line, load order
KVM_ORDER_FILE = "kvmkit-kvm.order"  # the same for KVM_MODULES, loaded with svm/vmx only
STALE_SECONDS = 3600

Progress = Callable[[str], None]


class ImageError(UserError):
    """The default guest image cannot be built."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path  # bzImage (vmlinuz) from the Debian package
    initrd: Path  # newc cpio written by kvmkit
    vmlinux: Path | None  # uncompressed ELF (for PVH boot tests), if available
    kernel_release: str


@dataclass(frozen=True)
class ImageStatus:
    """What `kvmkit image info` reports; found without downloading or building anything."""

    kernel: assets.LaneKernel | None
    busybox: Path | None
    directory: Path | None  # where the image for the current inputs is (or would be)
    built: bool
    manifest: dict[str, Any] | None


def image_root() -> Path:
    path = cache_dir() / "image"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def image_inputs(kernel: assets.LaneKernel, busybox: Path) -> dict[str, Any]:
    """Everything the initramfs depends on; a change to any of it means a rebuild."""
    return {
        "layout": LAYOUT_VERSION,
        "kernel_package": kernel.package,
        "kernel_version": kernel.version,
        "kernel_release": kernel.kver,
        "kernel_root": str(kernel.root),
        "busybox": str(busybox),
        "busybox_sha256": _sha256_file(busybox),
        "init_sha256": hashlib.sha256(INIT.encode()).hexdigest(),
        "modules": list(IMAGE_MODULES),
        "kvm_modules": list(KVM_MODULES),
    }


def _directory(inputs: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return image_root() / f"{inputs['kernel_release']}-{key}"


def _read_manifest(directory: Path, inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of a complete build for exactly `inputs` in `directory`, or None."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        if not isinstance(manifest, dict) or manifest.get("inputs") != inputs:
            return None
        if (directory / INITRD).stat().st_size != manifest.get("initrd_size"):
            return None
    except (OSError, ValueError):
        return None
    return manifest


def _builtin_modules(kernel: assets.LaneKernel) -> set[str]:
    try:
        lines = (kernel.modules_dir / "modules.builtin").read_text().splitlines()
    except OSError:
        return set()
    names = set()
    for line in lines:
        name = line.rsplit("/", 1)[-1]
        if name.endswith(".ko"):
            names.add(name[:-3].replace("-", "_"))
    return names


def _archive_name(kernel: assets.LaneKernel, path: Path) -> str:
    """Where a module goes in the image: its path under lib/modules/<release>/, uncompressed."""
    rel = path.relative_to(kernel.modules_dir).as_posix()
    for suffix in (".xz", ".gz"):
        if rel.endswith(suffix):
            rel = rel[: -len(suffix)]
    return rel


def build_initramfs(
    kernel: assets.LaneKernel, busybox: Path, say: Progress
) -> tuple[bytes, dict[str, Any]]:
    """The initramfs bytes and what went into it (for the manifest)."""
    index = assets.module_index(kernel)
    builtin = _builtin_modules(kernel)
    wanted = [m for m in IMAGE_MODULES if m in index]
    missing = [m for m in IMAGE_MODULES if m not in index and m not in builtin]
    for name in missing:
        say(f"warning: module {name} is not in {kernel.package}; the image goes without it")
    order = assets.module_load_order(kernel, tuple(wanted))
    in_order = {name for name, _ in order}
    kvm_wanted = tuple(m for m in KVM_MODULES if m in index)
    for name in KVM_MODULES:
        if name not in index and name not in builtin:
            say(f"warning: module {name} is not in {kernel.package}; --nested guests go "
                "without it")
    kvm_order = [(n, p) for n, p in assets.module_load_order(kernel, kvm_wanted)
                 if n not in in_order]  # fmt: skip
    applets = bb.applet_paths(busybox)
    if "bin/sh" not in applets:
        raise ImageError(f"{busybox} has no sh applet")

    moddir = f"lib/modules/{kernel.kver}"
    buf = io.BytesIO()
    with CpioWriter(buf) as w:
        for d in ("bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp",
                  "run", "root", "etc", "lib", "lib/modules", moddir, "mnt", "var"):
            w.dir(d, 0o1777 if d == "tmp" else 0o700 if d == "root" else 0o755)
        # The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
        w.chardev("dev/console", 5, 1)
        w.chardev("dev/null", 1, 3, 0o666)
        w.host_file("bin/busybox", busybox, 0o755)
        for applet in applets:
            if applet in ("bin/busybox", "init", "linuxrc"):
                continue
            w.dirs_for(applet)
            w.symlink(applet, "/bin/busybox")
        w.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        w.file("etc/group", b"root:x:0:\n")
        w.file("etc/hostname", b"kvmkit\n")
        w.file("etc/hosts", b"127.0.0.1\tlocalhost\n127.0.1.1\tkvmkit\n")
        w.file("init", INIT.encode(), 0o755)
        lists: list[list[str]] = []
        for modules, order_file in ((order, ORDER_FILE), (kvm_order, KVM_ORDER_FILE)):
            names = []
            for _name, path in modules:
                rel = _archive_name(kernel, path)
                w.dirs_for(f"{moddir}/{rel}")
                w.file(f"{moddir}/{rel}", assets.read_module(path))
                names.append(rel)
            w.file(f"{moddir}/{order_file}", "".join(f"{n}\n" for n in names).encode())
            lists.append(names)
    details = {
        "modules": [name for name, _ in order],
        "module_files": lists[0],
        "kvm_modules": [name for name, _ in kvm_order],
        "kvm_module_files": lists[1],
        "builtin_modules": [m for m in IMAGE_MODULES if m not in index and m in builtin],
        "missing_modules": missing,
        "applets": len(applets),
    }
    return buf.getvalue(), details


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove_stale(keep: Path) -> None:
    """Remove images for other inputs, unless young (a VM may be about to read one)."""
    now = time.time()
    for old in image_root().iterdir():
        try:
            if old != keep and old.is_dir() and now - old.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(old)
        except OSError:
            pass


def _kernel(say: Progress) -> assets.LaneKernel:
    if assets.cached_kernel() is None:
        say("fetching Debian's generic kernel package with apt-get (once; about 70 MB)")
    kernel = assets.ensure_kernel()
    if not kernel.vmlinux.is_file():
        say(f"decompressing vmlinux-{kernel.kver} for PVH boots")
    assets.ensure_vmlinux(kernel)
    return kernel


def _busybox(say: Progress) -> Path:
    if bb.find_busybox(assets.lane_cache() / "busybox-static") is None:
        say("fetching busybox-static with apt-get (once)")
    return assets.ensure_busybox()


def _image(kernel: assets.LaneKernel, directory: Path) -> GuestImage:
    vmlinux = kernel.vmlinux if kernel.vmlinux.is_file() else None
    return GuestImage(kernel.vmlinuz, directory / INITRD, vmlinux, kernel.kver)


def default_image(*, rebuild: bool = False, progress: Progress | None = None) -> GuestImage:
    """The default guest image, built into the cache on first use (or when `rebuild`)."""
    say: Progress = progress or (lambda line: None)
    kernel = _kernel(say)
    busybox = _busybox(say)
    inputs = image_inputs(kernel, busybox)
    directory = _directory(inputs)
    if not rebuild and _read_manifest(directory, inputs) is not None:
        return _image(kernel, directory)
    with debian.locked(image_root() / ".build.lock"):
        if not rebuild and _read_manifest(directory, inputs) is not None:
            return _image(kernel, directory)  # another process built it while we waited
        say(f"building the initramfs for {kernel.kver} in {directory}")
        started = time.monotonic()
        data, details = build_initramfs(kernel, busybox, say)
        directory.mkdir(parents=True, exist_ok=True)
        _write_atomic(directory / INITRD, data)
        manifest = {
            "inputs": inputs,
            "initrd_size": len(data),
            "initrd_sha256": hashlib.sha256(data).hexdigest(),
            "kernel": str(kernel.vmlinuz),
            "vmlinux": str(kernel.vmlinux) if kernel.vmlinux.is_file() else None,
            "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "build_seconds": round(time.monotonic() - started, 3),
            **details,
        }
        # The manifest goes last: its presence marks the build complete.
        _write_atomic(directory / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        _remove_stale(directory)
        say(f"initramfs ready: {directory / INITRD} ({len(data) / 1e6:.1f} MB)")
    return _image(kernel, directory)


def image_status() -> ImageStatus:
    """The state of the default image for the current inputs, without fetching anything."""
    kernel = assets.cached_kernel()
    busybox = bb.find_busybox(assets.lane_cache() / "busybox-static")
    if kernel is None or busybox is None:
        return ImageStatus(kernel, busybox, None, False, None)
    inputs = image_inputs(kernel, busybox)
    directory = _directory(inputs)
    manifest = _read_manifest(directory, inputs)
    return ImageStatus(kernel, busybox, directory, manifest is not None, manifest)
