"""A Machine's threads against the host side failing or stalling (real /dev/kvm, tiny PVH
kernels): a console reader that never reads does not stop the vCPUs or the shutdown, a
guest driving the UART the way Linux does loses nothing to a slow reader, and one vCPU whose
stop fails does not leave the others running; a pause parks every virtio queue worker."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

from kvmkit.devices.virtio.blk import DriveConfig
from kvmkit.devices.virtio.vsock import VsockConfig
from kvmkit.testing import pvh
from kvmkit.vmm.config import MachineConfig
from kvmkit.vmm.machine import Machine


def closes_within(m: Machine, seconds: float) -> bool:
    t = threading.Thread(target=m.close, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive()


def test_a_console_reader_that_never_reads_stops_neither_vcpus_nor_shutdown(
    tmp_path: Path,
) -> None:
    """The guest writes to the serial port in a loop; the only console reader blocks for
    good (a full stdout pipe). The vCPU keeps running (the guest's output goes on reaching
    the console), the machine pauses and resumes, and close() returns in bounded time,
    leaving the reader behind."""
    kernel = pvh.serial_loop_kernel(tmp_path / "loop.elf", delay=200)
    release = threading.Event()
    entered = threading.Event()

    def never_reads(data: bytes) -> None:
        entered.set()
        release.wait()

    m = Machine(MachineConfig(kernel=kernel, cmdline="", mem_mib=64))
    try:
        m.console.add_listener(never_reads)
        m.start()
        assert entered.wait(30)
        before = m.console.total
        time.sleep(1.0)
        assert m.console.total > before  # the vCPU runs on
        m.pause()  # every vCPU parks (would time out if one were stuck in the console)
        m.resume()
        assert closes_within(m, 20)
    finally:
        release.set()
        m.close()


def test_every_vcpu_stops_when_stopping_one_fails(tmp_path: Path) -> None:
    """vCPU 0's kick fails (its thread gone: ESRCH from pthread_kill); vCPU 1, waiting for a
    SIPI inside KVM_RUN, must still be kicked and stop, and stop() must not raise."""
    kernel = pvh.serial_loop_kernel(tmp_path / "loop.elf", delay=2000)
    m = Machine(MachineConfig(kernel=kernel, cmdline="", mem_mib=64, vcpus=2))
    try:
        m.start()
        assert m.console.wait_for(b"....", 30)

        def kick_fails() -> None:
            raise ProcessLookupError(errno.ESRCH, "No such process")

        vcpu0 = m.threads[0].vcpu
        vcpu0.kick = kick_fails  # type: ignore[method-assign]
        m.stop()
        m.threads[1].join(10)
        assert not m.threads[1].thread.is_alive()
        del vcpu0.kick  # vCPU 0 itself only stops at its next exit: kick it for the test
        vcpu0.kick()
        assert m.wait(10) is not None
        assert not any(t.thread.is_alive() for t in m.threads)
    finally:
        assert closes_within(m, 20)


def test_pause_parks_every_queue_worker_and_resume_releases_them(tmp_path: Path) -> None:
    """Machine.pause parks each virtio queue worker (a thread per queue group: the drive's
    queue, the rng's, vsock's three queues together), not one worker for all; `paused` holds
    only then, and resume() lets every one run again. Each thread carries its kind in its
    name."""
    kernel = pvh.build(pvh.HALT, tmp_path / "halt.elf")
    img = tmp_path / "d.img"
    img.write_bytes(bytes(1 << 20))
    sock = Path(f"/tmp/kvmkit-test-{os.getpid()}-pause.sock")
    cfg = MachineConfig(
        kernel=kernel, cmdline="", mem_mib=64, drives=[DriveConfig(img)], rng=True,
        vsock=VsockConfig(3, sock),
    )  # fmt: skip
    names = ("vda/0", "rng/0", "vsock/0+1+2")
    with Machine(cfg) as m:
        m.start()
        threads = {t.name for t in threading.enumerate()}
        assert {f"virtio:{n}" for n in names} <= threads, threads
        # Kernel names too (what /proc, ps and a stall report show), 15 bytes at most; a
        # thread names itself as it starts.
        want = {"vcpu-0", "virtio-vda/0", "virtio-rng/0", "virtio-vsock/0+"}
        deadline = time.monotonic() + 10
        while True:
            comms = set()
            for task in Path("/proc/self/task").iterdir():
                try:
                    comms.add((task / "comm").read_text().strip())
                except OSError:
                    pass  # a thread that ended meanwhile
            if want <= comms or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert want <= comms, comms
        m.pause()
        assert m.paused
        text = m.describe()
        for n in names:
            assert f"worker {n}: parked" in text, text
        m.resume()
        assert not m.paused
        text = m.describe()
        for n in names:
            assert f"worker {n}: running" in text, text
