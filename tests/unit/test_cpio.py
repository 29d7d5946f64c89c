"""The newc cpio writer, checked against GNU cpio (Debian package `cpio`)."""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from kvmkit.image.cpio import CpioWriter, Entry, write_archive

needs_cpio = pytest.mark.skipif(shutil.which("cpio") is None, reason="needs GNU cpio (apt cpio)")


def _archive() -> bytes:
    buf = io.BytesIO()
    with CpioWriter(buf) as w:
        w.dirs_for("bin/busybox")
        w.file("bin/busybox", b"\x7fELF" + bytes(range(256)) * 3, 0o755)
        w.symlink("bin/sh", "busybox")
        w.dirs_for("etc/odd")
        w.file("/etc/odd", b"abc")  # length not a multiple of 4: exercises padding
        w.file("empty", b"")
        w.dirs_for("dev/console")
        w.chardev("dev/console", 5, 1)
    return buf.getvalue()


def test_layout_is_aligned_and_reproducible() -> None:
    data = _archive()
    assert data == _archive()
    assert data.startswith(b"070701")
    assert len(data) % 4 == 0
    assert b"TRAILER!!!\0" in data


@needs_cpio
def test_gnu_cpio_lists_members() -> None:
    out = subprocess.run(
        ["cpio", "-t", "--quiet"], input=_archive(), capture_output=True, check=True
    ).stdout.decode()
    assert out.split() == ["bin", "bin/busybox", "bin/sh", "etc", "etc/odd", "empty", "dev",
                           "dev/console"]


@needs_cpio
def test_gnu_cpio_extracts_contents(tmp_path: Path) -> None:
    subprocess.run(
        ["cpio", "-i", "--quiet", "--make-directories", "--no-absolute-filenames"],
        input=_archive(), cwd=tmp_path, check=True,
    )
    assert (tmp_path / "bin/busybox").read_bytes() == b"\x7fELF" + bytes(range(256)) * 3
    assert stat.S_IMODE((tmp_path / "bin/busybox").stat().st_mode) == 0o755
    assert os.readlink(tmp_path / "bin/sh") == "busybox"
    assert (tmp_path / "etc/odd").read_bytes() == b"abc"
    assert (tmp_path / "empty").read_bytes() == b""
    if os.geteuid() == 0:
        st = (tmp_path / "dev/console").stat()
        assert stat.S_ISCHR(st.st_mode)
        assert (os.major(st.st_rdev), os.minor(st.st_rdev)) == (5, 1)


@needs_cpio
def test_concatenated_archives_are_read_in_turn(tmp_path: Path) -> None:
    second = io.BytesIO()
    write_archive(second, [Entry("run.sh", stat.S_IFREG | 0o644, b"echo hi\n")])
    # GNU cpio stops at the first trailer, so read the second archive from its own offset,
    # as the kernel does when it walks concatenated initramfs archives.
    first = _archive()
    out = subprocess.run(
        ["cpio", "-t", "--quiet"], input=second.getvalue(), capture_output=True, check=True
    ).stdout.decode()
    assert out.split() == ["run.sh"]
    assert (first + second.getvalue()).count(b"TRAILER!!!") == 2


def test_rejects_bad_names() -> None:
    w = CpioWriter(io.BytesIO())
    with pytest.raises(ValueError):
        w.file("../escape", b"")
    w.file("a", b"")
    with pytest.raises(ValueError):
        w.file("a", b"")
