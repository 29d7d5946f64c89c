"""`kvmkit run` refuses bad input with one line and exit status 2, before any guest runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvmkit.testing import pvh


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


def test_triple_fault_ends_the_run_with_status_5(tmp_path: Path) -> None:
    # A PVH "kernel" that loads an empty IDT and faults: #UD -> #DF -> triple fault. It runs
    # on any KVM, PVM included (the machine set-up is the same as for Linux).
    elf = pvh.build(pvh.TRIPLE_FAULT, tmp_path / "tf.elf")
    proc = kvmkit_run("--kernel", str(elf), "--mem-mib", "128", "--timeout", "60", "--", "true")
    assert proc.returncode == 5, proc.stderr
    assert "the guest triple-faulted" in proc.stderr
    # The report shows the state the fault left: the empty IDT the kernel loaded, and where.
    assert "idt=0x0/0x0" in proc.stderr, proc.stderr
    assert "rip=0x100007" in proc.stderr, proc.stderr  # the ud2 after the 7-byte lidt
    # 255 vCPUs (once a traceback: three limits disagreed): the machine is built, the MP
    # table left out (it cannot hold them), and the guest ends the same way.
    many = kvmkit_run("--kernel", str(elf), "--vcpus", "255", "--mem-mib", "128", "--timeout",
                      "120", "--", "true")  # fmt: skip
    assert many.returncode == 5 and "Traceback" not in many.stderr, many.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--vcpus", "1025"], "--vcpus 1025: must be between 1 and 1024"),
        (["--vcpus", "6", "--topology", "sockets=2,cores=2"], "has 4 vCPUs"),
        (["--topology", "sockets=0"], "sockets=0: must be a whole number of at least 1"),
        (["--topology", "cores=x"], "cores='x': not a number"),
        (["--topology", "cpus=4"], "unknown part"),
        (["--topology", "sockets=64,cores=32"],
         "--vcpus 2048 (--topology sockets=64,dies=1,cores=32,threads=1): must be between 1 and "
         "1024"),
        (["--vcpus", "4", "--mem-mib", "256", "--numa", "cpus=0-2,mem-mib=128",
          "--numa", "cpus=2-3,mem-mib=128"], "vCPU 2 is in node 0 and node 1"),
        (["--vcpus", "4", "--mem-mib", "256", "--numa", "cpus=0-1,mem-mib=128",
          "--numa", "cpus=2,mem-mib=128"], "vCPUs 3 are in no node"),
        (["--vcpus", "2", "--mem-mib", "256", "--numa", "cpus=0,mem-mib=100",
          "--numa", "cpus=1,mem-mib=100"], "the nodes have 200 MiB of memory, the machine 256"),
        (["--vcpus", "2", "--mem-mib", "64", "--numa", "cpus=0-2,mem-mib=64"],
         "vCPU 2 does not exist"),
        (["--numa", "cpus=0,mem-mib=0"], "mem-mib must be at least 1"),
        (["--numa", "mem-mib=256"], "needs cpus"),
        (["--numa", "cpus=0,mem-mib=256,host-node=7"], "this host has no NUMA node 7"),
        (["--huge-pages", "2M", "--mem-mib", "33"], "must be a multiple of 2"),
        (["--huge-pages", "1G"], "invalid choice"),
        (["--cpu-affinity", "4096"], "host CPU 4096 is not available to this process"),
        (["--cpu-affinity", "3=0"], "there is no vCPU 3"),
        (["--cpu-affinity", "x=0"], "'x' is not a vCPU number"),
    ],
)  # fmt: skip
def test_bad_topology_numa_and_placement_options(args: list[str], needle: str) -> None:
    proc = kvmkit_run(*args, "--", "true")
    if needle == "invalid choice":  # argparse's own usage error: status 2, a usage line
        assert proc.returncode == 2 and needle in proc.stderr and "Traceback" not in proc.stderr
        return
    one_line_error(proc, needle)


def test_too_few_free_huge_pages_refused_before_anything_starts() -> None:
    free = int(Path("/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages").read_text())
    mem = max(32, (free + 1) * 2)  # one page more than the host has free
    proc = kvmkit_run("--huge-pages", "2M", "--mem-mib", str(mem), "--", "true")
    one_line_error(proc, f"the guest needs {mem // 2} huge pages of 2 MiB, ")
    assert "are free to this process" in proc.stderr and "nr_hugepages" in proc.stderr


def _handles_sigusr1(pid: int) -> bool:
    """The process has a handler for SIGUSR1 (SigCgt in /proc/PID/status, bit 10 - 1)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << 9))
    return False


def test_sigusr1_prints_the_vm_state_and_the_run_goes_on(tmp_path: Path) -> None:
    """`kill -USR1` a running `kvmkit run` (a halting PVH kernel, one drive): its vCPUs,
    console, virtio queues and worker threads on stderr, as often as asked, and the VM keeps
    running (it ends here on its --timeout of 15 s, status 124). A signal that comes while the VM is
    still being built is answered too, not the end of the process."""
    import signal
    import threading
    import time

    kernel = pvh.build(pvh.HALT, tmp_path / "halt.elf")
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    env = dict(os.environ, KVMKIT_FORCE_RUN="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvmkit", "run", "--kernel", str(kernel), "--cmdline", "",
         "--mem-mib", "64", "--timeout", "15", "--drive", str(disk)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    assert proc.stderr is not None
    err = bytearray()

    def read_stderr() -> None:
        assert proc.stderr is not None
        while chunk := proc.stderr.read1(65536):  # type: ignore[attr-defined]
            err.extend(chunk)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        while proc.poll() is None and not _handles_sigusr1(proc.pid):
            time.sleep(0.05)
        dumps = 0
        deadline = time.monotonic() + 60
        # Until the dump shows the started VM; then once more: it is answered again.
        while proc.poll() is None and time.monotonic() < deadline:
            proc.send_signal(signal.SIGUSR1)
            dumps += 1
            time.sleep(0.5)
            if err.count(b"worker vda/0: running") >= 2:
                break
        assert proc.wait(60) == 124, bytes(err).decode(errors="replace")
    finally:
        proc.kill()
        proc.wait()
    reader.join(10)
    text = bytes(err).decode(errors="replace")
    assert text.count("worker vda/0: running") >= 2, text
    assert "vcpu0: running" in text and "console: 0 bytes from the guest" in text
    assert "virtio vda (device 2): status 0x0" in text and "  q0: off size 256" in text
    assert "  transport mmio: interrupt status 0" in text
    assert text.count("kvmkit VM state after") + text.count("no VM yet") == dumps
