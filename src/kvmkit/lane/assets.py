"""The lane's kernel, its modules and busybox, fetched once into kvmkit's cache.

The kernel is Debian's generic `linux-image-<abi>-amd64-unsigned` (the `cloud` flavour has
no 9p), unpacked with `apt-get download` + `dpkg-deb -x`, never installed.  Debian builds the
virtio, 9p and KVM drivers as modules, so the initramfs must carry and load them; which files
and in which order is computed from each module's `.modinfo` `depends=` list (what depmod
reads), because Debian's package ships no modules.dep and module names change between ABIs.
"""

from __future__ import annotations

import gzip
import json
import lzma
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from kvmkit.boot.bootparams import BootError
from kvmkit.boot.elf import ElfError, ElfFile
from kvmkit.boot.pvh import pvh_entry
from kvmkit.boot.vmlinux import extract_vmlinux
from kvmkit.cache import cache_dir
from kvmkit.errors import UserError
from kvmkit.image import busybox, debian

KERNEL_METAPACKAGE = "linux-image-amd64"

# What the lane needs; their dependencies (virtio, virtio_ring, virtio_pci_*_dev, netfs,
# fscache, 9pnet, irqbypass, ccp, kvm) are added and ordered automatically.
LANE_MODULES = ("virtio_pci", "virtio_console", "9pnet_virtio", "9p", "kvm_amd")

_KO_SUFFIXES = (".ko", ".ko.xz", ".ko.gz")


class LaneAssetError(UserError):
    """A lane asset (kernel, module, busybox) is missing or unusable."""


@dataclass(frozen=True)
class LaneKernel:
    root: Path  # the unpacked package tree
    package: str
    version: str
    kver: str  # the `uname -r` of the kernel, e.g. 6.1.0-56-amd64

    @property
    def vmlinuz(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.kver}"

    @property
    def vmlinux(self) -> Path:
        """The uncompressed kernel, written by `ensure_vmlinux` (absent until then)."""
        return self.root / "boot" / f"vmlinux-{self.kver}"

    @property
    def boot_image(self) -> Path:
        """What QEMU's -kernel gets: the uncompressed ELF if there is one, else the bzImage."""
        return self.vmlinux if self.vmlinux.is_file() else self.vmlinuz

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.kver


def lane_cache() -> Path:
    path = cache_dir() / "lane"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _kernels_dir() -> Path:
    return lane_cache() / "kernel"


def _load_kernel(root: Path) -> LaneKernel | None:
    stamp = debian.unpacked(root)
    if stamp is None:
        return None
    kvers = sorted(p.name for p in (root / "lib" / "modules").glob("*") if p.is_dir())
    if len(kvers) != 1:
        return None
    kernel = LaneKernel(root, stamp.get("package", root.name), stamp.get("version", "?"),
                        kvers[0])
    return kernel if kernel.vmlinuz.is_file() else None


def _abi_key(name: str) -> list[int]:
    return [int(n) for n in re.findall(r"\d+", name)]


def cached_kernel() -> LaneKernel | None:
    """The newest completely unpacked lane kernel in the cache, without asking apt."""
    base = _kernels_dir()
    if not base.is_dir():
        return None
    found = [k for k in (_load_kernel(p) for p in base.iterdir() if p.is_dir()) if k]
    return max(found, key=lambda k: _abi_key(k.package)) if found else None


def resolve_kernel_package() -> str:
    """The `-unsigned` generic kernel package apt currently offers."""
    for dep in debian.depends_of(KERNEL_METAPACKAGE):
        if re.fullmatch(r"linux-image-[\w.+-]+-amd64", dep):
            unsigned = dep if dep.endswith("-unsigned") else f"{dep}-unsigned"
            if debian.candidate_version(unsigned) is not None:
                return unsigned
    raise LaneAssetError(
        f"kernel missing: apt knows no generic {KERNEL_METAPACKAGE} kernel "
        "(run `apt-get update`, or scripts/setup-host.sh)"
    )


def ensure_kernel(refresh: bool = False) -> LaneKernel:
    """The lane kernel, fetched and unpacked into the cache if not there yet.

    With `refresh`, ask apt for its current kernel and fetch it if it is newer than the cache.
    """
    if not refresh:
        kernel = cached_kernel()
        if kernel is not None:
            return kernel
    if shutil.which("apt-get") is None:
        raise LaneAssetError(
            f"kernel missing: no lane kernel in {_kernels_dir()} and no apt-get to fetch one"
        )
    package = resolve_kernel_package()
    root = _kernels_dir() / package
    debian.fetch_unpacked(package, root)
    kernel = _load_kernel(root)
    if kernel is None:
        raise LaneAssetError(f"kernel missing: {package} unpacked into {root} has no vmlinuz")
    return kernel


