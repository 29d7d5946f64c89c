"""Fuzz target: the kernel loader (kvmkit.boot.loader.load_linux): the file's format
(bzImage setup header, ELF headers, program headers, notes), each way in (bzImage through
the 64-bit boot protocol, ELF with a PVH note, ELF vmlinux without one), the placement of
the kernel and of an initrd above it, and the boot parameters written, into 32 MiB of guest
memory. The input is the kernel file; the only rejection is BootError (one line)."""

from __future__ import annotations

from pathlib import Path

from common import scratch_dir

from kvmkit.boot.loader import BootError, load_linux
from kvmkit.memory import GuestMemory

MEM_SIZE = 32 << 20
_SHM = Path("/dev/shm")
_DIR = _SHM if _SHM.is_dir() else scratch_dir()
_KERNEL = _DIR / f"kvmkit-fuzz-kernel-{id(_DIR)}"
_INITRD = scratch_dir() / "initrd"
_INITRD.write_bytes(b"070701" + bytes(4090))
_MEM = GuestMemory()
_MEM.add_anonymous(0, MEM_SIZE)


def TestOneInput(data: bytes) -> None:
    _KERNEL.write_bytes(data)
    for initrd in (None, _INITRD):
        try:
            setup = load_linux(_MEM, _KERNEL, initrd=initrd, cmdline="console=ttyS0",
                               mem_size=MEM_SIZE)  # fmt: skip
        except BootError:
            return
        start, end = setup.kernel_range
        assert 0 <= start <= end <= MEM_SIZE, setup
