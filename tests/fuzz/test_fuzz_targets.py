"""The fuzz targets in the host suite (docs/security.md, "Fuzzing"): every corpus input
(seeds and the crashes found so far, `crash-*`) replayed through its target, and each
target fuzzed briefly with atheris (a second or two: long runs are `make fuzz`)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run import CORPUS, TARGETS  # noqa: E402

INPUTS = sorted(p for t in TARGETS for p in (CORPUS / t).iterdir() if p.is_file())


def test_every_target_has_a_seed_corpus() -> None:
    for target in TARGETS:
        assert any((CORPUS / target).glob("seed-*")), f"{target} has no seed"


@pytest.mark.parametrize("path", INPUTS, ids=[f"{p.parent.name}/{p.name}" for p in INPUTS])
def test_corpus_input_is_handled(path: Path) -> None:
    # A crash-* input made kvmkit raise something other than its documented rejection
    # before the fix; every input must now be accepted or rejected that way.
    module = importlib.import_module(path.parent.name)
    module.TestOneInput(path.read_bytes())


@pytest.mark.parametrize("target", TARGETS)
def test_target_fuzzes_briefly_without_a_crash(target: str, tmp_path: Path) -> None:
    pytest.importorskip("atheris", reason="the fuzz extra: pip install -e '.[fuzz]'")
    proc = subprocess.run(
        [sys.executable, str(HERE / "run.py"), target, "-runs=1500", "-max_total_time=2",
         f"-artifact_prefix={tmp_path}/", str(tmp_path), str(CORPUS / target)],
        capture_output=True, text=True, timeout=600,  # a loaded machine starts slowly
    )  # fmt: skip
    tail = "\n".join(proc.stderr.splitlines()[-30:])
    assert proc.returncode == 0, f"{target} crashed (input under {tmp_path}):\n{tail}"
    assert "Done" in proc.stderr, tail
