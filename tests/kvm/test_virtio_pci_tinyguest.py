"""A tiny guest as a virtio-pci driver on real KVM, with the VMM's own PCI wiring
(`kvmkit.vmm.pci.MachinePci`): it finds virtio-rng through mechanism #1 and the capability
list, enables MSI-X with one entry aimed at its LAPIC, gets random bytes through a notify
write that is a KVM ioeventfd (no exit), and takes the used-buffer interrupt as an MSI
(GSI route + irqfd) in its IDT handler. Then it moves the BAR and does it again: the
ioeventfd and the MMIO mapping moved with it."""

from __future__ import annotations

from kvmkit.arch.x86_64 import layout
from kvmkit.devices.bus import Bus
from kvmkit.devices.virtio.rng import VirtioRng
from kvmkit.devices.virtio.worker import VirtioWorkers
from kvmkit.kvm import VmExit
from kvmkit.kvm.exits import IoExit, MmioExit
from kvmkit.testing.tinyguest import TinyGuest
from kvmkit.vmm.pci import MachinePci

VECTOR = 0x41
MOVED = layout.PCI_MMIO_BASE + 0x40_0000

GUEST = r"""
#include "kvmkit_guest.h"
#define DESC 0x280000ull
#define AVAIL 0x281000ull
#define USED 0x282000ull
#define BUF 0x283000ull
#define SLOT 1

volatile u32 irq_count;
/* The MSI handler: count, EOI to the LAPIC (address in a register: a 32-bit immediate
 * address would be sign-extended), return. */
__asm__(".globl isr\nisr:\n"
	"	push %rax\n"
	"	incl irq_count(%rip)\n"
	"	mov $0xFEE000B0, %eax\n"
	"	movl $0, (%rax)\n"
	"	pop %rax\n"
	"	iretq\n");

#define ADDR(reg) (0x80000000u | SLOT << 11 | (reg))
static u32 cfg_read(u32 reg) { outl(0xCF8, ADDR(reg)); return inl(0xCFC); }
static void cfg_write(u32 reg, u32 v) { outl(0xCF8, ADDR(reg)); outl(0xCFC, v); }

static void wait_irq(u32 n)
{
	__asm__ volatile("cli");
	while (irq_count < n)
		__asm__ volatile("sti; hlt; cli");
	__asm__ volatile("sti");
}

static void request(u64 notify_addr, u16 idx)
{
	volatile u8 *d = (volatile u8 *)DESC;
	*(volatile u64 *)d = BUF;
	*(volatile u32 *)(d + 8) = 64;
	*(volatile u16 *)(d + 12) = 2; /* WRITE */
	*(volatile u16 *)(AVAIL + 4 + 2 * (idx % 8)) = 0;
	*(volatile u16 *)(AVAIL + 2) = idx + 1;
	*(volatile u16 *)notify_addr = 0; /* an ioeventfd: no exit */
}

int main(void)
{
	outl(0xCF8, 0x80000000u);
	GUEST_ASSERT_EQ(inl(0xCFC), 0x00081b36); /* the host bridge */
	GUEST_ASSERT_EQ(cfg_read(0), 0x10441af4); /* virtio 1.0 rng */
	u32 common = 0, notify = 0, mult = 0, msix = 0;
	for (u32 ptr = cfg_read(0x34) & 0xff; ptr; ptr = (cfg_read(ptr) >> 8) & 0xff) {
		u32 hdr = cfg_read(ptr);
		if ((hdr & 0xff) == 0x09 && (hdr >> 24) == 1)
			common = cfg_read(ptr + 8);
		if ((hdr & 0xff) == 0x09 && (hdr >> 24) == 2) {
			notify = cfg_read(ptr + 8);
			mult = cfg_read(ptr + 16);
		}
		if ((hdr & 0xff) == 0x11)
			msix = ptr;
	}
	GUEST_ASSERT(msix && notify);
	u64 bar = cfg_read(0x10) & ~0xfu;
	u64 table = bar + (cfg_read(msix + 4) & ~7u);

	mmio_write32(0xFEE000F0, 0x1FF); /* LAPIC software enable */
	u32 ctrl = cfg_read(msix);
	cfg_write(msix, ctrl | 0xC0000000u); /* MSI-X enable, function masked */
	mmio_write32(table + 16, 0xFEE00000); /* entry 1: APIC 0, fixed, VECTOR */
	mmio_write32(table + 20, 0);
	mmio_write32(table + 24, VECTOR);
	mmio_write32(table + 28, 0);
	cfg_write(msix, (ctrl | 0x80000000u) & ~0x40000000u);

#define C8(o) (*(volatile u8 *)(bar + common + (o)))
#define C16(o) (*(volatile u16 *)(bar + common + (o)))
#define C32(o) (*(volatile u32 *)(bar + common + (o)))
	C8(0x14) = 0;
	C8(0x14) = 3;
	C32(0x08) = 1;
	C32(0x0C) = 1; /* VIRTIO_F_VERSION_1 */
	C8(0x14) = 11;
	GUEST_ASSERT(C8(0x14) & 8);
	C16(0x16) = 0;
	C16(0x18) = 8;
	C16(0x1A) = 1;
	GUEST_ASSERT_EQ(C16(0x1A), 1);
	C32(0x20) = (u32)DESC; C32(0x24) = 0;
	C32(0x28) = (u32)AVAIL; C32(0x2C) = 0;
	C32(0x30) = (u32)USED; C32(0x34) = 0;
	C16(0x1C) = 1;
	C8(0x14) = 15;
	u32 off = C16(0x1E) * mult;

	request(bar + notify + off, 0);
	wait_irq(1);
	guest_report(*(volatile u32 *)(USED + 8)); /* used len */

	/* Move the BAR (decoding off while it changes, as an OS does) and go again. */
	cfg_write(0x04, 0);
	cfg_write(0x10, MOVED);
	cfg_write(0x04, 6);
	bar = MOVED;
	GUEST_ASSERT_EQ(C16(0x12), 1); /* num_queues at the new address */
	request(bar + notify + off, 1);
	wait_irq(2);
	guest_report(*(volatile u16 *)(USED + 2));
	guest_report(irq_count);
	return 0;
}
"""


