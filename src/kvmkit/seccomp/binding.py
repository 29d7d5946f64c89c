"""Importing pyseccomp where `ctypes.util.find_library` cannot work.

pyseccomp finds libseccomp at import with `ctypes.util.find_library("seccomp")`, which runs
`ldconfig -p` (or gcc, or ld) to turn the name into a file. Inside kvmkit-jailer's jail none
of those programs exists (docs/security.md, "The jailer"), so the lookup answers None and the
import fails. The dynamic loader itself needs no program: given the library's soname, dlopen
searches the loader cache and the default directories, which the jail does hold. So when the
lookup finds nothing, the import is given the soname instead.
"""

from __future__ import annotations

import ctypes.util
import sys
from types import ModuleType

SONAME = "libseccomp.so.2"  # libseccomp's soname since 2.0 (Debian's libseccomp2)


def load() -> ModuleType:
    """The pyseccomp module, imported with the fallback above."""
    if "pyseccomp" in sys.modules:
        return sys.modules["pyseccomp"]
    real = ctypes.util.find_library

    def find(name: str) -> str | None:
        found = real(name)
        if found is None and name == "seccomp":
            return SONAME
        return found

    ctypes.util.find_library = find
    try:
        import pyseccomp
    finally:
        ctypes.util.find_library = real
    module: ModuleType = pyseccomp
    return module
