"""A tiny guest as a virtio-mmio driver on real KVM: it sets up virtio-rng, gets random
bytes through a notification that is a KVM ioeventfd (served by the worker thread), then
corrupts its queue with a descriptor loop. The VMM keeps running and the device reports
NEEDS_RESET in its status register."""

from __future__ import annotations

from kvmkit.devices.irq import NoIrq
from kvmkit.devices.virtio.mmio import VirtioMmio
from kvmkit.devices.virtio.rng import VirtioRng
from kvmkit.devices.virtio.worker import VirtioWorkers
from kvmkit.kvm import VmExit
from kvmkit.kvm.exits import MmioExit
from kvmkit.testing.tinyguest import TinyGuest

BASE = 0xD000_0000

GUEST = r"""
#include "kvmkit_guest.h"
#define R(off) (0xD0000000ull + (off))
#define DESC 0x280000ull
#define AVAIL 0x281000ull
#define USED 0x282000ull
#define BUF 0x283000ull

static void desc(int i, u64 addr, u32 len, u16 flags, u16 next)
{
	volatile u8 *d = (volatile u8 *)(DESC + 16 * i);
	*(volatile u64 *)d = addr;
	*(volatile u32 *)(d + 8) = len;
	*(volatile u16 *)(d + 12) = flags;
	*(volatile u16 *)(d + 14) = next;
}

static void publish(u16 idx, u16 head)
{
	*(volatile u16 *)(AVAIL + 4 + 2 * (idx % 8)) = head;
	*(volatile u16 *)(AVAIL + 2) = idx + 1;
	mmio_write32(R(0x50), 0); /* QueueNotify: an ioeventfd, no exit */
}

int main(void)
{
	GUEST_ASSERT_EQ(mmio_read32(R(0x0)), 0x74726976);
	GUEST_ASSERT_EQ(mmio_read32(R(0x8)), 4);
	mmio_write32(R(0x70), 0);
	mmio_write32(R(0x70), 3);
	mmio_write32(R(0x24), 1);
	mmio_write32(R(0x20), 1); /* VIRTIO_F_VERSION_1 */
	mmio_write32(R(0x70), 11);
	GUEST_ASSERT(mmio_read32(R(0x70)) & 8);
	mmio_write32(R(0x30), 0);
	mmio_write32(R(0x38), 8);
	mmio_write32(R(0x80), (u32)DESC);
	mmio_write32(R(0x90), (u32)AVAIL);
	mmio_write32(R(0xa0), (u32)USED);
	mmio_write32(R(0x44), 1);
	mmio_write32(R(0x70), 15);

	desc(0, BUF, 64, 2 /* WRITE */, 0);
	publish(0, 0);
	for (u64 i = 0; *(volatile u16 *)(USED + 2) != 1; i++)
		GUEST_ASSERT(i < 4000000000ull);
	guest_report(*(volatile u32 *)(USED + 8)); /* used len */

	desc(1, BUF, 64, 1 /* NEXT */, 1); /* a descriptor chained to itself */
	publish(1, 1);
	for (u64 i = 0; !(mmio_read32(R(0x70)) & 0x40); i++)
		GUEST_ASSERT(i < 100000000ull);
	guest_report(mmio_read32(R(0x70)));
	return 0;
}
"""


def test_hostile_tiny_guest_driver_gets_needs_reset_and_vmm_survives() -> None:
    dev = VirtioRng()
    worker = VirtioWorkers()
    with TinyGuest("long64", cpl=3) as g:
        transport = VirtioMmio(dev, g.mem, NoIrq())
        transport.attach(g.vm, BASE)
        worker.add(dev)
        worker.start()

        def on_exit(exit_: VmExit) -> bool:
            if not isinstance(exit_, MmioExit) or not BASE <= exit_.phys_addr < BASE + 0x1000:
                return False
            if exit_.is_write:
                transport.write(exit_.phys_addr - BASE, exit_.data)
            else:
                transport.read(exit_.phys_addr - BASE, exit_.data)
            return True

        try:
            g.load_c(GUEST)
            out = g.run(on_exit=on_exit, timeout=120)
        finally:
            worker.close()
        random = g.mem.read(0x283000, 64)
    assert out.status == 0
    assert out.reports[0] == 64  # the rng filled the buffer
    assert out.reports[1] & 0x40  # NEEDS_RESET
    assert out.reports[1] & 0x04  # DRIVER_OK still set: only the driver's reset clears it
    assert dev.errors and "longer" in dev.errors[0]
    assert random != bytes(64)
    dev.close()