def ensure_vmlinux(kernel: LaneKernel) -> Path | None:
    """Decompress the bzImage's payload into an ELF vmlinux that QEMU boots through PVH.

    Under TCG the kernel's own xz decompressor and SeaBIOS's real-mode path take about 3 s
    of a ~8 s boot; liblzma does it once in under a second and QEMU loads the ELF directly
    (CONFIG_PVH=y in Debian's kernels).  Returns None, keeping the bzImage, when the kernel
    has no PVH entry or an unexpected payload.
    """
    if kernel.vmlinux.is_file():
        return kernel.vmlinux
    # The boot package's extractor: bounds-checked header parsing, every payload format.
    try:
        elf = extract_vmlinux(kernel.vmlinuz.read_bytes())
        if pvh_entry(ElfFile(elf)) is None:
            return None
    except (OSError, BootError, ElfError):
        return None
    tmp = kernel.vmlinux.with_name(f".{kernel.vmlinux.name}.{os.getpid()}")
    tmp.write_bytes(elf)
    os.replace(tmp, kernel.vmlinux)  # atomic: a concurrent lane sees all of it or nothing
    return kernel.vmlinux


def ensure_busybox() -> Path:
    """A statically linked busybox: the host's (Debian `busybox-static`) or one unpacked."""
    root = lane_cache() / "busybox-static"
    found = busybox.find_busybox(root)
    if found is not None:
        return found
    if shutil.which("apt-get") is None:
        raise LaneAssetError("busybox missing: install busybox-static (scripts/setup-host.sh)")
    debian.fetch_unpacked("busybox-static", root)
    found = busybox.find_busybox(root)
    if found is None:
        raise LaneAssetError(f"busybox missing: no static busybox in {root}")
    return found


def read_module(path: Path) -> bytes:
    """A module's ELF bytes, decompressed (busybox insmod wants plain .ko files)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".gz"):
        return gzip.decompress(data)
    return data


def modinfo(elf: bytes) -> dict[str, list[str]]:
    """The key=value strings of a module's `.modinfo` section."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise ValueError("not a 64-bit ELF module")
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", elf, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", elf, shoff + i * shentsize
        )
        return name, offset, size

    _, stroff, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name, offset, size = section(i)
        end = elf.index(b"\0", stroff + name)
        if elf[stroff + name : end] != b".modinfo":
            continue
        for item in elf[offset : offset + size].split(b"\0"):
            key, sep, value = item.decode(errors="replace").partition("=")
            if sep:
                info.setdefault(key, []).append(value)
    return info


def _module_name(filename: str) -> str:
    for suffix in _KO_SUFFIXES:
        if filename.endswith(suffix):
            filename = filename[: -len(suffix)]
            break
    return filename.replace("-", "_")


def module_index(kernel: LaneKernel) -> dict[str, Path]:
    """Module name (underscored, as in `depends=`) -> file, for all of the kernel's modules."""
    index: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(kernel.modules_dir / "kernel"):
        for filename in files:
            if filename.endswith(_KO_SUFFIXES):
                index[_module_name(filename)] = Path(dirpath) / filename
    return index


def module_load_order(kernel: LaneKernel, wanted: tuple[str, ...]) -> list[tuple[str, Path]]:
    """`wanted` modules plus their dependencies, each after everything it depends on."""
    index = module_index(kernel)
    order: list[tuple[str, Path]] = []
    done: set[str] = set()
    active: list[str] = []

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in done:
            return
        if name in active:
            raise LaneAssetError(f"module dependency cycle: {' -> '.join([*active, name])}")
        path = index.get(name)
        if path is None:
            raise LaneAssetError(f"module {name} is not in {kernel.package} ({kernel.kver})")
        active.append(name)
        for deps in modinfo(read_module(path)).get("depends", []):
            for dep in filter(None, deps.split(",")):
                visit(dep)
        active.pop()
        done.add(name)
        order.append((name, path))

    for name in wanted:
        visit(name)
    return order


def describe(kernel: LaneKernel) -> str:
    return json.dumps(
        {"package": kernel.package, "version": kernel.version, "kver": kernel.kver,
         "vmlinuz": str(kernel.vmlinuz)}
    )
