"""The kvmkit cache directory (downloaded kernels, built guest images, unpacked packages).

`$KVMKIT_CACHE` when set, otherwise `$XDG_CACHE_HOME/kvmkit` or `~/.cache/kvmkit`.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(create: bool = True) -> Path:
    env = os.environ.get("KVMKIT_CACHE")
    if env:
        path = Path(env)
    else:
        base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(base) / "kvmkit"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path
