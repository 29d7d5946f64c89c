"""Fault injection under real devices driven by a tiny guest (CPL3 virtio-mmio drivers on real
KVM; issue 19, docs/security.md "When the host fails"): the disk image on a full file system
(ENOSPC) or failing (EIO), and the tap deleted under a running guest. The failing device
answers with an error (VIRTIO_BLK_S_IOERR) or drops; the other devices and the vCPU go on."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvmkit.devices.irq import NoIrq
from kvmkit.devices.virtio.blk import VirtioBlk
from kvmkit.devices.virtio.device import VirtioDevice
from kvmkit.devices.virtio.mmio import VirtioMmio
from kvmkit.devices.virtio.net import VirtioNet
from kvmkit.devices.virtio.rng import VirtioRng
from kvmkit.devices.virtio.worker import VirtioWorkers
from kvmkit.kvm import IoExit, VmExit
from kvmkit.kvm.exits import MmioExit
from kvmkit.testing.fusefile import FuseFile
from kvmkit.testing.netns import in_netns, temp_netns
from kvmkit.testing.tinyguest import TinyGuest

BASE = 0xD000_0000
PHASE_PORT = 0x500  # the guest's OUT here asks the host to inject the next fault
SECTOR = 512

# A minimal virtio-mmio driver (virtio 1.2 §4.2.2, §2.7 split rings) polling its used rings.
DRIVER = r"""
#include "kvmkit_guest.h"
#define DEV(i) (0xD0000000ull + 0x1000ull * (i))
#define PHASE_PORT 0x500
struct vq { u64 dev; u32 q; u16 size; u16 next; u16 seen; u64 desc, avail, used; };
static u64 area = 0x200000ull; /* queue rings and buffers, 4 KiB pages from 2 MiB */
static u64 page(void) { u64 p = area; area += 0x1000; for (int i = 0; i < 0x1000; i += 8)
	*(volatile u64 *)(p + i) = 0; return p; }
