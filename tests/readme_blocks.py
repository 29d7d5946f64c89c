"""The README's Python examples, for the tests that run them (docs that match the code).

Blocks that start with HWVIRT need VMX/SVM (they boot Linux) and run in tests/hwvirt; the
others run on any KVM host."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
HWVIRT = "# needs VMX/SVM"
ALL_BLOCKS: list[str] = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
KVM_BLOCKS = [b for b in ALL_BLOCKS if not b.startswith(HWVIRT)]
HWVIRT_BLOCKS = [b for b in ALL_BLOCKS if b.startswith(HWVIRT)]