def test_tiny_guest_drives_virtio_pci_with_msix_and_ioeventfd() -> None:
    dev = VirtioRng()
    worker = VirtioWorkers()
    with TinyGuest("long64", irqchip=True) as g:
        pio, mmio = Bus("pio"), Bus("mmio")
        pci = MachinePci(g.vm, g.mem, pio, mmio)
        function = pci.add_virtio(dev)
        worker.add(dev)
        worker.start()
        notify_exits = 0

        def on_exit(exit_: VmExit) -> bool:
            nonlocal notify_exits
            if isinstance(exit_, IoExit) and 0xCF8 <= exit_.port < 0xD00:
                if exit_.is_out:
                    pio.write(exit_.port, exit_.data)
                else:
                    pio.read(exit_.port, exit_.data)
                return True
            if isinstance(exit_, MmioExit) and mmio.find(exit_.phys_addr, exit_.len):
                if (exit_.phys_addr - function.bar_address) & ~0xFFF == 0x3000:
                    notify_exits += 1
                if exit_.is_write:
                    mmio.write(exit_.phys_addr, exit_.data)
                else:
                    mmio.read(exit_.phys_addr, exit_.data)
                return True
            return False

        try:
            symbols = g.load_c(GUEST, [f"-DMOVED={MOVED:#x}ull", f"-DVECTOR={VECTOR:#x}"])
            g.set_idt_entry(VECTOR, symbols["isr"])
            out = g.run(on_exit=on_exit, timeout=120)
        finally:
            worker.close()
            pci.close()
        random = g.mem.read(0x283000, 64)
    dev.close()
    assert out.status == 0
    assert out.reports == [64, 2, 2]  # 64 random bytes; two requests used; two MSIs taken
    assert random != bytes(64)
    assert notify_exits == 0  # both notifications were ioeventfds, at both BAR addresses
    assert function.bar_address == MOVED
    # The route the guest programmed: its GSI carries the entry's message.
    assert pci.router.msi[function.msix.gsis[1]] == (0xFEE0_0000, VECTOR)