static void dev_init(u64 dev, u32 id, u32 nq, struct vq *qs)
{
	GUEST_ASSERT_EQ(mmio_read32(dev), 0x74726976);
	GUEST_ASSERT_EQ(mmio_read32(dev + 0x8), id);
	mmio_write32(dev + 0x70, 0);
	mmio_write32(dev + 0x70, 3);              /* ACKNOWLEDGE | DRIVER */
	mmio_write32(dev + 0x24, 1);
	mmio_write32(dev + 0x20, 1);              /* VIRTIO_F_VERSION_1 only */
	mmio_write32(dev + 0x24, 0);
	mmio_write32(dev + 0x20, 0);
	mmio_write32(dev + 0x70, 11);             /* FEATURES_OK */
	GUEST_ASSERT(mmio_read32(dev + 0x70) & 8);
	for (u32 q = 0; q < nq; q++) {
		struct vq *v = &qs[q];
		v->dev = dev; v->q = q; v->size = 8; v->next = 0; v->seen = 0;
		v->desc = page(); v->avail = page(); v->used = page();
		mmio_write32(dev + 0x30, q);
		mmio_write32(dev + 0x38, v->size);
		mmio_write32(dev + 0x80, (u32)v->desc);
		mmio_write32(dev + 0x90, (u32)v->avail);
		mmio_write32(dev + 0xa0, (u32)v->used);
		mmio_write32(dev + 0x44, 1);
	}
	mmio_write32(dev + 0x70, 15);             /* DRIVER_OK */
}
/* chain n buffers (addr, len, device-writable) and make it available; returns the head */
static u16 vq_add(struct vq *v, int n, const u64 *addr, const u32 *len, const int *wr)
{
	u16 head = v->next;
	for (int i = 0; i < n; i++) {
		u16 d = (u16)((head + i) % v->size);
		volatile u8 *p = (volatile u8 *)(v->desc + 16 * d);
		*(volatile u64 *)p = addr[i];
		*(volatile u32 *)(p + 8) = len[i];
		*(volatile u16 *)(p + 12) = (u16)((i + 1 < n ? 1 : 0) | (wr[i] ? 2 : 0));
		*(volatile u16 *)(p + 14) = (u16)((d + 1) % v->size);
	}
	v->next = (u16)((head + n) % v->size);
	volatile u16 *idx = (volatile u16 *)(v->avail + 2);
	*(volatile u16 *)(v->avail + 4 + 2 * (*idx % v->size)) = head;
	__asm__ volatile("" ::: "memory");
	*idx = (u16)(*idx + 1);
	mmio_write32(v->dev + 0x50, v->q);        /* QueueNotify: an ioeventfd */
	return head;
}
/* wait for the next used entry; returns its length */
static u32 vq_wait(struct vq *v)
{
	for (u64 i = 0; *(volatile u16 *)(v->used + 2) == v->seen; i++)
		GUEST_ASSERT(i < 3000000000ull);
	u32 len = *(volatile u32 *)(v->used + 4 + 8 * (v->seen % v->size) + 4);
	v->seen++;
	return len;
}
static void phase(u32 n) { outl(PHASE_PORT, n); }
static u8 *hdr, *data, *status;
static u8 blk_req(struct vq *v, u32 type, u64 sector, u32 len)
{
	*(volatile u32 *)hdr = type;
	*(volatile u32 *)(hdr + 4) = 0;
	*(volatile u64 *)(hdr + 8) = sector;
	*status = 0xff;
	u64 a[3] = {(u64)hdr, (u64)data, (u64)status};
	u32 l[3] = {16, len, 1};
	int w[3] = {0, type == 0, 1};
	vq_add(v, 3, a, l, w);
	vq_wait(v);
	return *(volatile u8 *)status;
}
static u32 rng_read(struct vq *v, u64 buf)
{
	u64 a[1] = {buf}; u32 l[1] = {64}; int w[1] = {1};
	vq_add(v, 1, a, l, w);
	return vq_wait(v);
}
static void fill(u8 *p, u32 n, u8 v) { for (u32 i = 0; i < n; i++) p[i] = (u8)(v + i); }
static int same(const u8 *p, u32 n, u8 v) { for (u32 i = 0; i < n; i++) if (p[i] != (u8)(v + i))
	return 0; return 1; }
