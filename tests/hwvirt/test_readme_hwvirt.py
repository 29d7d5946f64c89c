"""The README's Linux-guest examples run as written (they need VMX/SVM)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from readme_blocks import HWVIRT_BLOCKS

pytestmark = pytest.mark.hwvirt


@pytest.mark.parametrize("code", HWVIRT_BLOCKS, ids=[f"b{i}" for i in range(len(HWVIRT_BLOCKS))])
def test_readme_linux_example_runs(code: str) -> None:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("0 b'2\\n'")
