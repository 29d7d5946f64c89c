"""Guest memory without KVM: bounds checks, typed access, views, regions."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmkit.memory import GuestMemory, GuestMemoryError, anonymous_region, file_region

MIB = 1 << 20


@pytest.fixture
def mem() -> GuestMemory:
    m = GuestMemory()
    m.add_anonymous(0, MIB)
    m.add_memfd(4 * MIB, MIB)
    yield m
    m.close()


def test_typed_access_round_trips(mem: GuestMemory) -> None:
    mem.write_u8(0x10, 0xAB)
    mem.write_u16(0x20, 0xBEEF)
    mem.write_u32(0x30, 0xDEADBEEF)
    mem.write_u64(4 * MIB + 8, 0x0123456789ABCDEF)
    assert mem.read_u8(0x10) == 0xAB
    assert mem.read_u16(0x20) == 0xBEEF
    assert mem.read_u32(0x30) == 0xDEADBEEF
    assert mem.read_u64(4 * MIB + 8) == 0x0123456789ABCDEF
    assert mem.read(0x30, 4) == (0xDEADBEEF).to_bytes(4, "little")


def test_view_is_zero_copy(mem: GuestMemory) -> None:
    view = mem.view(0x1000, 16)
    view[0:4] = b"kvmk"
    assert mem.read(0x1000, 4) == b"kvmk"
    view.release()


@pytest.mark.parametrize(
    ("gpa", "length"),
    [(MIB, 1), (MIB - 2, 4), (2 * MIB, 8), (5 * MIB, 1), (-1, 1), (0, -1), (2**64, 1)],
)
def test_out_of_range_access_raises_a_clear_error(mem: GuestMemory, gpa: int, length: int) -> None:
    with pytest.raises(GuestMemoryError, match="guest"):
        mem.read(gpa, length)
    if length > 0:
        with pytest.raises(GuestMemoryError):
            mem.write(gpa, b"\0" * length)


def test_error_names_the_range(mem: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError) as info:
        mem.read_u32(MIB - 2)
    assert str(info.value) == "guest address range 0xffffe..0x100002 is outside guest memory"


def test_overlapping_regions_are_refused(mem: GuestMemory) -> None:
    with pytest.raises(GuestMemoryError, match="overlaps"):
        mem.add(anonymous_region(MIB - 4096 * 2 + 4096, 8192))


def test_unaligned_region_is_refused() -> None:
    with pytest.raises(GuestMemoryError, match="multiples of 4 KiB"):
        anonymous_region(0x800, 4096)


def test_cstring_stops_at_region_end(mem: GuestMemory) -> None:
    mem.fill(MIB - 8, 8, ord("x"))
    assert mem.read_cstring(MIB - 8, 100) == b"x" * 8


def test_file_region_must_fit_the_file(tmp_path: Path) -> None:
    f = tmp_path / "small"
    f.write_bytes(b"\0" * 4096)
    with pytest.raises(GuestMemoryError, match="cannot map"):
        file_region(0, 8192, f)


@given(gpa=st.integers(min_value=-(2**65), max_value=2**65), length=st.integers(0, 3 * MIB))
def test_any_access_is_inside_a_region_or_refused(gpa: int, length: int) -> None:
    m = GuestMemory()
    try:
        m.add_anonymous(0x10000, MIB)
        try:
            data = m.read(gpa, length)
        except GuestMemoryError:
            assert not (0x10000 <= gpa and gpa + max(length, 1) <= 0x10000 + MIB)
        else:
            assert len(data) == length
            assert 0x10000 <= gpa and gpa + length <= 0x10000 + MIB
    finally:
        m.close()
