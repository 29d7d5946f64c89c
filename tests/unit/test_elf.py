"""The ELF reader refuses malformed files instead of reading past them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.boot.elf import ElfError, ElfFile


def test_not_elf() -> None:
    with pytest.raises(ElfError, match="bad magic"):
        ElfFile(b"MZ\0\0" + bytes(100))


def test_truncated_header() -> None:
    with pytest.raises(ElfError, match="truncated"):
        ElfFile(b"\x7fELF\x02\x01\x01" + bytes(20))


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_reads_segments_and_symbols_of_a_real_object(tmp_path: Path) -> None:
    src = tmp_path / "a.S"
    src.write_text(".globl _start\n_start: nop\nmarker: .long 0x12345678\n")
    exe = tmp_path / "a.elf"
    subprocess.run(
        ["gcc", "-nostdlib", "-static", "-Wl,-Ttext=0x200000", "-o", str(exe), str(src)],
        check=True,
    )
    elf = ElfFile(exe.read_bytes())
    assert elf.is64 and elf.entry == 0x200000
    assert elf.symbols()["marker"] == 0x200001
    seg = next(s for s in elf.load_segments if s.vaddr <= 0x200000 < s.vaddr + s.memsz)
    data = elf.segment_data(seg)
    assert data[0x200001 - seg.vaddr : 0x200005 - seg.vaddr] == (0x12345678).to_bytes(4, "little")


@settings(max_examples=300)
@given(st.binary(min_size=0, max_size=512))
def test_random_bytes_after_the_magic_never_crash(tail: bytes) -> None:
    data = b"\x7fELF\x02\x01\x01\0" + tail
    try:
        elf = ElfFile(data)
        elf.symbols()
        elf.notes()
        for seg in elf.load_segments:
            elf.segment_data(seg)
    except ElfError:
        pass