"""

# blk at slot 0, rng at slot 1. Phase 1: the host makes the image fail; 2: it heals.
BLK_GUEST = DRIVER + r"""
int main(void)
{
	struct vq blk[1], rng[1];
	dev_init(DEV(0), 2, 1, blk);
	dev_init(DEV(1), 4, 1, rng);
	hdr = (u8 *)page(); status = (u8 *)page(); data = (u8 *)page();
	fill(data, 4096, 0x11);
	guest_report(blk_req(blk, 1, 0, 4096));   /* OUT sectors 0-7: OK */
	phase(1);                                  /* the host makes the disk fail */
	fill(data, 4096, 0x22);
	guest_report(blk_req(blk, 1, 8, 4096));   /* OUT sectors 8-15: IOERR */
	guest_report(rng_read(rng, page()));       /* the rng still answers: 64 */
	guest_report(blk_req(blk, 4, 0, 0));      /* FLUSH (Unsafe: acknowledged, no sync) */
	guest_report(blk_req(blk, 0, 0, 4096));   /* IN sectors 0-7: the failure's status */
	phase(2);                                  /* the host heals the disk */
	guest_report(blk_req(blk, 0, 0, 4096));   /* IN: OK ... */
	guest_report(same(data, 4096, 0x11));      /* ... with what was written before */
	fill(data, 4096, 0x33);
	guest_report(blk_req(blk, 1, 8, 4096));   /* OUT again: OK */
	guest_report(mmio_read32(DEV(0) + 0x70)); /* status: no NEEDS_RESET */
	return 0;
}
"""


def _serve(transports: list[VirtioMmio], on_phase: Callable[[int], None]
           ) -> Callable[[VmExit], bool]:  # fmt: skip
    def on_exit(exit_: VmExit) -> bool:
        if isinstance(exit_, IoExit) and exit_.port == PHASE_PORT and exit_.is_out:
            on_phase(exit_.value)
            return True
        if not isinstance(exit_, MmioExit):
            return False
        slot, off = divmod(exit_.phys_addr - BASE, 0x1000)
        if not 0 <= slot < len(transports):
            return False
        if exit_.is_write:
            transports[slot].write(off, exit_.data)
        else:
            transports[slot].read(off, exit_.data)
        return True

    return on_exit


def _run(g: TinyGuest, devices: list[VirtioDevice], source: str,
         on_phase: Callable[[int], None]) -> list[int]:  # fmt: skip
    workers = VirtioWorkers()
    transports = []
    for i, dev in enumerate(devices):
        t = VirtioMmio(dev, g.mem, NoIrq())
        t.attach(g.vm, BASE + 0x1000 * i)
        transports.append(t)
        workers.add(dev)
    workers.start()
    try:
        g.load_c(source)
        out = g.run(on_exit=_serve(transports, on_phase), timeout=120)
    finally:
        workers.close()
    assert out.status == 0
    return [int(r) for r in out.reports]


@contextlib.contextmanager
def _full_tmpfs(mnt: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs holding a sparse 64 KiB image and a filler that takes every free page
    left: writes into the image's holes get ENOSPC from the file system itself."""
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "kvmkit-full", str(mnt)],
                   check=True)  # fmt: skip
    try:
        image = mnt / "disk.img"
        with image.open("wb") as f:
            f.write(bytes(4096))  # sectors 0-7 allocated; 8 on a hole
            f.truncate(64 << 10)
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            with contextlib.suppress(OSError):
                while os.write(fd, b"x" * 4096):
                    pass
        finally:
            os.close(fd)
        yield image
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_on_a_full_file_system_gets_ioerr_and_recovers(tmp_path: Path) -> None:
    """ENOSPC from a real full tmpfs: the write fails with IOERR and leaves nothing on the
    disk; after space is freed the same write succeeds."""
    with _full_tmpfs(tmp_path / "mnt") as image:
        blk, rng = VirtioBlk(image, cache_type="Unsafe"), VirtioRng()
        filler = image.parent / "filler"

        def on_phase(n: int) -> None:
            if n == 2:
                filler.unlink()  # space comes back

        with TinyGuest("long64", cpl=3) as g:
            reports = _run(g, [blk, rng], BLK_GUEST, on_phase)
        blk.close()
        rng.close()
        data = image.read_bytes()
    ok, enospc, rng_len, flush, read_after, read_ok, same, write_ok, status = reports
    assert (ok, enospc, rng_len, flush) == (0, 1, 64, 0)
    assert read_after == 0  # reads of allocated blocks need no space
    assert (read_ok, same, write_ok) == (0, 1, 0)
    assert not status & 0x40
    assert data[:4096] == bytes((0x11 + i) & 0xFF for i in range(4096))
    assert data[4096:8192] == bytes((0x33 + i) & 0xFF for i in range(4096))
    assert blk.write_count == 2 and blk.errors == []


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EIO])
def test_disk_failing_with_errno_gets_ioerr_and_recovers(tmp_path: Path, err: int) -> None:
    """A FUSE disk that fails every data request with `err`: the failing write and read get
    IOERR, nothing reaches the image, the rng keeps serving, and once the disk heals the
    device works again without a reset."""
    with FuseFile(tmp_path / "mnt", size=64 << 10) as f:
        blk, rng = VirtioBlk(f.path, cache_type="Unsafe"), VirtioRng()
        f.fail(0)
        phases = {1: err, 2: 0}
        with TinyGuest("long64", cpl=3) as g:
            reports = _run(g, [blk, rng], BLK_GUEST, lambda n: f.fail(phases[n]))
        blk.close()
        rng.close()
        data = bytes(f.data)
    ok, failed, rng_len, flush, read_failed, read_ok, same, write_ok, status = reports
    assert (ok, failed, rng_len, flush, read_failed) == (0, 1, 64, 0, 1)
    assert (read_ok, same, write_ok) == (0, 1, 0)
    assert not status & 0x40
    assert data[:4096] == bytes((0x11 + i) & 0xFF for i in range(4096))
    # the failed write of 0x22... never reached the image; the healed one did
    assert data[4096:8192] == bytes((0x33 + i) & 0xFF for i in range(4096))
    assert blk.errors == []


