"""The snapshot state-file format: round trip, every rejection, and fuzzing of the parser."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmkit.errors import UserError
from kvmkit.snapshot.core import Snapshot
from kvmkit.snapshot.format import (
    HEADER,
    MAGIC,
    MAX_PAYLOAD,
    SnapshotError,
    decode,
    encode,
    read_state,
    write_state,
)
from kvmkit.snapshot.memory import MemoryState

STATE: dict[str, Any] = {"kind": "test", "n": 7, "blob": "AAEC", "list": [1, 2, {"x": True}]}


def test_round_trip_and_layout(tmp_path: Path) -> None:
    data = encode(STATE)
    magic, version, arch, length = HEADER.unpack_from(data)
    assert (magic, version, arch, length) == (MAGIC, 1, b"x86_64\0\0", len(data) - 32)
    assert struct.unpack_from("<I", data, len(data) - 4)[0] == zlib.crc32(data[:-4])
    assert decode(data) == STATE
    write_state(tmp_path / "s", STATE)
    assert read_state(tmp_path / "s") == STATE
    assert issubclass(SnapshotError, UserError)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d[:10], "truncated"),
        (lambda d: d[:-7], "truncated"),
        (lambda d: d + b"x", "after the checksum"),
        (lambda d: b"NOTASNAP" + d[8:], "bad magic"),
        (lambda d: d[:8] + struct.pack("<I", 2) + d[12:], "format version 2"),
        (lambda d: d[:12] + b"aarch64\0" + d[20:], "architecture 'aarch64'"),
        (lambda d: d[:20] + struct.pack("<Q", MAX_PAYLOAD + 1) + d[28:], "exceeds"),
        (lambda d: d[:40] + bytes([d[40] ^ 1]) + d[41:], "checksum mismatch"),
    ],
)
def test_bad_files_are_rejected_with_a_clear_error(mutate: Any, message: str) -> None:
    with pytest.raises(SnapshotError, match=message):
        decode(mutate(encode(STATE)))


def test_wrong_version_even_with_a_valid_checksum() -> None:
    assert decode(encode(STATE, version=1)) == STATE
    with pytest.raises(SnapshotError, match="format version 9"):
        decode(encode(STATE, version=9))
    with pytest.raises(SnapshotError, match="architecture"):
        decode(encode(STATE, arch=b"riscv64"))


def test_non_object_and_deep_payloads_rejected() -> None:
    with pytest.raises(SnapshotError, match="not an object"):
        decode(encode([1, 2]))  # type: ignore[arg-type]
    deep: Any = 0
    for _ in range(50):
        deep = [deep]
    with pytest.raises(SnapshotError, match="nested"):
        decode(encode({"d": deep}))


def test_missing_and_oversized_files(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="cannot read"):
        read_state(tmp_path / "missing")
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(MAX_PAYLOAD + 1024)
    with pytest.raises(SnapshotError, match="larger than any state file"):
        read_state(big)


def test_snapshot_schema_validation() -> None:
    with pytest.raises(SnapshotError, match="kind"):
        Snapshot.from_dict({})
    with pytest.raises(SnapshotError, match="no vCPUs"):
        Snapshot.from_dict({"kind": "kvmkit-vm", "vcpus": []})
    with pytest.raises(SnapshotError, match="must be an object"):
        Snapshot.from_dict({"kind": "kvmkit-vm", "vcpus": [3]})
    with pytest.raises(SnapshotError, match="regions overlap"):
        MemoryState.from_dict({"page_size": 4096, "diff": False, "regions": [
            {"gpa": 0, "size": 8192, "offset": 0}, {"gpa": 4096, "size": 4096, "offset": 8192},
        ]})  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(data: bytes) -> None:
    try:
        decode(data)
    except SnapshotError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 200), st.binary(min_size=1, max_size=8))
def test_fuzz_corrupted_valid_file(at: int, junk: bytes) -> None:
    data = bytearray(encode(STATE))
    at %= len(data)
    data[at : at + len(junk)] = junk
    try:
        decode(bytes(data))
    except SnapshotError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=12), json_values, max_size=8))
def test_fuzz_schema_of_well_formed_files(payload: dict[str, Any]) -> None:
    """Any payload with a valid envelope: only SnapshotError escapes the full validation."""
    payload.setdefault("kind", "kvmkit-vm")
    try:
        Snapshot.from_dict(decode(encode(payload)))
    except SnapshotError:
        pass


def test_kvmkit_restore_rejects_a_bad_state_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kvmkit.cli.main import main

    (tmp_path / "s").write_bytes(encode(STATE)[:-1])
    status = main(["restore", "--state", str(tmp_path / "s"), "--mem", str(tmp_path / "m")])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("kvmkit restore: ") and "truncated" in err and err.count("\n") == 1