def test_guest_stacking_two_bars_is_survived() -> None:
    """A hostile guest moves one function's BAR onto another's: KVM refuses the duplicate
    notify ioeventfds (EEXIST); the VMM keeps running, the first function keeps its own and
    the second falls back to notify exits."""
    with TinyGuest("long64", irqchip=True) as g:
        pio, mmio = Bus("pio"), Bus("mmio")
        pci = MachinePci(g.vm, g.mem, pio, mmio)
        first, second = VirtioRng(), VirtioRng()
        try:
            f1 = pci.add_virtio(first)
            f2 = pci.add_virtio(second)
            assert f2.bar_address != f1.bar_address

            def cfg_write(slot: int, reg: int, value: int) -> None:
                pio.write(0xCF8, memoryview(bytearray((0x8000_0000 | slot << 11 | reg)
                                                      .to_bytes(4, "little"))))
                pio.write(0xCFC, memoryview(bytearray(value.to_bytes(4, "little"))))

            cfg_write(2, 0x10, f1.bar_address)
            assert f2.bar_address == f1.bar_address
            assert f2.mapped and f1.mapped  # both decode; the bus serves the first slot
            # f1's ioeventfds are still registered: registering the same one again fails.
            try:
                g.vm.ioeventfd(first.notify_fds[0], f1.bar_address + 0x3000, 2)
            except OSError as err:
                assert err.errno == 17  # EEXIST
            else:
                raise AssertionError("f1's notify ioeventfd was lost")
            # f2 moved back: its ioeventfd is placed again at its own address.
            cfg_write(2, 0x10, layout.PCI_MMIO_BASE + 0x10_0000)
            try:
                g.vm.ioeventfd(second.notify_fds[0], layout.PCI_MMIO_BASE + 0x10_3000, 2)
            except OSError as err:
                assert err.errno == 17
            else:
                raise AssertionError("f2's notify ioeventfd was not placed")
        finally:
            pci.close()
            first.close()
            second.close()


def test_pci_state_restores_into_a_new_vm() -> None:
    """save() is plain data; restore() into another VM re-creates the BAR placement, the
    MSI routes and the notify ioeventfds there."""
    moved = layout.PCI_MMIO_BASE + 0x30_0000

    def access(bus: Bus, addr: int, value: int) -> None:
        bus.write(addr, memoryview(bytearray(value.to_bytes(4, "little"))))

    with TinyGuest("long64", irqchip=True) as g:
        pio, mmio = Bus("pio"), Bus("mmio")
        pci = MachinePci(g.vm, g.mem, pio, mmio)
        dev = VirtioRng()
        try:
            function = pci.add_virtio(dev)
            access(pio, 0xCF8, 0x8000_0810)  # 00:01.0 BAR0
            access(pio, 0xCFC, moved)
            table = moved + 0x4000
            for offset, value in ((16, 0xFEE0_0000), (24, 0x51), (28, 0)):
                access(mmio, table + offset, value)
            state = function.bar_address, pci.save()
        finally:
            pci.close()
            dev.close()
    assert state[0] == moved
    with TinyGuest("long64", irqchip=True) as g:
        pio, mmio = Bus("pio"), Bus("mmio")
        pci = MachinePci(g.vm, g.mem, pio, mmio)
        dev = VirtioRng()
        try:
            function = pci.add_virtio(dev)
            pci.restore(*state[1])
            assert function.bar_address == moved
            assert pci.router.msi[function.msix.gsis[1]] == (0xFEE0_0000, 0x51)
            try:
                g.vm.ioeventfd(dev.notify_fds[0], moved + 0x3000, 2)
            except OSError as err:
                assert err.errno == 17  # EEXIST: restore placed it
            else:
                raise AssertionError("notify ioeventfd not placed at the restored BAR")
        finally:
            pci.close()
            dev.close()