# net at slot 0 (rx 0, tx 1), rng at slot 1. Phase 1: the host deletes the tap.
NET_GUEST = DRIVER + r"""
static void send(struct vq *tx, u64 frame)
{
	u64 a[1] = {frame}; u32 l[1] = {12 + 60}; int w[1] = {0};
	vq_add(tx, 1, a, l, w);
	vq_wait(tx);
}
int main(void)
{
	struct vq net[2], rng[1];
	dev_init(DEV(0), 1, 2, net);
	dev_init(DEV(1), 4, 1, rng);
	for (int i = 0; i < 4; i++) {                /* rx buffers */
		u64 a[1] = {page()}; u32 l[1] = {2048}; int w[1] = {1};
		vq_add(&net[0], 1, a, l, w);
	}
	u64 frame = page();
	for (int i = 12; i < 18; i++) ((u8 *)frame)[i] = 0xff;   /* broadcast */
	((u8 *)frame)[18] = 0x02; ((u8 *)frame)[24] = 0x08;        /* src, type IPv4 */
	send(&net[1], frame);
	phase(1);                                  /* the host deletes the tap */
	for (int i = 0; i < 3; i++)
		send(&net[1], frame);                  /* tx goes on: dropped, not stuck */
	phase(2);                                  /* the host measures CPU time */
	guest_report(rng_read(rng, page()));       /* the rng still answers: 64 */
	guest_report(mmio_read32(DEV(0) + 0x70));
	return 0;
}
"""


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process, by thread name (comm)."""
    out: dict[str, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for tid in os.listdir("/proc/self/task"):
        try:
            stat = Path(f"/proc/self/task/{tid}/stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[f"{name}/{tid}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def test_tap_deleted_under_a_running_guest(tmp_path: Path) -> None:
    """`ip link del` of the tap while the guest drives the NIC: the tap's reader stops
    (one log line, no busy loop: the device's threads take no CPU afterwards), tx frames
    are dropped and counted, the rng and the vCPU go on, the device is not reset."""
    with temp_netns() as ns:
        net = in_netns(ns, lambda: VirtioNet("kvmkit-del0"))
        rng = VirtioRng()
        cpu: dict[str, float] = {}

        def on_phase(n: int) -> None:
            if n == 1:
                subprocess.run(["ip", "-n", ns, "link", "del", "kvmkit-del0"], check=True)
                time.sleep(0.2)  # the rx worker sees the tap go
            elif n == 2:
                before = _thread_cpu()
                time.sleep(2.0)
                after = _thread_cpu()
                cpu.update({k: after[k] - before.get(k, 0.0) for k in after})

        with TinyGuest("long64", cpl=3) as g:
            reports = _run(g, [net, rng], NET_GUEST, on_phase)
        rng.close()
        described = net.describe_device()
        tx_frames, tx_dropped = net.tx_frames, net.tx_dropped
        net.close()
    assert reports[0] == 64
    assert not reports[1] & 0x40 and reports[1] & 4  # DRIVER_OK, no NEEDS_RESET
    assert tx_frames == 1 and tx_dropped == 3, described
    assert "failed" in described, described
    # While the vCPU waited in the host for 2 s, no thread of this process spun.
    busy = {k: v for k, v in cpu.items() if v > 0.2}
    assert not busy, busy
