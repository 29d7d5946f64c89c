"""`kvmkit image`: build or describe the default guest image (kernel + kvmkit initramfs)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from kvmkit.image.guest import default_image, image_root, image_status

DESCRIPTION = """\
The default guest image is Debian's generic kernel package (unpacked, not installed; the
same one `kvmkit lane` uses) and an initramfs written by kvmkit with busybox, the virtio
modules and an init that runs the command given on the kernel command line.  `kvmkit run`
builds it on first use; docs/image.md describes it."""


def register(subparsers: Any) -> None:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "image", help="build or describe the default guest image",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    sub = p.add_subparsers(dest="image_command", metavar="ACTION")
    build = sub.add_parser("build", help="build the image (fetching the kernel and busybox once)")
    build.add_argument("--rebuild", action="store_true",
                       help="rebuild the initramfs even if the cached one is current")
    build.set_defaults(func=run, action="build")
    info = sub.add_parser("info", help="show the image's paths, kernel release and state")
    info.set_defaults(func=run, action="info")
    p.set_defaults(func=run, action=None)


def _size(path: Path | None) -> str:
    if path is None:
        return "-"
    try:
        size = path.stat().st_size
    except OSError:
        return "missing"
    return f"{size / (1 << 20):.1f} MiB"


def _print_rows(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")


def _build(rebuild: bool) -> int:
    started = time.monotonic()
    image = default_image(
        rebuild=rebuild, progress=lambda line: print(f"kvmkit image: {line}", file=sys.stderr,
                                                     flush=True),
    )  # fmt: skip
    elapsed = time.monotonic() - started
    _print_rows([
        ("kernel", f"{image.kernel} ({_size(image.kernel)})"),
        ("initrd", f"{image.initrd} ({_size(image.initrd)})"),
        ("vmlinux", f"{image.vmlinux} ({_size(image.vmlinux)})" if image.vmlinux else
            "none (no PVH entry or unexpected payload)"),
        ("kernel release", image.kernel_release),
        ("time", f"{elapsed:.2f} s"),
    ])  # fmt: skip
    return 0


def _info() -> int:
    st = image_status()
    kernel = st.kernel
    rows = [("cache", str(image_root()))]
    if kernel is None:
        rows.append(("kernel", "not downloaded yet (`kvmkit image build` fetches it)"))
    else:
        rows += [
            ("kernel", f"{kernel.vmlinuz} ({_size(kernel.vmlinuz)})"),
            ("kernel package", f"{kernel.package} {kernel.version}"),
            ("kernel release", kernel.kver),
            ("vmlinux", f"{kernel.vmlinux} ({_size(kernel.vmlinux)})"
                if kernel.vmlinux.is_file() else "not decompressed yet"),
        ]  # fmt: skip
    rows.append(("busybox", str(st.busybox) if st.busybox else "not available yet"))
    if st.built and st.directory is not None and st.manifest is not None:
        initrd = st.directory / "initrd.cpio"
        rows += [
            ("initrd", f"{initrd} ({_size(initrd)})"),
            ("modules", " ".join(st.manifest.get("modules", []))),
            ("built", f"yes ({st.manifest.get('built_at', '?')})"),
        ]
    else:
        rows.append(("built", "no (`kvmkit image build`, or `kvmkit run` builds it)"))
    _print_rows(rows)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.action == "build":
        return _build(args.rebuild)
    if args.action == "info":
        return _info()
    print("usage: kvmkit image {build [--rebuild] | info}", file=sys.stderr)
    return 2
