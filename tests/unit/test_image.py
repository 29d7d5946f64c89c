"""The default guest image: its build and cache, its contents, and the init's command decoding.

Builds the real image in kvmkit's cache (fetching the kernel and busybox on a fresh machine,
as `kvmkit run` would), and runs the init's decoding functions with busybox sh on the host.
"""

from __future__ import annotations

import base64
import json
import shutil
import stat
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvmkit.image import guest
from kvmkit.image.guest import GuestImage, default_image
from kvmkit.image.guest_init import DECODE_FUNCS, INIT


@dataclass
class Member:
    mode: int
    data: bytes
    rdev: tuple[int, int]


def read_newc(data: bytes) -> dict[str, Member]:
    """A minimal newc reader (independent of kvmkit.image.cpio, which only writes)."""
    members: dict[str, Member] = {}
    pos = 0
    while True:
        assert data[pos : pos + 6] == b"070701", f"bad magic at {pos}"
        fields = [int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rmaj, rmin, namesize = (fields[1], fields[6], fields[9], fields[10],
                                                fields[11])  # fmt: skip
        name_at = pos + 110
        name = data[name_at : name_at + namesize - 1].decode()
        pos = (name_at + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return members
        members[name] = Member(mode, data[pos : pos + filesize], (rmaj, rmin))
        pos = (pos + filesize + 3) & ~3


@pytest.fixture(scope="module")
def image() -> GuestImage:
    return default_image(progress=print)


@pytest.fixture(scope="module")
def members(image: GuestImage) -> dict[str, Member]:
    return read_newc(image.initrd.read_bytes())


Encoder = Callable[[list[str]], str]


@pytest.fixture(scope="module")
def encode() -> Encoder:
    """The host side: how the VMM puts the command on the kernel command line."""
    from kvmkit.vmm.machine import _cmdline_quote

    return _cmdline_quote


@pytest.fixture(scope="module")
def busybox() -> str:
    path = shutil.which("busybox") or "/bin/busybox"
    if not Path(path).exists():
        pytest.fail("busybox missing: install busybox-static (scripts/setup-host.sh)")
    return path


def test_image_files(image: GuestImage) -> None:
    assert image.kernel.is_file()
    assert image.kernel.read_bytes()[0x202:0x206] == b"HdrS"  # a bzImage
    assert image.initrd.is_file()
    assert image.kernel_release and image.kernel_release in image.kernel.name
    if image.vmlinux is not None:
        assert image.vmlinux.read_bytes()[:4] == b"\x7fELF"
    # The lane's kernel: one download for both.
    from kvmkit.lane import assets

    assert image.kernel == assets.ensure_kernel().vmlinuz


def test_initramfs_contents(image: GuestImage, members: dict[str, Member]) -> None:
    assert members["init"].data == INIT.encode()
    assert stat.S_IMODE(members["init"].mode) == 0o755
    bb = members["bin/busybox"]
    assert stat.S_ISREG(bb.mode) and bb.data[:4] == b"\x7fELF"
    for applet in ("bin/sh", "bin/mount", "sbin/insmod", "sbin/poweroff", "usr/bin/awk",
                   "bin/base64", "bin/stty", "usr/bin/setsid", "bin/cttyhack"):
        assert stat.S_ISLNK(members[applet].mode), applet
        assert members[applet].data == b"/bin/busybox"
    console = members["dev/console"]
    assert stat.S_ISCHR(console.mode) and console.rdev == (5, 1)

    moddir = f"lib/modules/{image.kernel_release}"
    order = members[f"{moddir}/kvmkit.order"].data.decode().split()
    manifest = json.loads((image.initrd.parent / guest.MANIFEST).read_text())
    assert order == manifest["module_files"]
    for rel in order:
        assert members[f"{moddir}/{rel}"].data[:4] == b"\x7fELF", rel
    loaded = manifest["modules"]
    for name in guest.IMAGE_MODULES:
        assert name in loaded or name in manifest["builtin_modules"], name
    # Dependencies come before what needs them.
    for dep, user in [("virtio", "virtio_pci"), ("virtio_ring", "virtio_blk"),
                      ("virtio_pci_modern_dev", "virtio_pci"), ("failover", "net_failover"),
                      ("net_failover", "virtio_net"), ("vsock", "vmw_vsock_virtio_transport"),
                      ("vmw_vsock_virtio_transport_common", "vmw_vsock_virtio_transport"),
                      ("jbd2", "ext4"), ("mbcache", "ext4"), ("crc16", "ext4"),
                      ("crc32c_generic", "jbd2")]:
        if dep in loaded:
            assert loaded.index(dep) < loaded.index(user), (dep, user)
    # KVM for --nested guests: its own list, loaded by /init only with svm/vmx in cpuinfo.
    kvm_order = members[f"{moddir}/kvmkit-kvm.order"].data.decode().split()
    assert kvm_order == manifest["kvm_module_files"]
    kvm = manifest["kvm_modules"]
    for dep, user in [("irqbypass", "kvm"), ("kvm", "kvm_amd"), ("ccp", "kvm_amd"),
                      ("kvm", "kvm_intel")]:
        assert kvm.index(dep) < kvm.index(user), (dep, user)
    assert not set(kvm) & set(loaded)
    for rel in kvm_order:
        assert members[f"{moddir}/{rel}"].data[:4] == b"\x7fELF", rel


def test_init_is_valid_sh(tmp_path: Path, busybox: str) -> None:
    script = tmp_path / "init"
    script.write_text(INIT)
    proc = subprocess.run([busybox, "sh", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# The same steps as the init: decode, eval into "$@"; then print each argument NUL-terminated.
DECODE_AND_PRINT = DECODE_FUNCS + r"""
words=$(kvmkit_decode_cmd "$1") || exit 99
eval "set -- $words"
for arg; do printf '%s\0' "$arg"; done
"""

TRICKY_ARGVS = [
    ["uname", "-r"],
    ["sh", "-c", "exit 3"],
    ["echo", "two  spaces", " lead", "trail ", "tab\there"],
    ["'single'", '"double"', "it's", "a'b'c\\'", "'"],
    ["back\\slash", "\\\\", "\\n is not a newline", "\\"],
    ["", "", "empty strings", ""],
    ["new\nline", "x\n", "\n", "cr\r", "\b\f\x01\x1f\x7f"],
    ["$HOME", "`id`", "$(id)", "*", "?", "[a]", "~", "a;b", "a|b", "&", "!", "#x", "{a,b}"],
    ["ünïcødé", "日本語", "😀 emoji", "\u00a0nbsp", "€"],
    ["/slash/", "{\"json\": [1, 2]}", "[]", ","],
    [bytes(range(1, 128)).decode()],
    # Undecodable bytes of a host argv (surrogateescape) arrive as those bytes.
    [b"raw\x80\xff".decode("utf-8", "surrogateescape")],
    ["x" * 500],
]


@pytest.mark.parametrize("argv", TRICKY_ARGVS, ids=range(len(TRICKY_ARGVS)))
def test_cmdline_decoding(argv: list[str], busybox: str, encode: Encoder) -> None:
    encoded = encode(argv)
    assert " " not in encoded and "=" not in encoded
    proc = subprocess.run([busybox, "sh", "-c", DECODE_AND_PRINT, "sh", encoded],
                          capture_output=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split(b"\0")[:-1] == [a.encode("utf-8", "surrogateescape") for a in argv]


def test_cmdline_decoding_of_an_empty_array(busybox: str, encode: Encoder) -> None:
    proc = subprocess.run([busybox, "sh", "-c", DECODE_AND_PRINT, "sh", encode([])],
                          capture_output=True)  # fmt: skip
    assert (proc.returncode, proc.stdout) == (0, b"")


def _b64url(text: bytes) -> str:
    return base64.urlsafe_b64encode(text).decode().rstrip("=")


BAD_JSON = [b'"notjson"', b'{"a": 1}', b"[1]", b'["a"] []', b'["a",]', b'["a"', b'["\\x"]',
            b'["\\u00"]', b'["\\u0000"]', b'["a" "b"]', b'["raw\nnewline"]', b""]


@pytest.mark.parametrize("bad", ["!!!", "A", *map(_b64url, BAD_JSON)])
def test_cmdline_decoding_rejects_garbage(bad: str, busybox: str) -> None:
    proc = subprocess.run([busybox, "sh", "-c", DECODE_AND_PRINT, "sh", bad], capture_output=True)
    assert proc.returncode == 99, proc.stdout


def test_second_build_is_a_no_op(image: GuestImage) -> None:
    manifest = image.initrd.parent / guest.MANIFEST
    before = (image.initrd.stat().st_mtime_ns, manifest.stat().st_mtime_ns)
    started = time.monotonic()
    again = default_image()
    elapsed = time.monotonic() - started
    assert again == image
    assert (image.initrd.stat().st_mtime_ns, manifest.stat().st_mtime_ns) == before
    assert elapsed < 0.5, f"a warm default_image() took {elapsed:.2f} s"


def test_changed_inputs_rebuild_and_concurrent_builds(
    image: GuestImage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(guest, "image_root", lambda: tmp_path)
    lines: list[str] = []
    first = default_image(progress=lines.append)
    assert first.initrd.parent.parent == tmp_path
    assert first.initrd.read_bytes() == image.initrd.read_bytes()  # reproducible
    assert any("building" in line for line in lines)

    lines.clear()
    assert default_image(progress=lines.append) == first
    assert not any("building" in line for line in lines)

    # Another init script: a new image beside the old one.
    monkeypatch.setattr(guest, "INIT", INIT + "# changed\n")
    results: list[GuestImage] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(default_image(progress=lines.append))
        except BaseException as err:
            errors.append(err)

    # Two builders at once (the flock is per open file, so threads contend like processes).
    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(results) == 2 and results[0] == results[1] != first
    assert sum("building" in line for line in lines) == 1
    assert read_newc(results[0].initrd.read_bytes())["init"].data.endswith(b"# changed\n")
    assert not list(tmp_path.glob("*/.*"))  # no temporary files left behind

    # A damaged image (initrd truncated) is rebuilt.
    results[0].initrd.write_bytes(b"")
    lines.clear()
    assert default_image(progress=lines.append) == results[0]
    assert any("building" in line for line in lines)
    assert results[0].initrd.stat().st_size > 1 << 20


# -- root=: the init's partition-table reader (busybox sh on the host, over disk images)


@pytest.mark.parametrize("table", ["mbr", "gpt"])
def test_init_finds_partuuids(tmp_path: Path, busybox: str, table: str) -> None:
    import uuid

    from kvmkit.image.guest_init import ROOT_FUNCS
    from kvmkit.testing import disks

    tree = tmp_path / "tree"
    (tree / "sbin").mkdir(parents=True)
    (tree / "sbin" / "init").write_text("#!/bin/sh\n")
    img = tmp_path / "disk.img"
    if table == "mbr":
        want = disks.mbr_disk(img, tree, 4, 0xCAFE0123)
        assert want == "cafe0123-01"
    else:
        want = disks.gpt_disk(img, tree, 4, uuid.UUID("6b1f2e3a-1c2d-4e5f-8a9b-0c1d2e3f4a5b"))
    proc = subprocess.run(
        [busybox, "sh", "-c", ROOT_FUNCS + 'kvmkit_partuuids "$1"', "sh", str(img)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", want]
    # The partition is an ext4 filled from the tree (e2fsprogs reads it at the offset).
    out = subprocess.run(["debugfs", "-R", "ls -l /sbin", f"{img}?offset=1048576"],
                         capture_output=True, text=True)  # fmt: skip
    assert "init" in out.stdout, out.stderr


def test_init_root_device_forms(tmp_path: Path, busybox: str) -> None:
    from kvmkit.image.guest_init import ROOT_FUNCS

    not_partitioned = tmp_path / "plain.img"
    not_partitioned.write_bytes(bytes(4096))
    script = ROOT_FUNCS + 'kvmkit_partuuids "$1" || echo none; kvmkit_root_device "$2"; echo .'
    proc = subprocess.run([busybox, "sh", "-c", script, "sh", str(not_partitioned),
                           "/dev/nonexistent-vdz"], capture_output=True, text=True)  # fmt: skip
    assert proc.stdout.split() == ["none", "."], proc.stderr
