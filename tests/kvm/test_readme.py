"""The README's Python examples run as written (docs that match the code)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from readme_blocks import ALL_BLOCKS, KVM_BLOCKS


@pytest.mark.parametrize("code", KVM_BLOCKS, ids=[f"block{i}" for i in range(len(KVM_BLOCKS))])
def test_readme_example_runs(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_readme_has_examples() -> None:
    assert len(KVM_BLOCKS) >= 2
    assert len(ALL_BLOCKS) > len(KVM_BLOCKS)  # the Linux-guest example runs in tests/hwvirt
