"""`kvmkit run` refuses bad input with one line and exit status 2, before any guest runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


def kvmkit_run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, KVMKIT_FORCE_RUN="1")
    return subprocess.run(
        [sys.executable, "-m", "kvmkit", "run", *args],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def one_line_error(proc: subprocess.CompletedProcess[str], needle: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert needle in proc.stderr


def test_missing_kernel(tmp_path: Path) -> None:
    one_line_error(kvmkit_run("--kernel", str(tmp_path / "nope"), "--", "true"), "no such file")


def test_not_a_kernel(tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(8192))
    one_line_error(kvmkit_run("--kernel", str(junk), "--", "true"), "junk")


def test_old_boot_protocol(tmp_path: Path) -> None:
    image = bytearray(16384)
    image[0x1FE:0x200] = b"\x55\xaa"
    image[0x202:0x206] = b"HdrS"
    image[0x206:0x208] = (0x0202).to_bytes(2, "little")  # protocol 2.02: no 64-bit entry
    image[0x1F1] = 4
    kernel = tmp_path / "old-bzImage"
    kernel.write_bytes(bytes(image))
    one_line_error(kvmkit_run("--kernel", str(kernel), "--", "true"), "2.02")


@pytest.mark.parametrize(
    ("option", "value", "needle"),
    [("--vcpus", "0", "--vcpus 0"), ("--vcpus", "100000", "--vcpus 100000"),
     ("--mem-mib", "0", "--mem-mib 0"), ("--mem-mib", "999999999", "--mem-mib 999999999")],
)  # fmt: skip
def test_absurd_sizes(option: str, value: str, needle: str) -> None:
    one_line_error(kvmkit_run(option, value, "--", "true"), needle)


TRIPLE_FAULT_KERNEL = """
	.section .note.Xen, "", @note
	.balign 4
	.long 4, 4, 18
	.asciz "Xen"
	.long _start
	.text
	.code32
	.globl _start
_start:
	lidt idtr
	ud2
idtr:	.word 0
	.long 0
"""


def test_triple_fault_ends_the_run_with_status_5(tmp_path: Path) -> None:
    # A PVH "kernel" that loads an empty IDT and faults: #UD -> #DF -> triple fault. It runs
    # on any KVM, PVM included (the machine set-up is the same as for Linux).
    src, obj, elf = tmp_path / "tf.S", tmp_path / "tf.o", tmp_path / "tf.elf"
    src.write_text(TRIPLE_FAULT_KERNEL)
    subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True)
    subprocess.run(
        ["ld", "-m", "elf_x86_64", "-N", "-Ttext=0x100000", "-e", "_start", "-o", str(elf),
         str(obj)],
        check=True, capture_output=True,
    )  # fmt: skip
    proc = kvmkit_run("--kernel", str(elf), "--mem-mib", "128", "--timeout", "60", "--", "true")
    assert proc.returncode == 5, proc.stderr
    assert "the guest triple-faulted" in proc.stderr
    # The report shows the state the fault left: the empty IDT the kernel loaded, and where.
    assert "idt=0x0/0x0" in proc.stderr, proc.stderr
    assert "rip=0x100007" in proc.stderr, proc.stderr  # the ud2 after the 7-byte lidt


def test_sigusr1_prints_the_vm_state_and_the_run_goes_on(tmp_path: Path) -> None:
    """`kill -USR1` a running `kvmkit run`: its vCPUs, console, virtio queues and worker
    threads on stderr, and the VM keeps running (ends here on --timeout, status 124)."""
    import signal
    import time

    from kvmkit.testing import pvh

    kernel = pvh.build(pvh.HALT, tmp_path / "halt.elf")
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    env = dict(os.environ, KVMKIT_FORCE_RUN="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmkit", "run", "--kernel", str(kernel), "--cmdline", "",
         "--mem-mib", "64", "--timeout", "20", "--drive", str(disk)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env=env,
    )  # fmt: skip
    try:
        time.sleep(8)  # started (Python imports, the VM built)
        proc.send_signal(signal.SIGUSR1)
        time.sleep(1)
        proc.send_signal(signal.SIGUSR1)  # answered again: the run goes on
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 124, err
    assert "vcpu0: running" in err and "virtio vda (device 2): status 0x0" in err
    assert "  q0: off size 256" in err and "worker vda/0: running" in err
